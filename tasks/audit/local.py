"""The hospital-local white-box audit: the adversary the accountant assumes, who sees every
noisy step, against the product's own DP-SGD (``train_with_dp_sgd``) or its distributed-DP
share (``clipped_gradient_sum`` + ``continuous_share``, summed over t hospitals as secure
aggregation releases it).

m Dirac canaries (``dirac.py``) sit among the hospital's training records; training runs
once; each canary is scored on every release of its coordinate, two ways (``scores.py``):
as the accountant's own adversary would with secret sampling (the likelihood ratio at the
claimed q and sigma), and as a server that replays the hospital's sampler with everything it
knows would (which catches a sampler it can predict). The bound (``verdict.py``) is the
largest of the counting and Gaussian one-run bounds over both scores and the k tried, all
holding together at the confidence asked. A bound above the claimed epsilon fails the audit.

Nothing here leaves a hospital: it runs where the hospital's code runs, on its data or the
synthetic notes, and reports epsilons and counts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import datasets
import numpy as np
import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from clinical_fl.settings.privacy import Accountant, DpSgdSettings, GradSampleMode
from clinical_fl.settings.train import TrainSettings
from tasks.audit.canaries import CANARY_COLUMN, NOT_A_CANARY
from tasks.audit.dirac import DiracCanaries, slot_of
from tasks.audit.scores import mixture_scores, observed_noise, replay_scores
from tasks.audit.verdict import NoiseCheck, audit_verdict
from tasks.errors import TaskInputError
from tasks.learning.batches import make_loader, tokenize
from tasks.privacy import dp_sgd
from tasks.privacy.accounting import calibrate_noise_multiplier, epsilon_spent
from tasks.privacy.distributed_dp import (
    clipped_gradient_sum,
    continuous_share,
    flat_signal,
    plan_distributed_dp,
)

DP_SGD, DISTRIBUTED_DP = "dp_sgd", "distributed_dp"


@dataclass(frozen=True)
class LocalAudit:
    """What is audited and how hard. ``steps``: DP-SGD epochs x batches an epoch, or
    distributed-DP rounds (one step each); ``sample_rate``: every record's chance to be in
    a step; ``threshold``: the hospitals whose shares the release sums (distributed DP)."""

    mechanism: str
    target_epsilon: float
    delta: float = 1e-5
    canaries: int = 1000
    sample_rate: float = 0.25
    epochs: int = 4  # DP-SGD
    rounds: int = 16  # distributed DP
    threshold: int = 3
    max_grad_norm: float = 1.0
    accountant: Accountant = DpSgdSettings.accountant  # the product's default
    max_length: int = 16
    confidence: float = 0.95

    def __post_init__(self) -> None:
        """Refuse what the audit cannot run, naming the option, before any training."""
        checks = {
            "mechanism": self.mechanism in (DP_SGD, DISTRIBUTED_DP),
            "target_epsilon": math.isfinite(self.target_epsilon) and self.target_epsilon > 0,
            "delta": 0 < self.delta < 1, "canaries": self.canaries >= 2,
            "sample_rate": 0 < self.sample_rate <= 1, "epochs": self.epochs >= 1,
            "rounds": self.rounds >= 1, "threshold": self.threshold >= 2,
            "max_grad_norm": math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0,
            "max_length": self.max_length >= 2, "confidence": 0 < self.confidence < 1}
        for option, holds in checks.items():
            if not holds:
                raise TaskInputError(f"local audit: {option}={getattr(self, option)!r} is out "
                                     "of range", key=option)


def _records(real: datasets.Dataset, canaries: DiracCanaries, num_labels: int
             ) -> datasets.Dataset:
    base = real.select_columns(["text", "label"])
    base = base.add_column(CANARY_COLUMN, [NOT_A_CANARY] * len(base))
    return datasets.concatenate_datasets([base, canaries.records(num_labels).cast(base.features)])


def replayed_membership(loader: DataLoader, steps: int, count: int) -> np.ndarray:
    """steps x canaries: which slots the hospital's Poisson loader would draw if it were
    rebuilt, as the DP-SGD code builds it (``with_secret_sampling``, then Opacus' Poisson
    loader) and iterated epoch by epoch as training does, from what a server knows. Secret
    sampling makes this independent of the real draws."""
    replay = DPDataLoader.from_data_loader(dp_sgd.with_secret_sampling(loader))
    dp_sgd._shape_empty_batches_like_a_record(replay)
    predicted = np.zeros((steps, count), dtype=bool)
    step = 0
    while step < steps:
        for batch in replay:  # each epoch's iterator draws from the generator, as training's
            for value in batch[CANARY_COLUMN].tolist() if len(batch["labels"]) else []:
                slot = slot_of(int(value))
                if slot is not None:
                    predicted[step, slot] = True
            step += 1
            if step == steps:
                break
    return predicted


def _train_settings(train: TrainSettings, audit: LocalAudit, records: int) -> TrainSettings:
    batch = max(1, round(audit.sample_rate * records))
    # A canary's forward pass is two tokens: one pass per batch, not CPU-sized passes.
    return replace(train, local_epochs=audit.epochs, batch_size=batch, windows_per_pass=4096)


def audit_dp_sgd(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 real: datasets.Dataset, num_labels: int, train: TrainSettings,
                 audit: LocalAudit) -> dict:
    canaries = DiracCanaries([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                             audit.canaries, audit.max_grad_norm)
    records = tokenize(_records(real, canaries, num_labels), tokenizer, audit.max_length)
    settings = _train_settings(train, audit, len(records))
    loader = make_loader(records, tokenizer, settings.batch_size, shuffle=False)
    rate, steps = 1 / len(loader), audit.epochs * len(loader)  # as Opacus samples
    noise = calibrate_noise_multiplier(audit.target_epsilon, audit.delta, rate, steps,
                                       audit.accountant)
    history: list = []
    start = time.perf_counter()
    dp_sgd.train_with_dp_sgd(model, loader, settings, noise, audit.max_grad_norm,
                             GradSampleMode.hooks, history, canaries=canaries)
    seconds = time.perf_counter() - start
    claimed = epsilon_spent(history, audit.delta, audit.accountant)  # the true history
    observed = canaries.observations()
    scores = {"secret_sampling": mixture_scores(observed, rate, observed_noise(observed)),
              "replayed_sampling": replay_scores(
                  observed, replayed_membership(loader, len(observed), canaries.count))}
    return _report(audit, canaries, scores, claimed, noise, rate, len(observed), seconds,
                   len(records))


def audit_distributed_dp(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                         real: datasets.Dataset, num_labels: int, audit: LocalAudit) -> dict:
    """Hospital 0 holds every record and the canaries; the other t - 1 hospitals add their
    noise shares to a zero signal (the fewest shares the release can hold)."""
    canaries = DiracCanaries([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                             audit.canaries, audit.max_grad_norm)
    records = tokenize(_records(real, canaries, num_labels), tokenizer, audit.max_length)
    loader = make_loader(records, tokenizer, 64, shuffle=False)
    plan = plan_distributed_dp(audit.target_epsilon, audit.delta, len(records),
                               audit.sample_rate * len(records), audit.rounds,
                               audit.max_grad_norm, audit.threshold, audit.accountant)
    start = time.perf_counter()
    for _ in range(audit.rounds):
        clipped = clipped_gradient_sum(model, loader, plan, canaries=canaries)
        signal = flat_signal(clipped, plan)
        release = continuous_share(signal, plan)
        for _ in range(audit.threshold - 1):
            release = release + continuous_share(np.zeros_like(signal), plan)
        # the signal is minus the clipped sum over B: a canary drawn adds -C / B
        canaries.observe_release(release, list(clipped), plan.expected_batch, sign=-1.0)
    seconds = time.perf_counter() - start
    claimed = plan.epsilon(audit.rounds, audit.delta, audit.accountant)
    observed = canaries.observations()
    scores = {"secret_sampling": mixture_scores(observed, plan.sample_rate,
                                                observed_noise(observed))}
    return _report(audit, canaries, scores, claimed, plan.noise_multiplier, plan.sample_rate,
                   audit.rounds, seconds, len(records))


def _report(audit: LocalAudit, canaries: DiracCanaries, scores: dict[str, np.ndarray],
            claimed: float, noise: float, rate: float, steps: int, seconds: float,
            records: int) -> dict:
    noise_check = NoiseCheck(canaries.observations(), rate, steps, audit.accountant)
    verdict = audit_verdict(scores, canaries.included, claimed, audit.delta, audit.confidence,
                            noise=noise_check)
    return {"auditor": "local_white_box", "mechanism": audit.mechanism,
            "target_epsilon": audit.target_epsilon, "noise_multiplier": noise,
            "sample_rate": rate, "steps": steps, "records": records,
            "accountant": audit.accountant.value, "training_seconds": seconds, **verdict}
