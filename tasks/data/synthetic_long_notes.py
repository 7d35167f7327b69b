"""Real-length synthetic notes (``data.note_length=long``): a full history and physical.

The short notes (synthetic_notes.py) are 100-180 tokens, so the model's 256-token window
always reads all of them. Real notes run to hundreds or thousands of tokens, and what decides
the case is spread through them. These notes follow a full H&P, 400-1,500 MiniLM tokens:
identifiers, chief complaint, a history that opens with the presenting complaint (which, as
in the short notes, often points at a lookalike specialty) and grows with interval history,
past medical and surgical history, medications, allergies, family and social history, a
review of systems, the exam, results, and an assessment and plan. The deciding evidence (the
owning specialty's positive review of systems, exam finding, result, diagnosis and plan) sits
mostly in the sections after the medications, typically past the first 256 tokens. The PHI
types and their recorded spans are those of the short notes, so de-identification is
measured the same way.
"""

from __future__ import annotations

import random

from tasks.data.synthetic_phi import (
    FIRST_NAMES,
    LAST_NAMES,
    NoteBuilder,
    SyntheticNote,
    fake_address,
    fake_date,
    write_contact_and_signoff,
    write_identifiers,
)
from tasks.data.synthetic_style import HospitalStyle, abbreviate

# The vocabulary of the short notes too, so both kinds of notes speak of the same cases.
from tasks.data.synthetic_vocabulary import (
    COMORBIDITIES,
    COMPLAINTS,
    DIAGNOSES,
    EXAM,
    GENERIC_EXAM,
    GENERIC_PLANS,
    GENERIC_SYMPTOMS,
    LOOKALIKES,
    PLANS,
    SYMPTOMS,
)

_MEDICATIONS = (
    "lisinopril 10 mg daily", "atorvastatin 40 mg nightly", "metformin 500 mg twice daily",
    "aspirin 81 mg daily", "omeprazole 20 mg daily", "levothyroxine 75 mcg daily",
    "amlodipine 5 mg daily", "sertraline 50 mg daily", "albuterol inhaler as needed",
    "gabapentin 300 mg at bedtime", "hydrochlorothiazide 25 mg daily",
    "vitamin D 1000 units daily", "acetaminophen 500 mg as needed for pain",
    "melatonin 3 mg at night", "fluticasone nasal spray daily", "calcium carbonate 500 mg daily",
    "losartan 50 mg daily", "tamsulosin 0.4 mg daily", "montelukast 10 mg nightly",
    "cetirizine 10 mg daily",
)
_ALLERGIES = ("no known drug allergies", "penicillin (rash)", "sulfa drugs (hives)",
              "codeine (nausea)", "latex", "no known allergies")
_SURGERIES = ("appendectomy", "cholecystectomy", "right knee arthroscopy", "cesarean section",
              "tonsillectomy as a child", "inguinal hernia repair", "cataract surgery",
              "no prior surgeries")
_FAMILY = ("father with coronary disease in his sixties", "mother with type 2 diabetes",
           "sister with hypothyroidism", "no family history of sudden death",
           "brother with asthma", "grandmother with stroke", "family history otherwise "
           "noncontributory")
_SOCIAL = ("works as a school teacher", "retired postal worker", "works night shifts in a "
           "warehouse", "never smoker", "former smoker, quit ten years ago",
           "drinks alcohol socially", "no illicit drug use", "walks thirty minutes most days",
           "lives with spouse", "lives alone and is independent in daily activities")
_INTERVAL = (
    "Symptoms have been present on and off and the patient kept a diary at our request.",
    "There was a visit to urgent care in the interval where no definite cause was found.",
    "The patient has been adherent to the medications listed below.",
    "Sleep has been fragmented and appetite is somewhat reduced.",
    "No recent illness among household contacts was reported.",
    "Prior records were reviewed and are summarized in this note.",
    "The patient is accompanied by a family member who helps with the history.",
    "Over the counter remedies gave partial relief at best.",
    "There were no recent changes in diet, travel or exercise routine.",
    "The patient is worried about missing work because of these symptoms.",
)
# (system, what is said when negative)
_ROS = (("Constitutional", "no fevers, chills or night sweats"),
        ("Eyes", "no visual changes"), ("ENT", "no sore throat or hearing loss"),
        ("Cardiovascular", "no chest pain or palpitations"),
        ("Respiratory", "no cough or wheeze"), ("Gastrointestinal", "no abdominal pain, "
         "nausea or change in bowel habits"), ("Genitourinary", "no dysuria or hematuria"),
        ("Musculoskeletal", "no joint pain or swelling"), ("Skin", "no rashes"),
        ("Neurological", "no headache, weakness or numbness"),
        ("Psychiatric", "mood stable"), ("Endocrine", "no heat or cold intolerance"),
        ("Hematologic", "no easy bruising"))
