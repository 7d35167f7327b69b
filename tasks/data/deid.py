"""De-identification inside the hospital: PHI in each note becomes a typed placeholder
([NAME], [DATE], [ID], [PHONE], [ADDRESS], [EMAIL], ...) before tokenization.

Built on Microsoft Presidio (analyzer + anonymizer). Presidio's own recognizers
cover dates, phone numbers, SSNs, IP addresses, bank and card numbers; the
clinical ones it lacks (names by their cue words, record numbers, street
addresses, e-mails without a network lookup) are added here as regular
expressions. By default no language model is needed (a blank spaCy pipeline
tokenizes); with ``deid.spacy_model`` set to an installed spaCy model with NER
(for example ``en_core_web_lg``) Presidio also finds names and places that
carry no cue word. Nothing is downloaded at run time.

Recall and precision per PHI type on the synthetic notes are measured by
``benchmarks/deid_quality.py`` and pinned by tests/test_deid.py.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import datasets

from clinical_fl.settings.data import DeidSettings
from tasks.errors import TaskInputError

# Presidio entity -> our placeholder type.
PLACEHOLDER_TYPES = {
    "PERSON": "NAME", "NAME": "NAME",
    "DATE_TIME": "DATE", "DATE": "DATE",
    "MEDICAL_RECORD_ID": "ID", "US_SSN": "ID", "US_DRIVER_LICENSE": "ID",
    "US_PASSPORT": "ID", "US_ITIN": "ID", "MEDICAL_LICENSE": "ID", "US_BANK_NUMBER": "ID",
    "IBAN_CODE": "ID", "CREDIT_CARD": "ID", "NHS": "ID",
    "PHONE_NUMBER": "PHONE",
    "STREET_ADDRESS": "ADDRESS", "LOCATION": "ADDRESS", "GPE": "ADDRESS",
    "EMAIL_ADDRESS": "EMAIL",
    "IP_ADDRESS": "IP", "URL": "URL",
}

# Unicode letters (Müller), O'Neil, Smith-Jones, initials ("J."); a word followed by ':' is a
# header. Only an initial takes its dot: "Dr. Alice Walker. Crushing pain" ends at "Walker".
_NAME_WORD = r"(?:[A-Z]\.|[A-Z][\w'’\-]*(?![\w:]))"
_NAME = rf"{_NAME_WORD}(?:[ ]{_NAME_WORD}){{0,3}}"
_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|"
          r"Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_STREET_KIND = (r"(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Dr|Boulevard|Blvd|Way|Court|"
                r"Ct|Place|Pl|Terrace|Circle|Parkway|Pkwy|Highway|Hwy)\.?")

# (entity, pattern, group holding the PHI, score). Cue words make names findable
# without a language model; the cue itself stays in the text.
_PATTERNS: list[tuple[str, str, str, float]] = [
    ("NAME", rf"(?:\b(?:Patient|Pt|Name|Patient name|Author|Note author|Attending|Provider|"
             rf"Physician|Nurse|Resident|Referred by|Referring)\s*[:#]\s*)(?P<phi>{_NAME})",
     "phi", 0.85),
    ("NAME", rf"\b(?:Dr|Drs|Mr|Mrs|Ms|Miss|Prof)\.?[ \t]+(?P<phi>{_NAME})", "phi", 0.85),
    ("NAME", rf"\b(?:signed by|dictated by|seen with|seen by|attending|reviewed by|"
             rf"transcribed by)[ \t]+(?:Dr\.?[ \t]+)?(?P<phi>{_NAME})", "phi", 0.8),
    # "Jane Doe, MD"; the short degrees only after a comma ("MAbs NP-2" is an antibody).
    ("NAME", rf"(?P<phi>{_NAME})(?:,?[ \t]+(?:MD|M\.D\.)|,[ \t]*(?:DO|RN|NP|PA-C|PhD))\b",
     "phi", 0.8),
    ("DATE", rf"\b(?P<phi>{_MONTH}[ \t]+\d{{1,2}}(?:st|nd|rd|th)?,?[ \t]+\d{{4}})\b", "phi", 0.9),
    ("DATE", rf"\b(?P<phi>\d{{1,2}}(?:st|nd|rd|th)?[ \t]+{_MONTH},?[ \t]+\d{{4}})\b", "phi", 0.9),
    # One separator throughout: "03/14/1961", not the numeric range "9.6-13".
    ("DATE", r"(?<![\d.])(?P<phi>\d{1,2}([/.\-])\d{1,2}\2(?:\d{4}|\d{2}))(?![\d.]?\d)", "phi",
     0.8),
    ("DATE", r"\b(?P<phi>\d{4}-\d{1,2}-\d{1,2})\b", "phi", 0.9),
    # The cue goes too: "MRN: 12345678" -> "[ID]".
    ("MEDICAL_RECORD_ID",
     r"(?P<phi>\b(?:MRN|MR#|MR\s*No\.?|Medical record(?: number| no\.?| #)?|Pt ID|"
     r"Patient ID|Acct|Account(?: number)?|ID|Chart(?: number)?)\s*[:#]?\s*"
     r"(?=[A-Z0-9\-]*\d)[A-Z0-9][A-Z0-9\-]{3,})\b", "phi", 0.9),
    # Uncued: a long digit string or dashed groups of 7+ digits; not ranges like "250-400" or
    # "1984-1989", which abound in clinical text.
    ("MEDICAL_RECORD_ID", r"(?<![\d.\-])(?P<phi>\d{7,}|(?!(?:19|20)\d\d-(?:19|20)\d\d\b)"
                          r"(?=(?:\d-?){7,})\d{3,}-\d{3,}(?:-\d+)*)(?![\d.]?\d)", "phi", 0.6),
    ("PHONE_NUMBER",
     r"(?P<phi>(?:\+?1[ .\-]?)?(?:\(\d{3}\)[ \t]?|\b\d{3}[ .\-])\d{3}[ .\-]\d{4})\b",
     "phi", 0.85),
    ("EMAIL_ADDRESS", r"\b(?P<phi>[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+)\b", "phi", 0.95),
    ("STREET_ADDRESS",
     rf"\b(?P<phi>\d{{1,6}}[ \t]+(?:[A-Z][\w'\-]*[ \t]+){{1,4}}{_STREET_KIND}"
     rf"(?:,?[ \t]+(?:Apt|Suite|Unit|#)\.?[ \t]*\w+)?"
     rf"(?:,[ \t]*[A-Z][\w'\-]*(?:[ \t]+[A-Z][\w'\-]*){{0,3}})?"
     rf"(?:,?[ \t]*[A-Z]{{2}})?(?:[ \t]+\d{{5}}(?:-\d{{4}})?)?)", "phi", 0.9),
    ("STREET_ADDRESS", r"\b(?P<phi>[A-Z][a-z]+(?:[ \t]+[A-Z][a-z]+)?,[ \t]*[A-Z]{2}[ \t]+\d{5}"
                       r"(?:-\d{4})?)\b", "phi", 0.8),
]

# Presidio recognizers that would reach the network (tldextract fetches a suffix list) or
# duplicate ours; ours cover their entities offline.
_SKIPPED_PRESIDIO = {"EmailRecognizer", "UrlRecognizer"}


@dataclass(frozen=True)
class PhiSpan:
    start: int
    end: int
    kind: str  # placeholder type: NAME, DATE, ...
    score: float


class _RegexRecognizer:
    """A Presidio recognizer whose match group (not the cue word) is the PHI."""

    @staticmethod
    def build(entity: str, patterns: list[tuple[str, str, float]]):
        from presidio_analyzer import EntityRecognizer, RecognizerResult

        compiled = [(re.compile(p), group, score) for p, group, score in patterns]

        class Recognizer(EntityRecognizer):
            def load(self) -> None:  # nothing to load
                pass

            def analyze(self, text, entities, nlp_artifacts=None):  # noqa: ANN001
                found = []
                for pattern, group, score in compiled:
                    for match in pattern.finditer(text):
                        start, end = match.span(group)
                        if end > start:
                            found.append(RecognizerResult(entity, start, end, score))
                return found

        return Recognizer(supported_entities=[entity], name=f"Clinical{entity.title()}",
                          supported_language="en")


class Deidentifier:
    """Finds PHI spans and replaces them with typed placeholders."""

    def __init__(self, settings: DeidSettings) -> None:
        import spacy
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import SpacyNlpEngine

        self.settings = settings
        # Presidio warns once per recognizer of every language it was not asked for.
        logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
        model = settings.spacy_model
        if model and not (spacy.util.is_package(model) or _is_dir(model)):
            raise TaskInputError(
                f"deid.spacy_model='{model}' is not installed (pip install the spaCy model "
                "package, or give its folder); set deid.spacy_model=null to de-identify with "
                "patterns only")

        class _Engine(SpacyNlpEngine):
            def load(self) -> None:  # never download: a blank pipeline or an installed model
                self.nlp = {"en": spacy.load(model) if model else spacy.blank("en")}

        engine = _Engine(models=[{"lang_code": "en", "model_name": model or "blank"}])
        engine.load()
        registry = RecognizerRegistry(supported_languages=["en"])
        registry.load_predefined_recognizers(nlp_engine=engine, languages=["en"])
        for recognizer in list(registry.recognizers):
            if recognizer.name in _SKIPPED_PRESIDIO:
                registry.remove_recognizer(recognizer.name)
        by_entity: dict[str, list[tuple[str, str, float]]] = {}
        for entity, pattern, group, score in _PATTERNS:
            by_entity.setdefault(entity, []).append((pattern, group, score))
        for entity, patterns in by_entity.items():
            registry.add_recognizer(_RegexRecognizer.build(entity, patterns))
        self._analyzer = AnalyzerEngine(nlp_engine=engine, registry=registry,
                                        supported_languages=["en"])

    def find(self, text: str) -> list[PhiSpan]:
        """PHI spans, overlaps merged (the widest span wins), left to right."""
        results = self._analyzer.analyze(text=text, language="en",
                                         score_threshold=self.settings.score_threshold)
        spans = sorted((r for r in results if r.entity_type in PLACEHOLDER_TYPES),
                       key=lambda r: (r.start, -(r.end - r.start)))
        merged: list[PhiSpan] = []
        for r in spans:
            kind = PLACEHOLDER_TYPES[r.entity_type]
            if merged and r.start < merged[-1].end:
                last = merged[-1]
                if r.end > last.end:  # extend; keep the type of the more confident span
                    merged[-1] = PhiSpan(last.start, r.end,
                                         kind if r.score > last.score else last.kind,
                                         max(r.score, last.score))
                continue
            merged.append(PhiSpan(r.start, r.end, kind, r.score))
        return merged

    def redact(self, text: str) -> str:
        """The text with every PHI span replaced by its placeholder, e.g. [NAME]."""
        pieces, cursor = [], 0
        for span in self.find(text):
            pieces.append(text[cursor:span.start])
            pieces.append(f"[{span.kind}]")
            cursor = span.end
        pieces.append(text[cursor:])
        return "".join(pieces)

    def redact_all(self, texts: list[str]) -> list[str]:
        return [self.redact(t) for t in texts]


def _is_dir(path: str) -> bool:
    from pathlib import Path

    return Path(path).expanduser().is_dir()


_CACHE: dict[tuple, Deidentifier] = {}


def deidentifier(settings: DeidSettings) -> Deidentifier:
    """One Deidentifier per settings and process (building it loads spaCy and Presidio)."""
    key = (settings.spacy_model, settings.score_threshold)
    if key not in _CACHE:
        _CACHE[key] = Deidentifier(settings)
    return _CACHE[key]


def deidentify_records(records: datasets.Dataset, settings: DeidSettings) -> datasets.Dataset:
    """The records with their text column de-identified (unchanged when deid is off)."""
    if not settings.enabled or len(records) == 0:
        return records
    redactor = deidentifier(settings)
    texts = redactor.redact_all(records["text"])
    return records.remove_columns("text").add_column("text", texts)
