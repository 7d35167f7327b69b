"""Local training of the trainable parameters (LoRA + head) on one hospital's records."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from clinical_fl.settings.train import OptimizerName, TrainSettings
from tasks.audit.canaries import CANARY_COLUMN, NOT_A_CANARY, GradientCanaries
from tasks.learning.passes import split_passes
from tasks.learning.progress import TrainingProgress
from tasks.model.compute import CPU_FP32, Compute


@dataclass
class PrivacyReport:
    """A hospital's record-level privacy after a round: cumulative over the whole run (and,
    for the lifetime figures, over every run on the same state directory)."""

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int  # DP-SGD steps taken in this run so far
    max_epsilon: float | None
    can_train_next_round: bool  # False: one more round would exceed a budget
    lifetime_epsilon: float = 0.0  # every run of this hospital, at hospital_delta
    hospital_delta: float = 0.0  # the hospital's own delta (its policy's max-delta)
    # Distributed DP: this run's epsilon were only this hospital's own share of the noise to
    # protect its records (secure aggregation broken, or fewer than t hospitals adding noise).
    epsilon_if_alone: float | None = None


@dataclass
class TrainOutcome:
    loss: float  # mean cross-entropy over the examples seen, without any proximal term
    num_examples: int  # records in the local training set
    num_steps: int
    seconds: float
    privacy: PrivacyReport | None = None


def class_weight_tensor(settings: TrainSettings, device: torch.device | str
                        ) -> torch.Tensor | None:
    """``train.class_weights`` on the model's device (None: unweighted)."""
    if not settings.class_weights:
        return None
    return torch.tensor(settings.class_weights, dtype=torch.float32, device=device)


def logit_scale_tensor(scale: float, present: list[bool], device: torch.device | str
                       ) -> torch.Tensor | None:
    """The restricted softmax's factor per class (``scale`` for the classes this hospital
    holds no training record of, 1 for the others); None: the full softmax."""
    if scale == 1.0 or all(present):
        return None
    return torch.tensor([1.0 if held else scale for held in present],
                        dtype=torch.float32, device=device)


def per_record_loss(logits: torch.Tensor, labels: torch.Tensor,
                    weights: torch.Tensor | None,
                    logit_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Each record's cross-entropy (in float32), times its class's weight when given;
    with ``logit_scale`` the logits are scaled per class first (restricted softmax)."""
    logits = logits.float() if logit_scale is None else logits.float() * logit_scale
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    return loss if weights is None else loss * weights[labels]


def make_optimizer(model: torch.nn.Module, settings: TrainSettings,
                   lr_factor: float = 1.0) -> torch.optim.Optimizer:
    """The optimizer over ``model``'s trainable parameters, its rates times ``lr_factor``
    (the round's place in train.lr_schedule).

    With ``head_learning_rate`` set, the LoRA matrices and the rest of the trainable
    parameters (the classification head) are two parameter groups with their own rates.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups: list[dict] = [{"params": [p for _, p in named]}]
    if settings.head_learning_rate is not None:
        groups = [{"params": [p for name, p in named if "lora_" in name]},
                  {"params": [p for name, p in named if "lora_" not in name],
                   "lr": settings.head_learning_rate * lr_factor}]
        groups = [group for group in groups if group["params"]]
    if settings.optimizer == OptimizerName.sgd:
        return torch.optim.SGD(groups, lr=settings.learning_rate * lr_factor,
                               weight_decay=settings.weight_decay)
    return torch.optim.AdamW(groups, lr=settings.learning_rate * lr_factor,
                             weight_decay=settings.weight_decay)


def train_locally(model: torch.nn.Module, loader: DataLoader, settings: TrainSettings,
                  proximal_mu: float = 0.0,
                  canaries: GradientCanaries | None = None,
                  compute: Compute = CPU_FP32,
                  classes_held: list[bool] | None = None,
                  absent_class_scale: float = 1.0, lr_factor: float = 1.0) -> TrainOutcome:
    """Run ``settings.local_epochs`` passes of the optimizer over the trainable parameters.

    ``proximal_mu`` > 0 adds FedProx's term (mu/2)·||w - w_global||², which keeps
    a hospital with skewed data from drifting far from the global adapter.
    ``canaries``: the privacy audit's gradient canaries (tasks/audit/canaries.py).
    ``compute``: the device the model is on and the forward pass's precision.
    ``classes_held``: per class, whether this hospital's training records hold it, and
    ``absent_class_scale`` the factor of the others' logits (the restricted softmax).
    ``lr_factor``: the round's factor of the learning rates (train.lr_schedule).
    """
    start = time.perf_counter()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = make_optimizer(model, settings, lr_factor)
    total_loss, seen, steps = 0.0, 0, 0
    cap = settings.pass_cap(compute.device.type)
    progress = TrainingProgress(settings.local_epochs, len(loader))
    weights = class_weight_tensor(settings, compute.device)
    scale = (logit_scale_tensor(absent_class_scale, classes_held, compute.device)
             if classes_held is not None else None)
    for epoch in range(settings.local_epochs):
        for batch in compute.batches(loader):
            optimizer.zero_grad(set_to_none=True)
            canary_ids = batch.get(CANARY_COLUMN)
            batch_size = batch["labels"].shape[0]
            # Passes of whole notes (tasks/learning/passes.py); each pass's loss is its share
            # of the batch mean, so the gradients add up to the batch's.
            for part, notes in split_passes(batch, cap):
                part_canaries = part.pop(CANARY_COLUMN, None)
                with compute.autocast():  # the loss itself is computed in float32 either way
                    if weights is None and scale is None and (canaries is None
                                                              or part_canaries is None):
                        loss = model(**part).loss * (notes / batch_size)
                    else:
                        logits = model(**{k: v for k, v in part.items() if k != "labels"}).logits
                        per_record = per_record_loss(logits, part["labels"], weights, scale)
                        if canaries is not None and part_canaries is not None:
                            # a gradient canary's own loss does not count: set below
                            per_record = per_record * (part_canaries == NOT_A_CANARY)
                        loss = per_record.sum() / batch_size
                total_loss += loss.detach().float() * batch_size  # no device sync per step
                loss.backward()
            seen += batch_size
            if proximal_mu > 0:
                drift = sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))
                (proximal_mu / 2 * drift).backward()
            if canaries is not None and canary_ids is not None:
                canaries.add_to_grads(canary_ids, batch_size)
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            steps += 1
            progress.step(epoch)
    progress.finish()
    return TrainOutcome(loss=float(total_loss) / max(seen, 1), num_examples=len(loader.dataset),
                        num_steps=steps, seconds=time.perf_counter() - start)
