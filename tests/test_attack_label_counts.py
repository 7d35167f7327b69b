"""A mistaken or malicious server against the noisy label-count release
(``privacy.dp_sgd.label_count_noise``, fl_app/hospital/handlers.py ``preflight``), through the
hospital's real ClientApp (its edge and handlers), with a state directory.

What must hold for every message: the hospital checks every value it receives, never loosens
its own policy (lifetime max-epsilon, max-delta, require-dp), never releases counts its ledger
does not account for, books a release before the counts leave, and replies to a refusal with
a code only (no counts, no exception text).

The review that wrote these found five weaknesses, now fixed and kept here: a release asked
for after training started (no budget check ran), PRV's memory blow-up on a tiny sigma, counts
stored without their booked release, both record-level DP switches on at once, and counts of
reordered labels sent in the old order.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from clinical_fl.protocol.refusals import is_refusal_line, parse_refusal
from clinical_fl.settings.compose import task_settings_to_yaml
from clinical_fl.settings.privacy import Accountant
from tasks.data.hospital_data import load_hospital_data
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.privacy.accounting import calibrate_noise_multiplier, epsilon_spent
from tasks.privacy.policy import default_delta
from tests.hospital_process import (
    hospital_preflight_counts,
    hospital_train_reply,
    initial_arrays,
)
from tests.support import task

RUN = 5
FAST = ("data.notes_per_hospital=40", "train.batch_size=8", "train.local_epochs=1")
POLICY = {"max-epsilon": 3.0, "require-dp": True}  # the hospital's own lifetime budget


def _settings(model: Path, *overrides: str, planned_rounds: int = 2,
              ledger_run: int | None = None, labels: list[str] | None = None):
    settings = task(model, "privacy=dp_sgd", *FAST, *overrides, labels=labels,
                    planned_rounds=planned_rounds)
    return replace(settings, ledger_run=ledger_run) if ledger_run is not None else settings


def _yaml(model: Path, *overrides: str, **kwargs) -> str:
    return task_settings_to_yaml(_settings(model, *overrides, **kwargs))


def _ledger(state: Path) -> dict | None:
    path = state / "privacy-ledger.json"
    return json.loads(path.read_text()) if path.exists() else None


def _runs(state: Path) -> dict[int, dict]:
    ledger = _ledger(state)
    return {run["run_id"]: run for run in ledger["runs"]} if ledger else {}


def _booked(state: Path) -> list[list]:
    """Every step of every run, in the hospital's ledger."""
    return [step for run in _runs(state).values() for step in run["history"]]


def _code(status: dict) -> str:
    """The refusal name of a preflight reply that did not take part ('' if it did)."""
    line = status.get("problem") or status.get("declined") or ""
    if not line:
        return ""
    assert is_refusal_line(line), f"not a refusal line: {line!r}"
    return parse_refusal(line).name


def _refused_nothing_booked(status: dict, counts, state: Path, before: list | None = None,
                            code: str | None = None) -> None:
    assert counts is None, f"counts left with a refusal: {counts}"
    got = _code(status)
    assert got, f"not refused: {status}"
    if code:
        assert got == code, status
    assert _booked(state) == (before or []), _ledger(state)
    if before is None:
        assert all(run.get("released_label_counts") is None for run in _runs(state).values())


def _exact_counts(settings) -> list[int]:
    train = load_hospital_data(settings.data, settings.data.labels, 0, 2).train
    return [list(train["label"]).count(i) for i in range(len(settings.data.labels))]


# -- sigma values ----------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", ["1e-9", "1e-300", "5e-324"])
def test_tiny_sigma_over_the_target_is_refused_before_anything_leaves(tiny_bert, tmp_path,
                                                                      sigma):
    """Calibrated noise: a release that alone spends more than the target cannot be planned."""
    status, counts = hospital_preflight_counts(
        _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3",
              f"privacy.dp_sgd.label_count_noise={sigma}"), tmp_path, RUN)
    _refused_nothing_booked(status, counts, tmp_path, code="privacy-budget-refused")


