"""What a fresh hospital process pays before it can train: in deployment every message is
served by a new ClientApp process, so this is paid per message.

    .venv/bin/python benchmarks/message_startup.py          # median of 3 fresh processes

Prints the seconds of each stage, as the ClientApp meets them: imports, the tokenizer, the
model (base + head + LoRA), the hospital's records (read, partitioned, de-identified), and
their tokenization.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

STAGES = ("imports", "tokenizer", "model", "records", "tokenization")


def one_process() -> dict[str, float]:
    """Run in the child: time each stage once."""
    seconds = {}
    began = time.perf_counter()
    from clinical_fl.settings.data import DataSettings
    from clinical_fl.settings.model import ModelSettings
    from tasks.data.hospital_data import load_hospital_data, source_labels
    from tasks.learning.batches import tokenize
    from tasks.model.build import build_model, load_tokenizer
    seconds["imports"] = time.perf_counter() - began

    def stage(name: str, work):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        result = work()
        seconds[name] = time.perf_counter() - start
        return result

    model, data = ModelSettings(), DataSettings()
    labels = source_labels(data)
    tokenizer = stage("tokenizer", lambda: load_tokenizer(model))
    stage("model", lambda: build_model(model, labels, 42, tokenizer))
    records = stage("records", lambda: load_hospital_data(data, labels, 0, 2))
    stage("tokenization", lambda: (tokenize(records.train, tokenizer, model.max_length),
                                   tokenize(records.eval, tokenizer, model.max_length)))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_process()))
        return
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, __file__, "--child"], check=True,
                             capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    for stage in STAGES:
        print(f"{stage:<14} {statistics.median(r[stage] for r in runs):6.2f} s")
    print(f"{'total':<14} {statistics.median(sum(r.values()) for r in runs):6.2f} s")


if __name__ == "__main__":
    main()
