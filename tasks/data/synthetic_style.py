"""How each synthetic hospital writes its notes, shared by the short and the long notes.

A hospital's style (section headers, abbreviations, record-number and date formats, sign-off)
is a pure function of (hospital, seed), so one hospital writes its short and its long notes
alike and hospitals differ from one another, as real ones do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


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


def abbreviate(text: str, style: HospitalStyle) -> str:
    """``text`` with the hospital's abbreviations, if it abbreviates."""
    if not style.abbreviate:
        return text
    for long, short in (("shortness of breath", "SOB"), ("history of", "h/o"),
                        ("patient", "pt"), ("with", "w/"), ("without", "w/o"),
                        ("blood pressure", "BP"), ("diabetes", "DM")):
        text = text.replace(long, short)
    return text
