"""Epsilon from an accountant history, and noise calibration for a target epsilon.

A history is the ``(noise multiplier, sample rate, steps)`` entries of every
DP-SGD step taken, in order (``ledger.py`` keeps them). Epsilon is always
computed from a whole history, never from one round: a fresh accountant per
round would report the epsilon of that round only.

RDP uses integer orders only. At fractional orders Opacus' RDP of the
subsampled Gaussian is lower than Google's ``dp-accounting`` (by up to ~28% at
order 1.1); at integer orders both agree to 1e-14. Dropping the fractional
orders costs ~0.3% of epsilon and leaves no disputed claim.

Every input is checked (a noise multiplier, rate, step count or delta that a hostile server
or a damaged ledger could supply is refused with ``ValueError``), and no epsilon is ever NaN:
a computation that does not give a finite number for valid input gives +inf, the safe side.
"""

from __future__ import annotations

import math
import numbers
import warnings
from functools import lru_cache

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from clinical_fl.settings.privacy import Accountant

RDP_ORDERS: tuple[int, ...] = tuple(range(2, 257))
PRV_MIN_NOISE = 0.2  # below it the PRV accountant reports no guarantee (inf): see epsilon_spent
# Above this RDP epsilon the PLD accountant reports RDP's figure (see epsilon_spent). Below it
# a PLD took at most 3 s and 250 MB in the cases measured (noise 0.2 to 3, rate 1e-4 to 1, up
# to 1e7 steps).
PLD_RDP_CEILING = 64.0

NEIGHBOURING_RELATION = "zero_out"
"""The neighbouring datasets every epsilon of this product is stated for: zero-out, one
record replaced by a null record that contributes nothing (Kairouz et al. 2021, "Practical
and Private (Deep) Learning without Sampling or Shuffling"; Ponomareva et al. 2023, "How to
DP-fy ML"; ``dp_accounting.NeighboringRelation.REPLACE_SPECIAL``).

Why this one: a hospital releases its exact training and evaluation record counts (FedAvg
weights, the distributed-DP plan). Under add-or-remove-one the count itself differs between
neighbours and no epsilon covers it; under zero-out both neighbours have the same size, so
the counts are consistent with the guarantee. For the Poisson-subsampled Gaussian the null
record's clipped gradient is zero, so the pair of output distributions is exactly the
add-or-remove pair and the RDP is the same: the history is accounted as before.
Replace-one would cover the counts too, but RDP accounting does not support it for this
mechanism (PLD does, at a higher epsilon); see docs/privacy-accounting.md.
"""

Step = tuple[float, float, int]  # (noise multiplier, sample rate, number of steps)


def _is_real(value: object) -> bool:
    # bool is an int to Python, but True is no noise multiplier.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_step(step: Step) -> None:
    """Refuse (``ValueError``, naming the field) an entry the accountant cannot stand on:
    noise not finite and > 0 (RDP sees only sigma squared: -1 would count as +1), a rate
    not in (0, 1], a step count that is not a non-negative integer."""
    noise, rate, count = step
    if not (_is_real(noise) and math.isfinite(noise) and noise > 0):
        raise ValueError(f"noise multiplier {noise!r} is not a finite number > 0")
    if not (_is_real(rate) and math.isfinite(rate) and 0 < rate <= 1):
        raise ValueError(f"sample rate {rate!r} is not a finite number in (0, 1]")
    if not (isinstance(count, numbers.Integral) and not isinstance(count, bool) and count >= 0):
        raise ValueError(f"step count {count!r} is not a non-negative integer")


def check_delta(delta: float) -> None:
    """Refuse (``ValueError``) a delta that is not a finite number in (0, 1)."""
    if not (_is_real(delta) and math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta {delta!r} is not a finite number in (0, 1)")


@lru_cache(maxsize=4096)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    try:
        curve = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier,
                                         steps=1, orders=list(RDP_ORDERS))
    except ArithmeticError:  # e.g. a noise so small that the series divides by zero
        curve = np.full(len(RDP_ORDERS), np.inf)  # no noise to speak of: no guarantee
    curve.setflags(write=False)  # shared by every caller
    return curve


def _safe(epsilon: float) -> float:
    """A non-finite result (NaN, -inf, inf) is reported as +inf: never a NaN that compares
    false against every cap, never a claim smaller than the truth. A negative figure (the
    RDP conversion at a delta near 1) is reported as 0, as dp-accounting does: a mechanism
    that met a negative epsilon meets 0."""
    return max(0.0, float(epsilon)) if math.isfinite(epsilon) else math.inf


