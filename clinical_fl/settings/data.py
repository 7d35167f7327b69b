"""``data.*``: where a hospital's notes come from, how a shared corpus is dealt out to
simulated hospitals, and de-identification."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from clinical_fl.settings.checks import as_enum, require


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
