"""The parametric part of the local white-box audit: the noise the releases actually carry,
measured, and the epsilon the accountant gives for it.

One-run membership bounds need very many canaries to certify an epsilon near 1 (the
Gaussian one-run bound reaches about half of it with 20,000 canaries even for a mechanism
exactly at its claim), so a mechanism adding 30% less noise than it accounts stays below
their reach. The auditor, who sees every release and knows which canaries are left out,
can measure the noise itself: a left-out canary's coordinate carries the noise alone (and
whatever real notes add there, which only makes the noise look larger). The noise's upper
limit at the confidence asked, in units of the clipping norm, is the largest noise
multiplier consistent with what was seen, and the accountant's epsilon for it at the
claimed sampling rate and steps is a lower bound on the mechanism's epsilon **if** a record
moves a release by the clipping norm, no more or less (what the claim says), and the
mechanism is the sampled Gaussian the accountant assumes at that rate. Those are this
check's assumptions; the one-run bounds assume nothing and catch a record that moves a
release by more (clipping skipped) or a sampler the server can predict. The canaries'
signal (their mean release when in, over q) is estimated and reported beside it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import chi2

from clinical_fl.settings.privacy import Accountant
from tasks.privacy.accounting import epsilon_spent


def measured_noise(observed: np.ndarray, included: np.ndarray, sample_rate: float,
                   steps: int, delta: float, accountant: Accountant,
                   confidence: float) -> dict:
    """``observed``: steps x canaries in units of C / B; ``included``: the auditor's key."""
    alpha = 1.0 - confidence
    noise_only = observed[:, ~included].ravel()
    with_canary = observed[:, included].ravel()
    n = noise_only.size
    noise = float(noise_only.std(ddof=1))
    # the chi-square limit of a normal sample's standard deviation, one-sided: the largest
    # noise consistent with the sample, hence the smallest epsilon
    noise_high = noise * math.sqrt((n - 1) / chi2.ppf(alpha, n - 1))
    signal = float(with_canary.mean() - noise_only.mean()) / sample_rate
    spread = math.sqrt(with_canary.var(ddof=1) / with_canary.size + noise ** 2 / n)
    epsilon = epsilon_spent([(noise_high, sample_rate, steps)], delta, accountant)
    return {"noise_multiplier": noise, "noise_multiplier_upper": noise_high,
            "canary_signal": signal, "canary_signal_standard_error": spread / sample_rate,
            "epsilon_lower_bound": epsilon, "confidence": confidence}
