"""A CKKS run in a real deployment (TLS + SuperNode authentication, deploy/ scripts): the
operator's key material, a hospital lost mid-round."""

from __future__ import annotations

import pytest

from tasks.data.synthetic_notes import SPECIALTIES
from tests.deployment import hospital_file, wait_for_log
from tests.support import history, only_run, run_overrides

pytestmark = pytest.mark.e2e


def test_a_ckks_run_uses_the_operators_key_and_completes_without_a_lost_hospital(
        hospitals, tiny_bert, tmp_path):
    """Three hospitals hold the key material deploy/ckks-keys.sh made (node config
    ckks-context); the server is pinned to its public half. Hospital 2 stops while it trains
    for round 1: the round adds up the two encrypted updates that arrived."""
    deployment = hospitals
    secret = deployment.ckks_keys()
    for k in range(3):
        deployment.hospital_key(f"ckks-{k}")
        deployment.start_supernode(f"ckks-{k}", k, hospital_file(tmp_path, k),
                                   ckks_context=secret)
    deployment.wait_for_nodes(3)
    run = deployment.run(run_overrides(
        tiny_bert, tmp_path, "data=files", f"data.labels=[{','.join(SPECIALTIES)}]",
        "strategy.min_hospitals=2", "num_rounds=1", "train.learning_rate=1e-2",
        "secure_aggregation=ckks",
        f"secure_aggregation.ckks_public_context={secret.parent / 'ckks-public.ctx'}"))
    wait_for_log(deployment, "ckks-2", "Receiving: train message", run)
    deployment.stop_supernode("ckks-2")  # SIGTERM: the SuperNode leaves mid-round
    status, details, output = deployment.finish(run)
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"
    client, record = only_run(tmp_path)
    assert record.data.tags["secure_aggregation"] == "ckks"
    assert history(client, record.info.run_id, "round/train_replies") == {1: 2}
    # Two encrypted updates of at least one 131 KB ciphertext each reached the server.
    assert history(client, record.info.run_id, "secure_aggregation/update_bytes")[1] > 2 * 131e3
