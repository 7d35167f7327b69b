"""The server's aggregation, for benchmarks that run their hospitals in one process.

Each hospital's result becomes the reply the product sends (``fl_app/hospital/replies.py``'s
``train_reply``: float32 arrays, record count as the aggregation weight, its metrics), and the
product's strategy (``strategies/registry.py``: Flower's own ``FedAvg``, weighted by the
replies' aggregation weight, with the product's metric rules) aggregates them with its
``aggregate_train``, as the ServerApp does in every round. Nothing is averaged here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity

from clinical_fl.settings.strategy import StrategyName, StrategySettings
from fl_app.hospital.replies import train_reply
from strategies.metric_rules import evaluate_metrics_rules, train_metrics_rules
from strategies.registry import build_strategy
from tasks.learning.training import TrainOutcome

HospitalResult = tuple[int, dict[str, torch.Tensor], TrainOutcome]  # (hospital, state, outcome)


@contextmanager
def _server_identity() -> Iterator[None]:
    """Flower stamps an instruction with the run, node and task of the process (set by
    ``flwr run`` in a real ServerApp); in-process, this process plays the SuperLink's task."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


class ServerAggregation:
    """The product's strategy, fed in-process replies round by round (FedAvg only: the
    benchmarks compare hospital-side settings, and FedAvg keeps no server state)."""

    def __init__(self, settings: StrategySettings | None = None, quiet: bool = True) -> None:
        settings = settings or StrategySettings()
        if settings.name != StrategyName.fedavg:
            raise ValueError(f"strategy.name={settings.name.value}: in-process aggregation "
                             "here is FedAvg only (use `flwr run` for the others)")
        self.strategy: Strategy = build_strategy(settings, train_metrics_rules(),
                                                 evaluate_metrics_rules())
        if quiet:  # Flower logs every aggregation at INFO
            logging.getLogger("flwr").setLevel(logging.WARNING)

    def aggregate(self, server_round: int,
                  results: Sequence[HospitalResult]) -> dict[str, torch.Tensor]:
        """The new global trainable state from the hospitals' ``(hospital, state, outcome)``."""
        with _server_identity():
            replies = []
            for hospital, state, outcome in results:
                instruction = Message(RecordDict({"config": ConfigRecord({})}),
                                      dst_node_id=hospital + 1, message_type=MessageType.TRAIN)
                replies.append(train_reply(instruction, state, outcome, hospital))
            arrays, _ = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            raise RuntimeError(f"round {server_round}: no reply to aggregate")
        return arrays.to_torch_state_dict()
