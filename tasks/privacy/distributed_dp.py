"""Distributed DP-SGD (issue 16, in progress): one DP-SGD step per round over the union of the
hospitals' Poisson batches, with one shared noise.

Every hospital samples its own Poisson batch at the union's rate q (each record of every
hospital is in the round's batch with probability q, as in DP-SGD over the pooled records),
clips each record's gradient to C, sums them and adds Gaussian noise of standard deviation
sigma x C / sqrt(t). Secure aggregation releases only the sum over at least t hospitals, so
the released sum carries noise of standard deviation at least sigma x C: for every record,
one step of the sampled Gaussian mechanism at (q, sigma). Each hospital's epsilon composes
these steps over the rounds it took part in. Were the assumptions to break (the server sees
one hospital's sum, or fewer than t hospitals add their share), a record is protected by its
own hospital's share alone: (q, sigma / sqrt(t)) a step, the fallback this module also gives.

Here: the plan (sigma calibrated once for the planned rounds), its form as a one-step-a-round
``DpSgdPlan`` (so a hospital's ledger, run cap and lifetime policy work as for DP-SGD), and a
hospital's noisy clipped gradient sum on Opacus' own clipping and noise.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader

from settings.task import Accountant, DistributedDpSettings
from tasks.errors import TaskInputError
from tasks.model.compute import CPU_FP32, Compute
from tasks.privacy.accounting import Step, calibrate_noise_multiplier, epsilon_spent
from tasks.privacy.dp_sgd import (
    _logits,
    _per_record_gradients_in_float32,
    _shape_empty_batches_like_a_record,
)
from tasks.privacy.plan import DpSgdPlan, policy_delta
from tasks.privacy.policy import HospitalPolicy


@dataclass(frozen=True)
class DistributedDpPlan:
    sample_rate: float  # q: every record's chance to be in a round's batch
    noise_multiplier: float  # sigma: the released sum's noise is at least sigma x C
    max_grad_norm: float  # C: each record's gradient is clipped to this L2 norm
    threshold: int  # t: the fewest hospitals whose sum is released
    expected_batch: float  # q x the planned hospitals' training records

    @property
    def share_noise_multiplier(self) -> float:
        """Each hospital's share: t shares of variance (sigma C)^2 / t add up to (sigma C)^2."""
        return self.noise_multiplier / math.sqrt(self.threshold)

    def round_step(self) -> Step:
        """The accountant's entry for one round, with at least t hospitals adding noise."""
        return (self.noise_multiplier, self.sample_rate, 1)

    def fallback_step(self) -> Step:
        """The entry if only this hospital's own share protected its records."""
        return (self.share_noise_multiplier, self.sample_rate, 1)

    def epsilon(self, rounds: int, delta: float, accountant: Accountant,
                fallback: bool = False) -> float:
        noise, rate, _ = self.fallback_step() if fallback else self.round_step()
        return epsilon_spent([(noise, rate, rounds)], delta, accountant)


def hospital_plan(settings: DistributedDpSettings, hospital: int, train_records: int,
                  policy: HospitalPolicy,
                  prior_history: list[Step] | tuple[Step, ...] = ()
                  ) -> tuple[DistributedDpPlan, DpSgdPlan]:
    """The server's plan as a hospital takes it, and as its ledger and policy see it: one step
    a round at (q, sigma). Raises PrivacyBudgetError on a delta its policy forbids."""
    if None in (settings.noise_multiplier, settings.sample_rate, settings.threshold,
                settings.target_delta):
        raise TaskInputError(f"hospital {hospital}: the server's distributed DP plan is "
                             "incomplete (noise_multiplier, sample_rate, threshold, "
                             "target_delta are set by the server)")
    plan = DistributedDpPlan(sample_rate=settings.sample_rate,
                             noise_multiplier=settings.noise_multiplier,
                             max_grad_norm=settings.max_grad_norm, threshold=settings.threshold,
                             expected_batch=float(settings.expected_batch_size))
    budgets = [b for b in (settings.max_epsilon, settings.target_epsilon) if b is not None]
    as_steps = DpSgdPlan(
        hospital=hospital, train_records=train_records, sample_rate=plan.sample_rate,
        steps_per_round=1, delta=policy_delta(settings, policy, train_records),
        noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
        accountant=settings.accountant, max_epsilon=min(budgets) if budgets else None,
        policy=policy, prior_history=tuple(tuple(s) for s in prior_history))
    return plan, as_steps


