"""What a hospital reports of its privacy after a round (``PrivacyReport``), from its plan and
its ledger: the same figures whichever mechanism took the steps."""

from __future__ import annotations

from tasks.learning.training import PrivacyReport
from tasks.privacy.ledger import PrivacyLedger
from tasks.privacy.plan import DpSgdPlan


def privacy_report(plan: DpSgdPlan, ledger: PrivacyLedger) -> PrivacyReport:
    return PrivacyReport(
        epsilon=plan.epsilon(ledger.history), delta=plan.delta,
        noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
        sample_rate=plan.sample_rate, steps=ledger.steps, max_epsilon=plan.max_epsilon,
        can_train_next_round=plan.refusal(ledger.history, 0) is None,
        lifetime_epsilon=plan.lifetime_epsilon(ledger.history),
        hospital_delta=plan.hospital_delta)
