"""Local training with DP-SGD (Opacus): Poisson-sampled batches, per-record gradient
clipping, Gaussian noise. Only the trainable parameters (LoRA + head) are private
parameters; the frozen base model is public.

Every random draw that the guarantee rests on comes from fresh OS entropy that
never leaves the hospital, never from the run's seed (the server knows it):
- the noise: anyone who knew its seed could regenerate it and subtract it;
- the Poisson sampling: outside ``secure_mode`` Opacus' ``DPDataLoader`` keeps
  the generator of the loader it wraps, so a loader seeded from the run seed
  would let the server recompute every batch (``torch.rand(N, generator=g) < q``)
  and the amplification by subsampling that the accountant assumes would be gone.
Opacus' ``secure_mode`` is not used: it needs the ``torchcsprng`` package, which
has no build for this torch. Both generators are torch's Mersenne Twister seeded
with 63 bits from ``secrets`` at every round.

Under bf16 autocast the per-record gradients come out of Opacus' hooks in bf16; they
are cast to float32 before Opacus clips them, so each record's norm, its clipping
factor, the sum and the noise are all float32, as the analysis assumes: the clipped
vector is exactly within the clipping norm whatever rounding produced it.
"""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader

from clinical_fl.settings.privacy import GradSampleMode
from clinical_fl.settings.train import TrainSettings
from tasks.audit.canaries import CANARY_COLUMN, AuditCanaries
from tasks.errors import TaskInputError
from tasks.learning.passes import split_passes
from tasks.learning.progress import TrainingProgress
from tasks.learning.training import (
    TrainOutcome,
    class_weight_tensor,
    make_optimizer,
    per_record_loss,
)
from tasks.model.compute import CPU_FP32, Compute
from tasks.model.windows import WINDOW_NOTE, merge_window_gradients
from tasks.privacy.accounting import Step


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**{k: v for k, v in batch.items() if k not in ("labels", CANARY_COLUMN)}).logits


def with_secret_sampling(loader: DataLoader) -> DataLoader:
    """The same records and collation, with a sampling generator seeded from OS entropy.
    Opacus' Poisson loader takes its generator from this loader."""
    secret = torch.Generator().manual_seed(secrets.randbits(63))
    return DataLoader(loader.dataset, batch_size=loader.batch_size,
                      collate_fn=loader.collate_fn, generator=secret)


def _per_record_gradients_in_float32(dp_optimizer: torch.optim.Optimizer) -> None:
    """Opacus clips ``grad_sample`` in its own dtype: under bf16 autocast that is bf16,
    whose 8-bit mantissa would let a clipped record exceed the norm by ~0.4%."""
    for param in dp_optimizer.params:
        sample = getattr(param, "grad_sample", None)
        if isinstance(sample, torch.Tensor) and sample.dtype != torch.float32:
            param.grad_sample = sample.float()


def _take_rows(dp_optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This pass's per-note gradients, taken off the parameters: Opacus would otherwise list
    the passes as accumulated batches (refused under Poisson sampling, and it would divide
    the step by their number and account a larger sampling rate)."""
    rows = []
    for param in dp_optimizer.params:
        rows.append(param.grad_sample)
        param.grad_sample = None
    return rows


def _put_rows(dp_optimizer: torch.optim.Optimizer, passes: list[list[torch.Tensor]]) -> None:
    """The passes' per-note gradients joined: one row per note of the batch, in its order."""
    for param, rows in zip(dp_optimizer.params, zip(*passes, strict=True), strict=True):
        param.grad_sample = torch.cat(rows, dim=0)


def per_note(dp_optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
             grad_sample_mode: GradSampleMode, loss_reduction: str = "mean") -> None:
    """Each note's windows' per-sample gradients summed into the note's own, so that Opacus
    clips notes, not windows (tasks/model/windows.py)."""
    if _several_windows(batch, grad_sample_mode):
        merge_window_gradients(dp_optimizer.params, batch[WINDOW_NOTE], loss_reduction)


def _several_windows(batch: dict[str, torch.Tensor], grad_sample_mode: GradSampleMode) -> bool:
    """Whether some note of ``batch`` spans several windows; refused (before any forward
    pass) under ghost clipping, which would clip each window."""
    window_note = batch.get(WINDOW_NOTE)
    if window_note is None or len(window_note) == int(batch["labels"].shape[0]):
        return False
    if grad_sample_mode == GradSampleMode.ghost:
        raise TaskInputError("grad_sample_mode=ghost clips per window; a note read in several "
                             "windows needs hooks or functorch (or model.long_notes=truncate)")
    return True


def _noise_only_step(dp_optimizer: torch.optim.Optimizer) -> None:
    """An empty Poisson batch (every record left out, probability (1-q)^N) still takes its
    step: the noise alone, recorded by the accountant like any other. The model cannot run
    on zero notes (attention reshapes fail), so the empty per-record gradients are set here."""
    for param in dp_optimizer.params:
        param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype,
                                        device=param.device)
        param.grad = torch.zeros_like(param)  # ghost clipping reads the summed gradient
    dp_optimizer.step()


