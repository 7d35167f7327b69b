"""The server's view of one hospital, kept for the privacy audit: what it received each round.

An honest-but-curious server reads what arrives; the white-box audit scores its canaries on
exactly that (what arrived minus the global adapter it sent), round by round. Which view that
is depends on secure aggregation:

- ``hospital_update`` (no secure aggregation): the audited hospital's own reply;
- ``secure_sum`` (SecAgg+ or CKKS): the server never holds one hospital's update, only the
  aggregate the protocol releases; every contributor's reply carries that same aggregate
  (fl_app/server/grids/secure_aggregation.py), so the round's aggregate is kept, in the rounds
  the audited hospital contributed to. Under distributed DP it is the plain sum of the
  hospitals' shares (minus the round's noisy mean gradient); otherwise the weighted mean of
  the hospitals' updates that the sum gives.

Recorded before the server's optimiser (FedAdam's step is not linear in the update). Only
``clinical-fl-audit`` turns this on (``audit.updates_dir``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.wrapper import StrategyWrapper

log = logging.getLogger(__name__)


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return dict(zip(record.keys(), record.to_numpy_ndarrays(), strict=True))


HOSPITAL_UPDATE, SECURE_SUM = "hospital_update", "secure_sum"


def audit_view(secure_aggregation: bool) -> str:
    """What the server has of the audited hospital: its update, or the secure aggregate."""
    return SECURE_SUM if secure_aggregation else HOSPITAL_UPDATE


class UpdateRecorder(StrategyWrapper):
    """Wraps a strategy; writes what the server received of hospital ``hospital`` in round r
    (``view``: its update, or the round's secure aggregate) to ``directory/round-<r>.npz``
    (one array per trainable parameter)."""

    def __init__(self, strategy: Strategy, hospital: int, directory: Path,
                 view: str = HOSPITAL_UPDATE) -> None:
        super().__init__(strategy)
        if view not in (HOSPITAL_UPDATE, SECURE_SUM):
            raise ValueError(f"unknown audit view {view!r}")
        self.hospital = hospital
        self.view = view
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sent: dict[int, dict[str, np.ndarray]] = {}

    def summary(self) -> None:
        log.debug("UpdateRecorder (hospital %s, %s -> %s) around:", self.hospital, self.view,
                  self.directory)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = {server_round: _arrays(arrays)}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self._sent.get(server_round, {})
        if self.view == SECURE_SUM:
            self._check_one_aggregate(replies)
        for reply in replies:
            if reply.has_error():
                continue
            metrics = next(iter(reply.content.metric_records.values()), {})
            if int(metrics.get("hospital", -1)) != self.hospital:
                continue
            # secure_sum: the audited hospital's reply carries the round's aggregate, the
            # same as every contributor's (the grid put it there; its own update never came).
            received = _arrays(next(iter(reply.content.array_records.values())))
            np.savez(self.directory / f"round-{server_round}.npz",
                     **{k: v - sent[k] for k, v in received.items()})
        return self.strategy.aggregate_train(server_round, replies)

    def _check_one_aggregate(self, replies: list[Message]) -> None:
        """A secure round's contributors all carry the one released aggregate; replies that
        differ would be hospitals' own updates, not the view this recorder says it keeps."""
        received = [_arrays(next(iter(r.content.array_records.values())))
                    for r in replies if not r.has_error()]
        for other in received[1:]:
            if any(not np.array_equal(other[k], received[0][k]) for k in received[0]):
                raise RuntimeError("audit view secure_sum, but the replies are not one "
                                   "aggregate: is secure aggregation's grid in place?")
