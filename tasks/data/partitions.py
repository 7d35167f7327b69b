"""Dealing one shared corpus out to simulated hospitals (flwr-datasets partitioners).

In deployment each hospital reads its own file instead and nothing is partitioned.
"""

from __future__ import annotations

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    SizePartitioner,
)

from clinical_fl.settings.data import DataSettings, DataSource, Partitioning
from tasks.errors import DataFileError


def _lognormal_sizes(total: int, parts: int, sigma: float, seed: int) -> list[int]:
    """Hospital sizes summing to ``total``, log-normal with ``sigma``, each at least 1."""
    weights = np.random.default_rng(seed).lognormal(0.0, sigma, parts)
    sizes = np.maximum(1, np.floor(weights / weights.sum() * total).astype(int))
    sizes[np.argmax(sizes)] += total - int(sizes.sum())
    return [int(n) for n in sizes]


def _partitioner(settings: DataSettings, corpus: datasets.Dataset, num_partitions: int
                 ) -> Partitioner:
    method = settings.partitioning_used()
    if method == Partitioning.natural:
        if "site" not in corpus.column_names:
            raise DataFileError("data.partitioning=natural needs data.site_column (the column "
                                "naming each record's hospital)")
        return NaturalIdPartitioner(partition_by="site")
    if method == Partitioning.dirichlet:
        # min_partition_size 1: a hospital may get few notes, but never none.
        return DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                    alpha=settings.label_skew_alpha, min_partition_size=1,
                                    self_balancing=False, seed=settings.seed)
    if method == Partitioning.size:
        return SizePartitioner(_lognormal_sizes(len(corpus), num_partitions,
                                                settings.size_skew, settings.seed))
    return IidPartitioner(num_partitions=num_partitions)


def partition(corpus: datasets.Dataset, settings: DataSettings, partition_id: int,
               num_partitions: int) -> tuple[datasets.Dataset, str]:
    """Hospital ``partition_id``'s share of the corpus, and a name for it in messages."""
    if len(corpus) == 0:
        return corpus, f"partition {partition_id}"
    # IID and size partitioners slice in order (FederatedDataset shuffles first); so do we.
    corpus = corpus.shuffle(seed=settings.seed)
    partitioner = _partitioner(settings, corpus, num_partitions)
    partitioner.dataset = corpus
    if isinstance(partitioner, NaturalIdPartitioner):
        partitioner.num_partitions  # noqa: B018 - builds the site <-> partition mapping
        sites = partitioner.partition_id_to_natural_id
        if settings.source != DataSource.synthetic and len(sites) != num_partitions:
            raise DataFileError(
                f"data.site_column '{settings.site_column}' names {len(sites)} sites "
                f"({', '.join(list(map(str, sites.values()))[:8])}) but the federation has "
                f"{num_partitions} hospitals (num-partitions / num-supernodes); make them equal")
        # Synthetic sites are hospital ids; one with no notes has no partition at all.
        by_site = {site: index for index, site in sites.items()}
        site = f"{partition_id:05d}" if settings.source == DataSource.synthetic \
            else sites.get(partition_id)
        if site not in by_site:
            return corpus.select([]), f"partition {partition_id}"
        return partitioner.load_partition(by_site[site]), f"site '{site}'"
    try:
        return partitioner.load_partition(partition_id), f"partition {partition_id}"
    except ValueError as err:
        raise DataFileError(f"data.partitioning={settings.partitioning_used().value}: cannot deal "
                            f"{len(corpus)} records to {num_partitions} hospitals ({err})"
                            ) from err
