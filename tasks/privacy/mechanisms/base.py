"""The interface every record-level privacy mechanism implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from clinical_fl.settings.privacy import Accountant, PrivacySettings, RecordLevelMechanism
from tasks.learning.training import TrainOutcome
from tasks.privacy.accounting import Step
from tasks.privacy.ledger import PrivacyLedger
from tasks.privacy.policy import HospitalPolicy

if TYPE_CHECKING:  # the hospital imports the mechanisms
    from clinical_fl.settings.task import TaskSettings
    from tasks.data.hospital_data import HospitalData
    from tasks.hospital import Hospital


@dataclass
class RoundInputs:
    """What one training round is given besides the global adapter.

    ``ledger``: this hospital's privacy ledger for the run (None without record-level DP);
    ``policy``: the hospital's own; ``prior_history``: its spending in earlier runs (its
    lifetime budget); ``proximal_mu``: FedProx's term; ``lr_factor``: the round's factor of
    the learning rates (``train.lr_schedule``)."""

    server_round: int
    policy: HospitalPolicy
    ledger: PrivacyLedger | None = None
    prior_history: Sequence[Step] = ()
    proximal_mu: float = 0.0
    lr_factor: float = 1.0


RoundArrays = dict[str, torch.Tensor] | dict[str, np.ndarray]


class RecordLevelPrivacy(ABC):
    """One record-level DP mechanism: what a hospital's training round is under it, and what
    it checks and books around the round."""

    name: ClassVar[RecordLevelMechanism]
    # Record-level DP: what leaves is what the mechanism allows (exact counts stay home, the
    # steps go into the hospital's ledger).
    private: ClassVar[bool] = True
    # The update is the hospital's share of a secure sum (summed, every hospital weighs 1),
    # sent only through secure aggregation, not its own adapter.
    sends_share: ClassVar[bool] = False
    # Checks its plan (and books a release) at preflight, before round 1.
    plans_at_preflight: ClassVar[bool] = False

    def __init__(self, privacy: PrivacySettings) -> None:
        self.privacy = privacy

    def accountant(self) -> Accountant | None:
        """The accountant of the hospital's ledger under this mechanism (None: no ledger)."""
        return None

    def check_policy(self, policy: HospitalPolicy) -> None:
        """Refuse (PolicyRefusal) what the hospital's own policy forbids, before any step.
        Record-level DP itself is what a policy's require-dp asks for: nothing to refuse."""
        return None

    def preflight(self, task: TaskSettings, data: HospitalData, policy: HospitalPolicy,
                  run: PrivacyLedger, prior_history: Sequence[Step]) -> list[int] | None:
        """With ``plans_at_preflight``: check the plan against every budget before round 1
        (a refusal raises), book any release in ``run``; the label counts released (None:
        none leave)."""
        return None

    @abstractmethod
    def train(self, hospital: Hospital, global_state: dict[str, torch.Tensor],
              inputs: RoundInputs) -> tuple[RoundArrays, TrainOutcome]:
        """One round from the global adapter: the arrays to send and the round's outcome.
        A round the run's cap or the hospital's policy forbids raises PrivacyBudgetError
        before any step."""
