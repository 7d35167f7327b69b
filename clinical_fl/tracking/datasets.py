"""The run's data as MLflow dataset inputs (``mlflow.log_input``): metadata only.

One entry per hospital taking part (context ``training``) and one for the server's test set
(context ``evaluation``), each with a name, a digest and its record counts as the profile.
No text and no label leaves here: a hospital's entry holds what its preflight report already
told the server (record counts, label counts unless DP-SGD withholds them), and its source
says where the records stay. The digest is a fingerprint of those counts and of the data
settings, so that two runs on the same data show the same digest; the server's test set read
from files is fingerprinted from its records themselves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from typing import Any, Protocol

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.types import ColSpec, DataType, Schema

from clinical_fl.settings.data import DataSettings, DataSource

TRAINING = "training"
EVALUATION = "evaluation"
SERVER_TEST_SET = "server_test_set"
# The records' columns as the model reads them; their content is never logged.
RECORD_SCHEMA = Schema([ColSpec(DataType.string, "text"), ColSpec(DataType.string, "label")])


class HospitalCounts(Protocol):
    """What a hospital's preflight report says (fl_app/server/preflight.py::HospitalReport)."""

    node_id: int
    hospital: int
    train_records: int
    eval_records: int
    label_counts: list[int]
    empty_texts_dropped: int
    declined: str


class SiteSource(DatasetSource):
    """Where the records are: a hospital (its Flower node), never copied, or the server."""

    def __init__(self, site: str, data: str, node_id: int | None = None,
                 path: str | None = None) -> None:
        self.site, self.data, self.node_id, self.path = site, data, node_id, path

    @staticmethod
    def _get_source_type() -> str:
        return "clinical_fl_site"

    def load(self, **kwargs: Any) -> Any:
        raise NotImplementedError(f"the records stay at {self.site}; only counts were logged")

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> SiteSource:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        found = {"site": self.site, "data": self.data, "node_id": self.node_id,
                 "path": self.path}
        return {k: v for k, v in found.items() if v is not None}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> SiteSource:
        return cls(source_dict["site"], source_dict.get("data", ""),
                   source_dict.get("node_id"), source_dict.get("path"))


class CountsDataset(MetaDataset):
    """A dataset known by its counts: name, digest, source, schema, and the counts as its
    profile (what the MLflow UI shows beside the name)."""

    def __init__(self, source: SiteSource, name: str, digest: str,
                 counts: dict[str, Any]) -> None:
        self._counts = counts
        super().__init__(source=source, name=name, digest=digest, schema=RECORD_SCHEMA)

    @property
    def profile(self) -> dict[str, Any]:
        return dict(self._counts)

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config["profile"] = json.dumps(self._counts)
        return config


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else str(value)


def digest_of(*parts: Any) -> str:
    """Eight hex digits of SHA-256 over the parts (MLflow's own digests have eight)."""
    text = json.dumps(parts, sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def records_digest(texts: Iterable[str], labels: Iterable[str]) -> str:
    """Eight hex digits of SHA-256 over the records, in order."""
    sha = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        sha.update(text.encode("utf-8") + b"\x00" + label.encode("utf-8") + b"\x01")
    return sha.hexdigest()[:8]


def _data_settings(data: DataSettings) -> dict[str, Any]:
    return dataclasses.asdict(data)


def hospital_dataset(report: HospitalCounts, labels: Sequence[str],
                     data: DataSettings) -> CountsDataset:
    counts: dict[str, Any] = {"train_records": report.train_records,
                              "eval_records": report.eval_records,
                              "empty_texts_dropped": report.empty_texts_dropped}
    if report.label_counts:  # withheld under DP-SGD: then not here either
        counts["train_label_counts"] = dict(zip(labels, report.label_counts, strict=False))
    name = f"hospital_{report.hospital}"
    source = SiteSource(name, data.source.value, node_id=report.node_id)
    return CountsDataset(source, name, digest_of(name, counts, _data_settings(data)), counts)


Records = tuple[Sequence[str], Sequence[str]]  # texts, label names


def server_test_dataset(data: DataSettings, labels: Sequence[str],
                        read_records: Callable[[], Records] | None = None
                        ) -> CountsDataset | None:
    """The server's test set: built-in notes (generated from the data settings, which the
    digest covers), or the rows of ``data.split_column`` = ``data.test_split`` as
    ``read_records`` reads them (only called then). None: the run has none."""
    if data.source == DataSource.synthetic:
        if data.server_test_notes <= 0:
            return None
        counts = {"records": data.server_test_notes}
        digest = digest_of(SERVER_TEST_SET, counts, list(labels), _data_settings(data))
        source = SiteSource("server", data.source.value)
    else:
        if not data.split_column or read_records is None:
            return None
        texts, names = read_records()
        counts = {"records": len(texts)}
        digest = records_digest(texts, names)
        source = SiteSource("server", data.source.value, path=data.path)
    return CountsDataset(source, SERVER_TEST_SET, digest, counts)


def run_datasets(reports: Iterable[HospitalCounts], labels: Sequence[str], data: DataSettings,
                 read_test_records: Callable[[], Records] | None = None
                 ) -> list[tuple[CountsDataset, str]]:
    """(dataset, context) of every hospital taking part, and of the server's test set."""
    found = [(hospital_dataset(r, labels, data), TRAINING) for r in reports if not r.declined]
    test_set = server_test_dataset(data, labels, read_test_records)
    if test_set is not None:
        found.append((test_set, EVALUATION))
    return found
