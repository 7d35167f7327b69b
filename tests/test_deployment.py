"""Deployment with real processes on 127.0.0.1, built with the scripts in deploy/: TLS +
SuperNode authentication, each hospital on its own data file, the MLflow run with the server."""

from __future__ import annotations

import signal
import time

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tasks.data.synthetic_notes import SPECIALTIES, generate_hospital_notes
from tests.deployment import Deployment

pytestmark = pytest.mark.e2e


def _hospital_file(directory, hospital: int, notes: int = 90):
    """A hospital's own export: CSV with its notes (its own style and case mix)."""
    rows = [{"text": n.text, "label": n.label}
            for n in generate_hospital_notes(hospital, notes, seed=21, label_skew_alpha=1.0,
                                             label_noise=0.0)]
    path = directory / f"hospital-{hospital}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _overrides(tiny_bert, store, hospitals: int, extra: str = "") -> str:
    return (f"model.name_or_path={tiny_bert} tracking.uri=sqlite:///{store}/mlflow.db "
            f"data=files data.labels=[{','.join(SPECIALTIES)}] strategy.min_hospitals="
            f"{hospitals} num_rounds=2 model.max_length=64 model.lora.dropout=0.0 "
            f"train.learning_rate=1e-2 {extra}")


def _history(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture
def deployment(tmp_path):
    deployment = Deployment(tmp_path)
    deployment.start_superlink()
    yield deployment
    deployment.stop()


def test_tls_and_authenticated_supernodes_complete_a_run_on_their_own_files(deployment,
                                                                           tiny_bert, tmp_path):
    for k in (0, 1):
        deployment.hospital_key(f"hospital-{k}")
        deployment.start_supernode(f"hospital-{k}", k, _hospital_file(tmp_path, k))
    deployment.wait_for_nodes(2)
    status, details, output = deployment.finish(
        deployment.run(_overrides(tiny_bert, tmp_path, 2)))
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert run.info.status == "FINISHED"
    for key in ("federated/accuracy", "federated/macro_f1"):
        assert sorted(_history(client, run.info.run_id, key)) == [0, 1, 2], key
    assert _history(client, run.info.run_id, "round/train_replies") == {1: 2, 2: 2}
    # Each hospital trained on its own file: 90 notes, 72 for training.
    for k in (0, 1):
        assert run.data.params[f"hospital_{k}.train_records"] == "72"


def test_an_unregistered_supernode_is_refused_and_gets_no_task(deployment, tmp_path):
    deployment.hospital_key("hospital-0")
    rogue_key = deployment.hospital_key("rogue", register=False)
    deployment.start_supernode("hospital-0", 0, _hospital_file(tmp_path, 0))
    rogue = deployment.start_supernode("rogue", 1, _hospital_file(tmp_path, 1), key=rogue_key)
    deployment.wait_for_nodes(1)
    assert rogue.wait(timeout=120) != 0, "the SuperLink must turn the unknown key away"
    log = deployment.supernode_log("rogue")
    assert "Failed to activate SuperNode" in log, log[-2000:]
    assert "Starting ClientApp" not in log and "flwr-clientapp" not in log
    assert deployment.connected_nodes() == 1


def test_a_revoked_hospital_is_disconnected(deployment, tmp_path):
    for k in (0, 1):
        deployment.hospital_key(f"hospital-{k}")
        deployment.start_supernode(f"hospital-{k}", k, _hospital_file(tmp_path, k))
    deployment.wait_for_nodes(2)
    # register.sh noted each hospital's node id: the coordinator revokes by name.
    registry = dict(line.split("\t")[:2] for line in
                    (tmp_path / "hospitals.tsv").read_text().splitlines())
    assert sorted(registry) == ["hospital-0", "hospital-1"]
    revoked = deployment.flwr("supernode", "unregister", registry["hospital-1"],
                              deployment.connection)
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert deployment.supernodes["hospital-1"].wait(timeout=120) is not None
    assert deployment.connected_nodes() == 1
    assert deployment.supernodes["hospital-0"].poll() is None, "the other hospital stays"


def test_a_supernode_without_tls_cannot_join_a_tls_superlink(deployment, tmp_path):
    deployment.hospital_key("hospital-0")
    deployment.start_supernode("hospital-0", 0, _hospital_file(tmp_path, 0), secure=False)
    time.sleep(15)
    assert deployment.connected_nodes() == 0
    assert "Connection attempt failed" in deployment.supernode_log("hospital-0")


def _wait_for_log(deployment, name: str, text: str, run, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run.poll() is not None:
            output, _ = run.communicate()
            raise AssertionError(f"the run ended before {name} logged '{text}':\n"
                                 f"{output[-3000:]}")
        if text in deployment.supernode_log(name):
            return
        time.sleep(0.5)
    raise AssertionError(f"{name}: '{text}' not seen in {timeout} s")


def test_a_hospital_lost_mid_round_is_logged_and_the_others_finish_the_run(deployment,
                                                                          tiny_bert, tmp_path):
    for k in range(3):
        deployment.hospital_key(f"hospital-{k}")
        deployment.start_supernode(f"hospital-{k}", k, _hospital_file(tmp_path, k))
    deployment.wait_for_nodes(3)
    run = deployment.run(_overrides(tiny_bert, tmp_path, 2))
    _wait_for_log(deployment, "hospital-2", "Receiving: train message", run)
    deployment.stop_supernode("hospital-2", signal.SIGKILL)  # dies in the middle of round 1
    status, details, output = deployment.finish(run)
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_record = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert run_record.info.status == "FINISHED"
    replies = _history(client, run_record.info.run_id, "round/train_replies")
    errors = _history(client, run_record.info.run_id, "round/error_replies")
    assert replies[1] == 2, "round 1 aggregated the two hospitals that answered"
    assert sum(errors.values()) >= 1, "the lost hospital's failure is visible in MLflow"
    assert replies[2] == 2
    assert sorted(_history(client, run_record.info.run_id, "federated/accuracy")) == [0, 1, 2]


def test_a_restarted_supernode_keeps_its_privacy_ledger(deployment, tiny_bert, tmp_path):
    from tasks.privacy.accounting import epsilon_spent
    from tasks.privacy.ledger import LedgerStore
    from tasks.task_settings import Accountant

    for k in (0, 1):
        deployment.hospital_key(f"hospital-{k}")
        deployment.start_supernode(f"hospital-{k}", k, _hospital_file(tmp_path, k))
    deployment.wait_for_nodes(2)
    run = deployment.run(_overrides(tiny_bert, tmp_path, 2,
                                    "num_rounds=3 privacy=dp_sgd train.local_epochs=1 "
                                    "privacy.dp_sgd.target_epsilon=null "
                                    "privacy.dp_sgd.noise_multiplier=1.0"))
    # After hospital 1 has sent its round-1 update, stop its SuperNode and start a new one
    # with the same key, data and state directory.
    _wait_for_log(deployment, "hospital-1", "Sending: train message", run)
    deployment.stop_supernode("hospital-1")
    deployment.start_supernode("hospital-1", 1, _hospital_file(tmp_path, 1))
    status, details, output = deployment.finish(run)
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"

    lifetime = LedgerStore(tmp_path / "hospitals" / "hospital-1").load(1, Accountant.rdp)
    assert len(lifetime.runs) == 1
    ledger = next(iter(lifetime.runs.values()))
    trained = ledger.rounds_trained
    assert trained[0] == 1 and len(trained) >= 2 and trained[-1] == 3, trained
    # Every step of every round it trained is still in the ledger after the restart:
    # 72 training notes in batches of 16 = 5 steps a round.
    assert ledger.steps == 5 * len(trained)
    # The epsilon hospital 1 reported last covers every round it trained, before and after
    # the restart; a ledger that restarted from zero would report less.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_record = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    epsilon = _history(client, run_record.info.run_id, "hospital_1/epsilon")
    last = epsilon[max(epsilon)]
    whole = epsilon_spent(ledger.history, ledger.delta, Accountant.rdp)
    after_restart_only = epsilon_spent([(1.0, ledger.history[0][1], 5 * (len(trained) - 1))],
                                       ledger.delta, Accountant.rdp)
    assert last == pytest.approx(whole, rel=1e-9)
    assert last > after_restart_only * 1.05


def test_policy_refuses_in_a_deployment_from_the_supernode_node_config(deployment, tiny_bert,
                                                                      tmp_path):
    """Hospital 0's node config sets a budget; the server asks for training without DP-SGD:
    hospital 0 trains nothing, hospital 1 (no policy) carries on, and MLflow says why."""
    for k, policy in ((0, {"max-epsilon": "3"}), (1, None)):
        deployment.hospital_key(f"hospital-{k}")
        deployment.start_supernode(f"hospital-{k}", k, _hospital_file(tmp_path, k),
                                   policy=policy)
    deployment.wait_for_nodes(2)
    status, details, output = deployment.finish(
        deployment.run(_overrides(tiny_bert, tmp_path, 2, "privacy=none")))
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert "privacy policy require-dp (node config, implied by max-epsilon)" in \
        run.data.tags["refused/hospital_0"]
    assert "refused/hospital_1" not in run.data.tags
    assert _history(client, run.info.run_id, "round/train_replies") == {1: 1, 2: 1}
    assert not _history(client, run.info.run_id, "hospital_0/train_loss"), "nothing trained"
    assert sorted(_history(client, run.info.run_id, "hospital_1/train_loss")) == [1, 2]