def test_tiny_sigma_with_fixed_noise_is_refused_by_the_runs_cap(tiny_bert, tmp_path):
    status, counts = hospital_preflight_counts(
        _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=null",
              "privacy.dp_sgd.noise_multiplier=1.0", "privacy.dp_sgd.max_epsilon=8",
              "privacy.dp_sgd.label_count_noise=1e-9"), tmp_path, RUN)
    _refused_nothing_booked(status, counts, tmp_path, code="privacy-budget-refused")


@pytest.mark.parametrize("overrides", [
    # fixed noise, no run cap: only the hospital's lifetime budget stands in the way
    ("privacy.dp_sgd.target_epsilon=null", "privacy.dp_sgd.noise_multiplier=1.0",
     "privacy.dp_sgd.label_count_noise=1e-9"),
    # calibrated to a generous target (8) the release alone (sigma 1) is over the policy's 3
    ("privacy.dp_sgd.target_epsilon=8", "privacy.dp_sgd.label_count_noise=1.0"),
])
def test_release_over_the_lifetime_budget_is_declined_before_anything_leaves(
        tiny_bert, tmp_path, overrides):
    status, counts = hospital_preflight_counts(_yaml(tiny_bert, *overrides), tmp_path, RUN,
                                               node_config=POLICY)
    assert not status["declined"] or status["declined"].endswith("key=max-epsilon"), status
    _refused_nothing_booked(status, counts, tmp_path)


def test_a_delta_above_the_hospitals_max_delta_is_declined_before_a_release(tiny_bert,
                                                                          tmp_path):
    status, counts = hospital_preflight_counts(
        _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3", "privacy.dp_sgd.target_delta=1e-3",
              "privacy.dp_sgd.label_count_noise=4"), tmp_path, RUN,
        node_config={**POLICY, "max-delta": 1e-6})
    assert status["declined"].endswith("key=max-delta"), status
    _refused_nothing_booked(status, counts, tmp_path)


def test_fixed_noise_without_any_cap_books_a_tiny_sigma_release(tiny_bert, tmp_path):
    """By design, not a refusal: a hospital with no max-epsilon (require-dp alone) accepts any
    noise the server fixes, noise_multiplier=1e-9 as well. The release leaves, but the
    ledger books it first, so the lifetime epsilon says what it cost (unbounded)."""
    settings = _settings(tiny_bert, "privacy.dp_sgd.target_epsilon=null",
                         "privacy.dp_sgd.noise_multiplier=1.0",
                         "privacy.dp_sgd.label_count_noise=1e-9")
    status, counts = hospital_preflight_counts(task_settings_to_yaml(settings), tmp_path, RUN,
                                               node_config={"require-dp": True})
    assert status["ok"] and counts is not None
    assert _booked(tmp_path) == [[1e-9, 1.0, 1]]
    assert epsilon_spent([(1e-9, 1.0, 1)], 1e-5, Accountant.rdp) > 1e6


def test_huge_sigma_is_booked_and_above_the_bound_refused(tiny_bert, tmp_path):
    status, counts = hospital_preflight_counts(
        _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3",
              "privacy.dp_sgd.label_count_noise=1e6"), tmp_path, RUN)
    assert status["ok"] and len(counts) == len(SPECIALTIES)
    assert _booked(tmp_path) == [[1e6, 1.0, 1]]
    # Above the bound: built by hand, as the server's own compose would refuse it.
    text = yaml.safe_load(_yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3"))
    text["privacy"]["dp_sgd"]["label_count_noise"] = 2e6
    other = tmp_path / "other"
    status, counts = hospital_preflight_counts(yaml.safe_dump(text), other, RUN)
    _refused_nothing_booked(status, counts, other, code="settings-invalid")


@pytest.mark.parametrize("value", [True, ".nan", ".inf", "-1", "0", "1e-400", "'abc'"])
def test_label_count_noise_values_outside_the_schema_are_refused(tiny_bert, tmp_path, value):
    text = _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3",
                 "privacy.dp_sgd.label_count_noise=2").replace(
        "label_count_noise: 2.0", f"label_count_noise: {value}")
    assert f"label_count_noise: {value}" in text
    status, counts = hospital_preflight_counts(text, tmp_path, RUN)
    _refused_nothing_booked(status, counts, tmp_path)


# -- sigma where it does not belong ----------------------------------------------------------

def _edited(model: Path, edit) -> str:
    tree = yaml.safe_load(_yaml(model, "privacy.dp_sgd.target_epsilon=3",
                                "privacy.dp_sgd.label_count_noise=2"))
    edit(tree)
    return yaml.safe_dump(tree)


