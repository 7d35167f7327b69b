"""``privacy.*``: the record-level DP a hospital applies itself (one mechanism, chosen by
``privacy.mechanism``), and the privacy audit's canaries. Client-level DP on the server is
``clinical_fl/settings/strategy.py::CentralDpSettings``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

from clinical_fl.settings.bounds import (
    MAX_HOSPITALS,
    is_finite,
    require_count,
    require_defaults_while_off,
    require_open_unit,
    require_positive,
    require_rate,
)
from clinical_fl.settings.checks import ConfigError, as_enum, require
from clinical_fl.settings.train import Precision, TrainSettings

MAX_EXPECTED_BATCH = 10**6
MECHANISM_KEY = "privacy.mechanism"
MAX_LABEL_COUNT_NOISE = 1e6  # standard deviation of the noise on a released label count


class Accountant(Enum):
    """Accountants that give an upper bound on epsilon (GDP is only an approximation):
    Opacus' RDP and PRV, and dp-accounting's privacy loss distributions (PLD, pessimistic
    discretisation), the tightest of the three for the subsampled Gaussian and the default,
    with RDP as its cross-check (a PLD figure is never reported above RDP's for the same
    steps: tasks/privacy/accounting.py)."""

    rdp = "rdp"
    prv = "prv"
    pld = "pld"


class RecordLevelMechanism(Enum):
    """``privacy.mechanism``: the one switch of record-level DP, read by server and hospitals
    alike; the presets of ``conf/privacy/`` set it. Each mechanism is one module of
    ``tasks/privacy/mechanisms/`` behind one interface (``base.py`` there)."""

    none = "none"  # no record-level DP (client-level DP on the server may still be on)
    dp_sgd = "dp_sgd"  # DP-SGD inside each hospital (Opacus)
    # One DP-SGD step a round over the union of the hospitals' batches, the hospitals adding
    # one shared noise, over secure aggregation.
    distributed_dp = "distributed_dp"


class GradSampleMode(Enum):
    """How Opacus computes per-sample gradients (see docs/benchmarks.md for speed)."""

    hooks = "hooks"
    functorch = "functorch"
    ghost = "ghost"  # ghost clipping: per-sample norms without materializing gradients


def check_privacy_values(section: DpSgdSettings | DistributedDpSettings, chosen: str,
                         mechanism: str, notes: dict[str, str] | None = None) -> None:
    """The values DP-SGD and distributed DP share. Switched off, a value that differs from the
    default is an error: it would be silently ignored (``privacy.dp_sgd.target_epsilon=3``
    without ``privacy=dp_sgd`` would run without DP-SGD). Except at a sweep's level without
    ``mechanism`` (``target_epsilon=inf`` switched it off; its other values belong to the
    sweep's private levels), and for the target epsilon, which ``PrivacySettings`` checks (the
    privacy sweep gives both mechanisms one). Every value given is finite and in range."""
    key = section.SECTION
    off = chosen != section.MECHANISM.value and not section.non_private_level
    if off:
        require_defaults_while_off(section, key, None, section.TURN_ON,
                                   keep=("target_epsilon",), notes=notes,
                                   off_state=f"{MECHANISM_KEY}={chosen}")
    elif section.target_epsilon is not None and not section.non_private_level:
        require_positive(section.target_epsilon, f"{key}.target_epsilon",
                         f" (inf, in a sweep: the level without {mechanism})")
    if section.noise_multiplier is not None:
        require_positive(section.noise_multiplier, f"{key}.noise_multiplier",
                         " (use privacy=none for none)")
    if section.target_delta is not None:
        require_open_unit(section.target_delta, f"{key}.target_delta")
    if section.max_epsilon is not None:
        require_positive(section.max_epsilon, f"{key}.max_epsilon")


@dataclass
class DpSgdSettings:
    """Record-level DP: DP-SGD inside each hospital (Opacus), with
    ``privacy.mechanism=dp_sgd`` (the ``privacy=dp_sgd`` preset sets it). Give
    ``target_epsilon`` (the noise is calibrated once for the whole planned training) or
    ``noise_multiplier``, not both. A privacy sweep's non-private level is written
    ``target_epsilon=inf``: building the settings turns that into ``privacy.mechanism: none``,
    so nothing downstream ever reads epsilon as a switch.
    """

    SECTION: ClassVar[str] = "privacy.dp_sgd"
    MECHANISM: ClassVar[RecordLevelMechanism] = RecordLevelMechanism.dp_sgd
    # The options of conf/privacy/ that switch it on, as the user types them.
    TURN_ON: ClassVar[str] = "privacy=dp_sgd or privacy=dp_sgd_central_dp"
    # Its clipping norm is also the canary norm of an audit that leaves audit.canary_norm
    # unset (tasks/hospital.py); without DP-SGD that norm is set there.
    NOTES_WHILE_OFF: ClassVar[dict[str, str]] = {
        "max_grad_norm": ". For the canary norm of an audit without DP-SGD, set "
                         "audit.canary_norm"}

    target_epsilon: float | None = None
    # None: the hospital's own delta (tasks/privacy/policy.py); a hospital refuses one above it.
    target_delta: float | None = None
    noise_multiplier: float | None = None
    # Per-record L2 clipping norm of the gradient of the trainable parameters.
    max_grad_norm: float = 1.0
    # This run's cap: a hospital refuses any round that would take the run's epsilon above
    # it. A hospital's own lifetime budget (its privacy policy, max-epsilon) holds as well.
    max_epsilon: float | None = None
    accountant: Accountant = Accountant.pld
    grad_sample_mode: GradSampleMode = GradSampleMode.hooks
    # With train.class_weighting=balanced: each hospital releases its training records' label
    # counts with Gaussian noise of this standard deviation (one record moves one count by 1)
    # and books the release in its privacy ledger (tasks/privacy/label_counts.py). null: the
    # counts stay home and training is unweighted.
    label_count_noise: float | None = None

    def __post_init__(self) -> None:
        key = self.SECTION
        self.accountant = as_enum(Accountant, self.accountant, f"{key}.accountant")
        self.grad_sample_mode = as_enum(GradSampleMode, self.grad_sample_mode,
                                        f"{key}.grad_sample_mode")
        require_positive(self.max_grad_norm, f"{key}.max_grad_norm")
        if self.label_count_noise is not None:
            require(is_finite(self.label_count_noise)
                    and 0 < self.label_count_noise <= MAX_LABEL_COUNT_NOISE,
                    f"{key}.label_count_noise", self.label_count_noise,
                    f"a standard deviation in (0, {MAX_LABEL_COUNT_NOISE:g}], or null")

    @property
    def non_private_level(self) -> bool:
        """A privacy sweep's level without DP-SGD: ``target_epsilon=inf``, no fixed noise."""
        return self.target_epsilon == math.inf and self.noise_multiplier is None

    def check_as(self, chosen: str) -> None:
        """The checks that depend on whether DP-SGD is the run's mechanism (``chosen``)."""
        if chosen == self.MECHANISM.value and (
                (self.target_epsilon is None) == (self.noise_multiplier is None)):
            key = self.SECTION
            raise ConfigError(
                f"invalid configuration at '{key}': give exactly one of target_epsilon (got "
                f"{self.target_epsilon!r}) and noise_multiplier (got {self.noise_multiplier!r}): "
                "the noise is either calibrated or fixed", key)
        check_privacy_values(self, chosen, "DP-SGD", self.NOTES_WHILE_OFF)


