"""Privacy accounting: epsilon composes over the whole run and matches an independent
implementation (Google's dp-accounting); the plan refuses settings a hospital cannot keep."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from clinical_fl.settings.privacy import Accountant, DpSgdSettings
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.hospital import Hospital
from tasks.model.build import trainable_state
from tasks.privacy.accounting import (
    NEIGHBOURING_RELATION,
    RDP_ORDERS,
    calibrate_noise_multiplier,
    epsilon_spent,
)
from tasks.privacy.ledger import LedgerError, LedgerStore, LifetimeLedger, PrivacyLedger, most_spent
from tasks.privacy.plan import MAX_PLANNED_STEPS, PrivacyBudgetError, plan_dp_sgd
from tasks.privacy.policy import HospitalPolicy, default_delta
from tests.support import independent_epsilon, task


def _event(z, q):
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))


HISTORIES = [
    [(1.1, 1 / 15, 15)],
    [(1.1, 1 / 15, 15), (1.1, 1 / 15, 15), (1.1, 1 / 15, 30)],
    [(0.8, 0.01, 1000), (2.0, 0.2, 50)],
    [(0.6, 1 / 3, 3)],
]


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("delta", [1e-5, 4e-4])
def test_rdp_epsilon_matches_dp_accounting(history, delta):
    ours = epsilon_spent(history, delta, Accountant.rdp)
    assert ours == pytest.approx(independent_epsilon(history, delta, Accountant.rdp), rel=1e-6)


ZERO_OUT_HISTORIES = [
    [(0.7, 1 / 15, 180)],  # the example setting of docs/privacy-accounting.md
    [(1.0, 0.25, 8)],
    [(1.2, 1 / 15, 15), (1.2, 1 / 15, 30), (0.9, 1 / 30, 60)],
    [(0.8, 0.01, 1000), (2.0, 0.2, 50), (5.0, 1.0, 3)],
]


@pytest.mark.parametrize("history", ZERO_OUT_HISTORIES)
def test_epsilon_is_dp_accountings_under_the_zero_out_relation(history):
    """The product claims its epsilon for zero-out neighbours (one record replaced by a null
    record); dp-accounting computes that relation itself, so this is the claim checked."""
    assert NEIGHBOURING_RELATION == "zero_out"
    for delta in (1e-5, 1e-7):
        assert epsilon_spent(history, delta, Accountant.rdp) == pytest.approx(
            independent_epsilon(history, delta, Accountant.rdp), rel=1e-6)


def test_rdp_cannot_account_replace_one_for_this_mechanism():
    """Why the product does not claim replace-one: the RDP accountant, its cross-check,
    refuses it for the Poisson-subsampled Gaussian (PLD accounts it, at a higher epsilon)."""
    accountant = RdpAccountant(orders=list(RDP_ORDERS),
                               neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    assert not accountant.supports(_event(0.7, 1 / 15))


@pytest.mark.parametrize("step", [(-1.0, 0.1, 10), (0.0, 0.1, 10), (math.nan, 0.1, 10),
                                  (math.inf, 0.1, 10), (1.0, 0.0, 10), (1.0, 2.0, 10),
                                  (1.0, math.nan, 10), (1.0, 0.1, -1), (1.0, 0.1, 2.5)])
def test_epsilon_refuses_an_entry_it_cannot_stand_on(step):
    # sigma -1 would otherwise account exactly like +1 (RDP sees sigma squared).
    with pytest.raises(ValueError, match="noise multiplier|sample rate|step count"):
        epsilon_spent([(1.0, 0.1, 10), step], 1e-5, Accountant.rdp)


@pytest.mark.parametrize("delta", [math.nan, math.inf, 0.0, 1.0, -1e-5])
def test_epsilon_and_calibration_refuse_a_delta_outside_zero_one(delta):
    with pytest.raises(ValueError, match="delta"):
        epsilon_spent([(1.0, 0.1, 10)], delta, Accountant.rdp)
    with pytest.raises(ValueError, match="delta"):
        calibrate_noise_multiplier(3.0, delta, 0.1, 10, Accountant.rdp)


@pytest.mark.parametrize("target,rate,steps", [(math.nan, 0.1, 10), (0.0, 0.1, 10),
                                               (3.0, 0.0, 10), (3.0, math.nan, 10),
                                               (3.0, 0.1, 0)])
def test_calibration_refuses_what_it_cannot_calibrate_for(target, rate, steps):
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(target, 1e-5, rate, steps, Accountant.rdp)


def test_epsilon_is_never_nan_a_noise_too_small_to_compute_is_infinite():
    # 1e-300 makes Opacus' series divide by zero; no noise to speak of is no guarantee.
    assert epsilon_spent([(1e-300, 0.5, 1)], 1e-5, Accountant.rdp) == math.inf
    assert epsilon_spent([(1e-300, 0.5, 0), (1.0, 0.1, 1)], 1e-5, Accountant.rdp) == (
        pytest.approx(independent_epsilon([(1.0, 0.1, 1)], 1e-5, Accountant.rdp), rel=1e-6))
    # At a delta near 1 the RDP conversion goes negative; like dp-accounting, report 0.
    assert epsilon_spent([(5.0, 0.01, 1)], 0.9, Accountant.rdp) == 0.0
    assert independent_epsilon([(5.0, 0.01, 1)], 0.9, Accountant.rdp) == 0.0


def test_prv_epsilon_is_close_to_dp_accounting_pld_and_not_below_it():
    history = [(1.1, 1 / 15, 60)]
    pld = PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(_event(1.1, 1 / 15), 60)
    reference = pld.get_epsilon(1e-5)
    ours = epsilon_spent(history, 1e-5, Accountant.prv)
    assert reference * 0.99 <= ours <= reference * 1.05  # PRV reports its upper bound


def test_calibrated_noise_meets_the_target_over_the_whole_planned_training():
    noise = calibrate_noise_multiplier(3.0, 1e-5, 1 / 15, 4 * 15, Accountant.rdp)
    spent = epsilon_spent([(noise, 1 / 15, 4 * 15)], 1e-5, Accountant.rdp)
    assert 0.98 * 3.0 <= spent <= 3.0
    # calibrating per round instead would have spent far more over four rounds
    per_round = calibrate_noise_multiplier(3.0, 1e-5, 1 / 15, 15, Accountant.rdp)
    assert epsilon_spent([(per_round, 1 / 15, 60)], 1e-5, Accountant.rdp) > 4.5


def _plan(**dp):
    settings = DpSgdSettings(**({"target_epsilon": 8.0} | dp))
    return plan_dp_sgd(settings, hospital=3, train_records=240, batch_size=16, local_epochs=1,
                       planned_rounds=4)


def test_plan_follows_opacus_sampling_and_default_delta():
    plan = _plan()
    assert plan.sample_rate == 1 / 15 and plan.steps_per_round == 15
    assert plan.delta == default_delta(240) == 1e-5
    assert default_delta(1_000_000) == 1e-7
    assert plan.epsilon([plan.round_steps()] * 4) <= 8.0


def test_delta_not_below_one_over_records_is_refused_naming_the_hospital():
    with pytest.raises(PrivacyBudgetError, match=r"hospital 3: .*target_delta=0.005 is not "
                                                 r"below 1/records = 1/240"):
        _plan(target_delta=0.005)


def test_budget_too_small_for_one_round_is_refused_before_training():
    with pytest.raises(PrivacyBudgetError, match="hospital 3: max_epsilon 0.1 is too small "
                                                 "for even one round"):
        _plan(target_epsilon=None, noise_multiplier=0.8, max_epsilon=0.1)


def test_a_plan_of_a_billion_steps_is_refused():
    with pytest.raises(PrivacyBudgetError, match=r"hospital 3: .*1000000005 DP-SGD steps, "
                                                 r"above the most this product plans"):
        plan_dp_sgd(DpSgdSettings(noise_multiplier=1.0), hospital=3,
                    train_records=240, batch_size=16, local_epochs=1,
                    planned_rounds=66_666_667)  # x 15 steps a round
    within = plan_dp_sgd(DpSgdSettings(noise_multiplier=1.0), 3, 240, 16, 1,
                         planned_rounds=MAX_PLANNED_STEPS // 15)
    assert within.steps_per_round == 15


@pytest.mark.parametrize("noise", [-1.0, 0.0, math.nan, math.inf])
def test_a_plan_refuses_a_noise_multiplier_it_cannot_account(noise):
    with pytest.raises(PrivacyBudgetError, match="hospital 3: the noise multiplier its ledger "
                                                 "committed to: noise multiplier"):
        plan_dp_sgd(DpSgdSettings(target_epsilon=8.0), 3, 240, 16, 1, 4,
                    committed_noise_multiplier=noise)


def test_a_budget_check_that_meets_a_nan_epsilon_refuses(monkeypatch):
    """NaN compares false against any cap: "after > cap" would let the round through."""
    policy = HospitalPolicy(hospital=3, max_epsilon=50.0)
    plan = plan_dp_sgd(DpSgdSettings(target_epsilon=8.0), 3, 240, 16, 1, 4,
                       policy=policy)
    assert plan.refusal([], 1) is None
    monkeypatch.setattr("tasks.privacy.plan.epsilon_spent", lambda *args: math.nan)
    assert "round 1 would raise epsilon from nan to nan" in plan.refusal([], 1)
    lifetime_only = plan_dp_sgd(DpSgdSettings(noise_multiplier=1.0), 3, 240, 16,
                                1, 4, policy=policy, committed_noise_multiplier=1.0)
    assert lifetime_only.max_epsilon is None
    assert "privacy policy max-epsilon" in lifetime_only.refusal([], 1)
    with pytest.raises(PrivacyBudgetError, match="too small for even one round"):
        plan_dp_sgd(DpSgdSettings(noise_multiplier=1.0, max_epsilon=50.0), 3,
                    240, 16, 1, 4)


def test_the_target_epsilon_is_also_a_cap():
    plan = plan_dp_sgd(DpSgdSettings(target_epsilon=3.0), 0, 240, 16, 1,
                       planned_rounds=4)
    assert plan.max_epsilon == 3.0
    history = [plan.round_steps()] * 4
    assert plan.refusal(history[:3], 4) is None, "the planned rounds fit"
    assert "round 5 would raise epsilon" in plan.refusal(history, 5)


def test_ledger_round_trips_through_its_durable_store(tmp_path):
    store = LedgerStore(tmp_path / "state")
    empty = store.load(1, Accountant.rdp)
    assert empty.runs == {} and empty.epsilon(1e-5) == 0.0
    ledger = LifetimeLedger(hospital=1, accountant=Accountant.rdp)
    ledger.runs[7] = PrivacyLedger(run_id=7, hospital=1, noise_multiplier=1.2, delta=1e-5,
                                   history=[(1.2, 1 / 15, 15)], rounds_trained=[1])
    store.save(ledger)
    assert store.load(1, Accountant.rdp) == ledger
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["privacy-ledger.json"]
    store.path.write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable"):
        store.load(1, Accountant.rdp)


# Computed before the ledger recorded its neighbouring relation (format 1), with the product's
# accountant: the same history must give the same epsilon now.
FORMAT_1_EPSILON = 6.528418259356984  # [(1.0, 0.25, 8)] at delta 1e-5
FORMAT_1 = {"format": 1, "hospital": 0, "accountant": "rdp",
            "runs": [{"run_id": 5, "hospital": 0, "noise_multiplier": 1.0, "delta": 1e-5,
                      "history": [[1.0, 0.25, 8]], "rounds_trained": [1, 2]}],
            "events": []}


def test_a_format_1_ledger_still_loads_and_gives_the_same_epsilon(tmp_path):
    (tmp_path / "privacy-ledger.json").write_text(json.dumps(FORMAT_1, indent=1))
    store = LedgerStore(tmp_path)
    ledger = store.load(0, Accountant.rdp)
    assert ledger.runs[5].history == [(1.0, 0.25, 8)]
    assert ledger.epsilon(1e-5) == pytest.approx(FORMAT_1_EPSILON, rel=1e-12)
    assert ledger.epsilon(1e-5) == pytest.approx(
        independent_epsilon([(1.0, 0.25, 8)], 1e-5, Accountant.rdp), rel=1e-6)
    store.save(ledger)  # written again in the current format, naming the relation
    written = json.loads(store.path.read_text())
    assert written["format"] == 3 and written["neighbouring_relation"] == "zero_out"
    assert written["runs"][0]["accountants"] == ["rdp"], "format 1 was kept with one accountant"
    assert store.load(0, Accountant.rdp).epsilon(1e-5) == pytest.approx(FORMAT_1_EPSILON)


def test_audit_pld_a_format_1_ledger_kept_with_rdp_loads_under_pld_and_composes(tmp_path):
    """A ledger of the first format, kept with RDP (the accountant then required), is read by
    a run accounting with PLD: its lifetime epsilon is PLD's over the whole history, below the
    RDP figure it was written with, and new steps compose after it."""
    (tmp_path / "privacy-ledger.json").write_text(json.dumps(FORMAT_1, indent=1))
    store = LedgerStore(tmp_path)
    ledger = store.load(0, Accountant.pld)
    assert ledger.runs[5].accountants == ["rdp"]
    old = [(1.0, 0.25, 8)]
    assert ledger.epsilon(1e-5) == epsilon_spent(old, 1e-5, Accountant.pld)
    assert ledger.epsilon(1e-5) == pytest.approx(independent_epsilon(old, 1e-5), rel=1e-6)
    assert ledger.epsilon(1e-5) < FORMAT_1_EPSILON
    run = ledger.run(6)
    run.noise_multiplier, run.delta = 1.2, 1e-5
    run.add_step((1.2, 0.1, 30))
    run.booked_by(Accountant.pld)
    store.save(ledger)
    whole = [*old, (1.2, 0.1, 30)]
    again = store.load(0, Accountant.pld)
    assert [again.runs[k].accountants for k in (5, 6)] == [["rdp"], ["pld"]]
    assert again.epsilon(1e-5) == pytest.approx(independent_epsilon(whole, 1e-5), rel=1e-6)
    assert again.epsilon(1e-5) < store.load(0, Accountant.rdp).epsilon(1e-5) == pytest.approx(
        independent_epsilon(whole, 1e-5, Accountant.rdp), rel=1e-6)


@pytest.mark.parametrize("relation", ["add_or_remove_one", "replace_one", None])
def test_a_ledger_kept_for_another_neighbouring_relation_is_refused(tmp_path, relation):
    data = {"format": 2, "hospital": 4, "accountant": "rdp", "runs": [], "events": []}
    if relation is not None:
        data["neighbouring_relation"] = relation
    (tmp_path / "privacy-ledger.json").write_text(json.dumps(data))
    expected = (f"hospital 4: privacy ledger .* key 'neighbouring_relation' is '{relation}'"
                if relation else "unreadable .*neighbouring_relation")
    with pytest.raises(LedgerError, match=expected):
        LedgerStore(tmp_path).load(4, Accountant.rdp)
    data["format"] = 1  # a format-1 file naming another relation is refused just the same
    (tmp_path / "privacy-ledger.json").write_text(json.dumps(data))
    if relation is not None:
        with pytest.raises(LedgerError, match="neighbouring_relation"):
            LedgerStore(tmp_path).load(4, Accountant.rdp)


def test_of_two_copies_the_one_with_more_spending_wins():
    short = PrivacyLedger(1, 0, history=[(1.0, 0.1, 10)], rounds_trained=[1])
    long = PrivacyLedger(1, 0, history=[(1.0, 0.1, 20)], rounds_trained=[1, 2])
    assert most_spent(short, long) is long and most_spent(None, short) is short
    assert most_spent(None, None) is None


def test_cumulative_epsilon_over_rounds_is_exact_monotone_and_within_budget(tiny_bert):
    """A hospital trains round after round with DP-SGD until its budget refuses, accounted
    with the default accountant (PLD), RDP's figure never below it."""
    settings = task(tiny_bert, "data.notes_per_hospital=60", "train.batch_size=8",
                    "privacy=dp_sgd", "train.local_epochs=1", "privacy.dp_sgd.target_epsilon=null",
                    "privacy.dp_sgd.noise_multiplier=1.0", "privacy.dp_sgd.max_epsilon=5.6",
                    planned_rounds=3)
    hospital = Hospital(settings, list(SPECIALTIES), 0, 2)
    ledger = PrivacyLedger(run_id=1, hospital=hospital.data.hospital)
    state = trainable_state(hospital.model)
    reported = []
    for server_round in range(1, 10):
        try:
            state, outcome = hospital.train(state, server_round, ledger=ledger)
        except PrivacyBudgetError as refusal:
            assert f"round {server_round} would raise epsilon" in str(refusal)
            assert "above its budget 5.6" in str(refusal)
            break
        report = outcome.privacy
        reported.append(report.epsilon)
        assert report.epsilon == pytest.approx(
            independent_epsilon(ledger.history, report.delta), rel=1e-6)
        assert report.epsilon <= 5.6
        assert report.epsilon < independent_epsilon(ledger.history, report.delta,
                                                    Accountant.rdp), "RDP, the cross-check"
        after = independent_epsilon(ledger.history + [ledger.history[-1][:2] + (
            report.steps // server_round,)], report.delta)
        assert report.can_train_next_round == (after <= 5.6)
    assert reported == sorted(reported) and len(set(reported)) == len(reported)
    rounds = len(reported)
    assert rounds == 3, "3.61, 4.60, 5.39; a 4th round would reach 6.07 (RDP: 4.27 5.45 6.50)"
    assert ledger.rounds_trained == list(range(1, rounds + 1))
    assert ledger.steps == rounds * -(-len(hospital.data.train) // 8)
