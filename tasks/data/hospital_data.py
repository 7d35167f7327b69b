"""A hospital's data: load, partition, check against the global label set, split, tokenize."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import datasets

from clinical_fl.settings.data import DataSettings, DataSource
from tasks.data.deid import deidentify_records
from tasks.data.loaders import LoadReport, Records, load_records
from tasks.data.partitions import partition
from tasks.data.synthetic_notes import SPECIALTIES, generate_hospital_notes, hospital_sizes
from tasks.errors import DataFileError, HospitalDataError, UnknownLabelsError

# Synthetic hospitals whose notes the server keeps for centralized evaluation.
# They lie outside any federation, so this measures transfer to unseen sites.
_SERVER_TEST_HOSPITAL = 10_000

datasets.disable_progress_bars()


@dataclass
class HospitalData:
    """One hospital's records, labels already mapped to the global label ids."""

    hospital: int
    train: datasets.Dataset
    eval: datasets.Dataset
    report: LoadReport | None = None  # file sources: files read, empty texts dropped

    def label_counts(self, labels: list[str], held_out: bool = True) -> list[int]:
        """Records per label id, of the training records and (``held_out``) the held-out ones."""
        counts = Counter(self.train["label"])
        if held_out:
            counts += Counter(self.eval["label"])
        return [counts.get(i, 0) for i in range(len(labels))]


def source_labels(settings: DataSettings) -> list[str]:
    """The global label set: the configured one, else the source's full set.

    For files the server reads ``data.path`` once and takes every label found, in
    sorted order; where the server cannot read the hospitals' data (deployment),
    ``data.labels`` must be given.
    """
    if settings.labels:
        return list(settings.labels)
    if settings.source == DataSource.synthetic:
        return list(SPECIALTIES)
    if not settings.path:
        raise DataFileError(f"data.source={settings.source.value}: set data.labels (the global "
                            "label set) or data.path for the server to read them from")
    return sorted(set(load_records(settings).label))


def _synthetic_corpus(settings: DataSettings, num_hospitals: int) -> datasets.Dataset:
    sizes = hospital_sizes(num_hospitals, settings.notes_per_hospital, settings.size_skew,
                           settings.seed)
    rows: dict[str, list] = {"text": [], "label": [], "site": []}
    for hospital, size in enumerate(sizes):
        for note in generate_hospital_notes(hospital, size, settings.seed,
                                            settings.label_skew_alpha, settings.label_noise,
                                            length=settings.note_length.value):
            rows["text"].append(note.text)
            rows["label"].append(note.label)
            rows["site"].append(f"{hospital:05d}")  # zero-padded: sorts like the ids
    return datasets.Dataset.from_dict(
        rows, features=datasets.Features({"text": datasets.Value("string"),
                                          "label": datasets.Value("string"),
                                          "site": datasets.Value("string")}))


def encode_labels(records: datasets.Dataset, labels: list[str], where: str) -> datasets.Dataset:
    """Map label names to global ids; fail on the first label outside the set."""
    label_ids = {name: i for i, name in enumerate(labels)}
    unknown = [(row, name) for row, name in enumerate(records["label"]) if name not in label_ids]
    if unknown:
        row, name = unknown[0]
        raise UnknownLabelsError(
            f"{where}, row {row}: label '{name}' is not in the global label set {labels} "
            f"({len(unknown)} record(s) in all); add it to data.labels or remove the record",
            key="data.labels", counts={"records": len(unknown)})
    return records.map(lambda r: {"label": label_ids[r["label"]]},
                       features=datasets.Features({**{k: v for k, v in records.features.items()
                                                      if k != "label"},
                                                   "label": datasets.Value("int64")}))


def _records(settings: DataSettings, path: str | None = None) -> tuple[Records, LoadReport]:
    """The training records of a file source (the server's test split left out)."""
    records = load_records(settings, path)
    return records.where_split(settings.test_split if settings.split_column else None,
                               keep=False), records.report


def load_hospital_data(settings: DataSettings, labels: list[str], partition_id: int,
                       num_partitions: int, data_path: str | None = None) -> HospitalData:
    """Hospital ``partition_id`` of ``num_partitions``: its local train and eval splits.

    ``data_path`` (a hospital's node config in deployment) is this hospital's own
    export: read whole, no partitioning.
    """
    where = f"hospital {partition_id} (partition-id={partition_id} of {num_partitions})"
    report = None
    if data_path:
        records, report = _records(settings, data_path)
        records.check_labels(labels, settings.label_column)
        hospital_records = records.to_dataset()
        where = f"hospital {partition_id} (data-path={data_path})"
    else:
        if not 0 <= partition_id < num_partitions:
            raise HospitalDataError(f"{where}: partition-id must lie in [0, {num_partitions})")
        if settings.source == DataSource.synthetic:
            corpus = _synthetic_corpus(settings, num_partitions)
        else:
            records, report = _records(settings)
            records.check_labels(labels, settings.label_column)
            corpus = records.to_dataset()
        hospital_records, name = partition(corpus, settings, partition_id, num_partitions)
        if settings.source != DataSource.synthetic:
            where = f"hospital {partition_id} ({name} of {settings.path})"
    if len(hospital_records) == 0:
        raise HospitalDataError(f"{where}: the partition is empty; this hospital has no notes")
    if len(hospital_records) < 2:
        raise HospitalDataError(f"{where}: {len(hospital_records)} note is too few to hold out "
                                "an evaluation split; at least 2 are needed")
    hospital_records = encode_labels(hospital_records, labels, where)
    # Before anything else reads the text: the tokenizer only ever sees placeholders.
    hospital_records = deidentify_records(hospital_records, settings.deid)
    split = hospital_records.train_test_split(test_size=settings.eval_fraction,
                                              seed=settings.seed)
    return HospitalData(hospital=partition_id, train=split["train"], eval=split["test"],
                        report=report)


def load_server_test_set(settings: DataSettings, labels: list[str]) -> datasets.Dataset | None:
    """The server's held-out notes for centralized evaluation, or None.

    Synthetic: notes from a hospital outside the federation. Files: the rows
    whose ``data.split_column`` equals ``data.test_split``.
    """
    if settings.source != DataSource.synthetic:
        if not settings.split_column:
            return None
        records = load_records(settings).where_split(settings.test_split, keep=True)
        if not records.text:
            raise DataFileError(f"{settings.path}: no rows with {settings.split_column} = "
                                f"'{settings.test_split}' for the server's test set")
        records.check_labels(labels, settings.label_column)
        # The server's notes get the same placeholders the hospitals train on.
        return deidentify_records(encode_labels(records.to_dataset(), labels,
                                                "server test set"), settings.deid)
    if settings.server_test_notes <= 0:
        return None
    # A near-uniform case mix, so no specialty dominates the global score.
    notes = generate_hospital_notes(_SERVER_TEST_HOSPITAL, settings.server_test_notes,
                                    settings.seed, label_skew_alpha=100.0,
                                    label_noise=settings.label_noise,
                                    labels=tuple(labels), length=settings.note_length.value)
    records = datasets.Dataset.from_dict({"text": [n.text for n in notes],
                                          "label": [n.label for n in notes]})
    return deidentify_records(encode_labels(records, labels, "server test set"), settings.deid)
