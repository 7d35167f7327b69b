"""A hospital's data: load, partition, check against the global label set, split, tokenize."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import datasets
from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner

from tasks.config import DataSettings, DataSource, Partitioning
from tasks.errors import HospitalDataError
from tasks.synthetic_notes import SPECIALTIES, generate_hospital_notes, hospital_sizes

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

    def label_counts(self, labels: list[str]) -> list[int]:
        counts = Counter(self.train["label"]) + Counter(self.eval["label"])
        return [counts.get(i, 0) for i in range(len(labels))]


def source_labels(settings: DataSettings) -> list[str]:
    """The global label set: the configured one, else the source's full set."""
    if settings.labels:
        return list(settings.labels)
    if settings.source == DataSource.synthetic:
        return list(SPECIALTIES)
    raise ValueError(f"data.source={settings.source.value} has no built-in label set")


def _synthetic_corpus(settings: DataSettings, num_hospitals: int) -> datasets.Dataset:
    sizes = hospital_sizes(num_hospitals, settings.notes_per_hospital, settings.size_skew,
                           settings.seed)
    rows: dict[str, list] = {"text": [], "label": [], "hospital": []}
    for hospital, size in enumerate(sizes):
        for note in generate_hospital_notes(hospital, size, settings.seed,
                                            settings.label_skew_alpha, settings.label_noise):
            rows["text"].append(note.text)
            rows["label"].append(note.label)
            rows["hospital"].append(hospital)
    return datasets.Dataset.from_dict(
        rows, features=datasets.Features({"text": datasets.Value("string"),
                                          "label": datasets.Value("string"),
                                          "hospital": datasets.Value("int64")}))


def _partition(corpus: datasets.Dataset, settings: DataSettings, partition_id: int,
               num_partitions: int) -> datasets.Dataset:
    if len(corpus) == 0:
        return corpus
    if settings.partitioning == Partitioning.iid:
        partitioner = IidPartitioner(num_partitions=num_partitions)
        # IidPartitioner slices in order (FederatedDataset shuffles first); so do we.
        partitioner.dataset = corpus.shuffle(seed=settings.seed)
        return partitioner.load_partition(partition_id)
    partitioner = NaturalIdPartitioner(partition_by="hospital")
    partitioner.dataset = corpus
    # The partitioner numbers the sites present in the data; a site with no
    # notes at all has no partition, so look the hospital up by its own id.
    partitioner.num_partitions  # noqa: B018 - builds the site <-> partition mapping
    by_site = {site: index for index, site in partitioner.partition_id_to_natural_id.items()}
    if partition_id not in by_site:
        return corpus.select([])
    return partitioner.load_partition(by_site[partition_id])


def encode_labels(records: datasets.Dataset, labels: list[str], where: str) -> datasets.Dataset:
    """Map label names to global ids; fail on the first label outside the set."""
    label_ids = {name: i for i, name in enumerate(labels)}
    for row, name in enumerate(records["label"]):
        if name not in label_ids:
            raise HospitalDataError(
                f"{where}, row {row}: label '{name}' is not in the global label set "
                f"{labels}; add it to data.labels or remove the record")
    return records.map(lambda r: {"label": label_ids[r["label"]]},
                       features=datasets.Features({**{k: v for k, v in records.features.items()
                                                      if k != "label"},
                                                   "label": datasets.Value("int64")}))


def load_hospital_data(settings: DataSettings, labels: list[str], partition_id: int,
                       num_partitions: int) -> HospitalData:
    """Hospital ``partition_id`` of ``num_partitions``: its local train and eval splits."""
    where = f"hospital {partition_id} (partition-id={partition_id} of {num_partitions})"
    if not 0 <= partition_id < num_partitions:
        raise HospitalDataError(f"{where}: partition-id must lie in [0, {num_partitions})")
    corpus = _synthetic_corpus(settings, num_partitions)
    records = _partition(corpus, settings, partition_id, num_partitions)
    if len(records) == 0:
        raise HospitalDataError(f"{where}: the partition is empty; this hospital has no notes "
                                f"(data.notes_per_hospital={settings.notes_per_hospital})")
    if len(records) < 2:
        raise HospitalDataError(f"{where}: {len(records)} note is too few to hold out an "
                                "evaluation split; at least 2 are needed")
    records = encode_labels(records, labels, where)
    split = records.train_test_split(test_size=settings.eval_fraction, seed=settings.seed)
    return HospitalData(hospital=partition_id, train=split["train"], eval=split["test"])


def load_server_test_set(settings: DataSettings, labels: list[str]) -> datasets.Dataset | None:
    """Synthetic notes from a hospital outside the federation, for centralized evaluation."""
    if settings.source != DataSource.synthetic or settings.server_test_notes <= 0:
        return None
    # A near-uniform case mix, so no specialty dominates the global score.
    notes = generate_hospital_notes(_SERVER_TEST_HOSPITAL, settings.server_test_notes,
                                    settings.seed, label_skew_alpha=100.0,
                                    label_noise=settings.label_noise,
                                    labels=tuple(labels))
    records = datasets.Dataset.from_dict({"text": [n.text for n in notes],
                                          "label": [n.label for n in notes]})
    return encode_labels(records, labels, "server test set")
