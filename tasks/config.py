"""Typed settings of the learning task: what a hospital needs to train and evaluate.

These dataclasses are the schema that Hydra's composed YAML is validated
against (see ``fl_app/config.py``); a hospital receives exactly these sections
from the server and validates them again on arrival.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING


class DataSource(Enum):
    synthetic = "synthetic"


class Partitioning(Enum):
    natural = "natural"  # by the site each note was written at
    iid = "iid"


class PrivacyMode(Enum):
    none = "none"


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    # None: found from the model family (see tasks/model.py).
    target_modules: list[str] | None = None


@dataclass
class ModelSettings:
    name_or_path: str = MISSING
    max_length: int = 256
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DataSettings:
    source: DataSource = DataSource.synthetic
    # None: the full label set of the source. The server fixes it for everyone.
    labels: list[str] | None = None
    partitioning: Partitioning = Partitioning.natural
    notes_per_hospital: int = 300
    size_skew: float = 0.0
    label_skew_alpha: float = 1.0
    label_noise: float = 0.08
    eval_fraction: float = 0.2
    # Notes the server holds for centralized evaluation; 0 turns it off.
    server_test_notes: int = 400
    seed: int = 42


@dataclass
class TrainSettings:
    local_epochs: int = 1
    batch_size: int = 16
    eval_batch_size: int = 64
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Torch intra-op threads per hospital process; 0 keeps torch's default.
    num_threads: int = 0


@dataclass
class PrivacySettings:
    mode: PrivacyMode = PrivacyMode.none


@dataclass
class TaskSettings:
    """What the server sends to each hospital."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    seed: int = 42
