"""Examples per second of local training: non-private against DP-SGD in each Opacus
per-sample-gradient mode, on the same model, records and batch size.

    .venv/bin/python benchmarks/dp_sgd_throughput.py                  # default MiniLM
    .venv/bin/python benchmarks/dp_sgd_throughput.py --repeats 3 --records 240

Prints one line per mode: median examples/s over the repeats, and the ratio to
non-private training. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from clinical_fl.settings.data import DataSettings
from clinical_fl.settings.model import ModelSettings
from clinical_fl.settings.privacy import GradSampleMode
from clinical_fl.settings.train import TrainSettings
from tasks.data.hospital_data import load_hospital_data, source_labels
from tasks.learning.batches import make_loader, tokenize
from tasks.learning.training import train_locally
from tasks.model.build import (
    DEFAULT_MODEL_ID,
    build_model,
    load_tokenizer,
    load_trainable_state,
    trainable_state,
)
from tasks.privacy.dp_sgd import train_with_dp_sgd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL_ID)
    parser.add_argument("--records", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model_settings = ModelSettings(name_or_path=args.model, max_length=args.max_length)
    data_settings = DataSettings(notes_per_hospital=int(args.records / 0.8) + 1)
    labels = source_labels(data_settings)
    tokenizer = load_tokenizer(model_settings)
    model = build_model(model_settings, labels, 0, tokenizer)
    data = load_hospital_data(data_settings, labels, 0, 2)
    records = tokenize(data.train.select(range(min(args.records, len(data.train)))), tokenizer,
                       args.max_length)
    start = trainable_state(model)
    train = TrainSettings(batch_size=args.batch_size)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model}; "
          f"{len(records)} records, batch {args.batch_size}, max_length {args.max_length}")

    def run(mode: GradSampleMode | None) -> float:
        load_trainable_state(model, start)
        loader = make_loader(records, tokenizer, args.batch_size, shuffle=True, seed=0)
        began = time.perf_counter()
        if mode is None:
            train_locally(model, loader, train)
        else:
            train_with_dp_sgd(model, loader, train, noise_multiplier=1.0, max_grad_norm=1.0,
                              grad_sample_mode=mode, history=[])
        return len(records) / (time.perf_counter() - began)  # Poisson: same expected count

    modes: list[GradSampleMode | None] = [None, *GradSampleMode]
    results = {}
    for mode in modes:
        name = "non-private" if mode is None else f"dp-sgd {mode.value}"
        try:
            run(mode)  # warm-up
            results[name] = statistics.median(run(mode) for _ in range(args.repeats))
        except Exception as err:  # a mode that cannot run this model is reported, not hidden
            print(f"{name:<20} failed: {type(err).__name__}: {str(err)[:200]}")
            continue
        base = results.get("non-private", results[name])
        print(f"{name:<20} {results[name]:8.1f} examples/s   {results[name] / base:5.2f}x "
              "non-private")


if __name__ == "__main__":
    main()
