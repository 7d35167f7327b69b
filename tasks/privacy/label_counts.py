"""A hospital's label counts released under DP-SGD: the Gaussian mechanism, in its ledger.

Class weights need the federation's label counts (fl_app/server/class_weights.py). Exact counts are
a statistic of the private records, so under DP-SGD a hospital sends them only with
``privacy.dp_sgd.label_count_noise`` set: each count of its *training* records gets Gaussian
noise of that standard deviation, drawn from OS entropy.

Why it is accounted as one more DP-SGD step: under the ledger's zero-out relation a record
changes one count by at most 1, so the histogram's L2 sensitivity is 1, and the Gaussian
mechanism with standard deviation sigma is exactly a step of noise multiplier sigma at
sampling rate 1 (every record read once). The ledger books ``(sigma, 1.0, 1)`` before the
counts leave; the accountant composes it with the training's steps, DP-SGD's noise is
calibrated so that both together stay within the target, and the budget checks see it.

The noisy counts are kept with the run's ledger entry: a second preflight of the same run (a
retry, a resume) sends the same numbers again, which costs nothing more. Rounding and the
floor at 0 are post-processing.
"""

from __future__ import annotations

import secrets

import numpy as np

from tasks.privacy.accounting import Step

COUNT_RELEASE_RATE = 1.0  # every record is counted: no subsampling amplification


def release_step(noise: float) -> Step:
    """The ledger entry of one release of a histogram with noise standard deviation ``noise``."""
    return (float(noise), COUNT_RELEASE_RATE, 1)


def noisy_counts(counts: list[int], noise: float) -> list[int]:
    """Each count plus Gaussian noise of standard deviation ``noise``, from OS entropy,
    rounded, at least 0."""
    rng = np.random.default_rng(secrets.randbits(128))
    return [max(0, round(count + float(rng.normal(0.0, noise)))) for count in counts]
