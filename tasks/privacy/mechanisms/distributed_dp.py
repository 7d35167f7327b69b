"""``privacy.mechanism=distributed_dp``: the hospital's share of one DP-SGD step over the
union of the hospitals' batches (``tasks/privacy/distributed_dp.py``), sent only through
secure aggregation. Owns the hospital's side of the server's plan, the share, and the step
in the ledger."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from clinical_fl.settings.privacy import Accountant, RecordLevelMechanism
from tasks.errors import TaskInputError
from tasks.learning.training import TrainOutcome
from tasks.privacy.distributed_dp import (
    clipped_gradient_sum,
    continuous_share,
    flat_signal,
    hospital_plan,
    lattice_share,
)
from tasks.privacy.mechanisms.base import RecordLevelPrivacy, RoundArrays, RoundInputs
from tasks.privacy.report import privacy_report

if TYPE_CHECKING:
    from tasks.hospital import Hospital


class DistributedDp(RecordLevelPrivacy):
    name: ClassVar[RecordLevelMechanism] = RecordLevelMechanism.distributed_dp
    sends_share: ClassVar[bool] = True

    def accountant(self) -> Accountant:
        return self.privacy.distributed_dp.accountant

    def train(self, hospital: Hospital, global_state: dict[str, torch.Tensor],
              inputs: RoundInputs) -> tuple[RoundArrays, TrainOutcome]:
        """Per trainable parameter: minus the hospital's clipped gradient sum over the union's
        expected batch, plus its share of the noise; uint32 levels on SecAgg+'s lattice, or
        float64 values for CKKS. The secure sum over the hospitals is minus the round's noisy
        mean gradient. The step is in the ledger before it leaves."""
        ledger = inputs.ledger
        if ledger is None:
            raise ValueError("distributed DP needs the hospital's privacy ledger")
        lattice = hospital.share_lattice
        dimension = sum(t.numel() for t in global_state.values())
        plan, as_steps = hospital_plan(self.privacy.distributed_dp, hospital.data.hospital,
                                       len(hospital.data.train), inputs.policy, lattice,
                                       dimension, inputs.prior_history)
        refusal = as_steps.budget_error(ledger.history, inputs.server_round)
        if refusal:
            raise refusal
        start = time.perf_counter()
        # The audit's gradient canaries (simulation only) are in the share like any record.
        clipped = clipped_gradient_sum(hospital.model, hospital.step_loader(global_state),
                                       plan, hospital.compute, canaries=hospital.canaries)
        if list(clipped) != list(global_state):
            raise TaskInputError(f"hospital {hospital.data.hospital}: the global adapter's "
                                 "arrays are not this model's trainable parameters")
        signal = flat_signal(clipped, plan)
        flat = (lattice_share(signal, plan, lattice) if lattice is not None
                else continuous_share(signal, plan))
        ledger.noise_multiplier, ledger.delta = plan.accounted_noise_multiplier, as_steps.delta
        ledger.add_step(plan.round_step())
        ledger.rounds_trained.append(inputs.server_round)
        outcome = TrainOutcome(loss=float("nan"), num_examples=len(hospital.data.train),
                               num_steps=1, seconds=time.perf_counter() - start)
        outcome.privacy = privacy_report(as_steps, ledger)
        outcome.privacy.epsilon_if_alone = plan.epsilon(ledger.steps, as_steps.delta,
                                                        as_steps.accountant, fallback=True)
        return _shaped_like(flat, global_state), outcome


def _shaped_like(flat: np.ndarray, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    share, offset = {}, 0
    for name, tensor in state.items():
        share[name] = flat[offset:offset + tensor.numel()].reshape(tuple(tensor.shape))
        offset += tensor.numel()
    return share