def _shape_empty_batches_like_a_record(dp_loader: DataLoader) -> None:
    """Opacus makes an empty batch in the shape of the first non-empty one; when the very
    first draw is empty it falls back to shapes read from ``dataset[0]``, which fails for
    records that are dicts (ours). Give it that template before the first draw."""
    collate = dp_loader.collate_fn
    if getattr(collate, "first_batch", False) is None:  # opacus' CollateFnWithEmpty
        collate.first_batch = collate.wrapped_collator_fn([dp_loader.dataset[0]])


def train_with_dp_sgd(model: torch.nn.Module, loader: DataLoader, settings: TrainSettings,
                      noise_multiplier: float, max_grad_norm: float,
                      grad_sample_mode: GradSampleMode, history: list[Step],
                      poisson_sampling: bool = True,
                      noise_seed: int | None = None,
                      canaries: AuditCanaries | None = None,
                      compute: Compute = CPU_FP32, lr_factor: float = 1.0) -> TrainOutcome:
    """``settings.local_epochs`` epochs of DP-SGD (the optimizer steps on privatized gradients).

    ``history`` is the hospital's accountant history; the steps taken here are
    appended to it by Opacus' own accountant hook, step by step.
    ``poisson_sampling=False`` and ``noise_seed`` exist for tests that compare
    against non-private training; they void the privacy guarantee. ``canaries``: the
    privacy audit's canaries (tasks/audit/canaries.py, dirac.py), shown every step.
    ``compute``: the model's device and the forward pass's precision (bf16 only with the
    ``hooks`` mode; the others would compute per-record norms in bf16, so they run in
    float32). ``lr_factor``: the round's factor of the learning rates (train.lr_schedule;
    post-processing, no privacy cost).
    """
    if grad_sample_mode != GradSampleMode.hooks:
        compute = compute.without_bf16(f"grad_sample_mode={grad_sample_mode.value}")
    start = time.perf_counter()
    model.train()  # Opacus records activations only in training mode
    private = _make_private(model, loader, settings, noise_multiplier, max_grad_norm,
                            grad_sample_mode, history, poisson_sampling, noise_seed, compute,
                            lr_factor)
    total_loss, seen, steps = 0.0, 0, 0
    # Token ids never require grad, so torch notes that backward hooks see outputs only.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    progress = TrainingProgress(settings.local_epochs, len(private.loader), "DP-SGD")
    cap = (None if grad_sample_mode == GradSampleMode.ghost  # its two backward passes need
           else settings.pass_cap(compute.device.type))      # the batch in one pass
    try:
        for epoch in range(settings.local_epochs):
            for batch in compute.batches(private.loader):
                loss, batch_size = _private_step(model, private, batch, grad_sample_mode, cap,
                                                 canaries, compute)
                if canaries is not None:  # the audit sees every step's release
                    canaries.after_step(private.optimizer)
                total_loss += loss
                steps += 1
                seen += batch_size
                progress.step(epoch)
        progress.finish()
    finally:
        # The model object is reused for evaluation and the next round: drop Opacus' hooks.
        private.grad_hooks.cleanup()
    history[:] = [tuple(step) for step in private.engine.accountant.history]
    return TrainOutcome(loss=float(total_loss) / max(seen, 1), num_examples=len(loader.dataset),
                        num_steps=steps, seconds=time.perf_counter() - start)


