"""Privacy accounting: epsilon composes over the whole run and matches an independent
implementation (Google's dp-accounting); the plan refuses settings a hospital cannot keep."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant

from settings.task import Accountant, DpSgdSettings
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.hospital import Hospital
from tasks.model.build import trainable_state
from tasks.privacy.accounting import calibrate_noise_multiplier, epsilon_spent
from tasks.privacy.ledger import LedgerError, LedgerStore, LifetimeLedger, PrivacyLedger, most_spent
from tasks.privacy.plan import PrivacyBudgetError, plan_dp_sgd
from tasks.privacy.policy import default_delta
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
    assert ours == pytest.approx(independent_epsilon(history, delta), rel=1e-6)


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
    settings = DpSgdSettings(enabled=True, **({"target_epsilon": 8.0} | dp))
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


def test_the_target_epsilon_is_also_a_cap():
    plan = plan_dp_sgd(DpSgdSettings(enabled=True, target_epsilon=3.0), 0, 240, 16, 1,
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


def test_of_two_copies_the_one_with_more_spending_wins():
    short = PrivacyLedger(1, 0, history=[(1.0, 0.1, 10)], rounds_trained=[1])
    long = PrivacyLedger(1, 0, history=[(1.0, 0.1, 20)], rounds_trained=[1, 2])
    assert most_spent(short, long) is long and most_spent(None, short) is short
    assert most_spent(None, None) is None


def test_cumulative_epsilon_over_rounds_is_exact_monotone_and_within_budget(tiny_bert):
    """A hospital trains round after round with DP-SGD until its budget refuses."""
    settings = task(tiny_bert, "data.notes_per_hospital=60", "train.batch_size=8",
                    "privacy=dp_sgd", "train.local_epochs=1", "privacy.dp_sgd.target_epsilon=null",
                    "privacy.dp_sgd.noise_multiplier=1.0", "privacy.dp_sgd.max_epsilon=6.8",
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
            assert "above its budget 6.8" in str(refusal)
            break
        report = outcome.privacy
        reported.append(report.epsilon)
        assert report.epsilon == pytest.approx(
            independent_epsilon(ledger.history, report.delta), rel=1e-6)
        assert report.epsilon <= 6.8
        after = independent_epsilon(ledger.history + [ledger.history[-1][:2] + (
            report.steps // server_round,)], report.delta)
        assert report.can_train_next_round == (after <= 6.8)
    assert reported == sorted(reported) and len(set(reported)) == len(reported)
    rounds = len(reported)
    assert rounds == 3, "4.27, 5.45, 6.50; a 4th round would reach 7.07"
    assert ledger.rounds_trained == list(range(1, rounds + 1))
    assert ledger.steps == rounds * -(-len(hospital.data.train) // 8)
