"""Private federated runs end to end: real ``flwr run`` simulations on the tiny model, privacy
read back from MLflow and checked against the hospitals' own ledgers and dp-accounting."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.test_e2e_simulation import _history, _overrides
from tests.test_privacy_accounting import independent_epsilon

pytestmark = pytest.mark.e2e


def _only_run(store):
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def _ledgers(superlink, flwr_run_id):
    """This run's entry in each hospital's lifetime ledger."""
    state = superlink.env["FLWR_HOME"] + "/clinical-fl/hospital-state"
    from pathlib import Path

    files = sorted(Path(state).glob("partition-*/privacy-ledger.json"))
    runs = [run for f in files for run in json.loads(f.read_text())["runs"]]
    return [run for run in runs if str(run["run_id"]) == str(flwr_run_id)]


def test_record_and_client_level_dp_are_logged_every_round(superlink, tiny_bert, tmp_path):
    status, details, output = superlink.flwr_run(_overrides(
        tiny_bert, tmp_path, "privacy=dp_sgd_central_dp privacy.dp_sgd.target_epsilon=8 "
        "privacy.central_dp.noise_multiplier=0.5 privacy.central_dp.clipping_norm=5"))
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"
    client, run = _only_run(tmp_path)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and "stopped_early" not in run.data.tags
    assert run.data.tags["privacy"] == "dp_sgd(epsilon=8.0)+central_dp(noise=0.5)"

    epsilon = _history(client, run_id, "privacy/epsilon_max")
    assert sorted(epsilon) == [1, 2] and epsilon[1] < epsilon[2] <= 8.0
    assert epsilon[2] > 0.95 * 8.0, "calibrated for exactly the 2 planned rounds"
    assert _history(client, run_id, "privacy/epsilon_mean")[2] <= epsilon[2]
    for key in ("privacy/delta", "privacy/noise_multiplier", "privacy/clipping_norm",
                "privacy/sample_rate", "hospital_0/epsilon", "hospital_1/epsilon"):
        assert sorted(_history(client, run_id, key)) == [1, 2], key

    # The logged epsilon is what the hospitals' own ledgers add up to, per dp-accounting.
    from fl_app.flower_runs import started_run_id

    ledgers = _ledgers(superlink, started_run_id(output))
    assert len(ledgers) == 2 and all(ledger["rounds_trained"] == [1, 2] for ledger in ledgers)
    recomputed = [independent_epsilon([tuple(s) for s in ledger["history"]], ledger["delta"])
                  for ledger in ledgers]
    assert epsilon[2] == pytest.approx(max(recomputed), rel=1e-6)
    assert _history(client, run_id, "privacy/delta")[2] == max(lg["delta"] for lg in ledgers)

    client_level = _history(client, run_id, "privacy/client_level_epsilon")
    assert sorted(client_level) == [1, 2] and 0 < client_level[1] < client_level[2]
    assert _history(client, run_id, "privacy/client_level_releases")[2] == 2


def test_run_ends_cleanly_when_no_hospital_can_afford_another_round(superlink, tiny_bert,
                                                                    tmp_path):
    status, details, output = superlink.flwr_run(_overrides(
        tiny_bert, tmp_path, "num_rounds=6 privacy=dp_sgd train.local_epochs=1 "
        "privacy.dp_sgd.target_epsilon=null privacy.dp_sgd.noise_multiplier=1.0 "
        "privacy.dp_sgd.max_epsilon=6"))
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"
    client, run = _only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert "no hospital can train within its privacy budget" in run.data.tags["stopped_early"]
    epsilon = _history(client, run.info.run_id, "privacy/epsilon_max")
    trained = sorted(epsilon)
    assert 1 <= len(trained) < 6 and trained == list(range(1, len(trained) + 1))
    assert all(value <= 6.0 for value in epsilon.values())
    assert _history(client, run.info.run_id, "privacy/hospitals_within_budget")[trained[-1]] == 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "adapter" in artifacts, "the last global adapter is still saved"


def test_a_delta_too_large_for_a_hospital_stops_the_run_before_training(superlink, tiny_bert,
                                                                         tmp_path):
    # 150 notes per hospital -> 120 training records; 0.01 is not below 1/120.
    status, _, output = superlink.flwr_run(_overrides(
        tiny_bert, tmp_path, "privacy=dp_sgd privacy.dp_sgd.target_delta=0.01"))
    assert status == "finished:failed"
    assert "hospital 0: privacy.dp_sgd.target_delta=0.01 is not below 1/records" in output
    client, run = _only_run(tmp_path)
    assert run.info.status == "FAILED" and "target_delta" in run.data.tags["failure"]
    assert not client.get_metric_history(run.info.run_id, "privacy/epsilon_max")


def test_policy_refuses_in_simulation_and_the_reason_reaches_mlflow(superlink, tiny_bert,
                                                                    tmp_path):
    """Both hospitals' policy files require DP; the server asks for none: nothing trains."""
    from pathlib import Path

    state = Path(superlink.env["FLWR_HOME"]) / "clinical-fl" / "hospital-state"
    policies = [state / f"partition-{k}" / "privacy-policy.toml" for k in (0, 1)]
    try:
        for policy in policies:
            policy.parent.mkdir(parents=True, exist_ok=True)
            policy.write_text("max-epsilon = 3.0\n")
        status, details, output = superlink.flwr_run(_overrides(tiny_bert, tmp_path,
                                                                 "privacy=none"))
    finally:
        for policy in policies:
            policy.unlink(missing_ok=True)
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"
    client, run = _only_run(tmp_path)
    tags = run.data.tags
    for k in (0, 1):
        assert "privacy policy require-dp" in tags[f"refused/hospital_{k}"]
        assert "implied by max-epsilon" in tags[f"refused/hospital_{k}"]
    assert "no hospital can train within its privacy budget" in tags["stopped_early"]
    assert not client.get_metric_history(run.info.run_id, "train/loss"), "nothing trained"
    assert not client.get_metric_history(run.info.run_id, "round/train_replies")
