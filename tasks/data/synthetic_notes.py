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

The words (synthetic_vocabulary.py), the hospitals' styles (synthetic_style.py) and the fake
PHI (synthetic_phi.py) are shared with the long notes (synthetic_long_notes.py); this module
writes the short notes and generates either kind.
"""

from __future__ import annotations

import random

from tasks.data.synthetic_long_notes import write_long_note
from tasks.data.synthetic_phi import (
    FIRST_NAMES,
    LAST_NAMES,
    PHI_TYPES,
    NoteBuilder,
    SyntheticNote,
    fake_address,
    write_contact_and_signoff,
    write_identifiers,
)
from tasks.data.synthetic_style import HospitalStyle, abbreviate, hospital_style
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
    SPECIALTIES,
    SYMPTOMS,
)

# Callers import the whole synthetic-notes API from here, wherever its parts now live.
__all__ = [
    "PHI_TYPES",
    "SPECIALTIES",
    "HospitalStyle",
    "SyntheticNote",
    "generate_hospital_notes",
    "hospital_case_mix",
    "hospital_sizes",
    "hospital_style",
]


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


def _header(style: HospitalStyle, index: int) -> str:
    name = style.headers[index]
    return (name.upper() if style.uppercase_headers else name) + ": "


def _write_note(rng: random.Random, label: str, hospital: int,
                style: HospitalStyle, labels: tuple[str, ...]) -> SyntheticNote:
    # A lookalike presentation makes the complaint point at another specialty.
    lookalikes = [s for s in LOOKALIKES.get(label, ()) if s in labels] or [label]
    presenting = rng.choice(lookalikes) if rng.random() < 0.35 else label
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    age = rng.randint(19, 92)
    sex = rng.choice(("male", "female"))
    b = NoteBuilder()

    write_identifiers(b, rng, style, first, last)

    complaint = rng.choice(COMPLAINTS[presenting])
    b.add(_header(style, 0) + abbreviate(complaint, style) + "\n")

    symptoms = [rng.choice(SYMPTOMS[presenting])]
    if rng.random() < 0.6:
        extra = rng.choice(SYMPTOMS[label])
        if extra not in symptoms:
            symptoms.append(extra)
    symptoms += rng.sample(GENERIC_SYMPTOMS, k=rng.randint(1, 2))
    rng.shuffle(symptoms)
    opener = rng.choice((f"{age} year old {sex} presents with {complaint}.",
                         f"{age}yo {sex} referred for {complaint}.",
                         f"This is a {age} year old {sex} seen today for {complaint}."))
    hpi = opener + " Reports " + ", ".join(symptoms) + "."
    if rng.random() < 0.3:
        hpi += " Lives at "
        b.add(_header(style, 1) + abbreviate(hpi, style))
        b.add_phi(fake_address(rng), "ADDRESS")
        b.add(".\n")
    else:
        b.add(_header(style, 1) + abbreviate(hpi, style) + "\n")

    pmh = rng.sample(COMORBIDITIES, k=rng.randint(1, 3))
    b.add(_header(style, 2) + abbreviate(", ".join(pmh), style) + "\n")

    findings = rng.sample(GENERIC_EXAM, k=2)
    if rng.random() < 0.6:
        findings.append(rng.choice(EXAM[label]))
    if rng.random() < 0.3:
        findings.append(rng.choice(EXAM[presenting]))
    rng.shuffle(findings)
    b.add(_header(style, 3) + abbreviate(", ".join(findings), style) + ".\n")

    roll = rng.random()
    if roll < 0.55:
        assessment = f"Consistent with {rng.choice(DIAGNOSES[label])}."
    elif roll < 0.75:
        other = rng.choice([s for s in labels if s != label] or [label])
        pair = [rng.choice(DIAGNOSES[label]), rng.choice(DIAGNOSES[other])]
        rng.shuffle(pair)
        assessment = f"Differential includes {pair[0]} versus {pair[1]}."
    else:
        assessment = rng.choice(("Etiology unclear at this time.", "Symptoms under evaluation.",
                                 "Likely multifactorial, workup in progress."))
    b.add(_header(style, 4) + assessment + "\n")

    plans = rng.sample(GENERIC_PLANS, k=rng.randint(1, 2))
    if rng.random() < 0.55:
        plans.append(rng.choice(PLANS[label]))
    rng.shuffle(plans)
    b.add(_header(style, 5) + abbreviate("; ".join(plans), style) + ". ")
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
    unknown = [name for name in labels if name not in DIAGNOSES]
    if unknown:
        raise ValueError(f"synthetic notes know no specialty {unknown}; choose from {SPECIALTIES}")
    style = hospital_style(hospital, seed)
    mix = hospital_case_mix(hospital, seed, label_skew_alpha, labels)
    write = write_long_note if length == "long" else _write_note
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
