"""One ledger per hospital, across runs: a hospital's max-epsilon caps what its patients have
spent in every run, not one run; the ledger survives restarts, is checked against
dp-accounting, and is only ever archived on purpose, with a record."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fl_app import ledger_cli
from settings.compose import task_settings_to_yaml
from settings.task import (
    Accountant,
)
from tasks.privacy.accounting import epsilon_spent
from tasks.privacy.ledger import LedgerError, LedgerStore, PrivacyLedger
from tests.flower_processes import ROOT
from tests.hospital_process import hospital_train
from tests.support import independent_epsilon, task

NOISE, DELTA = 1.0, 1e-5
# 40 notes -> 32 training records in batches of 8: sample rate 1/4, 4 steps a round.
ROUND = (NOISE, 0.25, 4)


@pytest.fixture(scope="module")
def settings_yaml(tiny_bert):
    settings = task(tiny_bert, "data.notes_per_hospital=40", "train.batch_size=8",
                    "privacy=dp_sgd", "train.local_epochs=1", "privacy.dp_sgd.target_epsilon=null",
                    f"privacy.dp_sgd.noise_multiplier={NOISE}", planned_rounds=2)
    return task_settings_to_yaml(settings)


def _train_in_new_process(settings_file, state_dir, run_id, server_round, node_config):
    out = subprocess.run([sys.executable, "-m", "tests.hospital_process", str(settings_file),
                          str(state_dir), str(run_id), str(server_round),
                          json.dumps(node_config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_lifetime_ledger_composes_runs_and_stops_the_second_when_spent(settings_yaml,
                                                                      tmp_path):
    # A budget that holds exactly four rounds over the hospital's whole life.
    budget = epsilon_spent([ROUND] * 4, DELTA, Accountant.rdp) * 1.001
    policy = {"max-epsilon": budget, "max-delta": DELTA}
    state = tmp_path / "hospital-a"
    first_run = [hospital_train(settings_yaml, state, 101, r, policy) for r in (1, 2, 3)]
    assert [r["dp-steps"] for r in first_run] == [4, 8, 12]
    assert first_run[-1]["lifetime-epsilon"] == pytest.approx(first_run[-1]["epsilon"])

    # The second run starts in a new process: only the state directory remembers run 101.
    settings_file = tmp_path / "task.yaml"
    settings_file.write_text(settings_yaml)
    second = _train_in_new_process(settings_file, state, 202, 1, policy)
    assert second["dp-steps"] == 4, "a new run's own ledger starts at zero"
    assert second["epsilon"] == pytest.approx(first_run[0]["epsilon"]), "run epsilon: 1 round"
    both = [ROUND] * 4
    assert second["lifetime-epsilon"] == pytest.approx(independent_epsilon(both, DELTA),
                                                       rel=1e-6)
    assert second["can-train-next"] == 0, "the lifetime budget is spent"

    refused = hospital_train(settings_yaml, state, 202, 2, policy)
    assert refused["code"] == 4031
    assert "privacy policy max-epsilon" in refused["error"]
    assert "lifetime epsilon from" in refused["error"]
    # A third run is refused before its first step.
    third = hospital_train(settings_yaml, state, 303, 1, policy)
    assert "noise is too low for the remaining lifetime budget" in third["error"]

    ledger = LedgerStore(state).load(0, Accountant.rdp)
    assert sorted(ledger.runs) == [101, 202], "a refused run spent nothing and wrote nothing"
    assert [ledger.runs[k].rounds_trained for k in (101, 202)] == [[1, 2, 3], [1]]
    assert ledger.epsilon(DELTA) == pytest.approx(independent_epsilon(both, DELTA), rel=1e-6)

    # Without a policy the same ledger still reports the lifetime figure (no cap).
    free = hospital_train(settings_yaml, state, 404, 1)
    assert free["lifetime-epsilon"] == pytest.approx(
        independent_epsilon([ROUND] * 5, free["lifetime-delta"]), rel=1e-6)


def test_a_ledger_kept_with_another_accountant_is_refused_naming_the_key(tmp_path):
    store = LedgerStore(tmp_path)
    ledger = store.load(2, Accountant.prv)
    ledger.run(9).history.append(ROUND)
    store.save(ledger)
    with pytest.raises(LedgerError, match=r"hospital 2: privacy ledger .* key 'accountant' is "
                                          r"'prv' but this run uses privacy.dp_sgd.accountant="
                                          r"'rdp'"):
        store.load(2, Accountant.rdp)


@pytest.mark.parametrize("text", ["{", '{"format": 1, "accountant": "rdp"}',
                                  '{"format": 99, "accountant": "rdp", "runs": []}',
                                  '{"format": 1, "accountant": "x", "runs": []}'])
def test_a_damaged_ledger_is_never_silently_reset(tmp_path, text):
    (tmp_path / "privacy-ledger.json").write_text(text)
    with pytest.raises(LedgerError, match="unreadable.*refusing to train rather than forget"):
        LedgerStore(tmp_path).load(0, Accountant.rdp)


def test_ledgers_of_the_earlier_per_run_format_are_still_counted(tmp_path):
    legacy = PrivacyLedger(run_id=5, hospital=0, noise_multiplier=NOISE, delta=DELTA,
                           history=[ROUND, ROUND], rounds_trained=[1, 2])
    (tmp_path / "privacy_ledger_run_5.json").write_text(legacy.to_json())
    ledger = LedgerStore(tmp_path).load(0, Accountant.rdp)
    assert ledger.runs[5].steps == 8
    assert ledger.epsilon(DELTA) == pytest.approx(independent_epsilon([ROUND] * 2, DELTA))


def test_ledger_command_shows_runs_and_lifetime_and_archives_only_with_a_reason(tmp_path,
                                                                               capsys):
    store = LedgerStore(tmp_path)
    ledger = store.load(0, Accountant.rdp)
    for run_id, rounds in ((11, 2), (12, 1)):
        run = ledger.run(run_id)
        run.noise_multiplier, run.delta = NOISE, DELTA
        run.history.extend([ROUND] * rounds)
        run.rounds_trained.extend(range(1, rounds + 1))
    store.save(ledger)
    (tmp_path / "privacy-policy.toml").write_text("max-delta = 1e-6\n")

    assert ledger_cli.main([str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["steps"] for r in report["runs"]] == [8, 4]
    assert report["runs"][0]["run_epsilon"] == pytest.approx(
        independent_epsilon([ROUND] * 2, DELTA), rel=1e-6)
    assert report["hospital_delta"] == 1e-6 and "max-delta" in report["hospital_delta_from"]
    lifetime = independent_epsilon([ROUND] * 3, 1e-6)
    assert report["lifetime_epsilon"] == pytest.approx(lifetime, rel=1e-6)

    assert ledger_cli.main([str(tmp_path)]) == 0
    assert f"lifetime epsilon {lifetime:.4f} at delta 1e-06" in capsys.readouterr().out

    assert ledger_cli.main([str(tmp_path), "--archive"]) == 2
    assert "needs a reason" in capsys.readouterr().err
    assert store.load(0, Accountant.rdp).epsilon(1e-6) == pytest.approx(lifetime)

    assert ledger_cli.main([str(tmp_path), "--archive", "--reason", "new cohort"]) == 0
    capsys.readouterr()
    fresh = store.load(0, Accountant.rdp)
    assert fresh.runs == {} and fresh.events[-1]["reason"] == "new cohort"
    assert fresh.events[-1]["lifetime_epsilon"] == pytest.approx(lifetime)
    archived = list((tmp_path / "ledger-archive").glob("*/privacy-ledger.json"))
    assert len(archived) == 1 and "11" in archived[0].read_text()