_EXAM_SYSTEMS = (("General", "well developed, in no acute distress"),
                 ("HEENT", "normocephalic, moist mucous membranes"),
                 ("Neck", "supple, no lymphadenopathy"),
                 ("Cardiovascular", "regular rate and rhythm, no murmurs"),
                 ("Lungs", "clear to auscultation bilaterally"),
                 ("Abdomen", "soft, nontender, nondistended"),
                 ("Extremities", "no edema"), ("Skin", "warm and dry"),
                 ("Neurological", "alert, cranial nerves intact, strength symmetric"),
                 ("Musculoskeletal", "full range of motion in all joints"),
                 ("Psychiatric", "appropriate mood and affect"))
_NORMAL_LABS = ("sodium 139 mmol/L", "potassium 4.2 mmol/L", "creatinine 0.9 mg/dL",
                "hemoglobin 13.8 g/dL", "white cell count 6.4", "platelets 251",
                "ALT 22 U/L", "AST 19 U/L", "glucose 98 mg/dL", "calcium 9.4 mg/dL",
                "albumin 4.1 g/dL", "BUN 14 mg/dL")
_RESULTS: dict[str, tuple[str, ...]] = {
    "cardiology": ("troponin mildly elevated at 0.06 ng/mL", "BNP 840 pg/mL",
                   "ECG with atrial fibrillation at 112 beats per minute",
                   "echocardiogram with ejection fraction of 35 percent"),
    "pulmonology": ("chest x-ray with right lower lobe consolidation",
                    "FEV1/FVC ratio 0.62 on spirometry", "D-dimer 1.9 mg/L",
                    "CT chest with bibasilar reticular opacities"),
    "gastroenterology": ("lipase 410 U/L", "hemoglobin 9.1 g/dL with low ferritin",
                         "ultrasound with gallstones and a thickened gallbladder wall",
                         "H. pylori stool antigen positive"),
    "neurology": ("MRI with a small left frontal diffusion restricting lesion",
                  "EEG with left temporal sharp waves",
                  "nerve conduction study with length dependent axonal neuropathy",
                  "carotid duplex with 60 percent left stenosis"),
    "endocrinology": ("HbA1c 9.4 percent", "TSH below 0.01 with elevated free T4",
                      "morning cortisol 2.1 mcg/dL", "fasting glucose 212 mg/dL"),
    "orthopedics": ("knee MRI with a medial meniscus tear",
                    "lumbar x-ray with L5-S1 disc space narrowing",
                    "hip x-ray with joint space loss and osteophytes",
                    "ultrasound with a partial rotator cuff tear"),
}
_ROS_POSITIVE: dict[str, str] = {
    "cardiology": "Cardiovascular", "pulmonology": "Respiratory",
    "gastroenterology": "Gastrointestinal", "neurology": "Neurological",
    "endocrinology": "Endocrine", "orthopedics": "Musculoskeletal",
}

# Where each specialty's exam finding is written.
_EXAM_SYSTEM: dict[str, str] = {
    "cardiology": "Cardiovascular", "pulmonology": "Lungs", "gastroenterology": "Abdomen",
    "neurology": "Neurological", "endocrinology": "Extremities",
    "orthopedics": "Musculoskeletal",
}

_SECTIONS = ("Chief Complaint", "History of Present Illness", "Past Medical History",
             "Past Surgical History", "Medications", "Allergies", "Family History",
             "Social History", "Review of Systems", "Physical Exam", "Results",
             "Assessment and Plan")


def _header(style: HospitalStyle, name: str) -> str:
    return "\n" + (name.upper() if style.uppercase_headers else name) + ":\n"