@dataclass
class DistributedDpSettings:
    """Distributed DP-SGD over secure aggregation (tasks/privacy/distributed_dp.py): each round
    is one DP-SGD step over the union of the hospitals' Poisson batches, the hospitals adding
    one shared noise. The server completes the plan it sends (``noise_multiplier`` calibrated
    for the planned rounds, ``sample_rate``, ``threshold``, ``target_delta``); each hospital
    accounts the steps it takes in its own ledger and refuses a round its policy forbids."""

    SECTION: ClassVar[str] = "privacy.distributed_dp"
    MECHANISM: ClassVar[RecordLevelMechanism] = RecordLevelMechanism.distributed_dp
    TURN_ON: ClassVar[str] = "privacy=distributed_dp"

    target_epsilon: float | None = 8.0
    noise_multiplier: float | None = None  # sigma: the released sum's noise is sigma x C
    # None: min(1e-5, 1/(10 x the training records of every hospital taking part)).
    target_delta: float | None = None
    max_grad_norm: float = 1.0  # C, per record
    # The union's expected batch per round: every record is sampled at q = this / all records.
    expected_batch_size: int = 128
    max_epsilon: float | None = None
    accountant: Accountant = Accountant.pld
    # Set by the server for the hospitals: q, and the secure-aggregation threshold t.
    sample_rate: float | None = None
    threshold: int | None = None

    def __post_init__(self) -> None:
        key = self.SECTION
        self.accountant = as_enum(Accountant, self.accountant, f"{key}.accountant")
        require_positive(self.max_grad_norm, f"{key}.max_grad_norm")
        require_count(self.expected_batch_size, f"{key}.expected_batch_size", 1,
                      MAX_EXPECTED_BATCH)
        if self.sample_rate is not None:
            require_rate(self.sample_rate, f"{key}.sample_rate")
        if self.threshold is not None:
            require_count(self.threshold, f"{key}.threshold", 2, MAX_HOSPITALS,
                          ": the noise of one hospital is its own")

    @property
    def non_private_level(self) -> bool:
        """A privacy sweep's level without distributed DP: ``target_epsilon=inf``, no fixed
        noise."""
        return self.target_epsilon == math.inf and self.noise_multiplier is None

    def check_as(self, chosen: str) -> None:
        """The checks that depend on whether distributed DP is the run's mechanism. The
        server's plan too, which a hospital receives (sample_rate, threshold,
        noise_multiplier, target_delta), is checked here."""
        if chosen == self.MECHANISM.value:
            require(self.target_epsilon is not None or self.noise_multiplier is not None,
                    f"{self.SECTION}.target_epsilon", self.target_epsilon,
                    "a target epsilon, or a noise_multiplier")
        check_privacy_values(self, chosen, "distributed DP")


