"""A hospital's DP-SGD plan: sampling rate, steps per round, delta, noise, budget.

Everything here is fixed before the first private step and checked before
training: a delta too large for the hospital's record count, or a budget too
small for even one round, fails with the hospital's name before any work.

Every budget comparison is written ``not (after <= cap)``: a figure that is not
clearly within its cap (NaN included, which compares false to everything) is a
refusal, never a pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from clinical_fl.settings.privacy import (
    Accountant,
    DistributedDpSettings,
    DpSgdSettings,
    PrivacySettings,
)
from tasks.errors import TaskInputError
from tasks.privacy.accounting import (
    Step,
    calibrate_noise_multiplier,
    check_step,
    epsilon_spent,
)
from tasks.privacy.policy import HospitalPolicy

# The most DP-SGD steps a plan may promise (planned rounds x steps a round). Far above any
# real run (the default is 180); a server asking for 10^9 steps is refused rather than
# accounted: nothing useful trains that long, and calibration would be asked for a noise
# beyond any sense.
MAX_PLANNED_STEPS = 10_000_000


class PrivacyBudgetError(TaskInputError):
    """The hospital's privacy settings or budget rule out (further) training."""


class PolicyRefusal(PrivacyBudgetError):
    """The hospital's own privacy policy rules out what the server asked for."""


def refuse_without_dp(privacy: PrivacySettings, policy: HospitalPolicy) -> None:
    """A hospital whose policy requires DP refuses a run without record-level DP, whatever
    the server says (``privacy=none``, or a sweep's non-private level)."""
    if policy.require_dp and not privacy.record_level:
        asked = ("no DP-SGD" if privacy.dp_sgd.target_epsilon != math.inf else
                 "no DP-SGD (privacy.dp_sgd.target_epsilon=.inf, a sweep's non-private level)")
        implied = ", implied by max-epsilon" if policy.require_dp_setting is None else ""
        raise PolicyRefusal(
            f"hospital {policy.hospital}: privacy policy require-dp ({policy.source}{implied}): "
            f"the server asked for training with {asked}; refused, nothing trained",
            key="require-dp")


def steps_per_epoch(train_records: int, batch_size: int) -> tuple[float, int]:
    """(sample rate, steps per epoch) exactly as Opacus' Poisson loader takes them: rate
    1/ceil(N/B) and int(1/rate) steps, which is one step fewer than ceil(N/B) for some N
    (e.g. N = 93 x B - 1, where 1/(1/93) rounds below 93)."""
    sample_rate = 1.0 / math.ceil(train_records / batch_size)
    return sample_rate, int(1 / sample_rate)


