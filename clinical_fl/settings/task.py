"""Typed settings of the learning task: what a hospital needs to train and evaluate.

``TaskSettings`` is what the server sends each hospital; the run's own settings
(``clinical_fl/settings/run.py``) share its sections. Every dataclass holds the product's defaults
and checks itself when built (``clinical_fl/settings/checks.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clinical_fl.settings.checks import require
from clinical_fl.settings.data import DataSettings
from clinical_fl.settings.model import LongNotes, ModelSettings
from clinical_fl.settings.privacy import (
    AuditSettings,
    GradSampleMode,
    PrivacySettings,
    RecordLevelMechanism,
    check_precision_fits_dp_sgd,
)
from clinical_fl.settings.recovery import DrillSettings
from clinical_fl.settings.secure_aggregation import SecureAggregationSettings
from clinical_fl.settings.train import (
    DEFAULT_ABSENT_CLASS_SCALE,
    ClassWeighting,
    LearningRateSchedule,
    TrainSettings,
)

# The most rounds a hospital plans for in one run (distributed DP runs take hundreds).
MAX_PLANNED_ROUNDS = 100_000

DP_SGD, DISTRIBUTED_DP = RecordLevelMechanism.dp_sgd, RecordLevelMechanism.distributed_dp


@dataclass
class SharedSettings:
    """The sections the run's settings and a hospital's task settings have in common."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    # What the server may see of each hospital's update
    # (clinical_fl/settings/secure_aggregation.py).
    secure_aggregation: SecureAggregationSettings = field(
        default_factory=SecureAggregationSettings)
    # Injected faults, to rehearse the server's defences (simulation only).
    drill: DrillSettings = field(default_factory=DrillSettings)
    seed: int = 42


@dataclass
class TaskSettings(SharedSettings):
    """What the server sends to each hospital."""

    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    # Set by the server: the rounds each hospital is expected to train in, for calibrating
    # DP-SGD noise over the whole training (rounds x share of hospitals sampled per round).
    planned_rounds: int = 1
    # Set by the server: the Flower run whose privacy-ledger entry this training continues
    # (a resumed run keeps the first run's entry, so its accountant composes the whole
    # training). None: this Flower run's own entry.
    ledger_run: int | None = None
    # Set by the server: the evaluations each hospital is asked for in this run (round 0 and
    # every scheduled round). A hospital answers no more (fewer if its policy's
    # max-evaluations says so). None: planned_rounds + 1.
    planned_evaluations: int | None = None

    def restricted_softmax_scale(self) -> float:
        """``train.absent_class_scale`` resolved: null is 0.5 without record-level DP and 1
        with it, and at a privacy sweep's non-private level (it trains as its private
        levels do)."""
        if self.train.absent_class_scale is not None:
            return self.train.absent_class_scale
        privacy = self.privacy
        record_level = privacy.record_level or privacy.sweep_level_without_dp
        return 1.0 if record_level else DEFAULT_ABSENT_CLASS_SCALE

    def __post_init__(self) -> None:
        # Bounded: a hospital calibrates its noise and sizes its work from these.
        require(1 <= self.planned_rounds <= MAX_PLANNED_ROUNDS, "planned_rounds",
                self.planned_rounds, f"from 1 to {MAX_PLANNED_ROUNDS}")
        require(self.planned_evaluations is None
                or 1 <= self.planned_evaluations <= MAX_PLANNED_ROUNDS + 1,
                "planned_evaluations", self.planned_evaluations,
                f"from 1 to {MAX_PLANNED_ROUNDS + 1}, or null")
        check_precision_fits_dp_sgd(self.train, self.privacy)
        mechanism = self.privacy.mechanism
        weights = self.train.class_weights
        require(weights is None or not self.data.labels
                or len(weights) == len(self.data.labels), "train.class_weights",
                f"{len(weights or [])} weights", f"one weight per label of data.labels "
                f"({len(self.data.labels or [])})")
        # Distributed DP's step computes its own clipped sum (tasks/privacy/distributed_dp.py).
        require(not (weights and mechanism == DISTRIBUTED_DP), "train.class_weights",
                "a list", "null with privacy=distributed_dp (its step is unweighted)")
        # Distributed DP's round is one step of the noisy mean gradient: no local rate.
        require(self.train.lr_schedule == LearningRateSchedule.constant
                or mechanism != DISTRIBUTED_DP, "train.lr_schedule",
                self.train.lr_schedule.value, "constant with privacy=distributed_dp (its "
                "rounds take no local optimizer steps)")
        require(self.train.absent_class_scale in (None, 1.0) or not (
            self.privacy.record_level),
            "train.absent_class_scale", self.train.absent_class_scale,
            "1 with record-level DP (the classes a hospital holds are a statistic of its "
            "records, outside DP-SGD's per-record analysis)")
        # Noisy counts are released only to weigh the classes.
        require(self.privacy.dp_sgd.label_count_noise is None
                or self.train.class_weighting == ClassWeighting.balanced,
                "privacy.dp_sgd.label_count_noise", self.privacy.dp_sgd.label_count_noise,
                "null with train.class_weighting=none (counts for weights that are off)")
        require(self.privacy.dp_sgd.label_count_noise is None
                or self.privacy.dp_sgd.grad_sample_mode != GradSampleMode.ghost,
                "privacy.dp_sgd.label_count_noise", self.privacy.dp_sgd.label_count_noise,
                "null with privacy.dp_sgd.grad_sample_mode=ghost (weighted losses need hooks "
                "or functorch)")
        # Ghost clipping wraps the loss itself (Opacus' DPLossFastGradientClipping).
        require(not (weights and mechanism == DP_SGD
                     and self.privacy.dp_sgd.grad_sample_mode == GradSampleMode.ghost),
                "train.class_weights", "a list", "null with privacy.dp_sgd.grad_sample_mode="
                "ghost (weighted losses need hooks or functorch)")
        # Ghost clipping computes norms per layer from activations, i.e. per window: it
        # cannot clip a note of several windows once (tasks/model/windows.py).
        require(not (mechanism == DP_SGD
                     and self.privacy.dp_sgd.grad_sample_mode == GradSampleMode.ghost
                     and self.model.long_notes == LongNotes.chunk),
                "privacy.dp_sgd.grad_sample_mode", "ghost",
                "hooks or functorch with model.long_notes=chunk (ghost clipping would clip each "
                "window, not each note); or set model.long_notes=truncate")
