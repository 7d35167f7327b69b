"""How confident the auditor is that each canary was trained on (higher: more likely in).

- white-box (the server's view): minus the projection of the audited hospital's
  updates, summed over rounds, on the canary's secret direction (gradient descent
  moves against the gradient, so an included canary pulls the update along -u_j);
- black-box (the released model): minus the final model's loss on the canary
  note's label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from tasks.audit.canaries import GRADIENT, NOTE, Canary, direction


def white_box_scores(update_files: list[Path], canaries: list[Canary]) -> list[float]:
    """One score per gradient canary, in the order of ``canaries``."""
    if not update_files:
        raise ValueError("no updates of the audited hospital were recorded")
    total: dict[str, np.ndarray] = {}
    for path in update_files:  # projections are linear: sum the updates first
        with np.load(path) as update:
            for key in update.files:
                total[key] = total.get(key, 0) + update[key].astype(np.float64)
    names = sorted(total)  # the order the hospital laid the directions out in
    flat = torch.from_numpy(np.concatenate([total[k].ravel() for k in names]))
    shapes = [torch.Size(total[k].shape) for k in names]
    return [-float(torch.cat([p.flatten() for p in direction(c.seed, shapes)]).double() @ flat)
            for c in canaries if c.kind == GRADIENT]


@torch.no_grad()
def black_box_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                     canaries: list[Canary], max_length: int, batch_size: int = 64
                     ) -> list[float]:
    """One score per note canary, in the order of ``canaries``."""
    notes = [c for c in canaries if c.kind == NOTE]
    model.eval()
    scores: list[float] = []
    for start in range(0, len(notes), batch_size):
        chunk = notes[start:start + batch_size]
        batch = tokenizer([c.text for c in chunk], truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt")
        logits = model(**batch).logits
        labels = torch.tensor([c.label for c in chunk])
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        scores += (-loss).tolist()
    return scores


def observed_noise(observed: np.ndarray) -> float:
    """The noise's standard deviation as the releases show it (units of C / B): the median
    absolute deviation of all of them, scaled to a Gaussian's (canaries are drawn in a
    fraction q of steps, so the median sees the noise). The auditor scores with the noise
    it sees, not the noise claimed: a mechanism adding less than it claims is scored at its
    own noise."""
    values = np.asarray(observed, dtype=np.float64).ravel()
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def mixture_scores(observed: np.ndarray, sample_rate: float, noise_multiplier: float
                   ) -> np.ndarray:
    """Local white-box, sampling secret: per canary, the log-likelihood ratio of its
    coordinate's releases (steps x canaries, in units of C / B) under "in" (each step: the
    canary, of value 1, with probability q, plus noise N(0, sigma^2)) against "out" (the
    noise alone). The most powerful test of one canary at (q, sigma)."""
    variance = noise_multiplier ** 2
    drawn = np.log(sample_rate) + (2 * observed - 1) / (2 * variance)
    left_out = np.log1p(-sample_rate) if sample_rate < 1 else -np.inf
    return np.logaddexp(left_out, drawn).sum(axis=0)


def replay_scores(observed: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Local white-box, sampling predicted: the log-likelihood ratio (up to a factor) if
    the canary's slot was in exactly the steps ``predicted`` (steps x canaries) says. A
    server that can recompute the hospital's batches sees each drawn step whole, without
    the amplification the accountant counts; with secret sampling the prediction is noise."""
    return (predicted * (2 * observed - 1)).sum(axis=0)