def write_long_note(rng: random.Random, label: str, hospital: int, style: HospitalStyle,
                    labels: tuple[str, ...]) -> SyntheticNote:
    """One full-length note of ``label``'s case in ``style``; PHI spans recorded.

    The sections are written in the order of an H&P, each drawing from ``rng`` in turn, so the
    note is a pure function of the generator's state.
    """
    lookalikes = [s for s in LOOKALIKES.get(label, ()) if s in labels] or [label]
    presenting = rng.choice(lookalikes) if rng.random() < 0.35 else label
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    age, sex = rng.randint(19, 92), rng.choice(("male", "female"))
    b = NoteBuilder()
    write_identifiers(b, rng, style, first, last)

    complaint = rng.choice(COMPLAINTS[presenting])
    b.add(_header(style, _SECTIONS[0]) + abbreviate(complaint, style) + "\n")
    _write_history(b, rng, style, label, presenting, f"{age} year old {sex}", complaint)
    _write_earlier_visits(b, rng, style)
    comorbid = _write_background(b, rng, style)
    # The rest carries the case: positive review of systems, findings, results, assessment.
    _write_review_of_systems(b, rng, style, label)
    _write_exam(b, rng, style, label, presenting)
    _write_results(b, rng, style, label)
    _write_assessment_and_plan(b, rng, style, label, labels, comorbid)
    write_contact_and_signoff(b, rng, style, first, last)
    return SyntheticNote(text=b.text(), label=label, hospital=hospital, phi_spans=b.spans)


def _write_history(b: NoteBuilder, rng: random.Random, style: HospitalStyle, label: str,
                   presenting: str, patient: str, complaint: str) -> None:
    # The presenting complaint first, the case's own evidence only sometimes.
    hpi = [f"{patient} seen today for {complaint}.",
           f"Reports {rng.choice(SYMPTOMS[presenting])}."]
    hpi += [f"Also notes {s}." for s in rng.sample(GENERIC_SYMPTOMS, k=rng.randint(2, 4))]
    hpi += rng.sample(_INTERVAL, k=rng.randint(2, 8))
    if rng.random() < 0.3:
        hpi.insert(rng.randint(2, len(hpi)), f"Mentions {rng.choice(SYMPTOMS[label])}.")
    b.add(_header(style, _SECTIONS[1]) + abbreviate(" ".join(hpi), style) + " Last seen on ")
    b.add_phi(fake_date(rng, style.date_format, 2019, 2025), "DATE")
    b.add(".\n")


def _write_earlier_visits(b: NoteBuilder, rng: random.Random, style: HospitalStyle) -> None:
    # None for most notes, several for a long tail of long notes.
    for _ in range(rng.choices((0, 1, 2, 4, 6), weights=(35, 25, 15, 15, 10))[0]):
        b.add("On ")
        b.add_phi(fake_date(rng, style.date_format, 2015, 2024), "DATE")
        visit = rng.sample(_INTERVAL, k=rng.randint(3, 5))
        visit.append(f"At that time reported {rng.choice(GENERIC_SYMPTOMS)}.")
        b.add(", " + abbreviate(" ".join(visit), style) + "\n")


def _write_background(b: NoteBuilder, rng: random.Random, style: HospitalStyle) -> list[str]:
    """Past medical and surgical history, medications, allergies, family and social history;
    returns the comorbidities, which the problem list takes up again."""
    comorbid = rng.sample(COMORBIDITIES, k=rng.randint(2, 5))
    b.add(_header(style, _SECTIONS[2]) + abbreviate(
        "\n".join(f"- {c}, diagnosed {rng.randint(2, 25)} years ago" for c in comorbid),
        style) + "\n")
    b.add(_header(style, _SECTIONS[3]) + "; ".join(rng.sample(_SURGERIES, k=rng.randint(1, 3)))
          + "\n")
    meds = rng.sample(_MEDICATIONS, k=rng.randint(3, 16))
    b.add(_header(style, _SECTIONS[4]) + "\n".join(f"- {m}" for m in meds) + "\n")
    b.add(_header(style, _SECTIONS[5]) + rng.choice(_ALLERGIES) + "\n")
    b.add(_header(style, _SECTIONS[6]) + "; ".join(rng.sample(_FAMILY, k=rng.randint(1, 3)))
          + "\n")
    social = "; ".join(rng.sample(_SOCIAL, k=rng.randint(2, 4)))
    if rng.random() < 0.5:
        b.add(_header(style, _SECTIONS[7]) + abbreviate(social, style) + ". Lives at ")
        b.add_phi(fake_address(rng), "ADDRESS")
        b.add(".\n")
    else:
        b.add(_header(style, _SECTIONS[7]) + abbreviate(social, style) + ".\n")
    return comorbid


