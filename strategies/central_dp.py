"""Client-level DP on the server: Flower's fixed-clipping wrapper with its RDP accountant.

Each hospital clips its update (reply minus global adapter) to ``clipping_norm``
(Flower's ``fixedclipping_mod``, applied in the ClientApp); the wrapper adds
Gaussian noise of std ``noise_multiplier x clipping_norm / hospitals`` to the
average and composes one Gaussian release per round in the accountant.

What it protects: the participation of one whole hospital, not one patient.
With a handful of hospitals that protection is weak (the noise must hide a
whole hospital's update among very few); record-level DP-SGD is the headline
guarantee. The accountant claims no amplification by sampling hospitals.
"""

from __future__ import annotations

from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from clinical_fl.settings.strategy import CentralDpSettings

# Client-level delta when none is configured. A delta of 1/(10 x hospitals) would be 0.05 for
# two hospitals: a 5% chance of revealing a whole hospital's update outright.
DEFAULT_CLIENT_DELTA = 1e-5


def with_client_level_dp(strategy: FedAvg, settings: CentralDpSettings,
                         hospitals: int) -> DifferentialPrivacyClientSideFixedClipping:
    delta = settings.target_delta if settings.target_delta is not None \
        else DEFAULT_CLIENT_DELTA
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=delta, population_size=hospitals,
        # Flower's accountant supports add-or-remove-one neighbours without amplification.
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=settings.max_epsilon))
    return DifferentialPrivacyClientSideFixedClipping(
        strategy, noise_multiplier=settings.noise_multiplier,
        clipping_norm=settings.clipping_norm, num_sampled_clients=hospitals,
        accountant=accountant)