def _rdp_epsilon(history: list[Step], delta: float) -> float:
    # What Opacus' RDPAccountant computes (the sum over entries of steps x one step's RDP),
    # with one step's RDP curve cached per (noise, rate): a lifetime ledger of many runs,
    # re-read several times a round, costs additions instead of 255 series per entry.
    # Entries of zero steps are skipped: 0 x an infinite curve would be NaN.
    total = sum(_rdp_of_one_step(float(noise), float(rate)) * int(steps)
                for noise, rate, steps in history if steps)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # "Optimal order is the smallest alpha": orders below 2 could only lower epsilon.
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        epsilon, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=total,
                                                    delta=delta)
    return float(epsilon)


def epsilon_spent(history: list[Step], delta: float, accountant: Accountant) -> float:
    """Epsilon at ``delta`` of all the steps in ``history`` (0 for no steps), under
    ``NEIGHBOURING_RELATION``. Raises ``ValueError`` on an invalid entry or delta; +inf
    where the accountant gives no finite figure."""
    check_delta(delta)
    for step in history:
        check_step(tuple(step))
    if sum(steps for _, _, steps in history) == 0:
        return 0.0
    if accountant == Accountant.rdp:
        return _safe(_rdp_epsilon(history, delta))
    # Below this noise PRV's and PLD's discretisations ask for gigabytes (a hostile noise of
    # 1e-3 at rate 1 tried ~8 GiB under PRV) or fail; such noise gives no meaningful
    # guarantee anyway.
    if any(steps and noise < PRV_MIN_NOISE for noise, _, steps in history):
        return math.inf
    if accountant == Accountant.pld:
        # PLD is never above RDP. Where RDP's figure is already beyond any budget, it is the
        # answer: the discretised loss distribution of little noise over many steps needs
        # tens of GiB (noise 0.2 at rate 1 for 100,000 steps took 20 GiB and 93 s), which a
        # server choosing the noise could otherwise make a hospital spend.
        rdp = _safe(_rdp_epsilon(history, delta))
        if not rdp <= PLD_RDP_CEILING:
            return rdp
        return min(rdp, _pld_epsilon(
            tuple((float(n), float(r), int(s)) for n, r, s in history if s), float(delta)))
    prv = PRVAccountant()
    prv.history = [tuple(step) for step in history]
    try:
        return _safe(prv.get_epsilon(delta))  # the upper bound of PRV's estimate
    except (ArithmeticError, RuntimeError, MemoryError):
        return math.inf


@lru_cache(maxsize=1024)
def _pld_epsilon(history: tuple[Step, ...], delta: float) -> float:
    """dp-accounting's PLD accountant over the whole history, under the zero-out relation
    (``REPLACE_SPECIAL``), with its pessimistic discretisation: an upper bound on epsilon.
    Cached per history: calibration and every reading of a ledger ask again."""
    accountant = pld_privacy_accountant.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    try:
        for noise, rate, steps in history:
            accountant.compose(dp_accounting.PoissonSampledDpEvent(
                rate, dp_accounting.GaussianDpEvent(noise)), steps)
        return _safe(accountant.get_epsilon(delta))
    except (ArithmeticError, ValueError, RuntimeError, MemoryError):
        return math.inf


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                               steps: int, accountant: Accountant,
                               relative_tolerance: float = 1e-3,
                               preceding: list[Step] | tuple[Step, ...] = ()) -> float:
    """The smallest noise multiplier (to ``relative_tolerance``) whose epsilon after
    ``preceding`` (what the run already spent, e.g. a release of noisy label counts) and
    ``steps`` steps at ``sample_rate`` stays at or below ``target_epsilon``. Raises
    ``ValueError`` on a target that is not finite and > 0, an invalid delta or rate, or
    fewer than one step (nothing to calibrate for)."""
    if not (_is_real(target_epsilon) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon {target_epsilon!r} is not a finite number > 0")
    check_delta(delta)
    check_step((1.0, sample_rate, steps))
    if steps < 1:
        raise ValueError(f"cannot calibrate a noise multiplier for {steps} steps")

    for step in preceding:
        check_step(tuple(step))

    def eps(sigma: float) -> float:
        return epsilon_spent([*preceding, (sigma, sample_rate, steps)], delta, accountant)

    # Written as "not (eps <= target)" so that anything not clearly within the target
    # counts as over it and raises the noise.
    low, high = 0.0, 1.0
    while not eps(high) <= target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} at delta "
                             f"{delta} in {steps} steps at sample rate {sample_rate:.4g}")
    while high - low > relative_tolerance * high:
        middle = (low + high) / 2
        if not eps(middle) <= target_epsilon:
            low = middle
        else:
            high = middle
    return high  # always on the safe side of the target

