"""A batch of notes cut into forward passes of whole notes, at most so many windows each.

Why: on CPUs a forward and backward pass over many sequences is slower per token than over a
few (activations leave the caches): on the 2-core machine, training on 256-token windows ran
at 13.2 notes/s in passes of 4 or 8 windows and 9.9 in passes of 16 (docs/benchmarks.md,
"Long notes"). A batch of 16 long notes holds about 66 windows. Non-private training sums the
passes' gradients before its one optimizer step, so the step is the batch's step; evaluation
just reads the passes in turn. DP-SGD does not use this: Opacus needs the whole Poisson batch
in one pass to give each note its own gradient.

A note is never split (its windows are pooled into one vector: they must share a pass); a
note with more windows than the cap is a pass of its own. Each pass's padding is trimmed to
its own longest window.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tasks.audit.canaries import CANARY_COLUMN
from tasks.model.windows import WINDOW_NOTE

PER_NOTE = ("labels", CANARY_COLUMN)


def windows_per_note(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    notes = len(batch["labels"])
    if WINDOW_NOTE not in batch:
        return torch.ones(notes, dtype=torch.long)
    return torch.bincount(batch[WINDOW_NOTE].cpu(), minlength=notes)


def note_groups(windows: list[int], cap: int) -> list[tuple[int, int]]:
    """Consecutive notes [first, end) whose windows add up to at most ``cap`` (a note with
    more is alone)."""
    groups, first, held = [], 0, 0
    for note, count in enumerate(windows):
        if note > first and held + count > cap:
            groups.append((first, note))
            first, held = note, 0
        held += count
    if windows:
        groups.append((first, len(windows)))
    return groups


def split_passes(batch: dict[str, torch.Tensor], cap: int | None
                 ) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """(pass, notes in it) in order; the batch itself where it fits in one pass."""
    counts = windows_per_note(batch)
    notes = len(counts)
    if cap is None or int(counts.sum()) <= cap or notes <= 1:
        yield batch, notes
        return
    ends = torch.cumsum(counts, 0).tolist()
    for first, end in note_groups(counts.tolist(), cap):
        rows = slice(ends[first - 1] if first else 0, ends[end - 1])
        part: dict[str, torch.Tensor] = {}
        for key, value in batch.items():
            if key in PER_NOTE:
                part[key] = value[first:end]
            elif key == WINDOW_NOTE:
                part[key] = value[rows] - first
            else:
                part[key] = value[rows]
        mask = part.get("attention_mask")
        if mask is not None and mask.ndim == 2 and mask.shape[1] > 1:
            # Trailing columns that are padding in every row of this pass go (right padding
            # only: a left-padded batch has none, so nothing moves).
            used = torch.nonzero(mask.any(dim=0)).flatten()
            width = int(used[-1]) + 1 if len(used) else 1
            part = {key: value[:, :width] if value.ndim == 2 and key not in PER_NOTE
                    and value.shape[1] == mask.shape[1] else value
                    for key, value in part.items()}
        yield part, end - first
