"""Recall and precision of de-identification per PHI type on the synthetic notes, and speed.

    .venv/bin/python benchmarks/deid_quality.py --hospitals 8 --notes-per-hospital 250

Every hospital writes in its own style (headers, date and record-number formats,
sign-offs), so several hospitals cover all formats. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

from tasks.config import DeidSettings
from tasks.deid import Deidentifier
from tasks.deid_eval import score_deidentification
from tasks.synthetic_notes import generate_hospital_notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=8)
    parser.add_argument("--notes-per-hospital", type=int, default=250)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--spacy-model", default=None)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
