"""Distributed DP-SGD: one DP-SGD step per round over the union of the hospitals' Poisson
batches, with one shared noise.

Every hospital samples its own Poisson batch at the union's rate q (each record of every
hospital is in the round's batch with probability q, as in DP-SGD over the pooled records),
clips each record's gradient to C, sums them, divides by the union's expected batch B and adds
Gaussian noise of standard deviation sigma x C / (B sqrt(t)). Secure aggregation releases only
the sum over at least t hospitals, so the released sum carries noise of standard deviation at
least sigma x C / B while one record moves it by at most C / B: for every record, one step of
the sampled Gaussian mechanism at (q, sigma). Were the assumptions to break (the server sees
one hospital's share, or fewer than t hospitals add theirs), a record is protected by its own
hospital's share alone (``fallback_step``).

Rounding with SecAgg+ (``lattice.py``): SecAgg+ sums integers, so each share must lie on its
lattice of step Delta. Rounding a noisy value per hospital would make the rounding depend on
the records, so the share is built in the order that keeps the Gaussian analysis: the clipped
signal is rounded to the lattice first (before any noise; one record then moves it by at most
C/B + Delta sqrt(d)), and the noise is rounded on its own, by a map that commutes with lattice
shifts. The released sum is then a post-processing of t Gaussian vectors shifted by lattice
vectors whose norms add up to at most C/B + Delta sqrt(d) (1 + t/2), and each ledger records
the step at the noise multiplier that this larger sensitivity leaves
(``accounted_noise_multiplier``; 0.4% below sigma at the preset's range and the default
adapter).
The server calibrates sigma so that the accounted one meets the target. With CKKS nothing is
rounded by us: the continuous Gaussian is added directly.

Here: the plan, its form as a one-step-a-round ``DpSgdPlan`` (so a hospital's ledger, run cap
and lifetime policy work as for DP-SGD), and a hospital's share of a round.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader

from clinical_fl.settings.privacy import Accountant, DistributedDpSettings, GradSampleMode
from tasks.audit.canaries import CANARY_COLUMN, AuditCanaries
from tasks.errors import TaskInputError
from tasks.model.compute import CPU_FP32, Compute
from tasks.privacy.accounting import Step, calibrate_noise_multiplier, epsilon_spent
from tasks.privacy.dp_sgd import (
    _logits,
    _per_record_gradients_in_float32,
    _shape_empty_batches_like_a_record,
    per_note,
)
from tasks.privacy.lattice import Lattice
from tasks.privacy.plan import DpSgdPlan, policy_delta
from tasks.privacy.policy import HospitalPolicy

# Opacus' guard against dividing by a zero norm: a record's clipped norm is at most C.
_NORM_GUARD = 1e-6


@dataclass(frozen=True)
class DistributedDpPlan:
    sample_rate: float  # q: every record's chance to be in a round's batch
    noise_multiplier: float  # sigma: the released sum's noise is at least sigma x C / B
    max_grad_norm: float  # C: each record's gradient is clipped to this L2 norm
    threshold: int  # t: the fewest hospitals whose sum is released
    expected_batch: float  # B: q x the planned hospitals' training records
    lattice_step: float | None = None  # SecAgg+'s Delta; None: continuous values (CKKS)
    dimension: int = 0  # d: trainable values in a share
    own_noise_floor: float = 0.0  # the hospital's policy: its own share is at least this

    @property
    def sensitivity(self) -> float:
        """How far one record moves a round's noisy mean gradient (before rounding)."""
        return self.max_grad_norm / self.expected_batch

    @property
    def share_noise_multiplier(self) -> float:
        """This hospital's noise, in units of C / B: t shares of variance sigma^2 / t add up to
        sigma^2; a hospital's policy may ask for more of its own."""
        return max(self.noise_multiplier / math.sqrt(self.threshold), self.own_noise_floor)

    def lattice_sensitivity(self, honest: int) -> float:
        """How far one record moves the released sum, as the analysis above counts it when
        ``honest`` hospitals' noise protects it: rounding the signal adds Delta sqrt(d), and
        splitting the shift into lattice vectors over ``honest`` noises Delta sqrt(d) honest / 2."""
        if self.lattice_step is None:
            return self.sensitivity
        return self.sensitivity + self.lattice_step * math.sqrt(self.dimension) * (
            1 + honest / 2)

    @property
    def accounted_noise_multiplier(self) -> float:
        """The noise multiplier each ledger records: sigma against the lattice's sensitivity."""
        return self.noise_multiplier * self.sensitivity / self.lattice_sensitivity(
            self.threshold)

    def round_step(self) -> Step:
        """The accountant's entry for one round, with at least t hospitals adding noise."""
        return (self.accounted_noise_multiplier, self.sample_rate, 1)

    def fallback_step(self) -> Step:
        """The entry if only this hospital's own share protected its records."""
        return (self.share_noise_multiplier * self.sensitivity / self.lattice_sensitivity(1),
                self.sample_rate, 1)

    def epsilon(self, rounds: int, delta: float, accountant: Accountant,
                fallback: bool = False) -> float:
        noise, rate, _ = self.fallback_step() if fallback else self.round_step()
        return epsilon_spent([(noise, rate, rounds)], delta, accountant)


