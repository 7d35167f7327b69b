"""``privacy.mechanism=dp_sgd``: DP-SGD inside each hospital. Owns the hospital's DP-SGD
plan (``tasks/privacy/plan.py``), its check before round 1 with the noisy label-count
release it may book (``tasks/privacy/label_counts.py``), the round's steps
(``tasks/privacy/dp_sgd.py``) and what goes into the ledger."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from clinical_fl.settings.privacy import Accountant, RecordLevelMechanism
from clinical_fl.settings.train import ClassWeighting
from tasks.learning.training import TrainOutcome
from tasks.model.build import trainable_state
from tasks.privacy.accounting import Step
from tasks.privacy.dp_sgd import train_with_dp_sgd
from tasks.privacy.label_counts import noisy_counts, release_step
from tasks.privacy.ledger import LedgerError, PrivacyLedger
from tasks.privacy.mechanisms.base import RecordLevelPrivacy, RoundArrays, RoundInputs
from tasks.privacy.plan import DpSgdPlan, PrivacyBudgetError, plan_dp_sgd
from tasks.privacy.policy import HospitalPolicy
from tasks.privacy.report import privacy_report

if TYPE_CHECKING:
    from clinical_fl.settings.task import TaskSettings
    from tasks.data.hospital_data import HospitalData
    from tasks.hospital import Hospital


class DpSgd(RecordLevelPrivacy):
    name: ClassVar[RecordLevelMechanism] = RecordLevelMechanism.dp_sgd
    plans_at_preflight: ClassVar[bool] = True

    def accountant(self) -> Accountant:
        return self.privacy.dp_sgd.accountant

    def plan(self, task: TaskSettings, hospital: int, train_records: int,
             policy: HospitalPolicy | None = None, ledger: PrivacyLedger | None = None,
             prior_history: Sequence[Step] = (),
             pending: Sequence[Step] = ()) -> DpSgdPlan:
        """This hospital's DP-SGD plan; raises PrivacyBudgetError on settings it cannot keep.
        ``pending``: steps about to be booked in ``ledger`` (a release before training)."""
        return plan_dp_sgd(
            self.privacy.dp_sgd, hospital, train_records, task.train.batch_size,
            task.train.local_epochs, task.planned_rounds, policy,
            committed_noise_multiplier=ledger.noise_multiplier if ledger else None,
            prior_history=prior_history,
            run_history=[*ledger.history, *pending] if ledger else list(pending))

    def preflight(self, task: TaskSettings, data: HospitalData, policy: HospitalPolicy,
                  run: PrivacyLedger, prior_history: Sequence[Step]) -> list[int] | None:
        """Check that this hospital can keep the plan (a refusal raises) and, where the server
        asks for noisy label counts to weigh classes, release them: booked in ``run`` (which
        the caller saves before they leave). The same run's counts are sent again as they
        were, never drawn twice. None: no counts leave."""
        dp = self.privacy.dp_sgd
        labels = list(task.data.labels)
        wanted = (dp.label_count_noise is not None and task.train.class_weights is None
                  and task.train.class_weighting == ClassWeighting.balanced)
        stored = _stored_counts(run, labels, data.hospital)
        if wanted and stored is not None:
            wanted = False  # sent again as released: nothing new leaves
        elif wanted and (run.history or run.noise_multiplier is not None):
            # A release comes before the run's first step, where the plan below checks it
            # with the training against every budget; after that the noise is committed and
            # nothing would check it.
            raise PrivacyBudgetError(
                f"hospital {data.hospital}: label counts asked for after this run's training "
                "started; refused, nothing released", key="privacy.dp_sgd.label_count_noise")
        pending = [release_step(dp.label_count_noise)] if wanted else []
        # The release comes before any training: the plan must hold with it.
        self.plan(task, data.hospital, len(data.train), policy, run, prior_history, pending)
        if wanted:
            exact = data.label_counts(labels, held_out=False)  # the records DP-SGD covers
            run.add_step(pending[0])
            run.released_label_counts = noisy_counts(exact, dp.label_count_noise)
            run.released_labels = labels
            stored = run.released_label_counts
        return stored if dp.label_count_noise is not None else None

    def train(self, hospital: Hospital, global_state: dict[str, torch.Tensor],
              inputs: RoundInputs) -> tuple[RoundArrays, TrainOutcome]:
        seed = hospital.begin_round(global_state, inputs.server_round)
        # DP-SGD replaces the sampler with Poisson sampling: no length grouping there.
        loader = hospital.training_loader(seed, group_by_length=False)
        ledger = inputs.ledger
        if ledger is None:
            raise ValueError("DP-SGD training needs the hospital's privacy ledger")
        if inputs.proximal_mu > 0:
            # The key is the round config's (clinical_fl/protocol/messages.py): a refusal
            # names only keys the hospital received.
            raise PrivacyBudgetError("FedProx's proximal term is not supported with DP-SGD",
                                     key="proximal-mu")
        plan = self.plan(hospital.settings, hospital.data.hospital, len(hospital.data.train),
                         inputs.policy, ledger, inputs.prior_history)
        refusal = plan.budget_error(ledger.history, inputs.server_round)
        if refusal:
            raise refusal
        ledger.noise_multiplier, ledger.delta = plan.noise_multiplier, plan.delta
        outcome = train_with_dp_sgd(hospital.model, loader, hospital.settings.train,
                                    plan.noise_multiplier, plan.max_grad_norm,
                                    self.privacy.dp_sgd.grad_sample_mode,
                                    ledger.history, canaries=hospital.canaries,
                                    compute=hospital.compute, lr_factor=inputs.lr_factor)
        ledger.rounds_trained.append(inputs.server_round)
        outcome.privacy = privacy_report(plan, ledger)
        return trainable_state(hospital.model), outcome


def _stored_counts(run: PrivacyLedger, labels: list[str], hospital: int) -> list[int] | None:
    """The counts this run already released, in the order of ``labels``; a different label
    set is refused (a new release for it would be a second draw of the same run)."""
    if run.released_label_counts is None:
        return None
    by_label = dict(zip(run.released_labels or [], run.released_label_counts, strict=True))
    if sorted(by_label) != sorted(labels):
        raise LedgerError(f"hospital {hospital}: this run released counts of other labels "
                          f"({len(by_label)}) than the settings name ({len(labels)}); refused",
                          key="data.labels")
    return [by_label[label] for label in labels]
