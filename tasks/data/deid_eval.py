"""Scoring de-identification against notes whose PHI spans are known (the synthetic ones).

Per PHI type:
- recall: share of true PHI spans that end up fully inside redacted text. A span
  removed under another placeholder type still counts as removed (nothing leaks),
  so ``typed_recall`` is reported beside it: covered by a span of the same type.
- precision: share of redacted spans of that type that overlap some true PHI.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tasks.data.deid import Deidentifier
from tasks.data.synthetic_notes import PHI_TYPES, SyntheticNote


@dataclass
class TypeScore:
    true_spans: int = 0
    removed: int = 0
    removed_as_type: int = 0
    predicted_spans: int = 0
    predicted_correct: int = 0

    @property
    def recall(self) -> float:
        return self.removed / self.true_spans if self.true_spans else float("nan")

    @property
    def typed_recall(self) -> float:
        return self.removed_as_type / self.true_spans if self.true_spans else float("nan")

    @property
    def precision(self) -> float:
        return (self.predicted_correct / self.predicted_spans if self.predicted_spans
                else float("nan"))


@dataclass
class DeidScores:
    by_type: dict[str, TypeScore] = field(default_factory=dict)
    notes: int = 0
    missed: list[tuple[str, str]] = field(default_factory=list)  # (type, text), first 20

    def table(self) -> str:
        lines = ["| PHI type | true spans | recall | recall (same type) | predicted spans | "
                 "precision |", "|---|---|---|---|---|---|"]
        for kind, s in sorted(self.by_type.items()):
            lines.append(f"| {kind} | {s.true_spans} | {s.recall:.4f} | {s.typed_recall:.4f} "
                         f"| {s.predicted_spans} | {s.precision:.4f} |")
        return "\n".join(lines)


def score_deidentification(notes: Iterable[SyntheticNote],
                           deidentifier: Deidentifier) -> DeidScores:
    scores = DeidScores(by_type={kind: TypeScore() for kind in PHI_TYPES})
    for note in notes:
        scores.notes += 1
        found = deidentifier.find(note.text)
        for start, end, kind in note.phi_spans:
            score = scores.by_type.setdefault(kind, TypeScore())
            score.true_spans += 1
            covering = [f for f in found if f.start <= start and f.end >= end]
            if covering:
                score.removed += 1
                score.removed_as_type += any(f.kind == kind for f in covering)
            elif len(scores.missed) < 20:
                scores.missed.append((kind, note.text[start:end]))
        for span in found:
            score = scores.by_type.setdefault(span.kind, TypeScore())
            score.predicted_spans += 1
            score.predicted_correct += any(span.start < end and start < span.end
                                           for start, end, _ in note.phi_spans)
    return scores
