"""From canary scores to one epsilon lower bound and a verdict.

For each way of scoring, and each k tried, the auditor guesses the k highest scores in
and the k lowest out; each such guess set gets two lower bounds: the counting bound of
Steinke, Nasr and Jagielski (``bound.py``, no assumption about the mechanism) and the
Gaussian f-DP bound of Mahloujifar, Melis and Chaudhuri (``gaussian_bound.py``, tighter for
mechanisms with a Gaussian trade-off such as DP-SGD). Every bound is computed at one
Bonferroni-corrected confidence, so that all of them, hence their maximum, hold together
at ``confidence``. The audit fails when that maximum exceeds the claimed epsilon. The local
white-box audit adds one parametric bound, the noise multiplier it measures
(``noise_check.py``), reported beside the one-run bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clinical_fl.settings.privacy import Accountant
from tasks.audit import bound, gaussian_bound
from tasks.audit.noise_check import measured_noise

ANALYSES = {"counting": bound.epsilon_lower_bound,
            "gaussian": gaussian_bound.epsilon_lower_bound}
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2)  # k / m: guesses in (and as many out)


@dataclass(frozen=True)
class NoiseCheck:
    """The releases (steps x canaries, units of C / B) and the claimed rate and steps."""

    observed: np.ndarray
    sample_rate: float
    steps: int
    accountant: Accountant


def audit_verdict(scores: dict[str, np.ndarray], included: np.ndarray, claimed: float,
                  delta: float, confidence: float = 0.95,
                  fractions: tuple[float, ...] = GUESS_FRACTIONS,
                  noise: NoiseCheck | None = None) -> dict:
    """The lower bound (the largest of all tried) and whether it is above ``claimed``.
    ``noise``: also measure the noise multiplier (``noise_check.py``), one more bound under
    the same correction."""
    m = len(included)
    ks = sorted({max(1, min(m // 2, round(f * m))) for f in fractions})
    tries = len(scores) * len(ks) * len(ANALYSES) + (noise is not None)
    each = bound.per_bound_confidence(confidence, tries)
    tried = []
    for kind, values in scores.items():
        order = np.argsort(np.asarray(values), kind="stable")
        for k in ks:
            correct = int(included[order[m - k:]].sum() + (~included[order[:k]]).sum())
            for analysis, lower_bound in ANALYSES.items():
                tried.append({"score": kind, "analysis": analysis, "guesses": 2 * k,
                              "correct": correct,
                              "epsilon_lower_bound": lower_bound(m, 2 * k, correct, delta, each)})
    measured = None
    if noise is not None:
        measured = measured_noise(noise.observed, included, noise.sample_rate, noise.steps,
                                  delta, noise.accountant, each)
        tried.append({"score": "measured_noise", "analysis": "sampled_gaussian",
                      "epsilon_lower_bound": measured["epsilon_lower_bound"]})
    best = max(tried, key=lambda t: t["epsilon_lower_bound"])
    one_run = max((t for t in tried if t["score"] != "measured_noise"),
                  key=lambda t: t["epsilon_lower_bound"])
    return {"epsilon_lower_bound": best["epsilon_lower_bound"], "best": best,
            "one_run_epsilon_lower_bound": one_run["epsilon_lower_bound"],
            "measured_noise": measured,
            "epsilon_claimed": claimed, "delta": delta, "confidence": confidence,
            "confidence_each": each, "canaries": m, "canaries_in": int(included.sum()),
            "failed": bool(best["epsilon_lower_bound"] > claimed), "tried": tried}
