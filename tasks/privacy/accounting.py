"""Epsilon from an accountant history, and noise calibration for a target epsilon.

A history is the ``(noise multiplier, sample rate, steps)`` entries of every
DP-SGD step taken, in order (``ledger.py`` keeps them). Epsilon is always
computed from a whole history, never from one round: a fresh accountant per
round would report the epsilon of that round only.

RDP uses integer orders only. At fractional orders Opacus' RDP of the
subsampled Gaussian is lower than Google's ``dp-accounting`` (by up to ~28% at
order 1.1); at integer orders both agree to 1e-14. Dropping the fractional
orders costs ~0.3% of epsilon and leaves no disputed claim.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from settings.task import Accountant

RDP_ORDERS: tuple[int, ...] = tuple(range(2, 257))

Step = tuple[float, float, int]  # (noise multiplier, sample rate, number of steps)


@lru_cache(maxsize=4096)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    curve = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                     orders=list(RDP_ORDERS))
    curve.setflags(write=False)  # shared by every caller
    return curve


def epsilon_spent(history: list[Step], delta: float, accountant: Accountant) -> float:
    """Epsilon at ``delta`` of all the steps in ``history`` (0 for no steps)."""
    if not history or sum(steps for _, _, steps in history) == 0:
        return 0.0
    if accountant == Accountant.rdp:
        # What Opacus' RDPAccountant computes (the sum over entries of steps x one step's RDP),
        # with one step's RDP curve cached per (noise, rate): a lifetime ledger of many runs,
        # re-read several times a round, costs additions instead of 255 series per entry.
        total = sum(_rdp_of_one_step(float(noise), float(rate)) * int(steps)
                    for noise, rate, steps in history)
        with warnings.catch_warnings():
            # "Optimal order is the smallest alpha": orders below 2 could only lower epsilon.
            warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
            epsilon, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=total,
                                                        delta=delta)
        return float(epsilon)
    prv = PRVAccountant()
    prv.history = [tuple(step) for step in history]
    return float(prv.get_epsilon(delta))  # the upper bound of PRV's estimate


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                               steps: int, accountant: Accountant,
                               relative_tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (to ``relative_tolerance``) whose epsilon after
    ``steps`` steps at ``sample_rate`` stays at or below ``target_epsilon``."""
    def eps(sigma: float) -> float:
        return epsilon_spent([(sigma, sample_rate, steps)], delta, accountant)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} at delta "
                             f"{delta} in {steps} steps at sample rate {sample_rate:.4g}")
    while high - low > relative_tolerance * high:
        middle = (low + high) / 2
        if eps(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high  # always on the safe side of the target

