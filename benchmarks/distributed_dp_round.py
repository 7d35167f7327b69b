"""Where a distributed DP round's time goes: each hospital's own work, timed in process, against
the round time a real run measured.

    source scripts/env.sh
    .venv/bin/python benchmarks/distributed_dp_round.py --run <mlflow run id> [--repeats 5]

For each hospital of the run's configuration (read back from the run's params: the same data,
model, plan), times ``Hospital.train`` under distributed DP (Poisson batch, per-record gradients,
clipping, lattice share) and SecAgg+'s masking of the share, ``--repeats`` times after a
warm-up. A simulated round runs the hospitals one after another, so their summed work against
the run's median ``round/seconds`` (rounds without evaluation) leaves Flower's messaging,
process hand-offs and the secure-aggregation stages; the run's
``secure_aggregation/stage_seconds`` says how much of that the key-agreement and unmasking
stages take.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace

import numpy as np
from mlflow.tracking import MlflowClient

from clinical_fl.secure_aggregation import secagg_plus
from clinical_fl.settings.compose import compose_config, task_settings, to_run_settings
from clinical_fl.settings.tracking import TrackingSettings
from clinical_fl.tracking.paths import project_root
from clinical_fl.tracking.run_tracker import resolve_store
from tasks.data.hospital_data import source_labels
from tasks.hospital import Hospital
from tasks.model.build import trainable_state
from tasks.privacy.ledger import PrivacyLedger


def _params(client: MlflowClient, run_id: str) -> dict[str, str]:
    return client.get_run(run_id).data.params


def _overrides(params: dict[str, str]) -> list[str]:
    """The run's own configuration, as overrides (only the keys that shape a hospital's work)."""
    keys = [k for k in params if k.split(".")[0] in ("model", "data", "train", "seed")
            and not k.startswith("model.lora.target_modules")]
    out = []
    for key in keys:
        value = params[key]
        if value in ("None", ""):
            value = "null"
        if value.startswith("[") or value.startswith("{"):
            continue
        out.append(f"{key}={value}")
    return out


def _masking_seconds(size: int, hospitals: int) -> float:
    """One hospital's SecAgg+ masking of a vector of ``size`` levels among ``hospitals``."""
    nodes = list(range(1, hospitals + 1))
    others = {n: secagg_plus.setup(1, n, 2, 0.25, 2**24, 1.0) for n in nodes}
    secrets = others[1]
    secrets.stage = "shares-received"
    secrets.rd_seed = os.urandom(32)
    secrets.mask_partners = nodes[1:]
    secrets.pk1_of = {n: others[n].pk1 for n in nodes}
    levels = np.zeros(size, dtype=np.uint32)
    started = time.perf_counter()
    secagg_plus.masked_levels(secrets, levels, 2**24)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="MLflow run id of a distributed DP run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    client = MlflowClient(tracking_uri=resolve_store(TrackingSettings(), project_root())[0])
    params = _params(client, args.run)
    cfg = compose_config(_overrides(params))
    run_settings = to_run_settings(cfg)
    labels = source_labels(run_settings.data)
    task = task_settings(cfg, labels)
    plan = {"noise_multiplier": float(params["distributed_dp_plan.noise_multiplier"]),
            "sample_rate": float(params["distributed_dp_plan.sample_rate"]),
            "threshold": int(params["distributed_dp_plan.threshold"]),
            "target_delta": float(params["distributed_dp_plan.delta"]),
            "expected_batch_size": int(params["privacy.distributed_dp.expected_batch_size"]),
            "enabled": True, "target_epsilon": None, "max_epsilon": None}
    task.privacy.distributed_dp = replace(task.privacy.distributed_dp, **plan)
    task.secure_aggregation = replace(task.secure_aggregation, mode="secagg_plus")
    hospitals = int(client.get_run(args.run).data.tags["hospitals"])
    members = [Hospital(task, labels, k, hospitals) for k in range(hospitals)]
    start = trainable_state(members[0].model)
    size = sum(t.numel() for t in start.values())
    work = []
    with tempfile.TemporaryDirectory():
        for hospital in members:
            ledger = PrivacyLedger(run_id=0, hospital=hospital.data.hospital)
            hospital.train(start, 0, ledger=ledger)  # warm-up
            times = []
            for round_ in range(1, args.repeats + 1):
                began = time.perf_counter()
                hospital.train(start, round_, ledger=ledger)
                times.append(time.perf_counter() - began)
            work.append(statistics.median(times))
    masking = _masking_seconds(size, hospitals)
    rounds = client.get_metric_history(args.run, "round/seconds")
    evaluated = {m.step for m in client.get_metric_history(args.run, "central/accuracy")}
    plain = [m.value for m in rounds if m.step not in evaluated and m.step > 1]
    stages = [m.value for m in client.get_metric_history(args.run,
                                                         "secure_aggregation/stage_seconds")]
    round_seconds = statistics.median(plain)
    hospitals_work = sum(work) + hospitals * masking
    print(f"run {args.run}: {hospitals} hospitals, {size} adapter values, "
          f"expected batch {plan['expected_batch_size']}, q {plan['sample_rate']:.4g}")
    print(f"hospital step (median of {args.repeats}), s: "
          + ", ".join(f"{w:.3f}" for w in work))
    print(f"SecAgg+ masking of one share: {masking * 1000:.1f} ms")
    print(f"round without evaluation (median of {len(plain)}): {round_seconds:.2f} s")
    print(f"  hospitals' own work, one after another: {hospitals_work:.2f} s "
          f"({hospitals_work / round_seconds:.0%})")
    print(f"  SecAgg+ key stages (setup, share keys, unmask; median): "
          f"{statistics.median(stages):.2f} s ({statistics.median(stages) / round_seconds:.0%})")
    rest = round_seconds - hospitals_work - statistics.median(stages)
    print(f"  the rest (Flower messaging of the collect stage, aggregation, logging): "
          f"{rest:.2f} s ({rest / round_seconds:.0%})")


if __name__ == "__main__":
    main()
