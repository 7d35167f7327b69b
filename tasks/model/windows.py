"""Whole notes through a fixed window: windows encoded apart, pooled back into one note.

A note longer than ``model.max_length`` is cut into overlapping windows (batches.py). The
encoder reads the windows as if they were separate records; the head must read one vector
per note. ``enable_window_pooling`` adds two hooks to the model, so that every caller keeps
calling ``model(**batch)``: the model's own pre-hook takes the batch's ``window_note`` (the
note each window belongs to, 0..N-1 in order), and a pre-hook on the classification head
replaces its input, one vector per window, by the mean over each note's windows. Logits and
the loss are then per note.

Under DP-SGD the privacy unit stays the note: Opacus computes per-sample gradients per layer
from that layer's activations, so the encoder's layers give one gradient per window and the
head one per note. ``merge_window_gradients`` sums each note's window gradients (and undoes
Opacus' per-layer rescaling of a mean loss) before Opacus clips, so each note is clipped once
whatever its number of windows.
"""

from __future__ import annotations

import torch

from tasks.errors import TaskInputError

WINDOW_NOTE = "window_note"


def classification_head(model: torch.nn.Module, classes: int) -> torch.nn.Linear:
    """The trained last linear layer that outputs the logits (PEFT keeps the trained copy of
    the head under ``modules_to_save``)."""
    found = [module for name, module in model.named_modules()
             if "modules_to_save" in name and isinstance(module, torch.nn.Linear)
             and module.out_features == classes]
    if not found:
        raise TaskInputError(f"no trained linear classification head with {classes} outputs "
                             "in this model")
    return found[-1]


class _WindowPooling:
    def __init__(self) -> None:
        self.window_note: torch.Tensor | None = None

    def take(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.window_note = kwargs.pop(WINDOW_NOTE, None)
        return args, kwargs

    def pool(self, _module: torch.nn.Module, args: tuple) -> tuple | None:
        window_note = self.window_note
        if window_note is None:
            return None
        vectors = args[0]
        notes = int(window_note[-1]) + 1 if len(window_note) else 0
        if notes == len(window_note):  # one window per note: nothing to pool
            return None
        if vectors.ndim == 0 or vectors.shape[0] != len(window_note):
            return None  # not this batch's windows (Opacus' functorch re-runs the head per note)
        if vectors.ndim != 2:
            raise TaskInputError(
                "model.long_notes=chunk needs a head that reads one vector per window (BERT-"
                "family encoders); this model applies its head to every token: use "
                "model.long_notes=truncate")
        index = window_note.to(vectors.device)
        sums = vectors.new_zeros((notes, vectors.shape[1])).index_add(0, index, vectors)
        counts = torch.bincount(index, minlength=notes).to(vectors.dtype).unsqueeze(1)
        return (sums / counts, *args[1:])


def enable_window_pooling(model: torch.nn.Module, classes: int) -> None:
    """Let ``model(**batch)`` take a ``window_note`` tensor (see the module docstring)."""
    if getattr(model, "_window_pooling", None) is not None:
        return
    pooling = _WindowPooling()
    model.register_forward_pre_hook(pooling.take, with_kwargs=True)
    classification_head(model, classes).register_forward_pre_hook(pooling.pool)
    model._window_pooling = pooling


def merge_window_gradients(params: list[torch.nn.Parameter], window_note: torch.Tensor,
                           loss_reduction: str) -> None:
    """Per-window ``grad_sample`` (encoder layers) summed into per-note ones, in place.

    With ``loss_reduction="mean"`` Opacus multiplies a layer's per-sample gradients by that
    layer's batch size: the number of windows W for the encoder, of notes N for the head. The
    sum over a note's windows is therefore rescaled by N / W to be the note's own gradient.
    """
    windows = len(window_note)
    notes = int(window_note[-1]) + 1 if windows else 0
    if windows == notes:
        return
    scale = notes / windows if loss_reduction == "mean" else 1.0
    for param in params:
        sample = getattr(param, "grad_sample", None)
        if not isinstance(sample, torch.Tensor) or sample.shape[0] != windows:
            continue
        index = window_note.to(sample.device)
        merged = sample.new_zeros((notes, *sample.shape[1:])).index_add(0, index, sample)
        param.grad_sample = merged * scale if scale != 1.0 else merged