def plan_distributed_dp(target_epsilon: float | None, delta: float, total_records: int,
                        expected_batch: float, planned_rounds: int, max_grad_norm: float,
                        threshold: int, accountant: Accountant = Accountant.rdp,
                        noise_multiplier: float | None = None) -> DistributedDpPlan:
    """sigma calibrated once so that ``planned_rounds`` rounds at the union's sampling rate
    stay within ``target_epsilon`` at ``delta`` (or the given ``noise_multiplier``)."""
    if total_records < 1:
        raise ValueError("no training records to sample from")
    if threshold < 2:
        raise ValueError(f"a threshold of {threshold}: the noise of one hospital is its own")
    sample_rate = min(1.0, expected_batch / total_records)
    if noise_multiplier is None:
        if target_epsilon is None:
            raise ValueError("give a target epsilon or a noise multiplier")
        noise_multiplier = calibrate_noise_multiplier(target_epsilon, delta, sample_rate,
                                                      planned_rounds, accountant)
    return DistributedDpPlan(sample_rate=sample_rate, noise_multiplier=noise_multiplier,
                             max_grad_norm=max_grad_norm, threshold=threshold,
                             expected_batch=sample_rate * total_records)


def noisy_clipped_gradient_sum(model: torch.nn.Module, loader: DataLoader,
                               plan: DistributedDpPlan, compute: Compute = CPU_FP32,
                               poisson_sampling: bool = True,
                               noise_seed: int | None = None) -> dict[str, torch.Tensor]:
    """This hospital's share of one distributed step: the sum over a Poisson batch (rate q,
    sampled with OS entropy) of every record's gradient clipped to C, plus Gaussian noise of
    standard deviation sigma x C / sqrt(t) (OS entropy), per trainable parameter, float32.

    Clipping and noise are Opacus' (``DPOptimizer.pre_step``); the optimizer never steps:
    the server takes the step on the sum. ``poisson_sampling=False`` (the loader's records
    in one batch) and ``noise_seed`` exist for tests and void the guarantee."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    generator = torch.Generator(device=compute.device).manual_seed(
        noise_seed if noise_seed is not None else secrets.randbits(63))
    if poisson_sampling:
        secret = torch.Generator().manual_seed(secrets.randbits(63))
        loader = DPDataLoader(loader.dataset, sample_rate=plan.sample_rate,
                              collate_fn=loader.collate_fn, generator=secret)
    model.train()
    optimizer = torch.optim.SGD([p for _, p in named], lr=0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG.*")
        hooks, dp_optimizer, dp_loader = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=plan.share_noise_multiplier, max_grad_norm=plan.max_grad_norm,
            poisson_sampling=False, grad_sample_mode="hooks", noise_generator=generator,
            loss_reduction="sum", wrap_model=False)  # a sum: the server divides
    if poisson_sampling:
        _shape_empty_batches_like_a_record(dp_loader)
    try:
        with warnings.catch_warnings():  # a filter added once per round would pile up
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return _one_noisy_sum(model, dp_loader, dp_optimizer, named, compute)
    finally:
        hooks.cleanup()
        for _, param in named:
            param.grad = None


def _one_noisy_sum(model: torch.nn.Module, dp_loader: DataLoader,
                   dp_optimizer: torch.optim.Optimizer, named: list, compute: Compute
                   ) -> dict[str, torch.Tensor]:
    batch = next(iter(compute.batches(dp_loader)))
    dp_optimizer.zero_grad(set_to_none=True)
    if int(batch["labels"].shape[0]) == 0:  # an empty draw still sends its noise
        for _, param in named:
            param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype,
                                            device=param.device)
    else:
        with compute.autocast():
            logits = _logits(model, batch)
        torch.nn.functional.cross_entropy(logits.float(), batch["labels"],
                                          reduction="sum").backward()
        _per_record_gradients_in_float32(dp_optimizer)
    dp_optimizer.pre_step()  # clip per record, sum, add the noise share
    return {name: param.grad.detach().float().cpu().clone() for name, param in named}