@dataclass(frozen=True)
class DpSgdPlan:
    hospital: int
    train_records: int
    sample_rate: float  # Poisson sampling rate of each step
    steps_per_round: int
    delta: float  # of this run
    noise_multiplier: float
    max_grad_norm: float
    accountant: Accountant
    max_epsilon: float | None  # this run's cap: the tighter of the target and the server's
    # The hospital's own policy: its lifetime budget at its own delta, over every run.
    policy: HospitalPolicy = field(default_factory=lambda: HospitalPolicy(hospital=-1))
    prior_history: tuple[Step, ...] = ()  # steps of the hospital's earlier runs
    section: str = "privacy.dp_sgd"  # the settings it was planned from, for refusals' keys

    @property
    def hospital_delta(self) -> float:
        return self.policy.delta(self.train_records)

    def round_steps(self) -> Step:
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)

    def epsilon(self, history: list[Step]) -> float:
        """This run's epsilon at this run's delta."""
        return epsilon_spent(history, self.delta, self.accountant)

    def lifetime_epsilon(self, history: list[Step]) -> float:
        """Every run's steps so far, at the hospital's delta."""
        return epsilon_spent(list(self.prior_history) + list(history), self.hospital_delta,
                             self.accountant)

    def epsilon_after_round(self, history: list[Step]) -> float:
        """Epsilon if this hospital trains one more round."""
        return self.epsilon(list(history) + [self.round_steps()])

    def over(self, history: list[Step], delta: float, cap: float) -> float | None:
        """The epsilon of ``history`` at ``delta`` under this plan's accountant where it is not
        clearly within ``cap`` (NaN included), else None. Under PLD, an RDP figure within the
        cap decides without computing the PLD (a second or so): the PLD figure is never
        reported above RDP's, so the answer is the PLD's own."""
        if self.accountant == Accountant.pld and epsilon_spent(
                history, delta, Accountant.rdp) <= cap:
            return None
        figure = epsilon_spent(history, delta, self.accountant)
        return None if figure <= cap else figure

    def _run_over(self, history: list[Step]) -> float | None:
        """This run's epsilon after one more round, where it breaks the run's cap."""
        if self.max_epsilon is None:
            return None
        return self.over(list(history) + [self.round_steps()], self.delta, self.max_epsilon)

    def refusal(self, history: list[Step], server_round: int) -> str | None:
        """Why the next round would break the run's cap or the hospital's lifetime budget."""
        where = f"hospital {self.hospital}"
        after = self._run_over(history)
        if after is not None:
            return (f"{where}: privacy budget: round {server_round} would raise epsilon "
                    f"from {self.epsilon(history):.4g} to {after:.4g}, above its budget "
                    f"{self.max_epsilon:g} (delta {self.delta:.3g}); no update sent")
        cap = self.policy.max_epsilon
        if cap is not None:
            after = self.over(list(self.prior_history) + list(history) + [self.round_steps()],
                              self.hospital_delta, cap)
            if after is not None:
                return (f"{where}: privacy policy max-epsilon ({self.policy.source}): round "
                        f"{server_round} would raise the lifetime epsilon from "
                        f"{self.lifetime_epsilon(history):.4g} to {after:.4g}, above the "
                        f"hospital's lifetime budget {cap:g} (delta "
                        f"{self.hospital_delta:.3g}, noise multiplier "
                        f"{self.noise_multiplier:.3g}); no update sent")
        return None

    def refusal_key(self, history: list[Step]) -> str:
        """The setting or policy key a refusal of the next round concerns: the run's cap, or
        the hospital's lifetime budget."""
        if self._run_over(history) is not None:
            return f"{self.section}.max_epsilon"
        return "max-epsilon"

    def budget_error(self, history: list[Step], server_round: int) -> PrivacyBudgetError | None:
        """The refusal of the next round as an error that names its key, or None."""
        why = self.refusal(history, server_round)
        return PrivacyBudgetError(why, key=self.refusal_key(history)) if why else None


def policy_delta(settings: DpSgdSettings | DistributedDpSettings, policy: HospitalPolicy,
                 train_records: int) -> float:
    """This run's delta: the server's, if the hospital accepts it, else the hospital's own."""
    where = f"hospital {policy.hospital}"
    section = settings.SECTION
    policy.check_records(train_records)
    hospital_delta = policy.delta(train_records)
    delta = settings.target_delta
    if delta is None:
        return hospital_delta
    if delta >= 1.0 / train_records:
        raise PrivacyBudgetError(
            f"{where}: {section}.target_delta={delta:g} is not below 1/records = "
            f"1/{train_records} = {1 / train_records:.3g}; a delta that large permits "
            "revealing a whole record. Use a smaller delta (or leave it null).",
            key=f"{section}.target_delta")
    if delta > hospital_delta:
        raise PolicyRefusal(
            f"{where}: privacy policy max-delta ({policy.source}): the server asked for "
            f"{section}.target_delta={delta:g}, above the hospital's maximum "
            f"{hospital_delta:g}; refused, nothing trained", key="max-delta")
    return delta


def _check_noise(where: str, noise: float, source: str) -> None:
    """The noise this plan will use is finite and > 0, wherever it came from (the server's
    setting, this run's ledger, the calibration): RDP would read -1 as +1."""
    try:
        check_step((noise, 1.0, 0))
    except (TypeError, ValueError) as err:
        raise PrivacyBudgetError(f"{where}: {source}: {err}; refused, nothing trained") from err


