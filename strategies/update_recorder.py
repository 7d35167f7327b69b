"""The server's view of one hospital, kept for the privacy audit: every update it sent.

An honest-but-curious server reads each hospital's reply; the white-box audit
scores its canaries on exactly that (reply minus the global adapter it was sent),
round by round. Only ``clinical-fl-audit`` turns this on (``audit.updates_dir``).
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


class UpdateRecorder(StrategyWrapper):
    """Wraps a strategy; writes hospital ``hospital``'s update of round r to
    ``directory/round-<r>.npz`` (one array per trainable parameter)."""

    def __init__(self, strategy: Strategy, hospital: int, directory: Path) -> None:
        super().__init__(strategy)
        self.hospital = hospital
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sent: dict[int, dict[str, np.ndarray]] = {}

    def summary(self) -> None:
        log.debug("UpdateRecorder (hospital %s -> %s) around:", self.hospital, self.directory)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = {server_round: _arrays(arrays)}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self._sent.get(server_round, {})
        for reply in replies:
            if reply.has_error():
                continue
            metrics = next(iter(reply.content.metric_records.values()), {})
            if int(metrics.get("hospital", -1)) != self.hospital:
                continue
            received = _arrays(next(iter(reply.content.array_records.values())))
            np.savez(self.directory / f"round-{server_round}.npz",
                     **{k: v - sent[k] for k, v in received.items()})
        return self.strategy.aggregate_train(server_round, replies)
