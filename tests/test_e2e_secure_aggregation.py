"""End to end: real ``flwr run`` simulations with secure aggregation (2 hospitals, tiny model).

The same deterministic non-private run with each mode ends at the same accuracy (the
aggregate differs from FedAvg's by the quantisation or CKKS error only, about 1e-6; one
round, because the tiny model at learning rate 1e-2 amplifies such differences through
further rounds of training into single flipped notes: measured 2 rounds: none and SecAgg+
0.625, CKKS 0.617 on 120 notes; the MiniLM default run's parity is in docs/benchmarks.md),
and MLflow records the mode and the cryptographic stages' bytes and times. SecAgg+ with
DP-SGD runs in the deployment test (tests/test_deployment.py), client-level DP over the
secure sum in process (tests/test_secure_aggregation.py).
"""

from __future__ import annotations

import pytest

from tests.support import history, independent_epsilon, only_run, run_overrides


def _run(superlink, tiny_bert, store, *overrides, rounds=1):
    store.mkdir()
    status, details, output = superlink.flwr_run(run_overrides(
        tiny_bert, store, f"num_rounds={rounds}", "train.learning_rate=1e-2", *overrides))
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"
    client, run = only_run(store)
    assert run.info.status == "FINISHED"
    return client, run


@pytest.mark.e2e
def test_every_mode_trains_the_same_model_and_mlflow_records_the_crypto(
        superlink, tiny_bert, tmp_path):
    accuracy = {}
    for mode in ("none", "secagg_plus", "ckks"):
        client, run = _run(superlink, tiny_bert, tmp_path / mode, f"secure_aggregation={mode}",
                           rounds=1)
        run_id = run.info.run_id
        assert run.data.tags["secure_aggregation"] == mode
        assert history(client, run_id, "round/train_replies") == {1: 2}
        accuracy[mode] = (history(client, run_id, "federated/accuracy")[1],
                          history(client, run_id, "central/accuracy")[1])
        crypto = ("secure_aggregation/stage_seconds", "secure_aggregation/server_seconds",
                  "secure_aggregation/update_bytes", "secure_aggregation/hospital_seconds_max")
        for key in crypto:
            logged = history(client, run_id, key)
            if mode == "none":
                assert not logged, key
            else:
                assert set(logged) == {1}, key
                assert all(v > 0 for v in logged.values()), key
    for mode in ("secagg_plus", "ckks"):
        for plain, secure in zip(accuracy["none"], accuracy[mode], strict=True):
            assert abs(secure - plain) <= 0.005, (mode, accuracy)


@pytest.mark.e2e
def test_distributed_dp_runs_over_secagg_plus_and_accounts_every_round(
        superlink, tiny_bert, tmp_path):
    rounds = 3
    client, run = _run(superlink, tiny_bert, tmp_path / "distributed",
                       "secure_aggregation=secagg_plus", "privacy=distributed_dp",
                       "privacy.distributed_dp.expected_batch_size=32", "evaluate_every=2",
                       rounds=rounds)
    run_id = run.info.run_id
    # Scored after rounds 0, 2 and the last only; training figures every round.
    assert set(history(client, run_id, "central/accuracy")) == {0, 2, 3}
    assert set(history(client, run_id, "federated/accuracy")) == {0, 2, 3}
    assert run.data.tags["privacy"] == "distributed_dp(epsilon=8.0)"
    # The noise each ledger records: sigma against SecAgg+'s lattice (tasks/privacy/lattice.py).
    sigma = float(run.data.params["distributed_dp_plan.accounted_noise_multiplier"])
    assert 0.9 < sigma / float(run.data.params["distributed_dp_plan.noise_multiplier"]) < 1
    rate = float(run.data.params["distributed_dp_plan.sample_rate"])
    delta = float(run.data.params["distributed_dp_plan.delta"])
    assert history(client, run_id, "round/train_replies") == {r: 2 for r in range(1, 4)}
    # Each hospital's epsilon: rounds steps of the sampled Gaussian at (q, sigma), its ledger's.
    epsilon = history(client, run_id, "hospital_0/epsilon")
    assert epsilon[rounds] == pytest.approx(independent_epsilon([(sigma, rate, rounds)], delta),
                                            rel=1e-6)
    assert epsilon[rounds] <= 8.0
    # The released sums stayed far inside what SecAgg+'s modulus decodes (no wrap-around).
    used = history(client, run_id, "secure_aggregation/range_used")
    assert set(used) == {1, 2, 3} and 0 < max(used.values()) < 0.01
    # And what it would be with its own share of the noise alone.
    assert history(client, run_id, "hospital_0/epsilon_if_alone")[rounds] > epsilon[rounds]
