"""One ledger per hospital, across runs: a hospital's max-epsilon caps what its patients have
spent in every run, not one run; the ledger survives restarts, is checked against
dp-accounting, and is only ever archived on purpose, with a record."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from clinical_fl.settings.compose import task_settings_to_yaml
from clinical_fl.settings.privacy import Accountant
from fl_app.commands import ledger as ledger_cli
from tasks.privacy.accounting import epsilon_spent
from tasks.privacy.ledger import LedgerError, LedgerStore, LifetimeLedger, PrivacyLedger
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
    # A budget that holds exactly four rounds over the hospital's whole life, accounted with
    # the default accountant (PLD).
    budget = epsilon_spent([ROUND] * 4, DELTA, Accountant.pld) * 1.001
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
    assert refused["code"] == 4031  # the server learns the code; the hospital's log, why
    local = (state / "hospital.log").read_text()
    assert "privacy policy max-epsilon" in local and "lifetime epsilon from" in local
    # A third run is refused before its first step.
    third = hospital_train(settings_yaml, state, 303, 1, policy)
    assert third["code"] == 4007
    assert "noise is too low for the remaining lifetime budget" in (
        state / "hospital.log").read_text().rsplit("refused as", 1)[-1]

    ledger = LedgerStore(state).load(0, Accountant.pld)
    assert sorted(ledger.runs) == [101, 202], "a refused run spent nothing and wrote nothing"
    assert [ledger.runs[k].rounds_trained for k in (101, 202)] == [[1, 2, 3], [1]]
    assert [ledger.runs[k].accountants for k in (101, 202)] == [["pld"], ["pld"]]
    assert ledger.epsilon(DELTA) == pytest.approx(independent_epsilon(both, DELTA), rel=1e-6)
    # RDP, the cross-check, reads the same ledger and is never below.
    assert LedgerStore(state).load(0, Accountant.rdp).epsilon(DELTA) > ledger.epsilon(DELTA)

    # Without a policy the same ledger still reports the lifetime figure (no cap).
    free = hospital_train(settings_yaml, state, 404, 1)
    assert free["lifetime-epsilon"] == pytest.approx(
        independent_epsilon([ROUND] * 5, free["lifetime-delta"]), rel=1e-6)


def _kept_with_rdp(store: LedgerStore, run_id: int, rounds: int) -> None:
    """A run booked as the hospital books it (fl_app/hospital/state.py::save_ledger), by a
    run whose mechanism accounts with RDP."""
    ledger = store.load(2, Accountant.rdp)
    run = ledger.run(run_id)
    run.noise_multiplier, run.delta = NOISE, DELTA
    for _ in range(rounds):
        run.add_step(ROUND)
    run.booked_by(Accountant.rdp)
    store.save(ledger)


def test_audit_pld_a_ledger_kept_with_rdp_loads_under_pld_and_composes(tmp_path, capsys):
    """The history is the mechanism, (noise, rate, steps): a run accounting with PLD reads a
    ledger kept with RDP, composes its own steps after it, and computes the lifetime epsilon
    over the whole history with PLD, never above RDP's figure; and the other way round."""
    store = LedgerStore(tmp_path)
    _kept_with_rdp(store, 9, rounds=2)
    assert json.loads(store.path.read_text())["accountant"] == "rdp"

    ledger = store.load(2, Accountant.pld)
    assert ledger.accountant == Accountant.pld and ledger.runs[9].accountants == ["rdp"]
    assert ledger.epsilon(DELTA) == epsilon_spent([ROUND] * 2, DELTA, Accountant.pld)
    assert ledger.epsilon(DELTA) == pytest.approx(independent_epsilon([ROUND] * 2, DELTA),
                                                  rel=1e-6)
    run = ledger.run(10)  # a new run, accounting with PLD, composes after the RDP one
    run.noise_multiplier, run.delta = NOISE, DELTA
    run.add_step(ROUND)
    run.booked_by(Accountant.pld)
    store.save(ledger)

    written = json.loads(store.path.read_text())
    assert written["format"] == 3 and written["accountant"] == "pld"
    assert [r["accountants"] for r in written["runs"]] == [["rdp"], ["pld"]]
    whole = [ROUND] * 3
    pld = store.load(2, Accountant.pld).epsilon(DELTA)
    assert pld == epsilon_spent(whole, DELTA, Accountant.pld)
    assert pld == pytest.approx(independent_epsilon(whole, DELTA), rel=1e-6)
    rdp = store.load(2, Accountant.rdp).epsilon(DELTA)  # and back: RDP reads it too
    assert rdp == pytest.approx(independent_epsilon(whole, DELTA, Accountant.rdp), rel=1e-6)
    assert pld < rdp
    assert store.load(2, Accountant.prv).epsilon(DELTA) > 0  # any accountant composes it

    # The privacy officer's view: PLD's figure (the accountant last written with), RDP's
    # beside it, and which accountants booked each run.
    assert ledger_cli.main([str(tmp_path), "--json", "--delta", str(DELTA)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accountant"] == "pld" and report["lifetime_epsilon"] == pytest.approx(pld)
    assert report["lifetime_epsilon_rdp"] == pytest.approx(rdp)
    assert [r["accountants"] for r in report["runs"]] == [["rdp"], ["pld"]]
    assert ledger_cli.main([str(tmp_path), "--delta", str(DELTA), "--accountant", "rdp"]) == 0
    assert f"lifetime epsilon {rdp:.4f} at delta 1e-05" in capsys.readouterr().out


@pytest.fixture(scope="module")
def settings_yaml_rdp(tiny_bert):
    return task_settings_to_yaml(task(
        tiny_bert, "data.notes_per_hospital=40", "train.batch_size=8", "privacy=dp_sgd",
        "train.local_epochs=1", "privacy.dp_sgd.target_epsilon=null",
        f"privacy.dp_sgd.noise_multiplier={NOISE}", "privacy.dp_sgd.accountant=rdp",
        planned_rounds=2))


def test_audit_pld_the_lifetime_budget_holds_under_the_accountant_each_run_uses(
        settings_yaml, settings_yaml_rdp, tmp_path):
    """A hospital that kept its ledger with RDP carries on under PLD: the lifetime epsilon is
    the whole history's under the run's accountant, and its budget is checked with that
    accountant. Both figures bound the same true epsilon, so a budget checked with either
    holds; the server choosing the accountant loosens nothing of the hospital's policy."""
    budget = 7.5  # [ROUND] x 4: RDP 8.26 (over), PLD 7.30 (within)
    policy = {"max-epsilon": budget, "max-delta": DELTA}
    state = tmp_path / "hospital-a"
    first = [hospital_train(settings_yaml_rdp, state, 101, r, policy) for r in (1, 2)]
    assert first[-1]["lifetime-epsilon"] == pytest.approx(
        independent_epsilon([ROUND] * 2, DELTA, Accountant.rdp), rel=1e-6)

    second = hospital_train(settings_yaml, state, 202, 1, policy)  # the default: PLD
    three = [ROUND] * 3
    assert second["lifetime-epsilon"] == pytest.approx(independent_epsilon(three, DELTA),
                                                       rel=1e-6)
    assert second["lifetime-epsilon"] < epsilon_spent(three, DELTA, Accountant.rdp)
    assert second["can-train-next"] == 1, "PLD: a 4th round reaches 7.30, within 7.5"
    ledger = LedgerStore(state).load(0, Accountant.pld)
    assert [ledger.runs[k].accountants for k in (101, 202)] == [["rdp"], ["pld"]]

    # A run accounting with RDP checks the same budget with RDP: a 4th round (8.26) is over.
    refused = hospital_train(settings_yaml_rdp, state, 303, 1, policy)
    assert refused["code"] == 4007
    third = hospital_train(settings_yaml, state, 303, 1, policy)
    assert third["lifetime-epsilon"] == pytest.approx(
        independent_epsilon([ROUND] * 4, DELTA), rel=1e-6)
    assert third["lifetime-epsilon"] <= budget
    assert third["can-train-next"] == 0, "PLD: a 5th round would reach 8.08"


@pytest.mark.parametrize("text", ["{", '{"format": 1, "accountant": "rdp"}',
                                  '{"format": 99, "accountant": "rdp", "runs": []}',
                                  '{"format": 1, "accountant": "x", "runs": []}'])
def test_a_damaged_ledger_is_never_silently_reset(tmp_path, text):
    (tmp_path / "privacy-ledger.json").write_text(text)
    with pytest.raises(LedgerError, match="unreadable.*refusing to train rather than forget"):
        LedgerStore(tmp_path).load(0, Accountant.rdp)


BAD_STEPS = [(-1.0, 0.25, 4), (0.0, 0.25, 4), (math.nan, 0.25, 4), (math.inf, 0.25, 4),
             (NOISE, 0.0, 4), (NOISE, 2.0, 4), (NOISE, math.nan, 4), (NOISE, 0.25, -1),
             (NOISE, 0.25, 2.5)]


@pytest.mark.parametrize("step", BAD_STEPS)
def test_a_step_the_accountant_cannot_stand_on_is_never_booked(step):
    """A hostile server must not make a hospital book sigma -1 (RDP sees sigma squared: it
    would account as +1), a NaN (epsilon NaN compares false to every cap) or a rate > 1."""
    ledger = PrivacyLedger(run_id=3, hospital=6)
    ledger.add_step(ROUND)
    with pytest.raises(LedgerError, match="hospital 6: privacy ledger of run 3: step: "
                                          "(noise multiplier|sample rate|step count)"):
        ledger.add_step(step)
    assert ledger.history == [ROUND], "nothing booked"


def _ledger_file(tmp_path, run: dict, hospital: int = 6) -> None:
    data = {"format": 2, "hospital": hospital, "accountant": "rdp",
            "neighbouring_relation": "zero_out", "runs": [run], "events": []}
    (tmp_path / "privacy-ledger.json").write_text(json.dumps(data))


def _run(**fields) -> dict:
    return {"run_id": 3, "hospital": 6, "noise_multiplier": NOISE, "delta": DELTA,
            "history": [list(ROUND)], "rounds_trained": [1]} | fields


@pytest.mark.parametrize("step", BAD_STEPS + [(NOISE, 0.25, "4"), ("1.0", 0.25, 4)])
def test_a_ledger_file_with_a_bad_entry_is_refused_naming_file_and_field(tmp_path, step):
    _ledger_file(tmp_path, _run(history=[list(ROUND), list(step)]))
    # A NaN or inf is refused by the JSON reader, any other by the entry check: both name
    # the file and the field.
    with pytest.raises(LedgerError, match=r"privacy ledger .*privacy-ledger.json is unreadable "
                                          r"\(.*history\[1\]"):
        LedgerStore(tmp_path).load(6, Accountant.rdp)
    with pytest.raises(LedgerError, match=r"history\[1\]"):  # context.state's copy too
        PrivacyLedger.from_dict(_run(history=[list(ROUND), list(step)]))


@pytest.mark.parametrize("field,value", [("noise_multiplier", -1.0), ("noise_multiplier", 0.0),
                                         ("noise_multiplier", math.inf), ("delta", 0.0),
                                         ("delta", 1.0), ("delta", -1e-5),
                                         ("accountants", ["gdp"]), ("accountants", "rdp")])
def test_a_ledger_with_a_bad_committed_noise_or_delta_is_refused(tmp_path, field, value):
    _ledger_file(tmp_path, _run(**{field: value}))
    with pytest.raises(LedgerError, match=f"unreadable .*{field}"):
        LedgerStore(tmp_path).load(6, Accountant.rdp)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_ledger_file_containing_nan_or_infinity_is_refused_on_load(tmp_path, constant):
    _ledger_file(tmp_path, _run())
    path = tmp_path / "privacy-ledger.json"
    path.write_text(path.read_text().replace('"noise_multiplier": 1.0',
                                             f'"noise_multiplier": {constant}'))
    assert constant in path.read_text()
    with pytest.raises(LedgerError, match=f"{path} is unreadable .*non-finite number "
                                          f".*, at runs\\[0\\].noise_multiplier"):
        LedgerStore(tmp_path).load(6, Accountant.rdp)


def test_a_ledger_the_product_writes_never_contains_nan(tmp_path):
    store = LedgerStore(tmp_path)
    ledger = LifetimeLedger(hospital=6, accountant=Accountant.rdp)
    run = ledger.run(3)
    run.noise_multiplier, run.delta = NOISE, DELTA
    run.add_step(ROUND)
    store.save(ledger)
    good = store.path.read_text()
    assert "NaN" not in good and "Infinity" not in good
    assert json.loads(good, parse_constant=lambda c: pytest.fail(c))["format"] == 3
    # What slipped past add_step (history edited in place, a NaN delta) is refused at writing,
    # and the file on disk stays what it was.
    for bad in ({"delta": math.nan}, {"history": [ROUND, (math.nan, 0.25, 4)]}):
        broken = LifetimeLedger(hospital=6, accountant=Accountant.rdp)
        broken.runs[3] = PrivacyLedger(run_id=3, hospital=6, noise_multiplier=NOISE,
                                       delta=DELTA, history=[ROUND])
        for key, value in bad.items():
            setattr(broken.runs[3], key, value)
        with pytest.raises(LedgerError, match="hospital 6: privacy ledger of run 3"):
            store.save(broken)
        with pytest.raises(LedgerError):
            broken.runs[3].to_json()  # nor into Flower's context.state
        assert store.path.read_text() == good
    # Whatever else the file holds is written without NaN too (json's allow_nan=False).
    ledger.events.append({"event": "note", "lifetime_epsilon": math.nan})
    with pytest.raises(ValueError, match="not JSON compliant"):
        store.save(ledger)
    assert store.path.read_text() == good
    # Events are data too: an unbounded lifetime epsilon is written as "inf", never Infinity.
    store.archive("test", lifetime_epsilon=math.inf)
    archived = store.path.read_text()
    assert "Infinity" not in archived and '"lifetime_epsilon": "inf"' in archived


@pytest.mark.parametrize("delta", ["nan", "0", "1"])
def test_ledger_command_refuses_a_delta_outside_zero_one(tmp_path, delta, capsys):
    with pytest.raises(SystemExit):
        ledger_cli.main([str(tmp_path), "--delta", delta])
    assert "--delta must be a number in (0, 1)" in capsys.readouterr().err


def test_a_ledger_file_of_the_earlier_per_run_format_stops_the_hospital_saying_what_to_do(
        tmp_path, capsys):
    store = LedgerStore(tmp_path)
    store.save(LifetimeLedger(hospital=0, accountant=Accountant.rdp))
    earlier = PrivacyLedger(run_id=5, hospital=0, noise_multiplier=NOISE, delta=DELTA,
                            history=[ROUND, ROUND], rounds_trained=[1, 2])
    legacy = tmp_path / "privacy_ledger_run_5.json"
    legacy.write_text(earlier.to_json())  # well formed: refused for its format alone
    with pytest.raises(LedgerError, match=(
            f"privacy ledger {legacy} is a per-run ledger file in the format of 2026-11-26.*"
            f"move privacy_ledger_run_5.json out of {tmp_path}")):
        store.load(0, Accountant.rdp)
    assert ledger_cli.main([str(tmp_path)]) == 2
    assert str(legacy) in capsys.readouterr().err
    (tmp_path / "ledger-archive").mkdir()
    legacy.rename(tmp_path / "ledger-archive" / legacy.name)  # moved aside as the error says
    assert store.load(0, Accountant.rdp).runs == {}


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
        independent_epsilon([ROUND] * 2, DELTA, Accountant.rdp), rel=1e-6)
    assert report["hospital_delta"] == 1e-6 and "max-delta" in report["hospital_delta_from"]
    lifetime = independent_epsilon([ROUND] * 3, 1e-6, Accountant.rdp)
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
