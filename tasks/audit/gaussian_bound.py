"""The one-run lower bound under Gaussian differential privacy (f-DP), as in Mahloujifar,
Melis and Chaudhuri, "Auditing f-Differential Privacy in One Run" (ICML 2025).

The game is the one of ``bound.py``: m canaries, each included with probability 1/2; the
auditor guesses r of them and gets v right. Steinke, Nasr and Jagielski's counting bound
asks what an (epsilon, delta)-DP algorithm allows, and (epsilon, delta) describes a Gaussian
mechanism's trade-off badly in the middle, where most guesses are; so it needs very many
guesses before it says anything. This bound asks instead what a mu-GDP algorithm allows
(Dong, Roth and Su, 2022: for every test, type II error >= Phi(Phi^-1(1 - type I) - mu)),
using the paper's backward recursion over the number of correct guesses (its procedure for
reconstruction with abstention, alphabet of 2): it rejects mu when v right of r guesses
would happen with probability under alpha. The lower bound is the epsilon at ``delta`` of
the largest mu rejected.

What the Gaussian family assumes: the audited mechanism's trade-off curve is a Gaussian
one. DP-SGD's is close to one (the subsampled Gaussian composed over many steps: Dong, Roth
and Su's central limit theorem; Nasr et al., "Tight Auditing of Differentially Private
Machine Learning", USENIX Security 2023, audit DP-SGD this way), and where it departs the
departure is in the tails, which a one-run audit's middle-of-the-curve guesses do not reach.
The counting bound assumes nothing; an audit reports both.
"""

from __future__ import annotations

import math
from statistics import NormalDist

_STANDARD = NormalDist()
_MU_CEILING = 40.0  # beyond this a Gaussian mechanism is no privacy at all: epsilon ~ mu^2/2


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _inverse_blow_up(probability: float, mu: float) -> float:
    """The least probability, under one input, of an event that has ``probability`` under
    its neighbour, for a mu-GDP mechanism: Phi(Phi^-1(p) - mu)."""
    if probability <= 0.0:
        return 0.0
    if probability >= 1.0:
        return 1.0
    return _phi(_STANDARD.inv_cdf(probability) - mu)


def rejects(m: int, r: int, v: int, mu: float, alpha: float) -> bool:
    """Whether v or more right of r guesses on m canaries is under-``alpha`` likely for every
    mu-GDP algorithm (the recursion of Mahloujifar, Melis and Chaudhuri, 2 outcomes a guess)."""
    if not 0 <= v <= r <= m or r == 0:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m}), r >= 1")
    level = alpha * r / m
    right, wrong = level * v / r, level * (r - v) / r  # r[v], h[v] of the paper
    for i in range(v - 1, -1, -1):
        new_wrong = max(wrong, _inverse_blow_up(right, mu))
        right += i / (r - i) * (new_wrong - wrong)
        wrong = new_wrong
    return right + wrong > r / m


def gaussian_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of mu-GDP (Dong, Roth and Su, Corollary 2.13)."""
    if mu <= 0:
        return 0.0
    return _phi(-epsilon / mu + mu / 2) - math.exp(epsilon) * _phi(-epsilon / mu - mu / 2)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The epsilon of mu-GDP at ``delta`` (to 1e-6)."""
    if mu <= 0 or gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while gaussian_delta(mu, high) > delta:
        low, high = high, high * 2
    while high - low > 1e-6:
        middle = (low + high) / 2
        if gaussian_delta(mu, middle) > delta:
            low = middle
        else:
            high = middle
    return high


def mu_lower_bound(m: int, r: int, v: int, confidence: float = 0.95) -> float:
    """The largest mu (to 1e-4) that v right of r guesses rejects at ``confidence``; 0 if
    none. Rejection is monotone: a smaller mu allows fewer right guesses."""
    alpha = 1.0 - confidence
    if r == 0 or not rejects(m, r, v, 1e-4, alpha):
        return 0.0
    low, high = 1e-4, 1.0
    while rejects(m, r, v, high, alpha):
        low, high = high, high * 2
        if high > _MU_CEILING:
            return _MU_CEILING
    while high - low > 1e-4:
        middle = (low + high) / 2
        if rejects(m, r, v, middle, alpha):
            low = middle
        else:
            high = middle
    return low


def epsilon_lower_bound(m: int, r: int, v: int, delta: float,
                        confidence: float = 0.95) -> float:
    """The epsilon at ``delta`` of the largest mu rejected: a mechanism whose trade-off is
    Gaussian and whose epsilon at ``delta`` were lower would be that mu-GDP or better."""
    return gaussian_epsilon(mu_lower_bound(m, r, v, confidence), delta)