def _check_planned_steps(where: str, planned_rounds: int, steps_per_round: int) -> None:
    total = planned_rounds * steps_per_round
    if total > MAX_PLANNED_STEPS:
        raise PrivacyBudgetError(
            f"{where}: the plan asks for {planned_rounds} rounds x {steps_per_round} steps = "
            f"{total} DP-SGD steps, above the most this product plans ({MAX_PLANNED_STEPS}); "
            "refused, nothing trained")


def plan_dp_sgd(settings: DpSgdSettings, hospital: int, train_records: int, batch_size: int,
                local_epochs: int, planned_rounds: int,
                policy: HospitalPolicy | None = None,
                committed_noise_multiplier: float | None = None,
                prior_history: list[Step] | tuple[Step, ...] = (),
                run_history: list[Step] | tuple[Step, ...] = ()) -> DpSgdPlan:
    """The plan for one hospital. ``committed_noise_multiplier`` is the noise its ledger
    already uses in this run: the calibration happens once and is never redone mid-run.
    ``prior_history``: the hospital's steps in earlier runs, for its lifetime budget.
    ``run_history``: what this run spent before its first round (a release of noisy label
    counts, tasks/privacy/label_counts.py), which the calibration leaves room for."""
    where = f"hospital {hospital}"
    policy = policy or HospitalPolicy(hospital)
    if train_records < 1:
        raise PrivacyBudgetError(f"{where}: no training records, nothing to train privately")
    sample_rate, batches_per_epoch = steps_per_epoch(train_records, batch_size)
    steps_per_round = local_epochs * batches_per_epoch
    _check_planned_steps(where, planned_rounds, steps_per_round)
    delta = policy_delta(settings, policy, train_records)

    # The target is a promise too: a hospital sampled more often than planned (fraction_train
    # below 1) stops at it rather than spend more.
    target = settings.target_epsilon if settings.noise_multiplier is None else None
    budgets = [b for b in (settings.max_epsilon, target) if b is not None]
    max_epsilon = min(budgets) if budgets else None

    if committed_noise_multiplier is not None:
        noise, source = committed_noise_multiplier, "the noise multiplier its ledger committed to"
    elif settings.noise_multiplier is not None:
        noise, source = settings.noise_multiplier, "privacy.dp_sgd.noise_multiplier"
    else:
        source = "the calibrated noise multiplier"
        total_steps = planned_rounds * steps_per_round
        try:
            noise = calibrate_noise_multiplier(settings.target_epsilon, delta, sample_rate,
                                               total_steps, settings.accountant,
                                               preceding=tuple(run_history))
        except ValueError as err:
            raise PrivacyBudgetError(f"{where}: {err}") from err
    _check_noise(where, noise, source)

    plan = DpSgdPlan(hospital=hospital, train_records=train_records, sample_rate=sample_rate,
                     steps_per_round=steps_per_round, delta=delta, noise_multiplier=noise,
                     max_grad_norm=settings.max_grad_norm, accountant=settings.accountant,
                     max_epsilon=max_epsilon, policy=policy,
                     prior_history=tuple(tuple(s) for s in prior_history))
    if committed_noise_multiplier is None:
        spent = list(run_history)
        first = (plan.over([*spent, plan.round_steps()], delta, max_epsilon)
                 if max_epsilon is not None else None)
        if first is not None:
            raise PrivacyBudgetError(
                f"{where}: max_epsilon {max_epsilon:g} is too small for even one round: one "
                f"round ({steps_per_round} steps at sample rate {sample_rate:.3g}, noise "
                f"multiplier {noise:.3g}) spends epsilon {first:.3g} at delta {delta:.3g}"
                + (" after this run's label-count release" if spent else ""))
        refusal = plan.refusal(spent, 1)
        if refusal and policy.max_epsilon is not None:
            raise PolicyRefusal(f"{refusal} (the noise is too low for the remaining lifetime "
                                "budget)", key="max-epsilon")
    return plan
