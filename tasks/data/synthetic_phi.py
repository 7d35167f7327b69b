"""Fake PHI in synthetic notes, and the record of where it was written.

Both kinds of notes (synthetic_notes.py, synthetic_long_notes.py) write the same PHI types
through ``NoteBuilder``, which records each one's character span, so de-identification is
measured against the same ground truth whatever the note's length.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tasks.data.synthetic_style import HospitalStyle

PHI_TYPES: tuple[str, ...] = ("NAME", "DATE", "ID", "PHONE", "ADDRESS", "EMAIL")

FIRST_NAMES = ("James", "Maria", "Robert", "Linda", "Michael", "Aisha", "David", "Chen",
               "Sofia", "Omar", "Emily", "Kwame", "Olga", "Raj", "Hannah", "Luis",
               "Fatima", "Peter", "Yuki", "Grace", "Ivan", "Nadia", "Samuel", "Elena")
LAST_NAMES = ("Smith", "Garcia", "Johnson", "Nguyen", "Okafor", "Kowalski", "Patel",
              "Müller", "Rossi", "Haddad", "Andersson", "Tanaka", "Brown", "O'Neill",
              "Silva", "Cohen", "Ivanova", "Mensah", "Dubois", "Larsen", "Kim", "Novak")
_STREETS = ("Maple Street", "Oak Avenue", "Pine Road", "Cedar Lane", "Elm Drive",
            "Harbor Boulevard", "Mill Road", "Church Street", "Sunset Avenue")
_CITIES = (("Springfield", "IL"), ("Riverton", "WY"), ("Fairview", "OR"), ("Georgetown", "TX"),
           ("Madison", "WI"), ("Clinton", "NY"), ("Salem", "MA"), ("Franklin", "TN"))
_MONTHS = ("January", "February", "March", "April", "May", "June", "July",
           "August", "September", "October", "November", "December")
_EMAIL_DOMAINS = ("mail.com", "example.org", "inbox.net", "post.com")


@dataclass
class SyntheticNote:
    """One generated note with its label and the spans of the PHI written into it."""

    text: str
    label: str
    hospital: int
    phi_spans: list[tuple[int, int, str]] = field(default_factory=list)


class NoteBuilder:
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


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(n))


def fake_date(rng: random.Random, fmt: str, year_lo: int, year_hi: int) -> str:
    """A date between the years, written in the hospital's date format ``fmt``."""
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


def fake_address(rng: random.Random) -> str:
    """A street address with city, state and ZIP code."""
    city, state = rng.choice(_CITIES)
    return f"{rng.randint(10, 9999)} {rng.choice(_STREETS)}, {city}, {state} {_digits(rng, 5)}"


def write_identifiers(b: NoteBuilder, rng: random.Random, style: HospitalStyle, first: str,
                      last: str) -> None:
    """The note's first lines: name, date of birth, record number, visit date (all PHI)."""
    b.add("Patient: ")
    b.add_phi(f"{first} {last}", "NAME")
    b.add("  DOB: ")
    b.add_phi(fake_date(rng, style.date_format, 1932, 2005), "DATE")
    b.add("  ")
    b.add_phi(_fake_mrn(rng, style.mrn_format), "ID")
    b.add("\nVisit date: ")
    b.add_phi(fake_date(rng, style.date_format, 2021, 2026), "DATE")
    b.add("\n")


def write_contact_and_signoff(b: NoteBuilder, rng: random.Random, style: HospitalStyle,
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
    doctor = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    before, after = style.signoff.split("{doc}")
    b.add(before)
    b.add_phi(doctor, "NAME")
    b.add(after)
