"""Private federated runs end to end: real ``flwr run`` simulations on the tiny model, privacy
read back from MLflow and checked against the hospitals' own ledgers and dp-accounting.
Refusals before training (a delta too large for a hospital, its policy) are checked
in-process in test_privacy_policy.py and here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clinical_fl.settings.compose import task_settings_to_yaml
from fl_app.commands.flower_runs import started_run_id
from tests.hospital_process import hospital_preflight
from tests.support import history, independent_epsilon, only_run, run_overrides, task


def _ledgers(superlink, flwr_run_id):
    """This run's entry in each hospital's lifetime ledger."""
    state = Path(superlink.env["FLWR_HOME"]) / "clinical-fl" / "hospital-state"
    files = sorted(state.glob("partition-*/privacy-ledger.json"))
    runs = [run for f in files for run in json.loads(f.read_text())["runs"]]
    return [run for run in runs if str(run["run_id"]) == str(flwr_run_id)]


@pytest.mark.e2e
def test_record_and_client_level_dp_are_logged_every_round(superlink, tiny_bert, tmp_path):
    status, details, output = superlink.flwr_run(run_overrides(
        tiny_bert, tmp_path, "num_rounds=2", "data.notes_per_hospital=150",
        "data.server_test_notes=100", "train.local_epochs=2",
        "privacy=dp_sgd_central_dp", "privacy.dp_sgd.target_epsilon=8",
        "privacy.central_dp.noise_multiplier=0.5", "privacy.central_dp.clipping_norm=5"))
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"
    client, run = only_run(tmp_path)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and "stopped_early" not in run.data.tags
    assert run.data.tags["privacy"] == "dp_sgd(epsilon=8.0)+central_dp(noise=0.5)"

    epsilon = history(client, run_id, "privacy/epsilon_max")
    assert sorted(epsilon) == [1, 2] and epsilon[1] < epsilon[2] <= 8.0
    assert epsilon[2] > 0.95 * 8.0, "calibrated for exactly the 2 planned rounds"
    assert history(client, run_id, "privacy/epsilon_mean")[2] <= epsilon[2]
    for key in ("privacy/delta", "privacy/noise_multiplier", "privacy/clipping_norm",
                "privacy/sample_rate", "hospital_0/epsilon", "hospital_1/epsilon"):
        assert sorted(history(client, run_id, key)) == [1, 2], key
    assert not history(client, run_id, "train/loss"), "no training loss leaves under DP-SGD"

    # The logged epsilon is what the hospitals' own ledgers add up to, per dp-accounting.
    ledgers = _ledgers(superlink, started_run_id(output))
    assert len(ledgers) == 2 and all(ledger["rounds_trained"] == [1, 2] for ledger in ledgers)
    recomputed = [independent_epsilon([tuple(s) for s in ledger["history"]], ledger["delta"])
                  for ledger in ledgers]
    assert epsilon[2] == pytest.approx(max(recomputed), rel=1e-6)
    assert history(client, run_id, "privacy/delta")[2] == max(lg["delta"] for lg in ledgers)

    client_level = history(client, run_id, "privacy/client_level_epsilon")
    assert sorted(client_level) == [1, 2] and 0 < client_level[1] < client_level[2]
    assert history(client, run_id, "privacy/client_level_releases")[2] == 2


@pytest.mark.e2e
def test_run_ends_cleanly_when_no_hospital_can_afford_another_round(superlink, tiny_bert,
                                                                    tmp_path):
    status, details, output = superlink.flwr_run(run_overrides(
        tiny_bert, tmp_path, "num_rounds=4", "data.notes_per_hospital=100",
        "data.server_test_notes=0", "privacy=dp_sgd", "train.local_epochs=1",
        "privacy.dp_sgd.target_epsilon=null", "privacy.dp_sgd.noise_multiplier=1.0",
        "privacy.dp_sgd.max_epsilon=6.5"))  # 6.0 after 2 rounds, 6.9 after 3
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert "no hospital can train within its privacy budget" in run.data.tags["stopped_early"]
    epsilon = history(client, run.info.run_id, "privacy/epsilon_max")
    trained = sorted(epsilon)
    assert 1 <= len(trained) < 4 and trained == list(range(1, len(trained) + 1))
    assert all(value <= 6.5 for value in epsilon.values())
    assert history(client, run.info.run_id, "privacy/hospitals_within_budget")[trained[-1]] == 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "adapter" in artifacts, "the last global adapter is still saved"


def test_a_delta_too_large_for_a_hospital_is_named_by_its_preflight_reply(tiny_bert, tmp_path):
    # 150 notes per hospital -> 120 training records; 0.01 is not below 1/120.
    settings = task(tiny_bert, "data.notes_per_hospital=150", "privacy=dp_sgd",
                    "privacy.dp_sgd.target_delta=0.01", planned_rounds=2)
    status = hospital_preflight(task_settings_to_yaml(settings), tmp_path, 1)
    assert status["problem"] == "4031 privacy-budget-refused key=privacy.dp_sgd.target_delta"
    assert "hospital 0: privacy.dp_sgd.target_delta=0.01 is not below 1/records" in (
        tmp_path / "hospital.log").read_text()
