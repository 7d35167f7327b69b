"""Deployment with real processes on 127.0.0.1, built with the scripts in deploy/: TLS +
SuperNode authentication, each hospital on its own data file, the MLflow run with the server.

One SuperLink (with its certificates) serves the whole module. The tests that only join,
refuse or revoke SuperNodes run first, each with hospitals of its own; then one private run
carries the behaviours that need a federation at work: a hospital killed mid-round (after it
shared its SecAgg+ keys), one restarted with its ledger, one whose own policy (node
config) refuses the run, and the SuperLink itself killed after round 2 and restarted, the run
resumed into the same MLflow run with the same SuperNodes. The CKKS deployment run is in
test_deployment_ckks.py (its own SuperLink, so that pytest-xdist can run the two files side by
side)."""

from __future__ import annotations

import signal

import pytest

from clinical_fl.settings.privacy import Accountant
from strategies.checkpoint import CHECKPOINT_FILE, load_checkpoint
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.privacy.accounting import epsilon_spent
from tasks.privacy.ledger import LedgerStore
from tests.deployment import hospital_file, wait_for_log
from tests.support import checkpointed_round, history, only_run, run_overrides, wait_until

pytestmark = pytest.mark.e2e


def test_an_unregistered_supernode_is_refused_and_gets_no_task(hospitals, tmp_path):
    deployment = hospitals
    before = deployment.connected_nodes()
    deployment.hospital_key("solo")
    rogue_key = deployment.hospital_key("rogue", register=False)
    deployment.start_supernode("solo", 0, hospital_file(tmp_path, 0))
    rogue = deployment.start_supernode("rogue", 1, hospital_file(tmp_path, 1), key=rogue_key)
    deployment.wait_for_nodes(before + 1)
    assert rogue.wait(timeout=120) != 0, "the SuperLink must turn the unknown key away"
    log = deployment.supernode_log("rogue")
    assert "Failed to activate SuperNode" in log, log[-2000:]
    assert "Starting ClientApp" not in log and "flwr-clientapp" not in log
    assert deployment.connected_nodes() == before + 1


def test_a_supernode_without_tls_cannot_join_a_tls_superlink(hospitals, tmp_path):
    deployment = hospitals
    before = deployment.connected_nodes()
    deployment.hospital_key("plain")
    deployment.start_supernode("plain", 0, hospital_file(tmp_path, 0), secure=False)
    wait_until(lambda: "Connection attempt failed" in deployment.supernode_log("plain"), 60,
               "the SuperNode without TLS logs its failed connection")
    assert deployment.connected_nodes() == before


def test_a_revoked_hospital_is_disconnected(hospitals, tmp_path):
    deployment = hospitals
    before = deployment.connected_nodes()
    for k, name in enumerate(("kept", "revoked")):
        deployment.hospital_key(name)
        deployment.start_supernode(name, k, hospital_file(tmp_path, k))
    deployment.wait_for_nodes(before + 2)
    # register.sh noted each hospital's node id: the coordinator revokes by name.
    registry = dict(line.split("\t")[:2] for line in
                    (deployment.root / "hospitals.tsv").read_text().splitlines())
    assert {"kept", "revoked"} <= set(registry)
    revoked = deployment.flwr("supernode", "unregister", registry["revoked"],
                              deployment.connection)
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert deployment.supernodes["revoked"].wait(timeout=120) is not None
    assert deployment.connected_nodes() == before + 1
    assert deployment.supernodes["kept"].poll() is None, "the other hospital stays"