@dataclass
class PrivacySettings:
    """The privacy a hospital applies itself: one record-level mechanism, and the parameters of
    each. (Client-level DP on the server is configured in ``clinical_fl/settings/run.py``;
    hospitals only receive its clipping norm.)"""

    mechanism: RecordLevelMechanism = RecordLevelMechanism.none
    dp_sgd: DpSgdSettings = field(default_factory=DpSgdSettings)
    distributed_dp: DistributedDpSettings = field(default_factory=DistributedDpSettings)

    def __post_init__(self) -> None:
        """A privacy sweep's level without DP (the chosen mechanism's ``target_epsilon=inf``)
        runs as ``mechanism=none``; its target stays in its section, for its label. A section
        that is not the mechanism keeps its defaults, except its target epsilon, which may be
        the target of the mechanism that is on: the privacy sweep gives both one
        (``conf/sweep/epsilon.yaml`` sweeps one target, ``privacy=dp_sgd,distributed_dp``
        runs both series at it)."""
        self.mechanism = as_enum(RecordLevelMechanism, self.mechanism, MECHANISM_KEY)
        chosen = self.section(self.mechanism)
        if chosen is not None and chosen.non_private_level:
            self.mechanism = RecordLevelMechanism.none
        on = self.section(self.mechanism)
        for section in (self.dp_sgd, self.distributed_dp):
            section.check_as(self.mechanism.value)
            if section is on or section.non_private_level:
                continue
            if not (on is not None and section.target_epsilon == on.target_epsilon):
                require_defaults_while_off(section, section.SECTION, None, section.TURN_ON,
                                           off_state=f"{MECHANISM_KEY}={self.mechanism.value}")

    def section(self, mechanism: RecordLevelMechanism
                ) -> DpSgdSettings | DistributedDpSettings | None:
        """The settings of ``mechanism`` (None for none)."""
        return {RecordLevelMechanism.dp_sgd: self.dp_sgd,
                RecordLevelMechanism.distributed_dp: self.distributed_dp}.get(mechanism)

    @property
    def record_level(self) -> bool:
        """Whether the hospitals apply record-level DP of either kind."""
        return self.mechanism != RecordLevelMechanism.none

    @property
    def sweep_level_without_dp(self) -> bool:
        """A privacy sweep's level without DP: it trains as its private levels do."""
        return self.dp_sgd.non_private_level or self.distributed_dp.non_private_level


@dataclass
class AuditSettings:
    """The privacy audit's canaries (``clinical-fl-audit`` sets these; simulation only)."""

    # JSONL of the canaries to add to one hospital's training records (tasks/audit/).
    canaries_path: str | None = None
    hospital: int = 0  # the audited hospital (partition id)
    # Norm of a gradient canary; None: the record-level mechanism's clipping norm (DP-SGD's
    # or distributed DP's, which clip the canary to it anyway; DP-SGD's without one).
    canary_norm: float | None = None
    # Where the server keeps the audited hospital's updates (its view, for the white-box
    # scores); server side only.
    updates_dir: str | None = None

    def __post_init__(self) -> None:
        require(self.hospital >= 0, "audit.hospital", self.hospital, "a partition id, at least 0")
        if self.canary_norm is not None:
            require_positive(self.canary_norm, "audit.canary_norm",
                             ", or null (the mechanism's clipping norm)")


def check_precision_fits_dp_sgd(train: TrainSettings, privacy: PrivacySettings) -> None:
    """bf16 under DP-SGD only with the ``hooks`` per-sample gradients: they are cast to
    float32 before clipping. ``ghost`` and ``functorch`` would clip in bf16."""
    dp_sgd = privacy.dp_sgd
    require(not (privacy.mechanism == RecordLevelMechanism.dp_sgd
                 and train.precision == Precision.bf16
                 and dp_sgd.grad_sample_mode != GradSampleMode.hooks),
            "train.precision", train.precision.value,
            f"fp32 or auto with privacy.dp_sgd.grad_sample_mode={dp_sgd.grad_sample_mode.value} "
            "(its per-record norms would be computed in bf16); bf16 needs grad_sample_mode=hooks")
