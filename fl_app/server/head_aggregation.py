"""How the head's rows are averaged in this run (``strategy.head_aggregation``), once the
hospitals' label counts are known.

``auto`` picks ``class_counts`` (strategies/class_wise_head.py) where it can hold (FedAvg or
FedProx, no record-level or client-level DP, no secure aggregation) and some hospital lacks a
class that another holds: the label skew it is for. Where every hospital holds every class it
keeps ``examples``, FedAvg's own weighting, so such federations train as before. With
``class_counts`` chosen and ``train.absent_class_scale`` left null, the hospitals are sent 0:
a hospital then leaves the head rows of the classes it lacks untouched, and each row is its
holders' alone (measured on OHSUMED's 23 classes: docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from clinical_fl.settings.run import RunSettings
from clinical_fl.settings.strategy import HeadAggregation
from clinical_fl.settings.task import TaskSettings

log = logging.getLogger(__name__)


def label_skewed(label_counts: Sequence[Sequence[int]]) -> bool:
    """Some hospital holds none of a class that another hospital holds (all counts known)."""
    if not label_counts or any(not counts for counts in label_counts):
        return False
    held = [any(column) for column in zip(*label_counts, strict=True)]
    return any(not counts[c] and held[c] for counts in label_counts for c in range(len(held)))


def resolve_head_aggregation(settings: RunSettings, task: TaskSettings,
                             label_counts: Sequence[Sequence[int]]) -> HeadAggregation:
    """The aggregation this run uses, also written into ``settings``. Under ``class_counts`` a
    null ``train.absent_class_scale`` becomes 0 in ``task``: the caller sends the hospitals
    that task."""
    chosen = settings.strategy.head_aggregation
    if chosen == HeadAggregation.auto:
        chosen = (HeadAggregation.class_counts
                  if settings.class_wise_head_possible() and label_skewed(label_counts)
                  else HeadAggregation.examples)
        if chosen == HeadAggregation.class_counts:
            log.info("head rows averaged class by class: some hospitals lack classes that "
                     "others hold (strategy.head_aggregation=auto)")
    settings.strategy.head_aggregation = chosen
    if chosen == HeadAggregation.class_counts and task.train.absent_class_scale is None:
        task.train.absent_class_scale = 0.0
    return chosen