@pytest.mark.parametrize("name,edit", [
    ("dp_sgd off", lambda t: (t["privacy"].update(mechanism="none"),
                              t["privacy"]["dp_sgd"].update(target_epsilon=None))),
    ("class_weighting none", lambda t: t["train"].update(class_weighting="none")),
    ("ghost clipping", lambda t: t["privacy"]["dp_sgd"].update(grad_sample_mode="ghost")),
])
def test_sigma_with_settings_that_cannot_use_it_is_refused(tiny_bert, tmp_path, name, edit):
    status, counts = hospital_preflight_counts(_edited(tiny_bert, edit), tmp_path, RUN)
    _refused_nothing_booked(status, counts, tmp_path, code="settings-invalid")


def test_sigma_under_distributed_dp_is_refused(tiny_bert, tmp_path):
    """A label-count release belongs to DP-SGD: with the mechanism switched to distributed DP
    the DP-SGD section's values are refused (one mechanism, one switch), nothing released."""
    text = _edited(tiny_bert, lambda t: t["privacy"].update(mechanism="distributed_dp"))
    status, counts = hospital_preflight_counts(text, tmp_path, RUN)
    _refused_nothing_booked(status, counts, tmp_path, code="settings-invalid")


def test_sigma_at_a_sweeps_non_private_level_sends_no_counts_to_a_dp_hospital(tiny_bert,
                                                                             tmp_path):
    status, counts = hospital_preflight_counts(
        _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=inf",
              "privacy.dp_sgd.label_count_noise=2"), tmp_path, RUN, node_config=POLICY)
    assert counts is None and _code(status) == "policy-refused", status
    assert _booked(tmp_path) == []


def test_sigma_with_class_weights_given_at_preflight_releases_nothing(tiny_bert, tmp_path):
    # The server's compose refuses this pair; a hostile server sends it anyway.
    text = _edited(tiny_bert, lambda t: t["train"].update(class_weights=[1.0] * len(SPECIALTIES)))
    status, counts = hospital_preflight_counts(text, tmp_path, RUN)
    assert status["ok"] and counts is None
    assert _booked(tmp_path) == []


# -- a second preflight of the same run, many runs -------------------------------------------

def test_second_preflight_with_another_sigma_or_labels_draws_nothing_new(tiny_bert, tmp_path):
    first, counts = hospital_preflight_counts(
        _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3",
              "privacy.dp_sgd.label_count_noise=4"), tmp_path, RUN)
    assert first["ok"] and counts
    booked = _booked(tmp_path)
    assert booked == [[4.0, 1.0, 1]]
    # A smaller sigma: the stored counts again, nothing booked.
    again, counts_again = hospital_preflight_counts(
        _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3",
              "privacy.dp_sgd.label_count_noise=1e-9"), tmp_path, RUN)
    assert again["ok"] and counts_again == counts and _booked(tmp_path) == booked
    # The same labels in another order: the stored counts in that order (the server weighs
    # the right classes), nothing new drawn or booked.
    status, sent = hospital_preflight_counts(
        _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3", "privacy.dp_sgd.label_count_noise=4",
              labels=list(reversed(SPECIALTIES))), tmp_path, RUN)
    assert sent == list(reversed(counts)) and _booked(tmp_path) == booked, status
    # One label fewer: refused as a ledger that does not fit, without the counts.
    status, sent = hospital_preflight_counts(
        _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3", "privacy.dp_sgd.label_count_noise=4",
              labels=list(SPECIALTIES)[:-1]), tmp_path, RUN)
    assert sent is None and _code(status) in ("ledger-unreadable", "labels-unknown"), status
    assert "records=" not in (status["problem"] + status["declined"])  # withheld under DP
    assert _booked(tmp_path) == booked


