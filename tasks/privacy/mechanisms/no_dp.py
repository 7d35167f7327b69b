"""``privacy.mechanism=none``: local training without record-level DP (FedProx's proximal
term and the restricted softmax allowed). A hospital whose policy requires DP refuses it."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from clinical_fl.settings.privacy import RecordLevelMechanism
from tasks.learning.training import TrainOutcome, train_locally
from tasks.model.build import trainable_state
from tasks.privacy.mechanisms.base import RecordLevelPrivacy, RoundArrays, RoundInputs
from tasks.privacy.plan import refuse_without_dp
from tasks.privacy.policy import HospitalPolicy

if TYPE_CHECKING:
    from tasks.hospital import Hospital


class NoRecordLevelDp(RecordLevelPrivacy):
    name: ClassVar[RecordLevelMechanism] = RecordLevelMechanism.none
    private: ClassVar[bool] = False

    def check_policy(self, policy: HospitalPolicy) -> None:
        refuse_without_dp(self.privacy, policy)

    def train(self, hospital: Hospital, global_state: dict[str, torch.Tensor],
              inputs: RoundInputs) -> tuple[RoundArrays, TrainOutcome]:
        self.check_policy(inputs.policy)
        settings = hospital.settings
        seed = hospital.begin_round(global_state, inputs.server_round)
        loader = hospital.training_loader(seed, settings.train.group_by_length)
        held = set(hospital.data.train["label"])  # for the restricted softmax
        outcome = train_locally(hospital.model, loader, settings.train, inputs.proximal_mu,
                                canaries=hospital.canaries, compute=hospital.compute,
                                classes_held=[c in held for c in range(
                                    len(settings.data.labels))],
                                absent_class_scale=settings.restricted_softmax_scale(),
                                lr_factor=inputs.lr_factor)
        return trainable_state(hospital.model), outcome
