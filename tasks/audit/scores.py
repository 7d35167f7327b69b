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
