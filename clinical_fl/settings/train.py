"""``train.*``: the local optimisation every hospital runs, and where it computes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from clinical_fl.settings.bounds import (
    is_finite,
    is_real,
    require_count,
    require_non_negative,
    require_positive,
    require_rate,
)
from clinical_fl.settings.checks import as_enum, require

MAX_LOCAL_EPOCHS = 100


MAX_BATCH = 100_000


MAX_CLASS_WEIGHT = 1e4  # a class of one record among 10,000 in two classes weighs 5,000


DEFAULT_FINAL_LR_FRACTION = 0.1  # train.lr_schedule=cosine's floor when none is given


DEFAULT_ABSENT_CLASS_SCALE = 0.5  # FedRS' suggestion; measured on OHSUMED 23 (benchmarks.md)


class OptimizerName(Enum):
    adamw = "adamw"
    sgd = "sgd"


class ClassWeighting(Enum):
    """How the training loss weighs the classes. Real label sets are imbalanced: with plain
    cross-entropy a specialty of 40 notes among 800 is barely learned."""

    none = "none"  # plain cross-entropy: every record weighs the same
    balanced = "balanced"  # class c weighs N / (K x n_c): every class weighs the same in all


class LearningRateSchedule(Enum):
    """How a hospital's learning rates change across the run's rounds."""

    constant = "constant"
    # Round r of R trains at f + (1 - f)(1 + cos(pi (r - 1) / R)) / 2 of the rates,
    # f = train.final_lr_fraction: full steps first, smaller ones near a trained model.
    cosine = "cosine"


class Precision(Enum):
    """The arithmetic of forward and backward passes. Master weights, optimizer state and
    everything exchanged with the server stay float32 whatever is chosen."""

    auto = "auto"  # bf16 on CPUs with native bf16 (AVX-512 BF16, AMX); fp32 on CUDA, elsewhere
    fp32 = "fp32"
    bf16 = "bf16"  # bfloat16 autocast


class Device(Enum):
    auto = "auto"  # the GPU when there is one
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class TrainSettings:
    optimizer: OptimizerName = OptimizerName.adamw
    local_epochs: int = 1
    batch_size: int = 16
    eval_batch_size: int = 64
    learning_rate: float = 1e-3
    # The classification head starts from random weights and wants larger steps than the
    # LoRA matrices; None: learning_rate for both. 3e-2 lifted accuracy on the default data
    # from 0.808 to 0.875 without DP and from 0.542 to 0.650 at epsilon 8 (docs/benchmarks.md).
    head_learning_rate: float | None = 3e-2
    weight_decay: float = 0.0
    # Non-private training only: clips the whole batch's gradient, 0: not at all (DP-SGD
    # clips per record, privacy.dp_sgd.max_grad_norm).
    max_grad_norm: float = 1.0
    # Torch intra-op threads per hospital process; 0 keeps torch's default.
    num_threads: int = 0
    precision: Precision = Precision.auto
    device: Device = Device.auto
    # Non-private training and evaluation read notes of similar length together (less
    # padding). DP-SGD's Poisson batches are never regrouped: only their padding is trimmed.
    group_by_length: bool = True
    # Non-private training: at most this many windows (a truncated note is one) in one forward
    # and backward pass; a bigger batch is read in passes of whole notes whose gradients add up
    # to the batch's before its one step (tasks/learning/passes.py: CPUs are faster per token
    # in small passes). None: 8 on a CPU, the whole batch on a GPU. Evaluation's passes hold at
    # most eval_batch_size windows.
    windows_per_pass: int | None = None
    # "balanced": the server computes one weight per label from the label counts hospitals
    # report in preflight (N / (K x n_c), the mean weight of a record stays 1) and sends them
    # as class_weights. Hospitals under DP-SGD withhold their label counts, so private runs
    # train unweighted unless class_weights are given or the hospitals release noisy counts
    # (privacy.dp_sgd.label_count_noise; fl_app/server/class_weights.py).
    class_weighting: ClassWeighting = ClassWeighting.balanced
    # One weight per label, in data.labels' order: set by the server under "balanced", or
    # given. None: unweighted.
    class_weights: list[float] | None = None
    # Restricted softmax (FedRS, Li & Zhan, KDD 2021): in a hospital's training loss the
    # logits of the classes it holds no training record of are multiplied by this, so that
    # hospitals with few of the federation's classes do not push the others' logits down.
    # 1: the full softmax. Non-private runs only: the restriction depends on which labels
    # the hospital's records carry, which DP-SGD's per-record analysis does not cover.
    # None: 0.5 without record-level DP (a no-op where a hospital holds every class), 1 with;
    # the server sends 0 where it averages the head class by class
    # (fl_app/server/head_aggregation.py).
    absent_class_scale: float | None = None
    # Across rounds (strategies/learning_rate_schedule.py): the server sends each round's
    # factor of both learning rates, and a hospital checks it lies in [final_lr_fraction, 1].
    lr_schedule: LearningRateSchedule = LearningRateSchedule.constant
    # cosine only: the floor f the factor decays towards. The planned rounds stay above it
    # (round R of R trains at f + (1 - f)(1 - cos(pi / R)) / 2), rounds past the plan at f.
    # None: 0.1.
    final_lr_fraction: float | None = None

    def lowest_lr_factor(self) -> float:
        """The smallest factor of the learning rates the schedule sends (1: constant)."""
        if self.lr_schedule == LearningRateSchedule.constant:
            return 1.0
        return (DEFAULT_FINAL_LR_FRACTION if self.final_lr_fraction is None
                else self.final_lr_fraction)

    def pass_cap(self, device: str) -> int | None:
        """The windows one training pass may hold on ``device`` (None: no cap)."""
        if self.windows_per_pass is not None:
            return self.windows_per_pass
        return 8 if device == "cpu" else None

    def __post_init__(self) -> None:
        self.optimizer = as_enum(OptimizerName, self.optimizer, "train.optimizer")
        self.precision = as_enum(Precision, self.precision, "train.precision")
        self.device = as_enum(Device, self.device, "train.device")
        require_count(self.local_epochs, "train.local_epochs", 1, MAX_LOCAL_EPOCHS)
        for key in ("batch_size", "eval_batch_size"):
            require_count(getattr(self, key), f"train.{key}", 1, MAX_BATCH)
        require_positive(self.learning_rate, "train.learning_rate")
        if self.head_learning_rate is not None:
            require_positive(self.head_learning_rate, "train.head_learning_rate",
                             ", or null (train.learning_rate for the head too)")
        require_non_negative(self.weight_decay, "train.weight_decay")
        require_non_negative(self.max_grad_norm, "train.max_grad_norm", " (0: no clipping)")
        require(self.num_threads >= 0, "train.num_threads", self.num_threads,
                "at least 0 (0: torch's default)")
        require(self.windows_per_pass is None or self.windows_per_pass >= 1,
                "train.windows_per_pass", self.windows_per_pass,
                "at least 1, or null (8 on a CPU, the whole batch on a GPU)")
        self.class_weighting = as_enum(ClassWeighting, self.class_weighting,
                                       "train.class_weighting")
        self.lr_schedule = as_enum(LearningRateSchedule, self.lr_schedule, "train.lr_schedule")
        if self.final_lr_fraction is not None:
            require(self.lr_schedule == LearningRateSchedule.cosine, "train.final_lr_fraction",
                    self.final_lr_fraction, "null with train.lr_schedule=constant (a fraction "
                    "of a schedule that is off would be ignored)")
            require_rate(self.final_lr_fraction, "train.final_lr_fraction")
        if self.class_weights is not None:
            require(self.class_weighting == ClassWeighting.balanced, "train.class_weights",
                    "a list", "null with train.class_weighting=none (weights of a switched-off "
                    "weighting would be ignored)")
            self.class_weights = [float(w) if is_real(w) else w for w in self.class_weights]
            require(len(self.class_weights) > 0 and all(
                is_finite(w) and 0 < w <= MAX_CLASS_WEIGHT for w in self.class_weights),
                "train.class_weights", "a list", f"finite weights in (0, {MAX_CLASS_WEIGHT:g}]")
        require(self.absent_class_scale is None or is_finite(self.absent_class_scale)
                and 0 <= self.absent_class_scale <= 1, "train.absent_class_scale",
                self.absent_class_scale, "a number in [0, 1] (1: the full softmax), or null")
