"""Class weights for an imbalanced federation, from the label counts hospitals report.

Under ``train.class_weighting=balanced`` the server sums the label counts (of training and
held-out records) every hospital sent in its preflight reply and gives class c the weight
N / (K x n_c) (N records, K classes that have any; scikit-learn's "balanced"), so a record's
mean weight stays 1 and every class weighs the same in the loss. A class no hospital holds
weighs 1 (it is never a target). The weights travel in the task settings like the label
set; each hospital checks them (clinical_fl/settings/train.py) before training.

Hospitals under DP-SGD do not release exact label counts (a histogram of their records).
With ``privacy.dp_sgd.label_count_noise`` = sigma each releases its training records' counts
with Gaussian noise, booked in its privacy ledger (tasks/privacy/label_counts.py); the server
sums them (noise of standard deviation sigma x sqrt(H) over H hospitals) and floors each sum
at that standard deviation (and at 1), so that a rare class whose noisy sum came out near 0
does not get an absurd weight; every label counts in K, since noise hides which are absent.
Without it, a private run without given ``train.class_weights`` trains unweighted and says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from clinical_fl.settings.privacy import RecordLevelMechanism
from clinical_fl.settings.task import TaskSettings
from clinical_fl.settings.train import ClassWeighting

log = logging.getLogger(__name__)


def balanced_weights(counts: Sequence[int]) -> list[float]:
    """N / (K x n_c) per class from the federation's summed counts (1.0 where n_c is 0)."""
    total, present = sum(counts), sum(1 for c in counts if c > 0)
    return [total / (present * c) if c > 0 else 1.0 for c in counts]


def noisy_balanced_weights(counts: Sequence[int], noise: float, hospitals: int) -> list[float]:
    """N / (K x n_c) from summed noisy counts: every label in K, each sum floored at the
    noise's standard deviation sigma x sqrt(hospitals) and at 1."""
    floor = max(1.0, noise * math.sqrt(hospitals))
    floored = [max(float(c), floor) for c in counts]
    total = sum(floored)
    return [total / (len(floored) * c) for c in floored]


def federation_counts(label_counts: Sequence[Sequence[int]], labels: int) -> list[int] | None:
    """The summed label counts, or None when a hospital taking part withheld its
    counts (an empty list) or sent a list of the wrong length."""
    if not label_counts or any(len(counts) != labels for counts in label_counts):
        return None
    return [sum(column) for column in zip(*label_counts, strict=True)]


def plan_class_weights(task: TaskSettings, label_counts: Sequence[Sequence[int]]) -> str:
    """Set ``task.train.class_weights`` when the weighting is balanced and the weights are not
    given; what was decided, in words (for the log and MLflow)."""
    train = task.train
    if train.class_weighting != ClassWeighting.balanced:
        return "none"
    if train.class_weights is not None:
        return "given"
    counts = federation_counts(label_counts, len(task.data.labels))
    if counts is None:
        log.info("class weights: none (the hospitals' label counts are withheld under "
                 "DP-SGD); training is unweighted")
        return "unweighted: label counts withheld"
    noise = (task.privacy.dp_sgd.label_count_noise
             if task.privacy.mechanism == RecordLevelMechanism.dp_sgd else None)
    if noise is not None:
        train.class_weights = noisy_balanced_weights(counts, noise, len(label_counts))
        log.info("class weights from noisy label counts (sigma %g per hospital, %d "
                 "hospitals): %.2f to %.2f", noise, len(label_counts),
                 min(train.class_weights), max(train.class_weights))
        return "balanced: noisy counts"
    train.class_weights = balanced_weights(counts)
    rare = min(range(len(counts)), key=lambda c: counts[c] if counts[c] else float("inf"))
    log.info("class weights from the label counts of %d records: %.2f to %.2f (%s, %d "
             "records)",
             sum(counts), min(train.class_weights), max(train.class_weights),
             task.data.labels[rare], counts[rare])
    return "balanced"