def test_many_run_ids_each_draw_is_booked_and_the_lifetime_budget_stops_them(tiny_bert,
                                                                             tmp_path):
    draws = []
    for ledger_run in range(100, 116):
        status, counts = hospital_preflight_counts(
            _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=1.5",
                  "privacy.dp_sgd.label_count_noise=4", ledger_run=ledger_run),
            tmp_path, RUN, node_config=POLICY)
        if counts is None:
            assert _code(status) == "policy-refused", status
            break
        draws.append(counts)
    runs = _runs(tmp_path)
    assert 1 <= len(draws) < 16, "the lifetime budget stopped the draws (7 here)"
    assert sum(r["released_label_counts"] is not None for r in runs.values()) == len(draws)
    assert _booked(tmp_path) == [[4.0, 1.0, 1]] * len(draws)
    records = sum(_exact_counts(_settings(tiny_bert, "privacy.dp_sgd.target_epsilon=1.5")))
    assert epsilon_spent([(4.0, 1.0, 1)] * len(draws), default_delta(records),
                         Accountant.pld) <= POLICY["max-epsilon"]  # the default accountant


def test_many_run_ids_without_a_lifetime_budget_each_draw_is_booked(tiny_bert, tmp_path):
    """No max-epsilon: nothing bounds the number of runs (by design, as for training), but
    every draw is in the ledger before it leaves."""
    for ledger_run in range(200, 205):
        status, counts = hospital_preflight_counts(
            _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3",
                  "privacy.dp_sgd.label_count_noise=4", ledger_run=ledger_run), tmp_path, RUN)
        assert status["ok"] and counts
        assert _runs(tmp_path)[ledger_run]["released_label_counts"] == counts
    assert _booked(tmp_path) == [[4.0, 1.0, 1]] * 5


# -- a release after training has started ----------------------------------------------------

@pytest.mark.parametrize("same_run", [True, False], ids=["same-run", "ledger-run-of-a-past-run"])
def test_a_release_after_the_noise_is_committed_is_refused(
        tiny_bert, tmp_path, same_run):
    """Train one round without a release (noise committed in the ledger), then ask the same
    run (or, from a later Flower run, name it with ledger_run) for counts at sigma 1e-3.
    ``plan_dp_sgd`` with a committed noise multiplier checks neither the run's cap nor the
    hospital's lifetime max-epsilon: the almost exact counts used to leave, far over both.
    Now a release after the run's first step is refused."""
    plain = _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3", planned_rounds=1)
    status, counts = hospital_preflight_counts(plain, tmp_path, RUN, node_config=POLICY)
    assert status["ok"] and counts is None
    reply, _ = hospital_train_reply(plain, tmp_path, RUN, 1, node_config=POLICY,
                                    arrays=initial_arrays(plain))
    assert "error" not in reply, reply
    before = _booked(tmp_path)
    asking = _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3",
                   "privacy.dp_sgd.label_count_noise=1e-3", planned_rounds=1,
                   ledger_run=None if same_run else RUN)
    status, counts = hospital_preflight_counts(asking, tmp_path, RUN if same_run else RUN + 1,
                                               node_config=POLICY)
    lifetime = epsilon_spent([tuple(s) for s in _booked(tmp_path)], 1e-5, Accountant.pld)
    exact = _exact_counts(_settings(tiny_bert, "privacy.dp_sgd.target_epsilon=3"))
    assert counts is None, (f"counts released after training (exact: {counts == exact}), "
                            f"lifetime epsilon now {lifetime:.3g} against the policy's "
                            f"{POLICY['max-epsilon']}")
    assert _booked(tmp_path) == before


def test_the_first_rounds_calibration_leaves_room_for_the_release(tiny_bert, tmp_path):
    """The server drops label_count_noise after preflight: the first round still calibrates
    with the release as this run's history (the ledger's, not the settings')."""
    sigma, target = 3.0, 3.0
    status, counts = hospital_preflight_counts(
        _yaml(tiny_bert, f"privacy.dp_sgd.target_epsilon={target}",
              f"privacy.dp_sgd.label_count_noise={sigma}"), tmp_path, RUN)
    assert status["ok"] and counts
    dropped = _yaml(tiny_bert, f"privacy.dp_sgd.target_epsilon={target}")
    reply, _ = hospital_train_reply(dropped, tmp_path, RUN, 1, arrays=initial_arrays(dropped))
    assert "error" not in reply, reply
    run = _runs(tmp_path)[RUN]
    assert run["history"][0] == [sigma, 1.0, 1]
    noise, rate, steps = run["history"][1]
    assert noise == calibrate_noise_multiplier(target, run["delta"], rate, 2 * steps,
                                               Accountant.pld, preceding=[(sigma, 1.0, 1)])
    assert epsilon_spent([(sigma, 1.0, 1), (noise, rate, 2 * steps)], run["delta"],
                         Accountant.pld) <= target
    assert run["released_label_counts"] == counts


