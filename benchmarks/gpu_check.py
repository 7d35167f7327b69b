"""The default run's training, and a DP-SGD round, on whatever this machine has (a GPU where
there is one), in one process: for machines where Flower's processes cannot run (the lent GPU
machine has no Ray and no MLflow, and installs nothing).

    .venv/bin/python benchmarks/gpu_check.py --json gpu.json
    python benchmarks/gpu_check.py --set model.name_or_path=/tmp/minilm data.deid.enabled=false

The product's own settings (``conf/`` composed with the overrides) and hospitals
(``Hospital.train`` / ``Hospital.evaluate``, which resolve ``train.device`` and
``train.precision``): 2 hospitals, the default rounds, every round each hospital's held-out
notes and the server's test set scored, the updates averaged as Flower's FedAvg does (weighted
by training records; written out here because Flower is what cannot be installed there). Then
the first DP-SGD round of the ``privacy=dp_sgd`` preset's run (noise planned for all its
rounds), its epsilon from the hospital's ledger.
This is not ``flwr run``: no process start-up, no messages; compare it with a ``flwr run`` only
through its training and evaluation seconds. First, DP-SGD's per-record clipping bound is
checked on the device in float32 and bf16 (``--clipping-only``: only that).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from clinical_fl.settings.compose import compose_config, task_settings, to_run_settings
from clinical_fl.settings.privacy import GradSampleMode
from clinical_fl.settings.train import OptimizerName, TrainSettings
from tasks.data.hospital_data import load_server_test_set, source_labels
from tasks.hospital import Hospital
from tasks.learning.batches import make_loader
from tasks.learning.central_evaluation import CentralEvaluator
from tasks.model.build import build_model, load_trainable_state, trainable_state
from tasks.model.compute import Compute, resolve_compute
from tasks.privacy.dp_sgd import train_with_dp_sgd
from tasks.privacy.ledger import PrivacyLedger

HOSPITALS = 2


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """Flower FedAvg's arithmetic: the mean of the updates weighted by training records."""
    total = sum(weights)
    return {key: sum(state[key] * (w / total) for state, w in zip(states, weights, strict=True))
            for key in states[0]}


def federation(overrides: list[str], rounds: int | None = None) -> dict:
    """``rounds`` of the run (all by default); the noise is planned for all of them."""
    cfg = compose_config(overrides)
    run = to_run_settings(cfg)
    labels = source_labels(run.data)
    task = replace(task_settings(cfg, labels), planned_rounds=run.num_rounds)
    began = time.perf_counter()
    hospitals = [Hospital(task, labels, k, HOSPITALS) for k in range(HOSPITALS)]
    test_set = load_server_test_set(run.data, labels)
    central = CentralEvaluator(hospitals[0].model, hospitals[0].tokenizer, test_set, len(labels),
                               task.model.max_length, task.train.eval_batch_size,
                               resolve_compute(TrainSettings()), task.train.group_by_length)
    loaded = time.perf_counter() - began
    # The initial adapter as the server makes it (the hospitals' cached model may hold
    # another run's).
    state = trainable_state(build_model(task.model, labels, task.seed, hospitals[0].tokenizer))
    ledgers = [PrivacyLedger(run_id=1, hospital=k) for k in range(HOSPITALS)]
    history = []
    for server_round in range(1, (rounds or run.num_rounds) + 1):
        round_began = time.perf_counter()
        replies = [h.train(state, server_round, ledger=ledger if h.is_private else None)
                   for h, ledger in zip(hospitals, ledgers, strict=True)]
        state = fedavg([new for new, _ in replies], [o.num_examples for _, o in replies])
        train_seconds = time.perf_counter() - round_began
        scores = [h.evaluate(state) for h in hospitals]
        held_out = sum(s.accuracy * s.num_examples for s in scores) / sum(
            s.num_examples for s in scores)
        server = central(state)
        epsilon = max((o.privacy.epsilon for _, o in replies if o.privacy), default=None)
        history.append({"round": server_round, "train_seconds": train_seconds,
                       "seconds": time.perf_counter() - round_began,
                       "federated_accuracy": held_out, "central_accuracy": server["accuracy"],
                       "central_macro_f1": server["macro_f1"], "epsilon": epsilon})
        print(f"round {server_round}: train {train_seconds:.1f} s, federated accuracy "
              f"{held_out:.3f}, central accuracy {server['accuracy']:.3f}"
              + (f", epsilon {epsilon:.2f}" if epsilon is not None else ""), flush=True)
    return {"overrides": overrides, "compute": hospitals[0].compute.describe(),
            "load_seconds": loaded, "seconds": time.perf_counter() - began, "rounds": history}


def clipping_bound(overrides: list[str], records: int = 6) -> dict[str, float]:
    """DP-SGD's per-record bound on this machine's device, in float32 and in bf16: each
    record's update (SGD, learning rate 1, no noise, clipping norm far below its gradient)
    must be within the norm to float32's rounding; returns the largest norm / clipping norm."""
    cfg = compose_config(overrides)
    run = to_run_settings(cfg)
    labels = source_labels(run.data)
    task = task_settings(cfg, labels)
    hospital = Hospital(task, labels, 0, HOSPITALS)
    model, start = hospital.model, trainable_state(hospital.model)
    clip = 1e-3
    sgd = TrainSettings(optimizer=OptimizerName.sgd, learning_rate=1.0, head_learning_rate=None)
    worst = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        compute = Compute(hospital.compute.device, bf16, "clipping check")
        ratios = []
        for index in range(records):
            load_trainable_state(model, start)
            loader = make_loader(hospital.train_records.select([index]), hospital.tokenizer, 1,
                                 shuffle=False)
            train_with_dp_sgd(model, loader, sgd, noise_multiplier=0.0, max_grad_norm=clip,
                              grad_sample_mode=GradSampleMode.hooks, history=[],
                              poisson_sampling=False, compute=compute)
            moved = torch.cat([(v - start[k]).flatten()
                               for k, v in trainable_state(model).items()])
            ratios.append(float(moved.norm()) / clip)
        worst[name] = max(ratios)
        print(f"clipping on {compute.device.type} {name}: largest record update "
              f"{worst[name]:.6f} x the clipping norm ({records} records)", flush=True)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides for both runs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--clipping-only", action="store_true",
                        help="only the per-record clipping check")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"# GPU: {gpu}; torch {torch.__version__}", flush=True)
    report = {"gpu": gpu, "clipping_bound": clipping_bound(list(args.set))}
    if max(report["clipping_bound"].values()) > 1 + 1e-4:
        raise SystemExit("a record's update exceeds the clipping norm")
    if args.clipping_only:
        print(json.dumps(report))
        return
    report["default"] = federation(list(args.set))
    print(f"default run: {report['default']['compute']}, {report['default']['seconds']:.1f} s",
          flush=True)
    report["dp_sgd_round"] = federation(["privacy=dp_sgd", *args.set], rounds=1)
    print(f"DP-SGD round: {report['dp_sgd_round']['seconds']:.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