@dataclass
class _PrivateTraining:
    """What Opacus' ``make_private`` gives: the engine (its accountant's history), the hooks
    that compute per-record gradients, the DP optimizer, the loss and the Poisson loader."""

    engine: PrivacyEngine
    grad_hooks: Any
    optimizer: torch.optim.Optimizer
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    loader: DataLoader


def _make_private(model: torch.nn.Module, loader: DataLoader, settings: TrainSettings,
                  noise_multiplier: float, max_grad_norm: float,
                  grad_sample_mode: GradSampleMode, history: list[Step],
                  poisson_sampling: bool, noise_seed: int | None, compute: Compute,
                  lr_factor: float) -> _PrivateTraining:
    optimizer = make_optimizer(model, settings, lr_factor)
    # The noise is drawn where the gradients are (Opacus draws it on the parameter's device).
    generator = torch.Generator(device=compute.device).manual_seed(
        noise_seed if noise_seed is not None else secrets.randbits(63))
    if poisson_sampling:
        loader = with_secret_sampling(loader)
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off (it needs torchcsprng; see the docstring).
        warnings.filterwarnings("ignore", message=".*Secure RNG.*")
        engine = PrivacyEngine(accountant="rdp")  # only its history is used; see accounting.py
        engine.accountant.history = [tuple(step) for step in history]
        parts = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            criterion=torch.nn.CrossEntropyLoss(), noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=poisson_sampling,
            grad_sample_mode=grad_sample_mode.value, noise_generator=generator,
            wrap_model=False)  # hooks on our own model object, removed after training
    if grad_sample_mode == GradSampleMode.ghost:  # weights refused with ghost (settings)
        grad_hooks, dp_optimizer, criterion, dp_loader = parts
    else:
        grad_hooks, dp_optimizer, dp_loader = parts
        weights = class_weight_tensor(settings, compute.device)

        def criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            # the mean over the pass's records, as Opacus' loss_reduction="mean" expects;
            # a record's weight scales its gradient before it is clipped
            return per_record_loss(logits, labels, weights).mean()

    if poisson_sampling:
        _shape_empty_batches_like_a_record(dp_loader)
    return _PrivateTraining(engine, grad_hooks, dp_optimizer, criterion, dp_loader)


def _private_step(model: torch.nn.Module, private: _PrivateTraining,
                  batch: dict[str, torch.Tensor], grad_sample_mode: GradSampleMode,
                  cap: int | None, canaries: AuditCanaries | None,
                  compute: Compute) -> tuple[torch.Tensor | float, int]:
    """One DP-SGD step on one Poisson batch: (the batch's summed loss, its records)."""
    dp_optimizer = private.optimizer
    dp_optimizer.zero_grad(set_to_none=True)
    batch_size = int(batch["labels"].shape[0])
    if batch_size == 0:
        _noise_only_step(dp_optimizer)
        return 0.0, 0
    _several_windows(batch, grad_sample_mode)  # ghost: refused before the forward
    # Passes of whole notes (tasks/learning/passes.py): each pass's per-note rows are taken
    # aside and joined into one row per note of the batch, so that clipping, noise and the
    # accountant see the one Poisson batch.
    passes, rows, total_loss = list(split_passes(batch, cap)), [], 0.0
    for part, notes in passes:
        with compute.autocast():
            logits = _logits(model, part)
        loss = private.criterion(logits.float(), part["labels"])
        loss.backward()
        per_note(dp_optimizer, part, grad_sample_mode)
        total_loss += loss.detach() * notes  # no device sync per step
        if len(passes) > 1:
            rows.append(_take_rows(dp_optimizer))
    if rows:
        _put_rows(dp_optimizer, rows)
    _per_record_gradients_in_float32(dp_optimizer)
    if canaries is not None and CANARY_COLUMN in batch:
        canaries.replace_grad_samples(batch[CANARY_COLUMN])
    dp_optimizer.step()  # clip per record, add noise, record the step
    return total_loss, batch_size
