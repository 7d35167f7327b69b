"""Stop asking hospitals that have spent their privacy budget or refuse the run, and end the
run when none is left.

Each hospital enforces its own budget and policy (it refuses a round that
would break them); this wrapper is the server's courtesy on top: it stops
sending training work to a hospital that refused, or said it cannot afford
another round, reports why, and ends training cleanly when no hospital can
train, instead of running empty rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clinical_fl.protocol.messages import CAN_TRAIN_NEXT
from clinical_fl.protocol.refusals import BY_NAME, explain_reason
from strategies.wrapper import StrategyWrapper

log = logging.getLogger(__name__)

# Refusals after which a hospital is sent no more training work in this run: its budget or
# policy rules the run out, its ledger needs its operator, or the run's privacy plan does
# not fit it (asking again would get the same answer).
STOPS_TRAINING = frozenset(BY_NAME[name].code for name in (
    "privacy-budget-refused", "policy-refused", "privacy-plan-invalid", "ledger-unreadable"))

class TrainingStopped(Exception):
    """Training ended before the planned rounds, for the reason given."""


class PrivacyBudgetGate(StrategyWrapper):
    """Wraps a strategy; only hospitals within budget are sent training messages.

    ``all_or_nothing``: stop as soon as any hospital is out of budget, for
    server-side DP whose noise is calibrated to a fixed number of hospitals.
    """

    def __init__(self, strategy: Strategy, all_or_nothing: bool = False,
                 on_refusal: Callable[[int, str], None] | None = None) -> None:
        super().__init__(strategy)
        self.all_or_nothing = all_or_nothing
        self.on_refusal = on_refusal  # (node id, reason): e.g. to record it in MLflow
        self.exhausted: dict[int, str] = {}  # node id -> why

    def exclude(self, node: int, reason: str) -> None:
        """No more training work for ``node``, for ``reason``."""
        if self.exhausted.get(node) != reason:
            self.exhausted[node] = reason
            if self.on_refusal:
                self.on_refusal(node, reason)

    def summary(self) -> None:
        log.debug("PrivacyBudgetGate around:")
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.exhausted and self.all_or_nothing:
            raise TrainingStopped(f"before round {server_round}: {self._why()}; server-side DP "
                                  "needs every hospital in every round")
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        within = [m for m in messages if m.metadata.dst_node_id not in self.exhausted]
        if messages and not within:
            raise TrainingStopped(f"before round {server_round}: no hospital can train within "
                                  f"its privacy budget ({self._why()})")
        return within

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                if reply.error.code in STOPS_TRAINING:
                    self.exclude(node, explain_reason(reply.error.reason))
                continue
            for metrics in reply.content.metric_records.values():
                if metrics.get(CAN_TRAIN_NEXT, 1) == 0:
                    hospital = metrics.get("hospital", node)
                    self.exclude(node, f"hospital {hospital} cannot afford another round "
                                       "within its privacy budget")
        return self.strategy.aggregate_train(server_round, replies)

    def _why(self) -> str:
        return "; ".join(sorted(self.exhausted.values()))
