"""A federated run survives a server crash: real ``flwr run`` simulations, the SuperLink and
everything it spawned SIGKILLed after round 2 of 4, a new SuperLink, ``resume=<run id>``.

The resumed run must end where an uninterrupted one ends (FedAdam: its moments are part
of the checkpoint; the uninterrupted run is computed in process, Flower's FedAdam over the
hospitals' real handler) and log every round once in the same MLflow run; under DP-SGD every
hospital's accountant keeps the uninterrupted run's history and epsilon.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from clinical_fl.settings.compose import compose_config, task_settings_to_yaml, to_run_settings
from strategies.checkpoint import CHECKPOINT_FILE, load_checkpoint
from strategies.registry import build_strategy
from tests.flower_processes import LocalSimulationSuperLink, crash, start_flwr_run
from tests.hospital_process import hospital_train, hospital_train_reply, initial_arrays
from tests.support import (
    TwoNodeGrid,
    checkpointed_round,
    independent_epsilon,
    only_run,
    run_overrides,
    task,
    wait_until,
)

# Unweighted: the uninterrupted reference trains the hospitals again from these settings alone
# (class weights would come from the run's preflight counts).
COMMON = ("num_rounds=4", "data.notes_per_hospital=40", "data.server_test_notes=20",
          "train.local_epochs=1", "strategy=fedadam", "evaluate_every=2",
          "train.class_weighting=none")


def _checkpoint(store: Path):
    files = list((store / "server-state").glob(f"*/{CHECKPOINT_FILE}"))
    return load_checkpoint(files[0]) if files else None


def _crash_after_round(home: Path, store: Path, overrides: str, done: int) -> str:
    """Start the run, SIGKILL the whole server side once round ``done`` is checkpointed;
    the MLflow run id. The hospitals stall (fault drill) at the start of the next round, so
    the crash comes before they train it: between rounds, deterministically."""
    superlink = LocalSimulationSuperLink(home)
    run = start_flwr_run(superlink, f"{overrides} drill.faults=[0:stall@{done + 1},"
                                    f"1:stall@{done + 1}]")
    try:
        wait_until(lambda: checkpointed_round(store) >= done, 300, f"round {done} checkpointed",
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


def _uninterrupted(tiny_bert, tmp_path) -> dict[str, np.ndarray]:
    """The uninterrupted run's global adapter, computed here independently of the ServerApp:
    Flower's FedAdam over the two hospitals' real train handler, four rounds in a row."""
    settings = task(tiny_bert, *COMMON, planned_rounds=4)
    text = task_settings_to_yaml(settings)
    strategy = build_strategy(to_run_settings(compose_config(
        [f"model.name_or_path={tiny_bert}", *COMMON])).strategy,
        lambda *_: MetricRecord(), lambda *_: MetricRecord())
    arrays = initial_arrays(text)
    for server_round in (1, 2, 3, 4):
        list(strategy.configure_train(server_round, arrays, ConfigRecord(), TwoNodeGrid()))
        replies = []
        for hospital in (0, 1):
            metrics, trained = hospital_train_reply(
                text, tmp_path / f"reference-{hospital}", 1, server_round,
                {"partition-id": hospital, "num-partitions": 2}, arrays=arrays)
            request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=hospital + 1,
                              message_type=MessageType.TRAIN)
            replies.append(Message(RecordDict({"arrays": trained,
                                               "metrics": MetricRecord(metrics)}),
                                   reply_to=request))
        arrays, _ = strategy.aggregate_train(server_round, replies)
    return {k: v.numpy() for k, v in arrays.items()}


@pytest.mark.e2e
def test_a_run_killed_after_round_2_resumes_to_the_uninterrupted_result(tiny_bert, tmp_path,
                                                                        process_identity):
    store, home = tmp_path / "resumed", tmp_path / "home"
    overrides = run_overrides(tiny_bert, store, *COMMON)
    run_id = _crash_after_round(home, store, overrides, 2)
    _resume(home, overrides, run_id)

    got = _checkpoint(store)
    expected = _uninterrupted(tiny_bert, tmp_path)
    assert got.round == 4 and got.arrays.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(got.arrays[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    assert {k.split("/")[0] for k in got.strategy_arrays} == {"m_t", "v_t"}  # FedAdam's

    client, run = only_run(store)  # the same MLflow run, not a second one
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumes"] == "1"
    assert run.data.tags["resume/1"].startswith("after round 2, as Flower run ")
    assert run.data.tags["resume/1"].endswith("changed: drill.faults ['0:stall@3', "
                                              "'1:stall@3'] -> []")
    steps = {key: sorted(m.step for m in client.get_metric_history(run_id, key))
             for key in ("round/seconds", "round/rejected_replies", "central/accuracy")}
    assert steps == {"round/seconds": [0, 1, 2, 3, 4], "round/rejected_replies": [0, 1, 2, 3, 4],
                     "central/accuracy": [0, 2, 4]}, steps
    artifacts = [a.path for a in client.list_artifacts(run_id, "checkpoint")]
    assert artifacts == [f"checkpoint/{CHECKPOINT_FILE}"]


def test_a_resumed_runs_rounds_continue_the_hospitals_ledger_entry(tiny_bert, tmp_path):
    """The hospital's side of a resume, through its real train handler: rounds 1-2 in Flower
    run 21, the crash, rounds 3-4 in Flower run 22 naming run 21's ledger entry. The epsilon
    equals an uninterrupted run's (rounds 1-4 in one run), per an independent accountant. A
    resumed run that did not name the entry would open a second one and re-plan its noise
    over the spending of the first. (The real-process resumes: the test above, and the
    private deployment run in test_deployment.py, whose SuperLink is killed and restarted.)"""
    settings = task(tiny_bert, *COMMON[1:], "privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=4",
                    planned_rounds=4)
    first_run = task_settings_to_yaml(settings)
    resumed = task_settings_to_yaml(replace(settings, ledger_run=21))

    uninterrupted = [hospital_train(first_run, tmp_path / "whole", 11, r) for r in (1, 2, 3, 4)]
    before = [hospital_train(first_run, tmp_path / "crashed", 21, r) for r in (1, 2)]
    after = [hospital_train(resumed, tmp_path / "crashed", 22, r) for r in (3, 4)]
    for server_round in (1, 2):
        hospital_train(first_run, tmp_path / "forgetful", 21, server_round)
    forgetful = hospital_train(first_run, tmp_path / "forgetful", 22, 3)

    assert after[-1]["epsilon"] == pytest.approx(uninterrupted[-1]["epsilon"], rel=1e-9)
    assert [m["noise-multiplier"] for m in (*before, *after)] == \
        [uninterrupted[0]["noise-multiplier"]] * 4
    runs = json.loads((tmp_path / "crashed" / "privacy-ledger.json").read_text())["runs"]
    assert [(r["run_id"], r["rounds_trained"]) for r in runs] == [(21, [1, 2, 3, 4])]
    ledger = runs[0]
    assert after[-1]["epsilon"] == pytest.approx(
        independent_epsilon([tuple(s) for s in ledger["history"]], ledger["delta"]), rel=1e-6)
    assert after[-1]["epsilon"] == pytest.approx(4.0, abs=0.05)
    # Without the entry: a second one, whose epsilon starts again from zero: after round 3 it
    # reports one round's (the lifetime ledger still counts both), and its target would allow
    # four more rounds.
    assert forgetful["epsilon"] == pytest.approx(before[0]["epsilon"])
    assert forgetful["epsilon"] < after[0]["epsilon"]