def hospital_plan(settings: DistributedDpSettings, hospital: int, train_records: int,
                  policy: HospitalPolicy, lattice: Lattice | None, dimension: int,
                  prior_history: list[Step] | tuple[Step, ...] = ()
                  ) -> tuple[DistributedDpPlan, DpSgdPlan]:
    """The server's plan as a hospital takes it (its own lattice, adapter size and noise
    floor), and as its ledger and policy see it: one step a round at the accounted noise.
    Raises PrivacyBudgetError on a delta its policy forbids."""
    if None in (settings.noise_multiplier, settings.sample_rate, settings.threshold,
                settings.target_delta):
        raise TaskInputError(f"hospital {hospital}: the server's distributed DP plan is "
                             "incomplete (noise_multiplier, sample_rate, threshold, "
                             "target_delta are set by the server)", key="privacy.distributed_dp")
    plan = DistributedDpPlan(
        sample_rate=settings.sample_rate, noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm, threshold=settings.threshold,
        expected_batch=float(settings.expected_batch_size),
        lattice_step=lattice.step if lattice else None, dimension=dimension,
        own_noise_floor=policy.distributed_dp_noise_floor or 0.0)
    budgets = [b for b in (settings.max_epsilon, settings.target_epsilon) if b is not None]
    as_steps = DpSgdPlan(
        hospital=hospital, train_records=train_records, sample_rate=plan.sample_rate,
        steps_per_round=1, delta=policy_delta(settings, policy, train_records),
        noise_multiplier=plan.accounted_noise_multiplier, max_grad_norm=plan.max_grad_norm,
        accountant=settings.accountant, max_epsilon=min(budgets) if budgets else None,
        policy=policy, prior_history=tuple(tuple(s) for s in prior_history),
        section=settings.SECTION)
    return plan, as_steps


def plan_distributed_dp(target_epsilon: float | None, delta: float, total_records: int,
                        expected_batch: float, planned_rounds: int, max_grad_norm: float,
                        threshold: int, accountant: Accountant = Accountant.pld,
                        noise_multiplier: float | None = None,
                        lattice_step: float | None = None,
                        dimension: int = 0) -> DistributedDpPlan:
    """sigma calibrated once so that ``planned_rounds`` rounds at the union's sampling rate,
    accounted as the hospitals account them (the lattice's sensitivity), stay within
    ``target_epsilon`` at ``delta`` (or the given ``noise_multiplier``)."""
    if total_records < 1:
        raise ValueError("no training records to sample from")
    if threshold < 2:
        raise ValueError(f"a threshold of {threshold}: the noise of one hospital is its own")
    sample_rate = min(1.0, expected_batch / total_records)
    plan = DistributedDpPlan(sample_rate=sample_rate, noise_multiplier=1.0,
                             max_grad_norm=max_grad_norm, threshold=threshold,
                             expected_batch=sample_rate * total_records,
                             lattice_step=lattice_step, dimension=dimension)
    if noise_multiplier is None:
        if target_epsilon is None:
            raise ValueError("give a target epsilon or a noise multiplier")
        accounted = calibrate_noise_multiplier(target_epsilon, delta, sample_rate,
                                               planned_rounds, accountant)
        noise_multiplier = accounted / plan.accounted_noise_multiplier
    return DistributedDpPlan(**{**plan.__dict__, "noise_multiplier": noise_multiplier})


