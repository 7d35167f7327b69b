"""Typed settings of secure aggregation: the server sees only the sum of the hospitals' updates.

``conf/secure_aggregation/*.yaml`` picks the mode; the defaults live here. The hospitals
receive these settings with the task (they load their CKKS key material at preflight).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from clinical_fl.settings.bounds import (
    MAX_HOSPITALS,
    field_default,
    require_count,
    require_defaults_while_off,
    require_positive,
)
from clinical_fl.settings.checks import as_enum, require

# SecAgg+ works in the integers modulo 2^32: every masked value is one uint32.
SECAGG_MODULUS = 2**32


class SecureAggregationMode(Enum):
    none = "none"  # the server receives each hospital's update in the clear
    secagg_plus = "secagg_plus"  # SecAgg+ (Bell et al., CCS 2020): pairwise masks, Shamir shares
    ckks = "ckks"  # homomorphic encryption (TenSEAL CKKS): the server adds ciphertexts


@dataclass
class SecureAggregationSettings:
    mode: SecureAggregationMode = SecureAggregationMode.none
    # The fewest hospitals whose sum may be revealed in a round (a round with fewer is dropped,
    # never released); for SecAgg+ also the Shamir threshold: this many shares rebuild a
    # hospital's mask secrets. None: a majority of the hospitals each one shares with (all
    # of the round's by default), at least 2.
    reconstruction_threshold: int | None = None
    # SecAgg+: hospitals each one shares its secrets with, itself included (Flower's
    # ``num_shares``; a ring of neighbours as in SecAgg+, so an even number is rounded up to
    # the next odd one, as Flower does). None: every hospital of the round.
    num_shares: int | None = None
    # SecAgg+ quantisation of each hospital's weighted update (trained adapter minus the
    # global one, times its weight share <= 1): clipped to [-clipping_range, clipping_range],
    # then rounded stochastically to one of quantization_range + 1 levels. A round's updates
    # on the default run reach 0.40 (docs/benchmarks.md); the step is 2 x 4 / 2^24 = 5e-7.
    clipping_range: float = 4.0
    quantization_range: int = 2**24
    # CKKS: the public context the operator made with deploy/ckks-keys.sh (a path on the
    # server). The hospitals' key material must match it. None: the hospitals' public
    # contexts, which must all agree, are used.
    ckks_public_context: str | None = None

    SECTION: ClassVar[str] = "secure_aggregation"
    # The options of conf/secure_aggregation/ that switch it on, as the user types them.
    TURN_ON: ClassVar[str] = "secure_aggregation=secagg_plus or secure_aggregation=ckks"

    def __post_init__(self) -> None:
        key = self.SECTION
        self.mode = as_enum(SecureAggregationMode, self.mode, f"{key}.mode")
        self._check_mode_uses_every_value()
        if self.reconstruction_threshold is not None:
            require_count(self.reconstruction_threshold, f"{key}.reconstruction_threshold", 2,
                          MAX_HOSPITALS, " (or null): the sum of one hospital is that "
                          "hospital's update")
        if self.num_shares is not None:
            require_count(self.num_shares, f"{key}.num_shares", 2, MAX_HOSPITALS,
                          " (or null: every hospital of the round)")
            if self.reconstruction_threshold is not None:
                require(self.num_shares >= self.reconstruction_threshold, f"{key}.num_shares",
                        self.num_shares, f"at least reconstruction_threshold "
                        f"({self.reconstruction_threshold}): fewer shares cannot rebuild a "
                        "secret")
        require_positive(self.clipping_range, f"{key}.clipping_range")
        require_count(self.quantization_range, f"{key}.quantization_range", 2, 2**30,
                      " (Flower's quantisation rounds in int32)")

    def _check_mode_uses_every_value(self) -> None:
        """A value the chosen mode would ignore is an error. Off (mode none): every value must
        be the default. CKKS ignores SecAgg+'s quantisation levels, SecAgg+ the CKKS public
        context. Not refused under CKKS: ``clipping_range`` (``privacy=distributed_dp``'s
        preset sets it for SecAgg+ whichever mode the command line picks) and ``num_shares``
        (it sets the default reconstruction threshold in both modes)."""
        key = self.SECTION
        if self.mode == SecureAggregationMode.none:
            require_defaults_while_off(self, key, "mode", self.TURN_ON)
            return
        only = {SecureAggregationMode.secagg_plus: ("ckks_public_context", "ckks"),
                SecureAggregationMode.ckks: ("quantization_range", "secagg_plus")}
        name, other = only[self.mode]
        value, default = getattr(self, name), field_default(self, name)
        require(value == default, f"{key}.{name}", value,
                f"its default ({default!r}) with {key}.mode={self.mode.value}: it takes effect "
                f"only with secure_aggregation={other}")

    @property
    def enabled(self) -> bool:
        return self.mode != SecureAggregationMode.none

    def threshold_for(self, hospitals: int) -> int:
        """The reconstruction threshold for a round of ``hospitals``: a majority of the
        hospitals each one shares with, so that no two disjoint groups of hospitals can both
        hold enough shares (one of a hospital's seed, the other of its key)."""
        if self.reconstruction_threshold is not None:
            return self.reconstruction_threshold
        return max(2, self.shares_for(hospitals) // 2 + 1)

    def shares_for(self, hospitals: int) -> int:
        """Hospitals (itself included) each one shares with in a round of ``hospitals``: the
        ring's odd size, or all of them."""
        if self.num_shares is None:
            return hospitals
        return min(hospitals, 2 * (self.num_shares // 2) + 1)