def _write_review_of_systems(b: NoteBuilder, rng: random.Random, style: HospitalStyle,
                             label: str) -> None:
    positive = _ROS_POSITIVE[label] if rng.random() < 0.6 else None
    ros = rng.sample(_ROS, k=rng.randint(9, len(_ROS)))
    lines = []
    for system, negative in ros:
        if system == positive:
            lines.append(f"{system}: positive for {rng.choice(SYMPTOMS[label])}")
        else:
            lines.append(f"{system}: {negative}")
    b.add(_header(style, _SECTIONS[8]) + abbreviate("\n".join(lines), style) + "\n")


def _write_exam(b: NoteBuilder, rng: random.Random, style: HospitalStyle, label: str,
                presenting: str) -> None:
    vitals = (f"BP {rng.randint(104, 168)}/{rng.randint(60, 98)}, HR {rng.randint(54, 118)}, "
              f"RR {rng.randint(12, 22)}, T {rng.choice(('36.6', '36.9', '37.2', '37.8'))}, "
              f"SpO2 {rng.randint(90, 99)}%")
    exam = [f"Vitals: {vitals}"]
    systems = rng.sample(_EXAM_SYSTEMS, k=rng.randint(7, len(_EXAM_SYSTEMS)))
    abnormal = _EXAM_SYSTEM[label] if rng.random() < 0.7 else None
    if abnormal and abnormal not in (name for name, _ in systems):
        systems.append((abnormal, ""))
    for system, normal in systems:
        exam.append(f"{system}: {rng.choice(EXAM[label]) if system == abnormal else normal}")
    if rng.random() < 0.3:
        exam.append(f"Also noted: {rng.choice(EXAM[presenting])}")
    exam.append(f"Overall: {', '.join(rng.sample(GENERIC_EXAM, k=2))}")
    b.add(_header(style, _SECTIONS[9]) + abbreviate("\n".join(exam), style) + "\n")


def _write_results(b: NoteBuilder, rng: random.Random, style: HospitalStyle,
                   label: str) -> None:
    results = [f"- {lab}" for lab in rng.sample(_NORMAL_LABS, k=rng.randint(5, 12))]
    if rng.random() < 0.65:
        results.insert(rng.randint(0, len(results)), f"- {rng.choice(_RESULTS[label])}")
    b.add(_header(style, _SECTIONS[10]) + "\n".join(results) + "\n")


def _write_assessment_and_plan(b: NoteBuilder, rng: random.Random, style: HospitalStyle,
                               label: str, labels: tuple[str, ...],
                               comorbid: list[str]) -> None:
    roll = rng.random()
    if roll < 0.55:
        assessment = f"1. {rng.choice(DIAGNOSES[label])}."
    elif roll < 0.75:
        other = rng.choice([s for s in labels if s != label] or [label])
        pair = [rng.choice(DIAGNOSES[label]), rng.choice(DIAGNOSES[other])]
        rng.shuffle(pair)
        assessment = f"1. Differential includes {pair[0]} versus {pair[1]}."
    else:
        assessment = "1. Etiology unclear at this time, workup in progress."
    plans = rng.sample(GENERIC_PLANS, k=rng.randint(2, 4))
    if rng.random() < 0.55:
        plans.append(rng.choice(PLANS[label]))
    rng.shuffle(plans)
    problems = [assessment, f"   Plan: {'; '.join(plans)}."]
    # The comorbidities from the history, each its own problem.
    for n, condition in enumerate(c for c in comorbid if c != "no significant history"):
        problems.append(f"{n + 2}. {condition}: stable, continue current management.")
    b.add(_header(style, _SECTIONS[11]) + abbreviate("\n".join(problems), style) + "\n")
