"""Whole notes through a fixed window: windows encoded apart, pooled back into one note.

A note longer than ``model.max_length`` is cut into overlapping windows (batches.py). The
encoder reads the windows as if they were separate records; the head must read one vector
per note. ``enable_window_pooling`` adds two hooks to the model, so that every caller keeps
calling ``model(**batch)``: the model's own pre-hook takes the batch's ``window_note`` (the
note each window belongs to, 0..N-1 in order), and a pre-hook on the classification head
replaces its input, one vector per window, by one vector per note. Logits and the loss are
then per note. ``model.window_pooling`` says how: ``mean`` weighs every window alike; ``max``
keeps each feature's largest value over the note's windows (one deciding window is not diluted
by the boilerplate around it; its gradient flows to the window that holds the maximum);
``attention`` learns a linear score per window, softmax over the note's windows (the scorer
starts at zero, so training starts from the mean, and PEFT saves it with the adapter). Reading
the first window only is ``model.long_notes=truncate``.

Under DP-SGD the privacy unit stays the note: Opacus computes per-sample gradients per layer
from that layer's activations, so the encoder's layers give one gradient per window and the
head one per note. ``merge_window_gradients`` sums each note's window gradients (and undoes
Opacus' per-layer rescaling of a mean loss) before Opacus clips, so each note is clipped once
whatever its number of windows.
"""

from __future__ import annotations

import torch

from clinical_fl.settings.model import WindowPooling
from tasks.errors import TaskInputError

WINDOW_NOTE = "window_note"
WINDOW_ATTENTION = "window_attention"  # the attention pooling's scorer, on the base model


def add_window_attention(base: torch.nn.Module) -> None:
    """The attention pooling's scorer, zero (uniform weights: the mean), on the base model
    before LoRA wraps it; ``LoraConfig(modules_to_save=[WINDOW_ATTENTION])`` trains and saves
    it."""
    with torch.random.fork_rng(devices=[]):  # LoRA and the head start as with mean pooling
        scorer = torch.nn.Linear(base.config.hidden_size, 1)
    torch.nn.init.zeros_(scorer.weight)
    torch.nn.init.zeros_(scorer.bias)
    setattr(base, WINDOW_ATTENTION, scorer)


def window_attention(model: torch.nn.Module) -> torch.nn.Module | None:
    """The scorer to call (PEFT's wrapper calls its trained copy), None: mean pooling."""
    return next((module for name, module in model.named_modules()
                 if name.endswith(WINDOW_ATTENTION)), None)


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


def head_parameter_names(model: torch.nn.Module, classes: int) -> list[str]:
    """The names of the trained head's parameters (its weight and bias), as in
    ``trainable_state``: rows indexed by class."""
    head = classification_head(model, classes)
    prefix = next(name for name, module in model.named_modules() if module is head)
    return [f"{prefix}.{name}" for name, _ in head.named_parameters()]


class _WindowPooling:
    def __init__(self, mode: WindowPooling, attention: torch.nn.Module | None) -> None:
        if (mode == WindowPooling.attention) != (attention is not None):
            raise TaskInputError(f"model.window_pooling={mode.value} does not match the "
                                 "model: the attention scorer is "
                                 f"{'missing' if attention is None else 'present'}")
        self.window_note: torch.Tensor | None = None
        self.mode = mode
        self.attention = attention

    def take(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.window_note = kwargs.pop(WINDOW_NOTE, None)
        return args, kwargs

    def pool(self, _module: torch.nn.Module, args: tuple) -> tuple | None:
        # Once per forward pass: Opacus' functorch mode re-runs the head per note in the
        # backward pass, on vectors that are already pooled.
        window_note, self.window_note = self.window_note, None
        if window_note is None:
            return None
        vectors = args[0]
        notes = int(window_note[-1]) + 1 if len(window_note) else 0
        if notes == len(window_note) and self.attention is None:
            return None  # one window per note: nothing to pool
        if vectors.ndim == 0 or vectors.shape[0] != len(window_note):
            return None
        if vectors.ndim != 2:
            raise TaskInputError(
                "model.long_notes=chunk needs a head that reads one vector per window (BERT-"
                "family encoders); this model applies its head to every token: use "
                "model.long_notes=truncate")
        index = window_note.to(vectors.device)
        if self.mode == WindowPooling.max:
            # Include_self=False: the -inf start never wins, so every feature comes from a
            # real window (and its gradient goes back to that window).
            return (vectors.new_full((notes, vectors.shape[1]), float("-inf")).scatter_reduce(
                0, index.unsqueeze(1).expand_as(vectors), vectors, reduce="amax",
                include_self=False), *args[1:])
        if self.attention is None:
            sums = vectors.new_zeros((notes, vectors.shape[1])).index_add(0, index, vectors)
            counts = torch.bincount(index, minlength=notes).to(vectors.dtype).unsqueeze(1)
            return (sums / counts, *args[1:])
        # The scorer runs on every batch, one window a note too: Opacus needs its per-note
        # gradient in every step. Softmax per note, shifted by the note's top score.
        scores = self.attention(vectors).squeeze(-1).float()
        top = scores.new_full((notes,), float("-inf")).scatter_reduce(
            0, index, scores.detach(), reduce="amax")
        weight = torch.exp(scores - top[index])
        weight = weight / weight.new_zeros(notes).index_add(0, index, weight)[index]
        weighted = vectors * weight.to(vectors.dtype).unsqueeze(1)
        return (vectors.new_zeros((notes, vectors.shape[1])).index_add(0, index, weighted),
                *args[1:])


def enable_window_pooling(model: torch.nn.Module, classes: int,
                          mode: WindowPooling = WindowPooling.mean) -> None:
    """Let ``model(**batch)`` take a ``window_note`` tensor (see the module docstring)."""
    if getattr(model, "_window_pooling", None) is not None:
        return
    pooling = _WindowPooling(mode, window_attention(model))
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
