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

from opacus.accountants import PRVAccountant, RDPAccountant

from settings.task import Accountant

RDP_ORDERS: tuple[int, ...] = tuple(range(2, 257))

Step = tuple[float, float, int]  # (noise multiplier, sample rate, number of steps)


def epsilon_spent(history: list[Step], delta: float, accountant: Accountant) -> float:
    """Epsilon at ``delta`` of all the steps in ``history`` (0 for no steps)."""
    if not history or sum(steps for _, _, steps in history) == 0:
        return 0.0
    if accountant == Accountant.rdp:
        rdp = RDPAccountant()
        rdp.history = [tuple(step) for step in history]
        with warnings.catch_warnings():
            # "Optimal order is the smallest alpha": orders below 2 could only lower epsilon.
            warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
            return float(rdp.get_epsilon(delta, alphas=list(RDP_ORDERS)))
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

