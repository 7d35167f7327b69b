"""Epsilon from an accountant history, and noise calibration for a target epsilon.

A history is the ``(noise multiplier, sample rate, steps)`` entries of every
DP-SGD step taken, in order (``ledger.py`` keeps them). Epsilon is always
computed from a whole history, never from one round: a fresh accountant per
round would report the epsilon of that round only.

PLD, the default accountant, is ``dp-accounting``'s privacy loss distribution
of the Poisson-subsampled Gaussian (pessimistic: an upper bound), composed as its
``PLDAccountant`` composes it. RDP is its cross-check: a PLD figure is never
reported above RDP's over the same history, and noise is calibrated with PLD,
the tighter one, starting from RDP's noise (``_pld_bracket``).

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
from collections.abc import Callable
from functools import lru_cache

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from clinical_fl.settings.privacy import Accountant

RDP_ORDERS: tuple[int, ...] = tuple(range(2, 257))
PRV_MIN_NOISE = 0.2  # below it the PRV accountant reports no guarantee (inf): see epsilon_spent
# Above this RDP epsilon the PLD accountant reports RDP's figure (see epsilon_spent). Below it
# a PLD took at most 3 s and 250 MB in the cases measured (noise 0.2 to 3, rate 1e-4 to 1, up
# to 1e7 steps).
PLD_RDP_CEILING = 64.0
PLD_DISCRETISATION = 1e-4  # dp-accounting's PLDAccountant default (value_discretization_interval)
# The most distinct (noise, rate) pairs a PLD composes: the one-step distributions cached
# (_pld_of_one_step). Beyond it every reading rebuilt them all (0.5 to 5 s each at noise 0.2 to
# 0.5): a server running a hospital through 40 one-step runs at noise ~0.5 made each round's
# lifetime reading take ~24 s, 1,000 runs ~10 min, for a lifetime epsilon of ~5. Beyond it, RDP's
# figure (an upper bound, PLD's cross-check) is reported.
PLD_MAX_MECHANISMS = 16

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
        return _pld_or_rdp(history, delta, PLD_DISCRETISATION)
    prv = PRVAccountant()
    prv.history = [tuple(step) for step in history]
    try:
        return _safe(prv.get_epsilon(delta))  # the upper bound of PRV's estimate
    except (ArithmeticError, RuntimeError, MemoryError):
        return math.inf


def _pld_or_rdp(history: list[Step], delta: float, discretisation: float) -> float:
    """PLD's epsilon, where RDP's is not lower. PLD is never reported above RDP (RDP is its
    cross-check). Where RDP's figure is already beyond any budget, it is the answer: the
    discretised loss distribution of little noise over many steps needs tens of GiB (noise
    0.2 at rate 1 for 100,000 steps took 20 GiB and 93 s), which a server choosing the noise
    could otherwise make a hospital spend."""
    rdp = _safe(_rdp_epsilon(history, delta))
    if not rdp <= PLD_RDP_CEILING:
        return rdp
    merged = _merged(history)
    if len({(noise, rate) for noise, rate, _ in merged}) > PLD_MAX_MECHANISMS:
        return rdp  # more one-step distributions than are cached: see PLD_MAX_MECHANISMS
    return min(rdp, _pld_epsilon(merged, float(delta), discretisation))


# 1.5 MB at noise 0.88, rate 0.07; 10 MB at noise 0.2, rate 1
@lru_cache(maxsize=PLD_MAX_MECHANISMS)
def _pld_of_one_step(noise_multiplier: float, sample_rate: float, discretisation: float
                     ) -> privacy_loss_distribution.PrivacyLossDistribution:
    """One step's loss distribution, exactly as dp-accounting's ``PLDAccountant`` builds it for
    ``PoissonSampledDpEvent(rate, GaussianDpEvent(noise))`` (pessimistic, its discretisation).
    Building it is most of a PLD's cost (a Python loop over ~10^5 points); composing is not.
    Cached per (noise, rate), like RDP's curve: a ledger re-read each round builds it once.
    dp-accounting's distributions are never changed in place (composing makes new ones)."""
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, sampling_prob=sample_rate,
        value_discretization_interval=discretisation,
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)


