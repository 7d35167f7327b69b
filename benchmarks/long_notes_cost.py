"""What reading whole notes costs: seconds per training pass against tokens read.

    .venv/bin/python benchmarks/long_notes_cost.py --json long_cost.json

One hospital's long synthetic notes (``data=synthetic_long``: 240 training notes, median
822 tokens), read as ``truncate`` (the first window) and as ``chunk`` with ``max_chunks``
1, 2, 3, 4 and 16 (all of every note): each reading's tokens read per note (window tokens,
overlap and each window's [CLS]/[SEP] included), non-private and DP-SGD training passes per
second, and the headline figure, **examples per second per 1,000 tokens** (examples/s x
tokens read per note / 1,000: constant where cost grows linearly with tokens). A least-squares
line ``seconds = a + b x tokens`` over the readings shows the fixed and per-token parts.

Every figure is the median of ``--repeats`` timed passes after a warm-up pass, on one model
object, with the product's defaults (bf16 where the CPU has it, length-grouped batches).
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from speed import machine, timed

from clinical_fl.settings.data import DataSettings
from clinical_fl.settings.model import DEFAULT_MODEL_ID, LongNotes, ModelSettings
from clinical_fl.settings.privacy import GradSampleMode
from clinical_fl.settings.train import TrainSettings
from tasks.data.hospital_data import load_hospital_data, source_labels
from tasks.learning.batches import chunking_for, make_loader, token_lengths, tokenize
from tasks.learning.training import train_locally
from tasks.model.build import build_model, load_tokenizer, load_trainable_state, trainable_state
from tasks.model.compute import resolve_compute
from tasks.privacy.dp_sgd import train_with_dp_sgd


def readings(max_chunks: list[int]) -> dict[str, ModelSettings]:
    base = ModelSettings(name_or_path=DEFAULT_MODEL_ID)
    found = {"truncate": replace(base, long_notes=LongNotes.truncate)}
    for cap in max_chunks:
        found[f"chunk, max_chunks={cap}"] = replace(base, long_notes=LongNotes.chunk,
                                                    max_chunks=cap)
    return found


def measure(args: argparse.Namespace) -> dict:
    data_settings = DataSettings(note_length="long")
    labels = source_labels(data_settings)
    train = TrainSettings(batch_size=args.batch_size)
    compute = resolve_compute(train)
    data = load_hospital_data(data_settings, labels, 0, 2)
    first = ModelSettings(name_or_path=DEFAULT_MODEL_ID)
    tokenizer = load_tokenizer(first)
    model = build_model(first, labels, 0, tokenizer).to(compute.device)
    start = trainable_state(model)
    rows = []
    for name, settings in readings(args.max_chunks).items():
        records = tokenize(data.train, tokenizer, settings.max_length, chunking_for(settings))
        tokens = statistics.mean(token_lengths(records))

        def plain(records: object = records) -> None:
            load_trainable_state(model, start)
            train_locally(model, make_loader(records, tokenizer, train.batch_size, shuffle=True,
                                             group_by_length=train.group_by_length),
                          train, compute=compute)

        def private(records: object = records) -> None:
            load_trainable_state(model, start)
            train_with_dp_sgd(model, make_loader(records, tokenizer, train.batch_size,
                                                 shuffle=True), train,
                              noise_multiplier=1.0, max_grad_norm=1.0,
                              grad_sample_mode=GradSampleMode.hooks, history=[],
                              compute=compute)

        row = {"reading": name, "notes": len(records), "tokens_per_note": tokens,
               "plain_seconds": timed(plain, args.repeats)}
        if not args.no_dp:
            row["dp_seconds"] = timed(private, args.repeats)
        for kind in ("plain", "dp"):
            if f"{kind}_seconds" in row:
                rate = len(records) / row[f"{kind}_seconds"]
                row[f"{kind}_examples_per_s"] = rate
                row[f"{kind}_per_1000_tokens"] = rate * tokens / 1000
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"machine": machine(), "compute": compute.describe(), "repeats": args.repeats,
            "batch_size": train.batch_size, "rows": rows, "fits": fits(rows)}


def fits(rows: list[dict]) -> dict:
    """Least squares seconds = a + b * tokens_per_note, per kind of training."""
    found = {}
    for kind in ("plain", "dp"):
        points = [(r["tokens_per_note"], r[f"{kind}_seconds"]) for r in rows
                  if f"{kind}_seconds" in r]
        if len(points) < 2:
            continue
        slope, intercept = statistics.linear_regression(*zip(*points, strict=True))
        found[kind] = {"seconds_fixed": intercept, "seconds_per_1000_tokens": slope * 1000}
    return found


def table(report: dict) -> str:
    lines = ["| reading | tokens read per note | non-private examples/s | per 1,000 tokens "
             "| DP-SGD examples/s | per 1,000 tokens |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        dp = (f"{r['dp_examples_per_s']:.2f} | {r['dp_per_1000_tokens']:.2f}"
              if "dp_seconds" in r else "| ")
        lines.append(f"| {r['reading']} | {r['tokens_per_note']:.0f} | "
                     f"{r['plain_examples_per_s']:.2f} | {r['plain_per_1000_tokens']:.2f} | {dp} |")
    for kind, fit in report["fits"].items():
        lines.append(f"\n{kind}: seconds per pass = {fit['seconds_fixed']:.1f} + "
                     f"{fit['seconds_per_1000_tokens']:.2f} x (thousand tokens per note)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--batch-size", type=int, default=TrainSettings().batch_size)
    parser.add_argument("--max-chunks", type=int, nargs="+", default=[1, 2, 3, 4, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-dp", action="store_true", help="non-private training only")
    args = parser.parse_args()
    report = measure(args)
    print(f"# {report['machine']}; {report['compute']}")
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
