"""Built-in synthetic clinical notes: the offline default data set.

Every note is shaped like a real outpatient consult (chief complaint, history,
exam, assessment, plan) and labelled with the specialty that owns the case.
The generator is deliberately *not* trivially separable:

- presentations overlap (chest pain is cardiology, pulmonology or GI);
- a share of notes never names the diagnosis ("etiology unclear");
- some assessments list a differential that names another specialty;
- a small share of labels is miscoded, as in real registries.

Each hospital has its own writing style (section headers, abbreviations,
sign-off) and its own case mix (a Dirichlet draw), so hospitals are non-IID.

Fake PHI (names, dates, MRNs, phones, addresses, e-mails) is written into
every note and its character spans are returned, so de-identification can be
measured against ground truth.  Everything is a pure function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SPECIALTIES: tuple[str, ...] = (
    "cardiology",
    "pulmonology",
    "gastroenterology",
    "neurology",
    "endocrinology",
    "orthopedics",
)

PHI_TYPES: tuple[str, ...] = ("NAME", "DATE", "ID", "PHONE", "ADDRESS", "EMAIL")

# Which specialties present alike: a case of the key specialty is sometimes
# written up with the complaints and symptoms of one of these.
_LOOKALIKES: dict[str, tuple[str, ...]] = {
    "cardiology": ("pulmonology", "gastroenterology", "endocrinology"),
    "pulmonology": ("cardiology", "gastroenterology"),
    "gastroenterology": ("cardiology", "endocrinology"),
    "neurology": ("cardiology", "orthopedics", "endocrinology"),
    "endocrinology": ("neurology", "cardiology", "gastroenterology"),
    "orthopedics": ("neurology", "endocrinology"),
}

_COMPLAINTS: dict[str, tuple[str, ...]] = {
    "cardiology": ("chest pain", "palpitations", "shortness of breath on exertion",
                   "leg swelling", "near fainting", "chest tightness"),
    "pulmonology": ("cough", "shortness of breath", "wheezing", "chest tightness",
                    "coughing up blood", "chest pain when breathing"),
    "gastroenterology": ("abdominal pain", "heartburn", "chest pain after meals",
                         "blood in stool", "nausea and vomiting", "difficulty swallowing"),
    "neurology": ("headache", "dizziness", "numbness in the hands", "episodes of confusion",
                  "weakness on one side", "near fainting"),
    "endocrinology": ("fatigue", "weight loss", "excessive thirst", "palpitations",
                      "tingling in the feet", "heat intolerance"),
    "orthopedics": ("low back pain", "knee pain", "shoulder pain", "numbness in the hands",
                    "hip pain", "ankle swelling after a fall"),
}

_SYMPTOMS: dict[str, tuple[str, ...]] = {
    "cardiology": ("pressure-like discomfort radiating to the left arm",
                   "symptoms worse with stairs and relieved by rest",
                   "orthopnea requiring two pillows", "intermittent racing heartbeat",
                   "bilateral ankle edema by evening", "episodes of lightheadedness"),
    "pulmonology": ("productive cough with yellow sputum", "wheezing at night",
                    "dyspnea that worsens in cold air", "pleuritic pain on deep inspiration",
                    "long history of smoking", "low grade fevers for a week"),
    "gastroenterology": ("burning epigastric pain after large meals", "bloating and early satiety",
                         "dark tarry stools", "intermittent diarrhea",
                         "pain worse lying flat after dinner", "loss of appetite"),
    "neurology": ("throbbing unilateral headache with light sensitivity",
                  "spinning sensation when turning the head", "transient word-finding difficulty",
                  "tingling that follows no clear pattern", "episodes of lightheadedness",
                  "unsteady gait over several weeks"),
    "endocrinology": ("polyuria and nocturia", "unintentional weight change",
                      "tremor and heat intolerance", "burning pain in both feet",
                      "intermittent racing heartbeat", "feeling tired all day"),
    "orthopedics": ("pain worse with weight bearing", "stiffness in the morning",
                    "swelling after a twisting injury", "pain radiating down the leg",
                    "reduced range of motion", "tingling in the fingers at night"),
}

_GENERIC_SYMPTOMS: tuple[str, ...] = (
    "mild fatigue", "poor sleep", "no fevers or chills", "occasional nausea",
    "stress at work", "no recent travel", "symptoms for about three weeks",
    "tried over the counter medication without relief",
)

_EXAM: dict[str, tuple[str, ...]] = {
    "cardiology": ("irregularly irregular rhythm", "grade 2/6 systolic murmur",
                   "jugular venous distension", "pitting edema to mid shin"),
    "pulmonology": ("scattered expiratory wheezes", "crackles at the right base",
                    "decreased breath sounds on the left", "oxygen saturation 91% on room air"),
    "gastroenterology": ("epigastric tenderness", "hepatomegaly", "positive Murphy sign",
                         "hyperactive bowel sounds"),
    "neurology": ("left pronator drift", "nystagmus on lateral gaze",
                  "decreased sensation in a stocking distribution", "positive Romberg sign"),
    "endocrinology": ("enlarged nontender thyroid", "fine tremor of outstretched hands",
                      "acanthosis nigricans", "decreased monofilament sensation in the feet"),
    "orthopedics": ("joint line tenderness", "positive straight leg raise",
                    "painful arc on abduction", "effusion of the right knee"),
}

_GENERIC_EXAM: tuple[str, ...] = (
    "alert and oriented", "no acute distress", "vital signs within normal limits",
    "mildly elevated blood pressure", "well appearing", "afebrile",
)

_DIAGNOSES: dict[str, tuple[str, ...]] = {
    "cardiology": ("stable angina", "atrial fibrillation",
                   "heart failure with reduced ejection fraction",
                   "hypertensive heart disease", "aortic stenosis"),
    "pulmonology": ("asthma exacerbation", "COPD", "community acquired pneumonia",
                    "pulmonary embolism", "interstitial lung disease"),
    "gastroenterology": ("gastroesophageal reflux disease", "peptic ulcer disease",
                         "biliary colic", "irritable bowel syndrome", "upper GI bleed"),
    "neurology": ("migraine without aura", "transient ischemic attack", "peripheral neuropathy",
                  "benign paroxysmal positional vertigo", "focal seizure"),
    "endocrinology": ("type 2 diabetes mellitus", "hyperthyroidism", "hypothyroidism",
                      "adrenal insufficiency", "diabetic neuropathy"),
    "orthopedics": ("lumbar radiculopathy", "medial meniscus tear", "rotator cuff tendinopathy",
                    "carpal tunnel syndrome", "osteoarthritis of the hip"),
}

_PLANS: dict[str, tuple[str, ...]] = {
    "cardiology": ("echocardiogram", "exercise stress test", "start a beta blocker",
                   "Holter monitor for 48 hours", "lipid panel and troponin"),
    "pulmonology": ("chest x-ray", "pulmonary function tests", "inhaled corticosteroid",
                    "CT angiogram of the chest", "sputum culture"),
    "gastroenterology": ("upper endoscopy", "proton pump inhibitor trial",
                         "right upper quadrant ultrasound",
                         "colonoscopy", "H. pylori breath test"),
    "neurology": ("MRI of the brain", "EEG", "nerve conduction study",
                  "start a triptan as needed", "carotid duplex"),
    "endocrinology": ("HbA1c and fasting glucose", "TSH and free T4", "start metformin",
                      "morning cortisol level", "diabetic foot exam referral"),
    "orthopedics": ("MRI of the knee", "physical therapy referral", "lumbar spine x-ray",
                    "corticosteroid injection", "wrist splint at night"),
}

_GENERIC_PLANS: tuple[str, ...] = (
    "basic metabolic panel", "follow up in two weeks", "return precautions reviewed",
    "continue current medications", "complete blood count", "lifestyle counselling",
)

_COMORBIDITIES: tuple[str, ...] = (
    "hypertension", "hyperlipidemia", "type 2 diabetes", "obesity", "depression",
    "hypothyroidism", "asthma", "osteoarthritis", "GERD", "no significant history",
)

_FIRST_NAMES = ("James", "Maria", "Robert", "Linda", "Michael", "Aisha", "David", "Chen",
                "Sofia", "Omar", "Emily", "Kwame", "Olga", "Raj", "Hannah", "Luis",
                "Fatima", "Peter", "Yuki", "Grace", "Ivan", "Nadia", "Samuel", "Elena")
_LAST_NAMES = ("Smith", "Garcia", "Johnson", "Nguyen", "Okafor", "Kowalski", "Patel",
               "Müller", "Rossi", "Haddad", "Andersson", "Tanaka", "Brown", "O'Neill",
               "Silva", "Cohen", "Ivanova", "Mensah", "Dubois", "Larsen", "Kim", "Novak")
_STREETS = ("Maple Street", "Oak Avenue", "Pine Road", "Cedar Lane", "Elm Drive",
            "Harbor Boulevard", "Mill Road", "Church Street", "Sunset Avenue")
_CITIES = (("Springfield", "IL"), ("Riverton", "WY"), ("Fairview", "OR"), ("Georgetown", "TX"),
           ("Madison", "WI"), ("Clinton", "NY"), ("Salem", "MA"), ("Franklin", "TN"))
_MONTHS = ("January", "February", "March", "April", "May", "June", "July",
           "August", "September", "October", "November", "December")
_EMAIL_DOMAINS = ("mail.com", "example.org", "inbox.net", "post.com")


@dataclass(frozen=True)
class HospitalStyle:
    """How one hospital writes its notes."""

    headers: tuple[str, str, str, str, str, str]  # CC, HPI, PMH, exam, assessment, plan
    abbreviate: bool
    mrn_format: str
    date_format: str
    signoff: str
    uppercase_headers: bool


_HEADER_SETS = (
    ("Chief Complaint", "History of Present Illness", "Past Medical History",
     "Physical Exam", "Assessment", "Plan"),
    ("CC", "HPI", "PMH", "Exam", "A", "P"),
    ("Reason for visit", "History", "Medical history", "Examination",
     "Impression", "Recommendations"),
    ("Presenting complaint", "Subjective", "Background", "Objective",
     "Assessment", "Plan"),
)
_MRN_FORMATS = ("MRN: {d8}", "MR# {L2}-{d6}", "Medical record number {d7}", "Pt ID {d4}-{d4b}")
_DATE_FORMATS = ("us", "iso", "long", "eu")
_SIGNOFFS = ("Electronically signed by Dr. {doc}", "Dictated by {doc}, MD",
             "Seen with attending Dr. {doc}", "Note author: {doc}")


@dataclass
class SyntheticNote:
    """One generated note with its label and the spans of the PHI written into it."""

    text: str
    label: str
    hospital: int
    phi_spans: list[tuple[int, int, str]] = field(default_factory=list)


class _NoteBuilder:
    """Concatenates note text while recording where PHI was written."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._length = 0
        self.spans: list[tuple[int, int, str]] = []

    def add(self, text: str) -> None:
        self._parts.append(text)
        self._length += len(text)

    def add_phi(self, text: str, phi_type: str) -> None:
        self.spans.append((self._length, self._length + len(text), phi_type))
        self.add(text)

    def text(self) -> str:
        return "".join(self._parts)