def _merged(history: list[Step]) -> tuple[Step, ...]:
    """The history with consecutive entries of the same (noise, rate) merged and entries of no
    steps left out: the same mechanism, one self-composition per run of equal steps, and one
    cache key however the entries were split (a round's steps booked one by one, a check of
    ``history + [next round]``)."""
    merged: list[Step] = []
    for noise, rate, steps in history:
        if not steps:
            continue
        if merged and merged[-1][:2] == (float(noise), float(rate)):
            merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + int(steps))
        else:
            merged.append((float(noise), float(rate), int(steps)))
    return tuple(merged)


@lru_cache(maxsize=1024)
def _pld_epsilon(history: tuple[Step, ...], delta: float,
                 discretisation: float = PLD_DISCRETISATION) -> float:
    """dp-accounting's PLD accountant over the whole history, under the zero-out relation
    (``REPLACE_SPECIAL``), with its pessimistic discretisation: an upper bound on epsilon.
    The operations of ``PLDAccountant.compose(event, steps)`` for each entry of the (merged)
    history, then ``get_epsilon``: the identity, composed with each entry's one-step
    distribution self-composed ``steps`` times. Cached per history: calibration and every
    reading of a ledger ask again."""
    try:
        total = privacy_loss_distribution.identity(
            value_discretization_interval=discretisation)
        for noise, rate, steps in history:
            total = total.compose(_pld_of_one_step(noise, rate, discretisation)
                                  .self_compose(steps))
        return _safe(total.get_epsilon_for_delta(delta))
    except (ArithmeticError, ValueError, RuntimeError, MemoryError):
        return math.inf


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                               steps: int, accountant: Accountant,
                               relative_tolerance: float = 1e-3,
                               preceding: list[Step] | tuple[Step, ...] = ()) -> float:
    """The smallest noise multiplier (to ``relative_tolerance``) whose epsilon after
    ``preceding`` (what the run already spent, e.g. a release of noisy label counts) and
    ``steps`` steps at ``sample_rate`` stays at or below ``target_epsilon``: the noise returned
    meets the target, and a noise computed not to meet it lies within ``relative_tolerance``
    below it. Raises ``ValueError`` on a target that is not finite and > 0, an invalid delta or
    rate, or fewer than one step (nothing to calibrate for)."""
    if not (_is_real(target_epsilon) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon {target_epsilon!r} is not a finite number > 0")
    check_delta(delta)
    check_step((1.0, sample_rate, steps))
    if steps < 1:
        raise ValueError(f"cannot calibrate a noise multiplier for {steps} steps")

    preceding = tuple(tuple(step) for step in preceding)
    for step in preceding:
        check_step(step)

    def eps(sigma: float) -> float:
        return epsilon_spent([*preceding, (sigma, sample_rate, steps)], delta, accountant)

    low, high = 0.0, None
    if accountant == Accountant.pld:
        low, high = _pld_bracket(eps, target_epsilon, delta, sample_rate, steps,
                                 relative_tolerance, preceding)
    # Written as "not (eps <= target)" so that anything not clearly within the target
    # counts as over it and raises the noise.
    if high is None:
        low, high = 0.0, 1.0
        while not eps(high) <= target_epsilon:
            low, high = high, high * 2
            if high > 1e4:
                raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} at "
                                 f"delta {delta} in {steps} steps at sample rate "
                                 f"{sample_rate:.4g}")
    while high - low > relative_tolerance * high:
        middle = (low + high) / 2
        if not eps(middle) <= target_epsilon:
            low = middle
        else:
            high = middle
    return high  # always on the safe side of the target


# PLD calibration (_pld_bracket): the most PLD figures each of its searches computes before
# it leaves the rest to bisection, and the discretisation of its guide, 10x the product's:
# ~10x faster, and within ~1e-5 of the product's figure at the calibrated noise (7.99003
# against 7.98999 at q 0.0667, 180 steps, noise 0.8776, delta 1e-5).
PLD_CALIBRATION_PROBES = 8
PLD_GUIDE_DISCRETISATION = 10 * PLD_DISCRETISATION


