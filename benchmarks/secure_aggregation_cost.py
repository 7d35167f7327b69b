"""Secure aggregation's cost on the default run: round time, bytes and accuracy per mode.

Runs ``bash scripts/run.sh`` (the default run: 2 hospitals, MiniLM, 4 rounds) once per mode
and repeat, interleaved, into the default MLflow store (mlruns/, where the UI shows them side
by side, tagged with their mode), and reads back what each run logged:

    python benchmarks/secure_aggregation_cost.py [--repeats 2] [--json out.json] [--update-range]

``--update-range`` also trains one default round in process for each hospital and prints the
largest value of its weighted update (what SecAgg+'s clipping_range must cover).
``--ckks-values N`` only times CKKS at the default parameters on N values (two hospitals):
ciphertexts, bytes, encryption, the server's sum, decryption, error.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from clinical_fl.settings.tracking import TrackingSettings
from clinical_fl.tracking.run_tracker import default_store

ROOT = Path(__file__).resolve().parent.parent
MODES = ("none", "secagg_plus", "ckks")
ROUND_METRICS = ("round/seconds", "comm/bytes_sent", "comm/bytes_received",
                 "secure_aggregation/stage_seconds", "secure_aggregation/server_seconds",
                 "secure_aggregation/stage_bytes", "secure_aggregation/update_bytes",
                 "secure_aggregation/hospital_seconds_max")


def one_run(mode: str, extra: str) -> dict:
    overrides = f"secure_aggregation={mode} {extra}".strip()
    began = time.perf_counter()
    out = subprocess.run(["bash", "scripts/run.sh", "--run-config", f"overrides='{overrides}'"],
                         cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - began
    client = MlflowClient(default_store(ROOT)[0])
    experiment = client.get_experiment_by_name(TrackingSettings().experiment)
    run = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"],
                             max_results=1)[0]
    assert run.data.tags.get("secure_aggregation") == mode, run.info.run_id
    rounds = int(run.data.params["num_rounds"])

    def series(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    per_round = {key: [series(key).get(r) for r in range(1, rounds + 1)]
                 for key in ROUND_METRICS}
    return {"mode": mode, "run_id": run.info.run_id, "wall_s": wall, "rounds": rounds,
            "per_round": per_round, "federated_accuracy": series("federated/accuracy")[rounds],
            "central_accuracy": series("central/accuracy").get(rounds),
            "clipped_warnings": (out.stdout + out.stderr).count("were clipped")}


def median_round(runs: list[dict], key: str) -> float | None:
    values = [v for run in runs for v in run["per_round"][key] if v is not None]
    return statistics.median(values) if values else None


def update_range(hospitals: int = 2) -> list[float]:
    """The largest |value| of each hospital's weighted update after one default round."""
    import sys

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from composed_settings import compose

    from tasks.hospital import Hospital
    from tasks.model.build import trainable_state

    composed = compose([], hospitals)
    members = [Hospital(composed.task, composed.labels, k, hospitals) for k in range(hospitals)]
    start = trainable_state(members[0].model)
    largest = []
    for hospital in members:
        new, _ = hospital.train(start, 1)
        largest.append(max(float(np.abs(new[k].numpy() - start[k].numpy()).max())
                           for k in start))
    return largest


def ckks_cost(values: int, repeats: int = 3) -> dict:
    import tempfile

    import numpy as np

    from clinical_fl.secure_aggregation import ckks

    with tempfile.TemporaryDirectory() as directory:
        secret_path, public_path = ckks.generate_key_material(Path(directory))
        key = ckks.load_secret_context(secret_path, "benchmark")
        server = ckks.load_public_context(public_path.read_bytes(), "benchmark")
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.05, values) for _ in range(2)]
    timings: dict[str, list[float]] = {"encrypt_s": [], "sum_s": [], "decrypt_s": []}
    for _ in range(repeats):
        began = time.perf_counter()
        encrypted = [ckks.encrypt(key, u) for u in updates]
        timings["encrypt_s"].append((time.perf_counter() - began) / 2)
        began = time.perf_counter()
        total = ckks.add(server, encrypted)
        timings["sum_s"].append(time.perf_counter() - began)
        began = time.perf_counter()
        decrypted = ckks.decrypt(key, total, values)
        timings["decrypt_s"].append(time.perf_counter() - began)
    return {"values": values, "ciphertexts": len(encrypted[0]),
            "bytes_per_hospital": sum(len(c) for c in encrypted[0]),
            **{k: statistics.median(v) for k, v in timings.items()},
            "max_error": float(np.abs(decrypted - (updates[0] + updates[1])).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--overrides", default="", help="more Hydra overrides for every run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--update-range", action="store_true")
    parser.add_argument("--ckks-values", type=int, default=0)
    args = parser.parse_args()
    if args.ckks_values:
        print(json.dumps(ckks_cost(args.ckks_values), indent=2))
        return
    runs = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            runs[mode].append(one_run(mode, args.overrides))
            print(f"{mode}: {runs[mode][-1]['wall_s']:.0f} s", flush=True)
    base = median_round(runs["none"], "round/seconds")
    print(f"# {platform.processor() or platform.machine()}, {args.repeats} repeat(s), "
          f"median over rounds 1-{runs['none'][0]['rounds']}")
    print("| mode | round s | vs none | crypto stages s | server crypto s | hospital crypto s "
          "| bytes received/round | bytes sent/round | federated acc | central acc | run s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        r = runs[mode]

        def fmt(key: str, scale: float = 1.0, digits: int = 2, r: list[dict] = r) -> str:
            value = median_round(r, key)
            return "-" if value is None else f"{value / scale:.{digits}f}"

        acc = statistics.mean(x["federated_accuracy"] for x in r)
        central = statistics.mean(x["central_accuracy"] for x in r)
        print(f"| {mode} | {fmt('round/seconds')} | "
              f"{median_round(r, 'round/seconds') / base:.2f}x | "
              f"{fmt('secure_aggregation/stage_seconds')} | "
              f"{fmt('secure_aggregation/server_seconds')} | "
              f"{fmt('secure_aggregation/hospital_seconds_max')} | "
              f"{fmt('comm/bytes_received', 1e6)} MB | {fmt('comm/bytes_sent', 1e6)} MB | "
              f"{acc:.4f} | {central:.4f} | "
              f"{statistics.median(x['wall_s'] for x in r):.0f} |")
    clipped = sum(x["clipped_warnings"] for x in runs["secagg_plus"])
    print(f"SecAgg+ clipping warnings from hospitals: {clipped}")
    report = {"runs": runs}
    if args.update_range:
        report["largest_update_value"] = update_range()
        print(f"largest |update value| per hospital after one round: "
              f"{report['largest_update_value']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