def hospital_style(hospital: int, seed: int) -> HospitalStyle:
    """The writing style of a hospital: a pure function of (hospital, seed)."""
    rng = random.Random(f"style-{seed}-{hospital}")
    return HospitalStyle(
        headers=rng.choice(_HEADER_SETS),
        abbreviate=rng.random() < 0.5,
        mrn_format=rng.choice(_MRN_FORMATS),
        date_format=rng.choice(_DATE_FORMATS),
        signoff=rng.choice(_SIGNOFFS),
        uppercase_headers=rng.random() < 0.3,
    )


def hospital_case_mix(hospital: int, seed: int, alpha: float,
                      labels: tuple[str, ...] = SPECIALTIES) -> list[float]:
    """The label distribution of a hospital: a Dirichlet(alpha) draw."""
    rng = random.Random(f"mix-{seed}-{hospital}")
    draws = [rng.gammavariate(alpha, 1.0) for _ in labels]
    total = sum(draws) or 1.0
    # A floor keeps every specialty present everywhere, as in real hospitals.
    floored = [max(d / total, 0.03) for d in draws]
    norm = sum(floored)
    return [p / norm for p in floored]


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(n))


def _fake_date(rng: random.Random, fmt: str, year_lo: int, year_hi: int) -> str:
    year, month, day = rng.randint(year_lo, year_hi), rng.randint(1, 12), rng.randint(1, 28)
    if fmt == "us":
        return f"{month:02d}/{day:02d}/{year}"
    if fmt == "iso":
        return f"{year}-{month:02d}-{day:02d}"
    if fmt == "eu":
        return f"{day:02d}.{month:02d}.{year}"
    return f"{_MONTHS[month - 1]} {day}, {year}"