def _pld_bracket(eps: Callable[[float], float], target: float, delta: float,
                 sample_rate: float, steps: int, tolerance: float,
                 preceding: tuple[Step, ...]) -> tuple[float, float | None]:
    """``(low, high)`` around PLD's calibrated noise, from few PLD figures (each takes
    0.2 to 0.8 s where an RDP figure takes under 0.05 s): ``eps(high)`` meets the target,
    ``eps(low)`` was computed and does not (0.0: none yet), and usually
    ``high - low <= tolerance x high`` already, so that the bisection has nothing left to do.
    ``(0.0, None)`` where it cannot help (the plain search then decides).

    RDP's calibrated noise is the upper end, and needs no PLD figure to be one:
    ``epsilon_spent`` never reports PLD above RDP, so it meets the target under PLD too. A
    guide, PLD at a 10x coarser discretisation (``PLD_GUIDE_DISCRETISATION``), finds the noise
    closely below it; two of the product's PLD figures, 0.4 x the tolerance either side of the
    guide's answer, then usually close the bracket (``_probe``). Only those figures decide:
    the guide only says where to compute them."""
    try:
        high = calibrate_noise_multiplier(target, delta, sample_rate, steps, Accountant.rdp,
                                          max(tolerance, 1e-2), preceding)
    except ValueError:  # no noise meets it under RDP: the plain search tries PLD itself
        return 0.0, None
    if high < PRV_MIN_NOISE or any(noise < PRV_MIN_NOISE for noise, _, n in preceding if n):
        return 0.0, None  # PLD gives no figure below that noise (epsilon_spent)

    def rdp(sigma: float) -> float:
        return epsilon_spent([*preceding, (sigma, sample_rate, steps)], delta, Accountant.rdp)

    def guide(sigma: float) -> float:
        if sigma < PRV_MIN_NOISE:
            return math.inf
        return _pld_or_rdp([*preceding, (sigma, sample_rate, steps)], delta,
                           PLD_GUIDE_DISCRETISATION)

    # RDP's slope of log epsilon in log noise starts the guide; the guide's slope, the search.
    slope = _slope(high, rdp(high), 0.99 * high, rdp(0.99 * high))
    _, guide_high, root, slope = _probe(guide, target, high, tolerance / 20, high, slope)
    low, probed, _, _ = _probe(eps, target, high, tolerance, root or guide_high, slope)
    if probed == high and not eps(high) <= target:  # never computed under PLD: make sure
        return 0.0, None
    return low, probed


def _slope(x1: float, y1: float, x2: float, y2: float) -> float | None:
    """The slope of log epsilon in log noise between two figures (None: none to stand on)."""
    if not (x1 != x2 and 0 < y1 < math.inf and 0 < y2 < math.inf):
        return None
    return (math.log(y2) - math.log(y1)) / (math.log(x2) - math.log(x1))


def _probe(eps: Callable[[float], float], target: float, high: float, tolerance: float,
           root: float, slope: float | None) -> tuple[float, float, float | None, float | None]:
    """Search for the noise where ``eps`` meets ``target``, below ``high`` (which meets it),
    for at most ``PLD_CALIBRATION_PROBES`` figures: ``(low, high, root, slope)``, the bracket
    (``low`` 0.0: none found not to meet it) and the last estimate of the crossing and of the
    slope. Log epsilon is close to linear in log noise: each probe goes where the line through
    the last figure (its slope from the last two, at first ``slope``) meets the target
    (``root`` at first), moved 0.4 x the tolerance to the side the bracket still lacks, so
    that two good probes close it; a probe outside the bracket is a bisection step instead."""
    low, last = 0.0, None
    for _ in range(PLD_CALIBRATION_PROBES):
        if root is None:
            probe = None
        elif not low or root - low > high - root:
            probe = root * (1 - 0.4 * tolerance)  # the bracket lacks its lower end
        else:
            probe = root * (1 + 0.4 * tolerance)
        if probe is None or not low < probe < high:
            probe = (low + high) / 2 if low else high * (1 - 0.9 * tolerance)
        epsilon = eps(probe)
        if epsilon <= target:
            high = probe
        else:
            low = probe
        if high - low <= tolerance * high:
            break
        if last is not None:
            slope = _slope(*last, probe, epsilon) or slope
        root = (None if slope is None or not (slope < 0 and 0 < epsilon < math.inf) else
                probe * math.exp((math.log(target) - math.log(epsilon)) / slope))
        last = (probe, epsilon)
    return low, high, root, slope
