"""Side by side on one machine: examples per second of non-private training, DP-SGD training
and evaluation, in three columns, and (``--default-run``) the wall time of the default run.

    .venv/bin/python benchmarks/speed.py --json speed.json                  # the table
    .venv/bin/python benchmarks/speed.py --json speed.json --default-run    # + flwr run, twice

Columns:
- ``baseline``: what the PEFT and Opacus tutorials give: float32, every note padded to
  ``max_length``, batches in random order, evaluation under ``no_grad`` at the training batch
  size;
- ``before``: the product before issue 14, which stays selectable: ``train.precision=fp32
  train.group_by_length=false`` (float32, each batch padded to its longest note);
- ``new``: the product's defaults (``train.precision=auto``: bf16 on CPUs with native bf16,
  float32 on CUDA, or ``--precision``; length-grouped batches; evaluation under
  ``inference_mode`` at ``train.eval_batch_size``).

Every figure is the median over ``--repeats`` timed passes after one warm-up pass, all on the
same model object, records and hardware. DP-SGD uses Poisson sampling at the same expected
batch size (examples/s counts the expected records per pass). Run it on an otherwise idle
machine; it prints the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from clinical_fl.settings.data import DataSettings, DeidSettings
from clinical_fl.settings.model import DEFAULT_MODEL_ID, ModelSettings
from clinical_fl.settings.privacy import GradSampleMode
from clinical_fl.settings.train import Device, Precision, TrainSettings
from tasks.data.hospital_data import load_hospital_data, source_labels
from tasks.learning.batches import make_loader, tokenize
from tasks.learning.evaluation import evaluate
from tasks.learning.training import train_locally
from tasks.model.build import (
    build_model,
    load_tokenizer,
    load_trainable_state,
    trainable_state,
)
from tasks.model.compute import Compute, resolve_compute
from tasks.privacy.dp_sgd import train_with_dp_sgd

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("baseline", "before", "new")
WORKLOADS = ("non-private training", "DP-SGD training", "evaluation")


@dataclass
class Column:
    compute: Compute
    pad_to_max_length: bool
    group_by_length: bool
    eval_batch_size: int
    eval_no_grad: bool  # the tutorials' torch.no_grad instead of inference_mode


def columns(train: TrainSettings, device: Device) -> dict[str, Column]:
    fp32 = resolve_compute(replace(train, precision=Precision.fp32, device=device))
    new = resolve_compute(replace(train, device=device))
    return {
        "baseline": Column(fp32, True, False, train.batch_size, True),
        "before": Column(fp32, False, False, train.eval_batch_size, False),
        "new": Column(new, False, train.group_by_length, train.eval_batch_size, False),
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        name = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = name.group(1) if name else cpu
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


def loader(records: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int,
           column: Column, shuffle: bool, max_length: int) -> DataLoader:
    if column.pad_to_max_length:
        collate = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=max_length)
        return DataLoader(records.with_format("torch"), batch_size=batch_size, shuffle=shuffle,
                          collate_fn=collate, generator=torch.Generator().manual_seed(0))
    return make_loader(records, tokenizer, batch_size, shuffle=shuffle, seed=0,
                       group_by_length=column.group_by_length)


def timed(run: Callable[[], None], repeats: int) -> float:
    run()  # warm-up: allocator, oneDNN kernels, Opacus hooks
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(args: argparse.Namespace) -> dict:
    model_settings = ModelSettings(name_or_path=args.model, max_length=args.max_length)
    data_settings = DataSettings(notes_per_hospital=args.notes_per_hospital,
                                 deid=DeidSettings(enabled=not args.no_deid))
    train = TrainSettings(batch_size=args.batch_size, precision=Precision(args.precision))
    if args.eval_batch_size:
        train = replace(train, eval_batch_size=args.eval_batch_size)
    labels = source_labels(data_settings)
    tokenizer = load_tokenizer(model_settings)
    model = build_model(model_settings, labels, 0, tokenizer)
    data = load_hospital_data(data_settings, labels, 0, 2)
    train_records = tokenize(data.train, tokenizer, args.max_length)
    eval_records = tokenize(data.eval, tokenizer, args.max_length)
    if args.eval_copies > 1:  # a held-out split big enough to time
        eval_records = datasets.concatenate_datasets([eval_records] * args.eval_copies)
    start = trainable_state(model)
    device = Device(args.device)
    if args.eval_batch_sizes:
        return eval_batch_sweep(args, model, tokenizer, eval_records, len(labels), train, device)
    results: dict[str, dict[str, float]] = {workload: {} for workload in WORKLOADS}
    chosen = {}
    for name, column in columns(train, device).items():
        model.to(column.compute.device)
        chosen[name] = column.compute.describe()
        n = len(train_records)

        def plain(column: Column = column) -> None:
            load_trainable_state(model, start)
            train_locally(model, loader(train_records, tokenizer, train.batch_size, column, True,
                                        args.max_length), train, compute=column.compute)

        def private(column: Column = column) -> None:
            load_trainable_state(model, start)
            train_with_dp_sgd(model, loader(train_records, tokenizer, train.batch_size, column,
                                            True, args.max_length), train,
                              noise_multiplier=1.0, max_grad_norm=1.0,
                              grad_sample_mode=GradSampleMode.hooks, history=[],
                              compute=column.compute)

        def scoring(column: Column = column) -> None:
            batches = loader(eval_records, tokenizer, column.eval_batch_size, column, False,
                             args.max_length)
            if column.eval_no_grad:
                with torch.no_grad():
                    model.eval()
                    for batch in column.compute.batches(batches):
                        model(**batch)
            else:
                evaluate(model, batches, len(labels), column.compute)

        results["non-private training"][name] = n / timed(plain, args.repeats)
        results["DP-SGD training"][name] = n / timed(private, args.repeats)
        results["evaluation"][name] = len(eval_records) / timed(scoring, args.repeats)
        print(f"# {name}: {chosen[name]}: " + ", ".join(
            f"{w} {results[w][name]:.1f}" for w in WORKLOADS), flush=True)
    return {"machine": machine(), "model": args.model, "records": len(train_records),
            "eval_records": len(eval_records), "batch_size": train.batch_size,
            "eval_batch_size": train.eval_batch_size, "max_length": args.max_length,
            "repeats": args.repeats, "compute": chosen, "examples_per_second": results}


def eval_batch_sweep(args: argparse.Namespace, model: torch.nn.Module,
                     tokenizer: PreTrainedTokenizerBase, records: datasets.Dataset,
                     num_labels: int, train: TrainSettings, device: Device) -> dict:
    """The new column's evaluation only, at each of ``--eval-batch-sizes``, interleaved."""
    compute = columns(train, device)["new"].compute
    model.to(compute.device)
    sizes = [int(size) for size in args.eval_batch_sizes.split(",")]

    def scoring(size: int) -> float:
        began = time.perf_counter()
        evaluate(model, make_loader(records, tokenizer, size, shuffle=False,
                                    group_by_length=train.group_by_length),
                 num_labels, compute)
        return len(records) / (time.perf_counter() - began)

    scoring(sizes[0])  # warm-up
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(args.repeats):
        for size in sizes:
            rates[size].append(scoring(size))
    medians = {size: statistics.median(values) for size, values in rates.items()}
    print(f"# {machine()}; evaluation of {len(records)} notes, {compute.describe()}")
    for size, rate in medians.items():
        print(f"eval batch {size:>4}: {rate:8.1f} examples/s")
    return {"machine": machine(), "compute": compute.describe(),
            "eval_examples_per_second": medians}


