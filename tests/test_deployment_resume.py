"""A real deployment (TLS, authenticated SuperNodes, deploy/ scripts) whose SuperLink dies
between rounds: the coordinator restarts it on the same database and port, runs
``resume=<run id>``, and the same SuperNodes, which kept retrying, train the remaining
rounds into the same MLflow run. Its own module: its own SuperLink, which it kills."""

from __future__ import annotations

import pytest

from strategies.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
from tasks.data.synthetic_notes import SPECIALTIES
from tests.deployment import hospital_file
from tests.support import history, only_run, run_overrides, wait_until

pytestmark = pytest.mark.e2e


def _checkpointed_round(store) -> int:
    files = list((store / "server-state").glob(f"*/{CHECKPOINT_FILE}"))
    try:
        return load_checkpoint(files[0]).round if files else -1
    except CheckpointError:
        return -1


def test_a_restarted_superlink_resumes_the_run_with_the_same_supernodes(hospitals, tiny_bert,
                                                                       tmp_path):
    deployment = hospitals
    for k in range(2):
        deployment.hospital_key(f"hospital-{k}")
        deployment.start_supernode(f"hospital-{k}", k, hospital_file(tmp_path, k, notes=40))
    deployment.wait_for_nodes(2)
    overrides = run_overrides(tiny_bert, tmp_path, "data=files",
                              f"data.labels=[{','.join(SPECIALTIES)}]", "num_rounds=3",
                              "train.local_epochs=1")
    run = deployment.run(overrides)
    try:
        wait_until(lambda: _checkpointed_round(tmp_path) >= 1, 600, "round 1 checkpointed",
                   every=0.2)
    finally:
        deployment.crash_superlink()
        run.kill()
    [checkpoint_file] = (tmp_path / "server-state").glob(f"*/{CHECKPOINT_FILE}")
    checkpoint = load_checkpoint(checkpoint_file)
    assert 1 <= checkpoint.round < 3

    deployment.start_superlink()  # same database, certificates and port
    deployment.wait_for_nodes(2)  # the SuperNodes reconnect by themselves
    resumed = deployment.run(f"{overrides} resume={checkpoint.mlflow_run_id}")
    status, details, output = deployment.finish(resumed)
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"
    assert all(p.poll() is None for p in deployment.supernodes.values()), "never restarted"

    client, record = only_run(tmp_path)
    run_id = record.info.run_id
    assert run_id == checkpoint.mlflow_run_id and record.info.status == "FINISHED"
    assert record.data.tags["resumes"] == "1"
    for key in ("round/seconds", "federated/accuracy"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == [0, 1, 2, 3], (key, steps)
    replies = history(client, run_id, "round/train_replies")
    assert all(replies[r] == 2 for r in range(checkpoint.round + 1, 4)), replies
    assert load_checkpoint(checkpoint_file).round == 3
