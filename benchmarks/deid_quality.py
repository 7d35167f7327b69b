"""Recall and precision of de-identification per PHI type on the synthetic notes, and speed.

    .venv/bin/python benchmarks/deid_quality.py --hospitals 8 --notes-per-hospital 250
    .venv/bin/python benchmarks/deid_quality.py --real-text ~/.cache/clinical-fl/ohsumed_ma5.parquet

Every hospital writes in its own style (headers, date and record-number formats,
sign-offs), so several hospitals cover all formats. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

from clinical_fl.settings.data import DeidSettings
from tasks.data.deid import Deidentifier
from tasks.data.deid_eval import score_deidentification
from tasks.data.synthetic_notes import generate_hospital_notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=8)
    parser.add_argument("--notes-per-hospital", type=int, default=250)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--spacy-model", default=None)
    parser.add_argument("--real-text", default=None,
                        help="a Parquet file with a 'text' column and no PHI (e.g. the OHSUMED "
                             "table): every finding there is a false positive")
    args = parser.parse_args()
    if args.real_text:
        false_positives(args.real_text, args.spacy_model)
        return
    notes = [note for hospital in range(args.hospitals)
             for note in generate_hospital_notes(hospital, args.notes_per_hospital, args.seed,
                                                 1.0, 0.0)]
    began = time.perf_counter()
    deidentifier = Deidentifier(DeidSettings(spacy_model=args.spacy_model))
    built = time.perf_counter()
    scores = score_deidentification(notes, deidentifier)
    seconds = time.perf_counter() - built
    print(f"{scores.notes} notes from {args.hospitals} hospitals (seed {args.seed}), "
          f"spaCy model: {args.spacy_model or 'none (patterns only)'}")
    print(scores.table())
    print(f"setup {built - began:.1f} s; {scores.notes / seconds:.0f} notes/s "
          f"({1000 * seconds / scores.notes:.1f} ms per note)")
    for kind, text in scores.missed:
        print(f"missed {kind}: {text!r}")


def false_positives(path: str, spacy_model: str | None) -> None:
    from collections import Counter
    from pathlib import Path

    import pandas as pd

    texts = pd.read_parquet(Path(path).expanduser(), columns=["text"])["text"].tolist()
    deidentifier = Deidentifier(DeidSettings(spacy_model=spacy_model))
    began = time.perf_counter()
    kinds, examples, changed = Counter(), {}, 0
    for text in texts:
        spans = deidentifier.find(text)
        changed += bool(spans)
        for span in spans:
            kinds[span.kind] += 1
            examples.setdefault(span.kind, []).append(text[span.start:span.end])
    seconds = time.perf_counter() - began
    print(f"{len(texts)} texts from {path}: {changed} ({changed / len(texts):.1%}) changed, "
          f"{sum(kinds.values())} spans redacted; {len(texts) / seconds:.0f} texts/s")
    for kind, count in kinds.most_common():
        print(f"  {kind}: {count}  e.g. {examples[kind][:5]}")


if __name__ == "__main__":
    main()
