"""Faults and recovery, measured with real Flower processes (simulation, 127.0.0.1):

    python benchmarks/faults_benchmark.py faults [--hospitals 16] [--rounds 4]
    python benchmarks/faults_benchmark.py resume [--model tiny|default] [--rounds 4]

``faults``: a run of N simulated hospitals on the tiny model (tests/tiny_models.py) with one
hospital sending a NaN every round and one lost in the middle of round 2 (it trains, then
fails: no update, an error reply; the fault drill, fl_app/hospital/fault_drill.py); prints
hospitals, rounds, faults injected, rounds completed, rejected and error replies per round, the
drop, and the run's wall time. (A hospital whose process is killed outright is
tests/test_deployment.py's: a real SuperNode SIGKILLed mid-round.)

``resume``: a run killed (SuperLink and everything it spawned, SIGKILL) once round
``rounds/2`` is checkpointed, then a new SuperLink and ``resume=<run id>``; prints the
resume overhead (from starting the new SuperLink to the first new round's checkpoint, minus
that round's own time as MLflow logged it) beside a fresh run's start-up (from starting its
SuperLink to its round-1 checkpoint, minus round 1's time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' process helpers and tiny model

from mlflow.tracking import MlflowClient  # noqa: E402

from tests.flower_processes import LocalSimulationSuperLink, crash, start_flwr_run  # noqa: E402
from tests.support import FAST, NO_DEID, checkpointed_round, wait_until  # noqa: E402
from tests.tiny_models import make_tiny_bert  # noqa: E402


def _series(store: Path, key: str) -> tuple[str, dict[int, float]]:
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run.info.run_id, {m.step: m.value for m in
                             client.get_metric_history(run.info.run_id, key)}


def _overrides(model: Path | None, store: Path, *extra: str) -> str:
    model_part = [f"model.name_or_path={model}", *FAST] if model else []
    return " ".join([*model_part, f"tracking.uri=sqlite:///{store}/mlflow.db", NO_DEID, *extra])


def faults(args: argparse.Namespace, work: Path) -> dict:
    model = make_tiny_bert(work / "tiny-bert", pretrain=True)
    store = work / "faults"
    drill = ["3:nan", f"{args.hospitals // 2 - 1}:crash@2"]
    superlink = LocalSimulationSuperLink(work / "home-faults")
    began = time.perf_counter()
    try:
        status, details, output = superlink.flwr_run(_overrides(
            model, store, f"num_rounds={args.rounds}", "data.notes_per_hospital=60",
            "data.server_test_notes=60", "train.local_epochs=1",
            f"strategy.min_hospitals={args.hospitals - 2}",
            f"drill.faults=[{','.join(drill)}]"), timeout=3000, hospitals=args.hospitals)
    finally:
        superlink.stop()
    wall = time.perf_counter() - began
    run_id, rejected = _series(store, "round/rejected_replies")
    _, replies = _series(store, "round/train_replies")
    _, errors = _series(store, "round/error_replies")
    _, accuracy = _series(store, "central/accuracy")
    _, norms = _series(store, "round/update_norm_max")
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    tags = client.get_run(run_id).data.tags
    return {"part": "faults", "status": status, "details": details[-300:],
            "hospitals": args.hospitals, "rounds": args.rounds, "faults": drill,
            "rounds_completed": checkpointed_round(store), "train_replies": replies,
            "rejected_replies": rejected, "error_replies": errors,
            "central_accuracy": accuracy, "update_norm_max": norms,
            "dropped": {k: v for k, v in tags.items() if k.startswith("refused/")},
            "wall_s": round(wall, 1), "run_id": run_id}


def _until_round(store: Path, done: int, timeout: float = 3000) -> float:
    wait_until(lambda: checkpointed_round(store) >= done, timeout,
               f"round {done} checkpointed", every=0.2)
    return time.perf_counter()


def resume(args: argparse.Namespace, work: Path) -> dict:
    model = make_tiny_bert(work / "tiny-bert", pretrain=True) if args.model == "tiny" else None
    store, home = work / "resume", work / "home-resume"
    extra = [f"num_rounds={args.rounds}"] + (["data.notes_per_hospital=60",
                                              "data.server_test_notes=30"] if model else [])
    overrides = _overrides(model, store, *extra)
    kill_after = args.rounds // 2

    started = time.perf_counter()
    superlink = LocalSimulationSuperLink(home)
    run = start_flwr_run(superlink, overrides)
    try:
        first_round = _until_round(store, 1) - started
        _until_round(store, kill_after)
    finally:
        crash(superlink, run)
    killed_at = checkpointed_round(store)
    run_id, seconds = _series(store, "round/seconds")

    restarted = time.perf_counter()
    superlink = LocalSimulationSuperLink(home)
    try:
        run = start_flwr_run(superlink, f"{overrides} resume={run_id}")
        resumed_round = _until_round(store, killed_at + 1) - restarted
        run.communicate(timeout=3000)
    finally:
        superlink.stop()
    _, seconds = _series(store, "round/seconds")
    steps = [m.step for m in MlflowClient(f"sqlite:///{store}/mlflow.db").get_metric_history(
        run_id, "round/seconds")]
    return {"part": "resume", "model": args.model, "rounds": args.rounds,
            "killed_after_round": killed_at,
            "fresh_start_to_round_1_s": round(first_round, 1),
            "round_1_s": round(seconds[1], 1),
            "fresh_overhead_s": round(first_round - seconds[1], 1),
            "restart_to_first_new_round_s": round(resumed_round, 1),
            "first_new_round_s": round(seconds[killed_at + 1], 1),
            "resume_overhead_s": round(resumed_round - seconds[killed_at + 1], 1),
            "final_round": checkpointed_round(store), "steps_logged": sorted(steps),
            "run_id": run_id}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["faults", "resume"])
    parser.add_argument("--hospitals", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--model", choices=["tiny", "default"], default="tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="faults-benchmark-") as tmp:
        result = (faults if args.part == "faults" else resume)(args, Path(tmp))
    result["machine"] = f"{platform.processor() or platform.machine()}, " \
                        f"{len(os.sched_getaffinity(0))} cores"
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