def test_a_private_run_survives_a_lost_and_a_restarted_hospital_and_a_refusing_one(
        hospitals, tiny_bert, tmp_path):
    """Hospitals 0-2 train with DP-SGD and SecAgg+ over TLS with authenticated SuperNodes, each
    on its own file. Hospital 2 is killed in the middle of round 1, after it shared its keys
    (its third train message of the round is the collect stage, which trains): the others'
    sum is recovered with the shares of its key. Hospital 1 is restarted between
    rounds 1 and 2 (after its round-1 evaluation reply), with the same key, data and state
    directory; hospital 3's
    own budget (node config, max-epsilon) is too small for one round, so it refuses. Once
    round 2 is checkpointed the SuperLink and its ServerApp are SIGKILLed, the SuperLink is
    restarted on its database, the SuperNodes reconnect by themselves, and ``resume=``
    trains round 3: the hospitals' ledgers carry on in one entry."""
    deployment = hospitals
    for k in range(4):
        deployment.hospital_key(f"hospital-{k}")
        deployment.start_supernode(f"hospital-{k}", k, hospital_file(tmp_path, k),
                                   policy={"max-epsilon": "0.05"} if k == 3 else None)
    deployment.wait_for_nodes(4)
    overrides = run_overrides(
        tiny_bert, tmp_path, "data=files", f"data.labels=[{','.join(SPECIALTIES)}]",
        "strategy.min_hospitals=2", "num_rounds=3", "train.learning_rate=1e-2",
        "privacy=dp_sgd", "train.local_epochs=1", "privacy.dp_sgd.target_epsilon=null",
        "privacy.dp_sgd.noise_multiplier=1.0", "secure_aggregation=secagg_plus")
    run = deployment.run(overrides)
    # SecAgg+'s setup, key sharing, then the collect stage: it dies after sharing its keys.
    wait_for_log(deployment, "hospital-2", "Receiving: train message", run, times=3)
    deployment.stop_supernode("hospital-2", signal.SIGKILL)  # dies in the middle of round 1
    # Between rounds: a SuperNode restarted while it holds a message comes back under the same
    # node id, and the server would wait for that reply until the round's timeout.
    wait_for_log(deployment, "hospital-1", "Sending: evaluate message", run, times=2)
    deployment.stop_supernode("hospital-1")
    deployment.start_supernode("hospital-1", 1, hospital_file(tmp_path, 1))
    # The coordinator's machine fails once round 2 is checkpointed; it comes back.
    try:
        wait_until(lambda: checkpointed_round(tmp_path) >= 2, 600, "round 2 checkpointed",
                   every=0.2)
    finally:
        deployment.crash_superlink()
        run.kill()
    [checkpoint_file] = (tmp_path / "server-state").glob(f"*/{CHECKPOINT_FILE}")
    assert load_checkpoint(checkpoint_file).round == 2, "killed between rounds 2 and 3"
    deployment.start_superlink()  # same database, certificates and port
    deployment.wait_for_nodes(3)  # hospitals 0, 1 and 3 reconnect by themselves
    checkpoint = load_checkpoint(checkpoint_file)
    resumed = deployment.run(f"{overrides} resume={checkpoint.mlflow_run_id}")
    status, details, output = deployment.finish(resumed)
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"

    client, record = only_run(tmp_path)  # the resumed run went on in the same MLflow run
    run_id = record.info.run_id
    assert record.info.status == "FINISHED" and record.data.tags["resumes"] == "1"
    for key in ("federated/accuracy", "federated/macro_f1", "round/seconds"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == [0, 1, 2, 3], (key, steps)  # each round once
    # Each hospital read its own file: 90 notes, 72 for training.
    for k in range(4):
        assert record.data.params[f"hospital_{k}.train_records"] == "72"

    # The lost hospital: round 1 aggregated the two that answered, and MLflow shows the loss.
    assert record.data.tags["secure_aggregation"] == "secagg_plus"
    replies = history(client, run_id, "round/train_replies")
    # Round 2 may go out while hospital 1 restarts; an offline node's message fails at once
    # (and a SecAgg+ round of one hospital releases nothing).
    assert replies[1] == 2 and replies[3] == 2, replies
    assert sum(history(client, run_id, "round/error_replies").values()) >= 1

    # The refusing hospital: its own policy, named in MLflow; it trained nothing.
    assert record.data.tags["refused/hospital_3"].startswith("hospital 3: policy-refused "
                                                             "(max-epsilon)")
    assert "privacy policy max-epsilon (node config)" in (
        deployment.root / "hospitals" / "hospital-3" / "hospital.log").read_text()
    assert "refused/hospital_0" not in record.data.tags
    assert not history(client, run_id, "hospital_3/epsilon")

    # The restarted hospital kept every step of every round it trained in its ledger, in one
    # entry across the resume: 72 training notes in batches of 16 = 5 steps a round.
    lifetime = LedgerStore(deployment.root / "hospitals" / "hospital-1").load(1, Accountant.rdp)
    assert len(lifetime.runs) == 1
    ledger = next(iter(lifetime.runs.values()))
    trained = ledger.rounds_trained
    assert trained[0] == 1 and len(trained) >= 2 and trained[-1] == 3, trained
    assert ledger.steps == 5 * len(trained)
    # The epsilon hospital 1 reported last covers every round it trained, before and after
    # the restart; a ledger that restarted from zero would report less.
    epsilon = history(client, run_id, "hospital_1/epsilon")
    last = epsilon[max(epsilon)]
    whole = epsilon_spent(ledger.history, ledger.delta, Accountant.pld)  # the default
    after_restart_only = epsilon_spent([(1.0, ledger.history[0][1], 5 * (len(trained) - 1))],
                                       ledger.delta, Accountant.pld)
    assert last == pytest.approx(whole, rel=1e-9)
    assert last > after_restart_only * 1.05
