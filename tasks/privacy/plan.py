"""A hospital's DP-SGD plan: sampling rate, steps per round, delta, noise, budget.

Everything here is fixed before the first private step and checked before
training: a delta too large for the hospital's record count, or a budget too
small for even one round, fails with the hospital's name before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tasks.config import Accountant, DpSgdSettings
from tasks.errors import TaskInputError
from tasks.privacy.accounting import (
    Step,
    calibrate_noise_multiplier,
    epsilon_spent,
    is_finite_target,
)


class PrivacyBudgetError(TaskInputError):
    """The hospital's privacy settings or budget rule out (further) training."""


def dp_sgd_active(settings: DpSgdSettings) -> bool:
    """DP-SGD is on, with a finite target or an explicit noise (target .inf: no DP-SGD)."""
    return settings.enabled and (settings.noise_multiplier is not None
                                 or is_finite_target(settings.target_epsilon))


def default_delta(train_records: int) -> float:
    """Well below 1/records: a delta near 1/n allows releasing a record outright."""
    return min(1e-5, 1.0 / (10 * train_records))


@dataclass(frozen=True)
class DpSgdPlan:
    hospital: int
    train_records: int
    sample_rate: float  # Poisson sampling rate of each step (1 / batches per epoch)
    steps_per_round: int
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    accountant: Accountant
    max_epsilon: float | None  # the tightest of target, server budget and hospital budget

    def round_steps(self) -> Step:
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)

    def epsilon(self, history: list[Step]) -> float:
        return epsilon_spent(history, self.delta, self.accountant)

    def epsilon_after_round(self, history: list[Step]) -> float:
        """Epsilon if this hospital trains one more round."""
        return self.epsilon(list(history) + [self.round_steps()])

    def refusal(self, history: list[Step], server_round: int) -> str | None:
        """Why the next round would break the budget, or None if it fits."""
        if self.max_epsilon is None:
            return None
        now, after = self.epsilon(history), self.epsilon_after_round(history)
        if after <= self.max_epsilon:
            return None
        return (f"hospital {self.hospital}: privacy budget: round {server_round} would raise "
                f"epsilon from {now:.4g} to {after:.4g}, above its budget {self.max_epsilon:g} "
                f"(delta {self.delta:.3g}); no update sent")


def plan_dp_sgd(settings: DpSgdSettings, hospital: int, train_records: int, batch_size: int,
                local_epochs: int, planned_rounds: int,
                node_max_epsilon: float | None = None,
                committed_noise_multiplier: float | None = None) -> DpSgdPlan:
    """The plan for one hospital. ``committed_noise_multiplier`` is the noise its ledger
    already uses: the calibration happens once and is never redone mid-run."""
    where = f"hospital {hospital}"
    if train_records < 1:
        raise PrivacyBudgetError(f"{where}: no training records, nothing to train privately")
    batches_per_epoch = math.ceil(train_records / batch_size)
    sample_rate = 1.0 / batches_per_epoch  # what Opacus' Poisson loader uses
    steps_per_round = local_epochs * batches_per_epoch

    delta = settings.target_delta
    if delta is None:
        delta = default_delta(train_records)
    elif delta >= 1.0 / train_records:
        raise PrivacyBudgetError(
            f"{where}: privacy.dp_sgd.target_delta={delta:g} is not below 1/records = "
            f"1/{train_records} = {1 / train_records:.3g}; a delta that large permits "
            "revealing a whole record. Use a smaller delta (or leave it null).")

    # The target is a promise too: a hospital sampled more often than planned (fraction_train
    # below 1) stops at it rather than spend more.
    target = settings.target_epsilon if settings.noise_multiplier is None else None
    budgets = [b for b in (settings.max_epsilon, node_max_epsilon, target) if b is not None]
    max_epsilon = min(budgets) if budgets else None

    if committed_noise_multiplier is not None:
        noise = committed_noise_multiplier
    elif settings.noise_multiplier is not None:
        noise = settings.noise_multiplier
    else:
        total_steps = planned_rounds * steps_per_round
        try:
            noise = calibrate_noise_multiplier(settings.target_epsilon, delta, sample_rate,
                                               total_steps, settings.accountant)
        except ValueError as err:
            raise PrivacyBudgetError(f"{where}: {err}") from err

    plan = DpSgdPlan(hospital=hospital, train_records=train_records, sample_rate=sample_rate,
                     steps_per_round=steps_per_round, delta=delta, noise_multiplier=noise,
                     max_grad_norm=settings.max_grad_norm, accountant=settings.accountant,
                     max_epsilon=max_epsilon)
    if max_epsilon is not None and committed_noise_multiplier is None:
        first = plan.epsilon([plan.round_steps()])
        if first > max_epsilon:
            raise PrivacyBudgetError(
                f"{where}: max_epsilon {max_epsilon:g} is too small for even one round: one "
                f"round ({steps_per_round} steps at sample rate {sample_rate:.3g}, noise "
                f"multiplier {noise:.3g}) spends epsilon {first:.3g} at delta {delta:.3g}")
    return plan