# -- the ledger on disk ----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [[-1] * 6, [1.5] * 6, "abc", [True] * 6, {"a": 1}, [None] * 6])
def test_a_ledger_with_bad_released_counts_is_refused_without_counts(tiny_bert, tmp_path, bad):
    text = _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3",
                 "privacy.dp_sgd.label_count_noise=4")
    status, counts = hospital_preflight_counts(text, tmp_path, RUN)
    assert status["ok"] and counts
    ledger = _ledger(tmp_path)
    ledger["runs"][0]["released_label_counts"] = bad
    path = tmp_path / "privacy-ledger.json"
    path.write_text(json.dumps(ledger))
    kept = path.read_bytes()
    status, sent = hospital_preflight_counts(text, tmp_path, RUN)
    assert sent is None and _code(status) == "ledger-unreadable", status
    assert path.read_bytes() == kept
    for number in counts:  # nothing of the stored counts in the reply
        assert f"={number}" not in status["problem"] + status["declined"] or number == 0


def test_stored_counts_without_their_booked_release_are_refused(tiny_bert, tmp_path):
    """A ledger whose run holds released counts but no (sigma, 1.0, 1) step (edited, or
    written by a faulty version): the hospital sends counts its ledger does not account for.
    ``PrivacyLedger.check`` refuses counts without a release step."""
    text = _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3",
                 "privacy.dp_sgd.label_count_noise=4")
    status, counts = hospital_preflight_counts(text, tmp_path, RUN)
    assert status["ok"] and counts
    ledger = _ledger(tmp_path)
    ledger["runs"][0]["history"] = []
    (tmp_path / "privacy-ledger.json").write_text(json.dumps(ledger))
    status, sent = hospital_preflight_counts(text, tmp_path, RUN)
    assert sent is None, "counts sent that no ledger entry accounts for"
    assert _code(status) == "ledger-unreadable", status


# -- leaks through refusals -------------------------------------------------------------------

def test_unknown_labels_under_a_release_say_no_record_count(tiny_bert, tmp_path):
    status, counts = hospital_preflight_counts(
        _yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3", "privacy.dp_sgd.label_count_noise=4",
              labels=list(SPECIALTIES)[:-1]), tmp_path, RUN)
    assert counts is None and _code(status) == "labels-unknown", status
    assert "records=" not in status["problem"]
    assert _booked(tmp_path) == []


# -- the PRV accountant ----------------------------------------------------------------------

CHILD = """
import json, resource, sys
import fl_app.hospital.handlers, opacus.accountants  # loaded before the memory limit
from tests.hospital_process import hospital_preflight_counts
size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1])
resource.setrlimit(resource.RLIMIT_AS, (size * 1024 + 3 * 2**30, resource.RLIM_INFINITY))
status, counts = hospital_preflight_counts(open(sys.argv[1]).read(), sys.argv[2], 5)
print(json.dumps({"status": status, "counts": counts}))
"""


def test_prv_with_a_tiny_sigma_stays_within_the_hospitals_memory(tiny_bert, tmp_path):
    """accountant=prv, label_count_noise=1e-3: calibrating with the release as preceding
    history used to make Opacus' PRV accountant allocate arrays of hundreds of millions of
    floats (the OOM killer, or MemoryError under this test's limit of 3 GiB over the process
    size). Now it is refused as a privacy budget it cannot keep, cheaply, before any PRV
    computation."""
    settings = tmp_path / "task.yaml"
    settings.write_text(_yaml(tiny_bert, "privacy.dp_sgd.target_epsilon=3",
                              "privacy.dp_sgd.accountant=prv",
                              "privacy.dp_sgd.label_count_noise=1e-3"))
    state = tmp_path / "state"
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", CHILD, str(settings),
                           str(state)], capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    assert reply["counts"] is None and _booked(state) == []
    assert _code(reply["status"]) == "privacy-budget-refused", (
        reply["status"], "hospital.log:",
        (state / "hospital.log").read_text()[-600:] if (state / "hospital.log").exists() else "")