def _fake_mrn(rng: random.Random, fmt: str) -> str:
    letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2))
    return fmt.format(d8=_digits(rng, 8), d7=_digits(rng, 7), d6=_digits(rng, 6),
                      d4=_digits(rng, 4), d4b=_digits(rng, 4), L2=letters)


def _fake_phone(rng: random.Random) -> str:
    a, b, c = rng.randint(201, 989), rng.randint(200, 999), _digits(rng, 4)
    return rng.choice((f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}"))


def _fake_address(rng: random.Random) -> str:
    city, state = rng.choice(_CITIES)
    return f"{rng.randint(10, 9999)} {rng.choice(_STREETS)}, {city}, {state} {_digits(rng, 5)}"


def _header(style: HospitalStyle, index: int) -> str:
    name = style.headers[index]
    return (name.upper() if style.uppercase_headers else name) + ": "


def _abbreviate(text: str, style: HospitalStyle) -> str:
    if not style.abbreviate:
        return text
    for long, short in (("shortness of breath", "SOB"), ("history of", "h/o"),
                        ("patient", "pt"), ("with", "w/"), ("without", "w/o"),
                        ("blood pressure", "BP"), ("diabetes", "DM")):
        text = text.replace(long, short)
    return text


def write_identifiers(b: _NoteBuilder, rng: random.Random, style: HospitalStyle, first: str,
                      last: str) -> None:
    """The note's first lines: name, date of birth, record number, visit date (all PHI)."""
    b.add("Patient: ")
    b.add_phi(f"{first} {last}", "NAME")
    b.add("  DOB: ")
    b.add_phi(_fake_date(rng, style.date_format, 1932, 2005), "DATE")
    b.add("  ")
    b.add_phi(_fake_mrn(rng, style.mrn_format), "ID")
    b.add("\nVisit date: ")
    b.add_phi(_fake_date(rng, style.date_format, 2021, 2026), "DATE")
    b.add("\n")


def write_contact_and_signoff(b: _NoteBuilder, rng: random.Random, style: HospitalStyle,
                              first: str, last: str) -> None:
    """The note's last lines: a phone number, sometimes an e-mail, the author (all PHI)."""
    b.add("Call ")
    b.add_phi(_fake_phone(rng), "PHONE")
    b.add(" with questions")
    if rng.random() < 0.25:
        b.add(" or write to ")
        email_user = f"{first.lower()}.{last.lower().replace(chr(39), '')}{rng.randint(1, 99)}"
        b.add_phi(f"{email_user}@{rng.choice(_EMAIL_DOMAINS)}", "EMAIL")
    b.add(".\n")
    doctor = f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"
    before, after = style.signoff.split("{doc}")
    b.add(before)
    b.add_phi(doctor, "NAME")
    b.add(after)


def _write_note(rng: random.Random, label: str, hospital: int,
                style: HospitalStyle, labels: tuple[str, ...]) -> SyntheticNote:
    # A lookalike presentation makes the complaint point at another specialty.
    lookalikes = [s for s in _LOOKALIKES.get(label, ()) if s in labels] or [label]
    presenting = rng.choice(lookalikes) if rng.random() < 0.35 else label
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    age = rng.randint(19, 92)
    sex = rng.choice(("male", "female"))
    b = _NoteBuilder()

    write_identifiers(b, rng, style, first, last)

    complaint = rng.choice(_COMPLAINTS[presenting])
    b.add(_header(style, 0) + _abbreviate(complaint, style) + "\n")

    symptoms = [rng.choice(_SYMPTOMS[presenting])]
    if rng.random() < 0.6:
        extra = rng.choice(_SYMPTOMS[label])
        if extra not in symptoms:
            symptoms.append(extra)
    symptoms += rng.sample(_GENERIC_SYMPTOMS, k=rng.randint(1, 2))
    rng.shuffle(symptoms)
    opener = rng.choice((f"{age} year old {sex} presents with {complaint}.",
                         f"{age}yo {sex} referred for {complaint}.",
                         f"This is a {age} year old {sex} seen today for {complaint}."))
    hpi = opener + " Reports " + ", ".join(symptoms) + "."
    if rng.random() < 0.3:
        hpi += " Lives at "
        b.add(_header(style, 1) + _abbreviate(hpi, style))
        b.add_phi(_fake_address(rng), "ADDRESS")
        b.add(".\n")
    else:
        b.add(_header(style, 1) + _abbreviate(hpi, style) + "\n")

    pmh = rng.sample(_COMORBIDITIES, k=rng.randint(1, 3))
    b.add(_header(style, 2) + _abbreviate(", ".join(pmh), style) + "\n")

    findings = rng.sample(_GENERIC_EXAM, k=2)
    if rng.random() < 0.6:
        findings.append(rng.choice(_EXAM[label]))
    if rng.random() < 0.3:
        findings.append(rng.choice(_EXAM[presenting]))
    rng.shuffle(findings)
    b.add(_header(style, 3) + _abbreviate(", ".join(findings), style) + ".\n")

    roll = rng.random()
    if roll < 0.55:
        assessment = f"Consistent with {rng.choice(_DIAGNOSES[label])}."
    elif roll < 0.75:
        other = rng.choice([s for s in labels if s != label] or [label])
        pair = [rng.choice(_DIAGNOSES[label]), rng.choice(_DIAGNOSES[other])]
        rng.shuffle(pair)
        assessment = f"Differential includes {pair[0]} versus {pair[1]}."
    else:
        assessment = rng.choice(("Etiology unclear at this time.", "Symptoms under evaluation.",
                                 "Likely multifactorial, workup in progress."))
    b.add(_header(style, 4) + assessment + "\n")

    plans = rng.sample(_GENERIC_PLANS, k=rng.randint(1, 2))
    if rng.random() < 0.55:
        plans.append(rng.choice(_PLANS[label]))
    rng.shuffle(plans)
    b.add(_header(style, 5) + _abbreviate("; ".join(plans), style) + ". ")
    write_contact_and_signoff(b, rng, style, first, last)
    return SyntheticNote(text=b.text(), label=label, hospital=hospital, phi_spans=b.spans)


def hospital_sizes(num_hospitals: int, notes_per_hospital: int, size_skew: float,
                   seed: int) -> list[int]:
    """Number of notes per hospital; size_skew > 0 draws log-normal sizes of the same mean."""
    if size_skew <= 0:
        return [notes_per_hospital] * num_hospitals
    rng = random.Random(f"sizes-{seed}")
    weights = [rng.lognormvariate(0.0, size_skew) for _ in range(num_hospitals)]
    mean = sum(weights) / num_hospitals
    return [max(1, round(notes_per_hospital * w / mean)) if notes_per_hospital else 0
            for w in weights]


def generate_hospital_notes(hospital: int, num_notes: int, seed: int,
                            label_skew_alpha: float = 1.0, label_noise: float = 0.08,
                            labels: tuple[str, ...] = SPECIALTIES,
                            length: str = "short") -> list[SyntheticNote]:
    """Notes of one hospital, in its style and case mix; deterministic for the seed.
    ``length="long"``: full-length notes (synthetic_long_notes.py) of the same cases."""
    if length not in ("short", "long"):
        raise ValueError(f"length={length!r}: expected 'short' or 'long'")
    unknown = [name for name in labels if name not in _DIAGNOSES]
    if unknown:
        raise ValueError(f"synthetic notes know no specialty {unknown}; choose from {SPECIALTIES}")
    style = hospital_style(hospital, seed)
    mix = hospital_case_mix(hospital, seed, label_skew_alpha, labels)
    write = _write_note
    if length == "long":
        from tasks.data.synthetic_long_notes import write_long_note as write
    rng = random.Random(f"notes-{seed}-{hospital}" + ("-long" if length == "long" else ""))
    notes = []
    for _ in range(num_notes):
        label = rng.choices(labels, weights=mix, k=1)[0]
        note = write(rng, label, hospital, style, labels)
        # Miscoded records: the text stays, the label is another specialty.
        if rng.random() < label_noise:
            note.label = rng.choice([s for s in labels if s != label] or [label])
        notes.append(note)
    return notes
