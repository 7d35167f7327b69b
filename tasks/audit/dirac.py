"""Dirac gradient canaries for the hospital-local white-box audit (Nasr et al., "Tight
Auditing of Differentially Private Machine Learning", USENIX Security 2023; in one run as
Steinke, Nasr and Jagielski, NeurIPS 2023).

Canary j owns one trainable coordinate. Its record's gradient is ``overshoot x C`` on that
coordinate and zero elsewhere: far beyond the clipping norm C, so that correct clipping
brings it to exactly C and skipped clipping shows. It is a record like any other: it sits in
the training records and is Poisson-sampled with them.

Each canary has a **slot**, a fixed position among the records. Whether canary j is in
(probability 1/2, OS entropy) decides what its slot holds: the canary, or a record of zero
gradient. That is the zero-out neighbouring relation the accountant is computed under
(docs/privacy-accounting.md), and it keeps the number of records, hence the sampling rate,
the same whatever the coins say. It also lets an auditor who can predict which *positions*
a batch holds (a sampler seeded with something the server knows) score every canary.

The slot column (``CANARY_COLUMN``) reads: j >= 0 canary j is in its slot; -1 an ordinary
record; -(j + 2) slot j holds the zero record.
"""

from __future__ import annotations

import secrets

import datasets
import numpy as np
import torch

from tasks.audit.canaries import CANARY_COLUMN, NOT_A_CANARY
from tasks.errors import TaskInputError

OVERSHOOT = 10.0  # a canary's gradient norm, in clipping norms, before clipping


def slot_value(slot: int, included: bool) -> int:
    return slot if included else -(slot + 2)


def slot_of(value: int) -> int | None:
    """The slot a ``CANARY_COLUMN`` value belongs to (None: an ordinary record)."""
    if value >= 0:
        return value
    return None if value == NOT_A_CANARY else -value - 2


class DiracCanaries:
    """m canaries on m distinct trainable coordinates, each in with probability 1/2.

    ``named_params``: the model's trainable parameters; coordinates are drawn (OS entropy,
    without replacement) from those whose name contains ``prefer`` (LoRA's A matrices by
    default: their gradient from real notes is zero while B is zero, as at the start, so
    real records barely blur the canaries' coordinates) and from the rest only if too few.
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], count: int,
                 max_grad_norm: float, prefer: str = "lora_A") -> None:
        if count < 2:
            raise TaskInputError(f"the audit needs at least 2 canaries, got {count}")
        self.names = sorted(name for name, _ in named_params)
        self.params = dict(named_params)
        pool = self._coordinates(prefer) + self._coordinates(None, exclude=prefer)
        if count > len(pool):
            raise TaskInputError(f"{count} Dirac canaries need as many trainable values; the "
                                 f"model has {len(pool)} (raise model.lora.r)")
        rng = secrets.SystemRandom()
        preferred = len(self._coordinates(prefer))
        chosen = (rng.sample(range(preferred), count) if count <= preferred
                  else list(range(preferred)) + rng.sample(range(preferred, len(pool)),
                                                           count - preferred))
        self.coordinates = [pool[i] for i in chosen]  # (parameter name, flat offset)
        self.included = np.array([bool(rng.getrandbits(1)) for _ in range(count)])
        self.max_grad_norm = max_grad_norm
        self.observed: list[np.ndarray] = []  # one row per step: the released value / (C/B)
        self.expected_batch: float | None = None

    def _coordinates(self, contains: str | None, exclude: str | None = None
                     ) -> list[tuple[str, int]]:
        return [(name, offset) for name in self.names
                if (contains is None or contains in name)
                and (exclude is None or exclude not in name)
                for offset in range(self.params[name].numel())]

    @property
    def count(self) -> int:
        return len(self.coordinates)

    def records(self, num_labels: int) -> datasets.Dataset:
        """The m slots as records (empty notes): canary or zero record by the coins."""
        return datasets.Dataset.from_dict({
            "text": [""] * self.count, "label": [0] * self.count,
            CANARY_COLUMN: [slot_value(j, bool(inc)) for j, inc in enumerate(self.included)]})

    def _by_parameter(self) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
        """Per parameter: which canaries sit in it and at which flat offsets."""
        if not hasattr(self, "_grouped"):
            grouped: dict[str, tuple[list[int], list[int]]] = {}
            for j, (name, offset) in enumerate(self.coordinates):
                grouped.setdefault(name, ([], []))
                grouped[name][0].append(j)
                grouped[name][1].append(offset)
            self._grouped = {name: (np.array(js), torch.tensor(offsets))
                             for name, (js, offsets) in grouped.items()}
        return self._grouped

    def replace_grad_samples(self, canary_ids: torch.Tensor) -> None:
        """After backward, before clipping: a canary's row becomes its Dirac gradient, a
        zero record's row zero. Every trainable parameter has a row per record here."""
        values = canary_ids.cpu()
        slots = torch.nonzero(values != NOT_A_CANARY).flatten()
        if len(slots) == 0:
            return
        for name in self.names:
            sample = getattr(self.params[name], "grad_sample", None)
            if sample is None:
                raise TaskInputError("Dirac canaries need per-record gradients "
                                     "(grad_sample_mode hooks or functorch, not ghost)")
            sample[slots.to(sample.device)] = 0
        canary_rows = torch.nonzero(values >= 0).flatten()
        row_of = {int(values[row]): int(row) for row in canary_rows}
        for name, (js, offsets) in self._by_parameter().items():
            present = [(row_of[int(j)], off) for j, off in zip(js, offsets.tolist(), strict=True)
                       if int(j) in row_of]
            if present:
                sample = self.params[name].grad_sample
                rows, cols = zip(*present, strict=True)
                flat = sample.view(sample.shape[0], -1)
                flat[list(rows), list(cols)] = OVERSHOOT * self.max_grad_norm

    def _read(self, flat_of: dict[str, torch.Tensor], scale: float) -> None:
        row = np.empty(self.count)
        for name, (js, offsets) in self._by_parameter().items():
            row[js] = flat_of[name][offsets].double().cpu().numpy() * scale
        self.observed.append(row)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """DP-SGD: what the step released on each canary's coordinate (the noisy gradient
        the optimizer applies, Opacus' sum over the expected batch B), in units of C / B."""
        if self.expected_batch is None:
            self.expected_batch = float(optimizer.expected_batch_size)
        self._read({name: self.params[name].grad.detach().reshape(-1) for name in self.names},
                   self.expected_batch / self.max_grad_norm)

    def observe_release(self, flat: np.ndarray, order: list[str], expected_batch: float,
                        sign: float = 1.0) -> None:
        """Distributed DP: a released sum over hospitals, flattened in ``order``."""
        parts, at = {}, 0
        for name in order:
            size = self.params[name].numel()
            parts[name] = torch.from_numpy(np.asarray(flat[at:at + size], dtype=np.float64))
            at += size
        self._read(parts, sign * expected_batch / self.max_grad_norm)

    def observations(self) -> np.ndarray:
        """steps x canaries."""
        return np.vstack(self.observed) if self.observed else np.zeros((0, self.count))
