"""The epsilon lower bound of a one-run audit, as in Steinke, Nasr and Jagielski, "Privacy
Auditing with One (1) Training Run" (NeurIPS 2023).

m canaries are each included with probability 1/2; the auditor guesses r of them
(the rest abstain) and gets v right. Under (epsilon, delta)-DP the number of correct
guesses W satisfies (the paper's Theorem 5.2, the bound with the delta term, as
computed in its appendix):

    P[W >= v] <= f(v) + 2 m delta max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(k) = P[Binomial(r, e^eps / (1 + e^eps)) >= k].

The lower bound at confidence 1 - alpha is the largest epsilon whose p-value is
still below alpha: an algorithm that were (epsilon, delta)-DP would produce v or
more correct guesses with probability under alpha. No bound from r guesses can
exceed about ln(r / ln(1 / alpha)) (all r right), whatever the true epsilon.

Several bounds from one run hold together only if their confidences are
corrected for each other: ``guess_and_bound`` splits alpha over the k it tries,
and an audit reporting several bounds (the black-box and the white-box one)
splits it over them first (``per_bound_confidence``), Bonferroni both times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import binom


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of v or more correct of r guesses on m canaries under (epsilon, delta)-DP."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomized response
    tail = float(binom.sf(v - 1, r, q))  # f(v)
    worst, band = 0.0, 0.0  # band = f(v - i) - f(v) = P[v - i <= Binomial < v]
    for i in range(1, v + 1):
        band += float(binom.pmf(v - i, r, q))
        worst = max(worst, band / i)
    return min(1.0, tail + 2 * m * delta * worst)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float,
                        confidence: float = 0.95) -> float:
    """The largest epsilon (to 1e-6) rejected at ``confidence``; 0 if none is."""
    alpha = 1.0 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < alpha:
        low, high = high, high * 2
    while high - low > 1e-6:
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) < alpha:
            low = middle
        else:
            high = middle
    return low


def per_bound_confidence(confidence: float, bounds: int) -> float:
    """The confidence each of ``bounds`` bounds is computed at so that all of them hold
    together at ``confidence`` (Bonferroni: alpha split evenly)."""
    if not 0 < confidence < 1 or bounds < 1:
        raise ValueError(f"need 0 < confidence ({confidence}) < 1 and bounds ({bounds}) >= 1")
    return 1.0 - (1.0 - confidence) / bounds


@dataclass
class AuditGuess:
    guesses: int  # r: k guessed in + k guessed out
    correct: int  # v
    epsilon_lower_bound: float


def guess_and_bound(scores: list[float], included: list[bool], k_values: list[int],
                    delta: float, confidence: float = 0.95) -> tuple[AuditGuess, list[AuditGuess]]:
    """Guess "in" for the k highest scores and "out" for the k lowest, for each k; the
    bound of each at a Bonferroni-corrected confidence (several k are tried on one run),
    and the best of them."""
    m = len(scores)
    order = sorted(range(m), key=lambda j: scores[j])
    per_k_confidence = per_bound_confidence(confidence, max(len(k_values), 1))
    results = []
    for k in k_values:
        k = min(k, m // 2)
        guessed_in, guessed_out = order[m - k:], order[:k]
        correct = sum(included[j] for j in guessed_in) + sum(not included[j]
                                                             for j in guessed_out)
        results.append(AuditGuess(2 * k, correct, epsilon_lower_bound(
            m, 2 * k, correct, delta, per_k_confidence)))
    best = max(results, key=lambda g: g.epsilon_lower_bound)
    return best, results
