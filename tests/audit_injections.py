"""Four bugs injected into the code the product really runs, for the audit to catch (issue
33, part 2): by patching the libraries and functions in place, never by product flags. Used
by tests/test_audit_local.py and benchmarks/privacy_audit_local.py (the same injections)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from unittest import mock

import torch
from opacus.optimizers import optimizer as opacus_optimizer
from torch.utils.data import DataLoader

from tasks.privacy import dp_sgd
from tasks.privacy.distributed_dp import DistributedDpPlan


@contextlib.contextmanager
def predictable_sampling() -> Iterator[None]:
    """The Poisson sampler seeded with a value the server knows (the run seed, as before the
    sampling fix): the server can replay every batch."""
    def seeded(loader: DataLoader) -> DataLoader:
        return DataLoader(loader.dataset, batch_size=loader.batch_size,
                          collate_fn=loader.collate_fn,
                          generator=torch.Generator().manual_seed(42))
    with mock.patch.object(dp_sgd, "with_secret_sampling", seeded):
        yield


@contextlib.contextmanager
def half_the_noise() -> Iterator[None]:
    """Opacus draws half the noise its accountant books."""
    draw = opacus_optimizer._generate_noise

    def half(std, reference, generator=None, secure_mode=False):
        return draw(std * 0.5, reference, generator, secure_mode)
    with mock.patch.object(opacus_optimizer, "_generate_noise", half):
        yield


@contextlib.contextmanager
def clipping_skipped() -> Iterator[None]:
    """Per-record gradients summed unclipped: a canary moves the release by 10 C, not C."""
    clip = opacus_optimizer.DPOptimizer.clip_and_accumulate

    def unclipped(self):
        norm, self.max_grad_norm = self.max_grad_norm, math.inf
        try:
            clip(self)
        finally:
            self.max_grad_norm = norm
    with mock.patch.object(opacus_optimizer.DPOptimizer, "clip_and_accumulate", unclipped):
        yield


@contextlib.contextmanager
def share_for_twice_the_threshold() -> Iterator[None]:
    """Each hospital's noise share sized for 2t hospitals: t shares carry sigma / sqrt(2)."""
    with mock.patch.object(DistributedDpPlan, "share_noise_multiplier", property(
            lambda plan: plan.noise_multiplier / math.sqrt(2 * plan.threshold))):
        yield


# name: (injection, the mechanism it is in)
INJECTIONS: dict[str, tuple[Callable[[], contextlib.AbstractContextManager], str]] = {
    "predictable_sampling": (predictable_sampling, "dp_sgd"),
    "half_the_noise": (half_the_noise, "dp_sgd"),
    "clipping_skipped": (clipping_skipped, "dp_sgd"),
    "share_for_twice_the_threshold": (share_for_twice_the_threshold, "distributed_dp"),
}