def clipped_gradient_sum(model: torch.nn.Module, loader: DataLoader, plan: DistributedDpPlan,
                         compute: Compute = CPU_FP32, poisson_sampling: bool = True,
                         canaries: AuditCanaries | None = None) -> dict[str, torch.Tensor]:
    """The sum over a Poisson batch (rate q, sampled with OS entropy) of every record's
    gradient of the trainable parameters, each clipped to C: float64, no noise yet.

    Opacus' hooks give the per-record gradients; the clipping and the sum are done here in
    float64, so that no float32 rounding of a sum of many records can push one record's
    contribution past C. ``poisson_sampling=False`` (the loader's records in one batch)
    exists for tests; ``canaries``: an audit's, the local one's (tasks/audit/dirac.py) or
    the federated one's gradient canaries (tasks/audit/canaries.py)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if poisson_sampling:
        secret = torch.Generator().manual_seed(secrets.randbits(63))
        loader = DPDataLoader(loader.dataset, sample_rate=plan.sample_rate,
                              collate_fn=loader.collate_fn, generator=secret)
    model.train()
    optimizer = torch.optim.SGD([p for _, p in named], lr=0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG.*")
        hooks, dp_optimizer, dp_loader = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=plan.max_grad_norm, poisson_sampling=False,
            grad_sample_mode="hooks", loss_reduction="sum", wrap_model=False)
    if poisson_sampling:
        _shape_empty_batches_like_a_record(dp_loader)
    try:
        with warnings.catch_warnings():  # a filter added once per round would pile up
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return _clipped_sum(model, dp_loader, dp_optimizer, named, plan.max_grad_norm,
                                compute, canaries)
    finally:
        hooks.cleanup()
        for _, param in named:
            param.grad, param.grad_sample = None, None


def _clipped_sum(model: torch.nn.Module, dp_loader: DataLoader,
                 dp_optimizer: torch.optim.Optimizer, named: list, max_grad_norm: float,
                 compute: Compute, canaries: AuditCanaries | None
                 ) -> dict[str, torch.Tensor]:
    batch = next(iter(compute.batches(dp_loader)))
    if int(batch["labels"].shape[0]) == 0:  # an empty draw: nothing to clip, still a share
        return {name: torch.zeros(param.shape, dtype=torch.float64) for name, param in named}
    dp_optimizer.zero_grad(set_to_none=True)
    with compute.autocast():
        logits = _logits(model, batch)
    torch.nn.functional.cross_entropy(logits.float(), batch["labels"],
                                      reduction="sum").backward()
    per_note(dp_optimizer, batch, GradSampleMode.hooks, loss_reduction="sum")
    _per_record_gradients_in_float32(dp_optimizer)
    if canaries is not None and CANARY_COLUMN in batch:
        canaries.replace_grad_samples(batch[CANARY_COLUMN])
    per_record = {name: param.grad_sample.detach().cpu().double() for name, param in named}
    records = next(iter(per_record.values())).shape[0]
    norms = torch.sqrt(sum(g.reshape(records, -1).square().sum(dim=1)
                           for g in per_record.values()))
    factors = (max_grad_norm / (norms + _NORM_GUARD)).clamp(max=1.0)
    return {name: torch.tensordot(factors, g, dims=1) for name, g in per_record.items()}


def flat_signal(clipped_sum: dict[str, torch.Tensor], plan: DistributedDpPlan) -> np.ndarray:
    """Minus the clipped sum over B, flattened in the adapter's order (float64): this
    hospital's part of the round's step, which the server adds to the global adapter."""
    return np.concatenate([(-t / plan.expected_batch).numpy().ravel()
                           for t in clipped_sum.values()]).astype(np.float64)


def continuous_share(signal: np.ndarray, plan: DistributedDpPlan,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """CKKS: the signal plus Gaussian noise of standard deviation share x C / B (OS entropy)."""
    rng = rng or np.random.default_rng(secrets.randbits(128))
    std = plan.share_noise_multiplier * plan.sensitivity
    return signal + rng.normal(0.0, std, size=signal.shape) if std > 0 else signal.copy()


def lattice_share(signal: np.ndarray, plan: DistributedDpPlan, lattice: Lattice,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """SecAgg+: the signal rounded to the lattice, plus the noise rounded on its own, as
    uint32 levels (modulo 2^32) that SecAgg+ masks as they are."""
    rng = rng or np.random.default_rng(secrets.randbits(128))
    std = plan.share_noise_multiplier * plan.sensitivity
    return lattice.encode(lattice.round_signal(signal, rng) + lattice.noise_levels(
        std, signal.size, rng))
