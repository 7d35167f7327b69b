"""Typed settings of the learning task: what a hospital needs to train and evaluate.

These dataclasses are the schema that Hydra's composed YAML is validated
against (see ``fl_app/run_settings.py``); a hospital receives exactly these sections
from the server and validates them again on arrival.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING


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

    natural = "natural"  # by the site each note was written at (data.site_column)
    iid = "iid"
    dirichlet = "dirichlet"  # label skew: each label's notes dealt by Dirichlet(label_skew_alpha)
    size = "size"  # size skew: log-normal hospital sizes with sigma data.size_skew


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


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    # None: found from the model family (see tasks/model/build.py).
    target_modules: list[str] | None = None


@dataclass
class ModelSettings:
    name_or_path: str = MISSING
    max_length: int = 256
    pooling: Pooling = Pooling.auto
    lora: LoraSettings = field(default_factory=LoraSettings)


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


@dataclass
class DataSettings:
    source: DataSource = DataSource.synthetic
    # None: the full label set of the source. The server fixes it for everyone.
    labels: list[str] | None = None
    partitioning: Partitioning = Partitioning.natural
    # source=files / huggingface: where the records are and which columns hold what.
    path: str | None = None
    format: DataFormat = DataFormat.auto
    text_column: str = "text"
    label_column: str = "label"
    site_column: str | None = None  # needed by partitioning=natural
    split_column: str | None = None  # rows whose value is test_split form the server test set
    test_split: str = "test"
    # source=synthetic: notes written per hospital.
    notes_per_hospital: int = 300
    size_skew: float = 0.0
    label_skew_alpha: float = 1.0
    label_noise: float = 0.08
    eval_fraction: float = 0.2
    # Notes the server holds for centralized evaluation; 0 turns it off.
    server_test_notes: int = 400
    deid: DeidSettings = field(default_factory=DeidSettings)
    seed: int = 42


class OptimizerName(Enum):
    adamw = "adamw"
    sgd = "sgd"


@dataclass
class TrainSettings:
    optimizer: OptimizerName = OptimizerName.adamw
    local_epochs: int = 1
    batch_size: int = 16
    eval_batch_size: int = 64
    learning_rate: float = 5e-4
    # The classification head starts from random weights and wants larger steps than the
    # LoRA matrices; None: learning_rate for both. conf/train/default.yaml sets 3e-2, which on
    # the default data lifted accuracy from 0.808 to 0.875 without DP and from 0.542 to 0.650
    # at epsilon 8 (docs/benchmarks.md).
    head_learning_rate: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Torch intra-op threads per hospital process; 0 keeps torch's default.
    num_threads: int = 0


@dataclass
class DpSgdSettings:
    """Record-level DP: DP-SGD inside each hospital (Opacus).

    Give ``target_epsilon`` (the noise is calibrated once for the whole planned
    training) or ``noise_multiplier``, not both. ``target_epsilon: .inf`` trains
    without DP-SGD: the non-private point of a privacy sweep.
    """

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


@dataclass
class PrivacySettings:
    """The privacy a hospital applies itself. (Client-level DP on the server is configured in
    ``strategies/strategy_settings.py``; hospitals only receive its clipping norm.)"""

    dp_sgd: DpSgdSettings = field(default_factory=DpSgdSettings)


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


@dataclass
class TaskSettings:
    """What the server sends to each hospital."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    seed: int = 42
    # Set by the server: the rounds each hospital is expected to train in, for calibrating
    # DP-SGD noise over the whole training (rounds x share of hospitals sampled per round).
    planned_rounds: int = 1
