"""A federated run survives a server crash: real ``flwr run`` simulations, the SuperLink and
everything it spawned SIGKILLed after round 2 of 4, a new SuperLink, ``resume=<run id>``.

The resumed run must end where an uninterrupted one ends (FedAdam: its moments are part
of the checkpoint), log every round once in the same MLflow run, and, under DP-SGD, leave
every hospital's accountant with the uninterrupted run's history and epsilon.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from strategies.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
from tasks.privacy.plan import plan_dp_sgd
from tests.flower_processes import LocalSimulationSuperLink, crash, start_flwr_run
from tests.support import history, independent_epsilon, only_run, run_overrides, task, wait_until

COMMON = ("num_rounds=4", "data.notes_per_hospital=40", "data.server_test_notes=20",
          "train.local_epochs=1", "strategy=fedadam", "evaluate_every=2")


def _checkpoint(store: Path):
    files = list((store / "server-state").glob(f"*/{CHECKPOINT_FILE}"))
    return load_checkpoint(files[0]) if files else None


def _round_done(store: Path) -> int:
    try:
        checkpoint = _checkpoint(store)
    except CheckpointError:  # never torn: only a file we read while it was replaced
        return -1
    return checkpoint.round if checkpoint else -1


def _crash_after_round(home: Path, store: Path, overrides: str, done: int) -> str:
    """Start the run, SIGKILL the whole server side once round ``done`` is checkpointed;
    the MLflow run id. The hospitals stall (fault drill) at the start of the next round, so
    the crash comes before they train it: between rounds, deterministically."""
    superlink = LocalSimulationSuperLink(home)
    run = start_flwr_run(superlink, f"{overrides} drill.faults=[0:stall@{done + 1},"
                                    f"1:stall@{done + 1}]")
    try:
        wait_until(lambda: _round_done(store) >= done, 300, f"round {done} checkpointed",
                   every=0.1)
    finally:
        crash(superlink, run)
    checkpoint = _checkpoint(store)
    assert checkpoint.round == done, "killed between rounds"
    return checkpoint.mlflow_run_id


def _resume(home: Path, overrides: str, run_id: str) -> None:
    superlink = LocalSimulationSuperLink(home)
    try:
        status, details, output = superlink.flwr_run(f"{overrides} resume={run_id} "
                                                     "drill.faults=[]")
    finally:
        superlink.stop()
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"


@pytest.mark.e2e
def test_a_run_killed_after_round_2_resumes_to_the_uninterrupted_result(tiny_bert, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    superlink = LocalSimulationSuperLink(tmp_path / "home-whole")
    try:
        status, details, output = superlink.flwr_run(run_overrides(tiny_bert, whole, *COMMON))
    finally:
        superlink.stop()
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"

    overrides = run_overrides(tiny_bert, resumed, *COMMON)
    home = tmp_path / "home"
    run_id = _crash_after_round(home, resumed, overrides, 2)
    _resume(home, overrides, run_id)

    expected, got = _checkpoint(whole), _checkpoint(resumed)
    assert got.round == expected.round == 4
    assert got.arrays.keys() == expected.arrays.keys()
    for key, value in expected.arrays.items():
        np.testing.assert_allclose(got.arrays[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    assert got.strategy_arrays.keys() == expected.strategy_arrays.keys() != set()

    client, run = only_run(resumed)  # the same MLflow run, not a second one
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumes"] == "1"
    assert run.data.tags["resume/1"].startswith("after round 2, as Flower run ")
    assert run.data.tags["resume/1"].endswith("changed: drill.faults ['0:stall@3', "
                                              "'1:stall@3'] -> []")
    steps = {key: sorted(m.step for m in client.get_metric_history(run_id, key))
             for key in ("round/seconds", "round/rejected_replies", "central/accuracy")}
    assert steps == {"round/seconds": [0, 1, 2, 3, 4], "round/rejected_replies": [0, 1, 2, 3, 4],
                     "central/accuracy": [0, 2, 4]}, steps
    whole_client, whole_run = only_run(whole)
    assert history(client, run_id, "central/loss")[4] == pytest.approx(
        history(whole_client, whole_run.info.run_id, "central/loss")[4], rel=1e-4)
    artifacts = [a.path for a in client.list_artifacts(run_id, "checkpoint")]
    assert artifacts == [f"checkpoint/{CHECKPOINT_FILE}"]


@pytest.mark.e2e
def test_a_resumed_dp_run_continues_every_hospitals_accountant(tiny_bert, tmp_path):
    store, home = tmp_path / "store", tmp_path / "home"
    overrides = run_overrides(tiny_bert, store, *COMMON, "privacy=dp_sgd",
                              "privacy.dp_sgd.target_epsilon=4")
    run_id = _crash_after_round(home, store, overrides, 2)
    _resume(home, overrides, run_id)

    client, run = only_run(store)
    epsilon_max = history(client, run_id, "privacy/epsilon_max")
    assert sorted(epsilon_max) == [1, 2, 3, 4]
    checkpoint = _checkpoint(store)
    settings = task(tiny_bert, *COMMON[1:], "privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=4",
                    planned_rounds=4)
    for hospital in (0, 1):
        ledger_file = home / "clinical-fl" / "hospital-state" / f"partition-{hospital}" / \
            "privacy-ledger.json"
        runs = json.loads(ledger_file.read_text())["runs"]
        # One entry: the first run's, continued (a second would have re-planned its noise).
        assert [r["run_id"] for r in runs] == [checkpoint.ledger_run]
        ledger = runs[0]
        assert ledger["rounds_trained"] == [1, 2, 3, 4]
        # An uninterrupted run plans this noise for 4 rounds from an empty history and
        # composes 4 rounds of steps at it: what this ledger holds.
        records = int(run.data.params[f"hospital_{hospital}.train_records"])
        plan = plan_dp_sgd(settings.privacy.dp_sgd, hospital, records,
                           settings.train.batch_size, 1, 4)
        assert [s[0] for s in ledger["history"]] == [pytest.approx(plan.noise_multiplier)]
        assert ledger["history"][0][2] == 4 * plan.steps_per_round
        epsilon = independent_epsilon([tuple(s) for s in ledger["history"]], ledger["delta"])
        assert history(client, run_id, f"hospital_{hospital}/epsilon")[4] == pytest.approx(
            epsilon, rel=1e-6)
        assert epsilon == pytest.approx(4.0, abs=0.1)