def default_run(overrides: str) -> float:
    """Wall time of ``bash scripts/run.sh`` (setup already done), with extra overrides."""
    command = ["bash", "scripts/run.sh"]
    if overrides:
        command += ["--run-config", f"overrides='{overrides}'"]
    began = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def table(report: dict) -> str:
    rates = report["examples_per_second"]
    lines = ["| examples/s | baseline | before | new | new/before | new/baseline |",
             "|---|---|---|---|---|---|"]
    for workload in WORKLOADS:
        r = rates[workload]
        lines.append(f"| {workload} | {r['baseline']:.1f} | {r['before']:.1f} | {r['new']:.1f} "
                     f"| {r['new'] / r['before']:.2f}x | {r['new'] / r['baseline']:.2f}x |")
    dp_cost = {c: rates["non-private training"][c] / rates["DP-SGD training"][c]
               for c in COLUMNS}
    lines.append("| DP-SGD time per example / non-private | "
                 + " | ".join(f"{dp_cost[c]:.2f}x" for c in COLUMNS) + " | | |")
    if "default_run_seconds" in report:
        runs = report["default_run_seconds"]
        lines.append(f"| default run (`bash scripts/run.sh`), s | | {runs['before']:.0f} | "
                     f"{runs['new']:.0f} | {runs['before'] / runs['new']:.2f}x | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--model", default=DEFAULT_MODEL_ID)
    parser.add_argument("--notes-per-hospital", type=int, default=300,
                        help="the default run's (240 training, 60 held-out notes)")
    parser.add_argument("--batch-size", type=int, default=TrainSettings().batch_size)
    parser.add_argument("--eval-batch-size", type=int, default=0,
                        help="0: train.eval_batch_size's default")
    parser.add_argument("--eval-batch-sizes", metavar="N,N,...",
                        help="only the new column's evaluation, at each of these batch sizes")
    parser.add_argument("--eval-copies", type=int, default=4,
                        help="the held-out split repeated, for a longer timed pass")
    parser.add_argument("--max-length", type=int, default=ModelSettings().max_length)
    parser.add_argument("--device", choices=[d.value for d in Device], default="auto")
    parser.add_argument("--precision", choices=[p.value for p in Precision], default="auto",
                        help="the new column's train.precision")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-deid", action="store_true",
                        help="skip de-identification (where Presidio is not installed)")
    parser.add_argument("--default-run", action="store_true",
                        help="also time the default run with the before and new settings")
    args = parser.parse_args()

    report = measure(args)
    if args.eval_batch_sizes:
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return
    if args.default_run:
        report["default_run_seconds"] = {
            "before": default_run("train.precision=fp32 train.group_by_length=false"),
            "new": default_run("")}
    print(f"# {report['machine']}; {report['model']}, {report['records']} training notes, "
          f"batch {report['batch_size']}, max_length {report['max_length']}, "
          f"median of {report['repeats']}")
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
