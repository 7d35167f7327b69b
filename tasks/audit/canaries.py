"""Canaries for the one-run privacy audit (Steinke, Nasr and Jagielski, NeurIPS 2023).

Two kinds, each included in the audited hospital's training records
independently with probability 1/2 (the inclusion coins come from OS entropy and
stay with the auditor):

- **note canaries** (black-box): notes of random letter-words with a random
  label; trained on like any record. Scored by the final model's loss.
- **gradient canaries** (white-box): a record whose per-record gradient is
  replaced by a fixed secret direction ``u_j`` (a unit Gaussian vector over the
  trainable parameters, from the canary's seed) scaled to the clipping norm, so
  clipping leaves it whole. Scored by the projection of the hospital's updates,
  as the server sees them, on ``u_j``.

The hospital only ever reads the file of included canaries; which canaries
exist and which were left out is the auditor's key.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import datasets
import torch

from tasks.errors import TaskInputError

NOTE, GRADIENT = "note", "gradient"
NOT_A_CANARY = -1  # the ``canary`` column of ordinary records
CANARY_COLUMN = "canary"


@dataclass
class Canary:
    canary_id: int
    kind: str  # NOTE or GRADIENT
    text: str
    label: int
    seed: int  # of the direction (gradient canaries)
    included: bool


def make_canaries(count_per_kind: int, num_labels: int, words: int = 24) -> list[Canary]:
    """``count_per_kind`` canaries of each kind, each included with probability 1/2."""
    rng = secrets.SystemRandom()
    canaries = []
    for kind in (NOTE, GRADIENT):
        for _ in range(count_per_kind):
            text = " ".join("".join(rng.choice(string.ascii_lowercase)
                                    for _ in range(rng.randint(3, 9))) for _ in range(words))
            canaries.append(Canary(len(canaries), kind, text, rng.randrange(num_labels),
                                   rng.getrandbits(62), bool(rng.getrandbits(1))))
    return canaries


def write_canaries(canaries: list[Canary], path: Path) -> Path:
    path.write_text("".join(json.dumps(asdict(c)) + "\n" for c in canaries), encoding="utf-8")
    return path


def read_canaries(path: str | Path) -> list[Canary]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return [Canary(**json.loads(line)) for line in lines if line.strip()]
    except (OSError, ValueError, TypeError) as err:
        raise TaskInputError(f"audit canaries {path}: unreadable ({err})") from err


def with_canaries(train: datasets.Dataset, canaries: list[Canary]) -> datasets.Dataset:
    """The training records plus the included canaries, with a ``canary`` column: the
    gradient canary's id, or NOT_A_CANARY (note canaries train like any record)."""
    included = [c for c in canaries if c.included]
    extra = datasets.Dataset.from_dict({
        "text": [c.text for c in included], "label": [c.label for c in included],
        CANARY_COLUMN: [c.canary_id if c.kind == GRADIENT else NOT_A_CANARY
                        for c in included]})
    base = train.select_columns(["text", "label"]).add_column(
        CANARY_COLUMN, [NOT_A_CANARY] * len(train))
    return datasets.concatenate_datasets([base, extra.cast(base.features)])


def direction(seed: int, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """The unit direction of a gradient canary, split into tensors of ``shapes``
    (the trainable parameters, sorted by name)."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    flat = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(seed))
    flat /= flat.norm()
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True)]


class AuditCanaries(Protocol):
    """What DP-SGD's step does with an audit's canaries: their per-record gradients put in
    before clipping, and every step's release shown after it."""

    def replace_grad_samples(self, canary_ids: torch.Tensor) -> None: ...

    def after_step(self, optimizer: torch.optim.Optimizer) -> None: ...


class GradientCanaries:
    """Puts each gradient canary's secret direction where its gradient would be.

    ``params`` are the trainable parameters sorted by name (the order the scorer
    uses on the server's arrays); ``norm`` is the clipping norm.
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]],
                 canaries: list[Canary], norm: float) -> None:
        self.params = [p for _, p in sorted(named_params, key=lambda item: item[0])]
        self.seeds = {c.canary_id: c.seed for c in canaries if c.kind == GRADIENT}
        self.norm = norm

    def _rows(self, canary_ids: torch.Tensor) -> list[tuple[int, list[torch.Tensor]]]:
        shapes = [p.shape for p in self.params]
        return [(row, direction(self.seeds[int(cid)], shapes))
                for row, cid in enumerate(canary_ids.tolist()) if cid != NOT_A_CANARY]

    def replace_grad_samples(self, canary_ids: torch.Tensor) -> None:
        """DP-SGD: after backward, before clipping: a canary row's per-record gradient
        becomes ``norm x u_j``."""
        for row, parts in self._rows(canary_ids):
            for param, part in zip(self.params, parts, strict=True):
                if getattr(param, "grad_sample", None) is None:
                    raise TaskInputError("gradient canaries need per-record gradients "
                                         "(grad_sample_mode hooks or functorch, not ghost)")
                param.grad_sample[row] = self.norm * part.to(param.grad_sample.device,
                                                             param.grad_sample.dtype)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The federated audit scores the updates the server receives, not the steps."""

    def add_to_grads(self, canary_ids: torch.Tensor, batch_size: int) -> None:
        """Plain training (the loss is a batch mean): each canary adds ``norm x u_j / B``."""
        for _, parts in self._rows(canary_ids):
            for param, part in zip(self.params, parts, strict=True):
                contribution = self.norm * part.to(param.device) / batch_size
                param.grad = contribution if param.grad is None else param.grad + contribution
