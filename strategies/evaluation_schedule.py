"""Evaluate every k-th round: runs of hundreds of short rounds (distributed DP takes one
DP-SGD step a round) would otherwise spend most of their time scoring.

Flower's loop asks for federated evaluation after every round; this wrapper sends no
evaluation messages in the rounds between, and the round's end (``RoundEnd``) skips the
server's own evaluation in the same rounds (``EvaluationSchedule.due``). Round 0 (the
untrained adapter) and the last round are always evaluated, so a run's final figures are
always measured.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.wrapper import StrategyWrapper


@dataclass(frozen=True)
class EvaluationSchedule:
    every: int  # evaluate after rounds every, 2 x every, ...
    num_rounds: int  # ... and after the last one

    def due(self, server_round: int) -> bool:
        return (server_round == 0 or server_round % self.every == 0
                or server_round >= self.num_rounds)


class EvaluateOnSchedule(StrategyWrapper):
    def __init__(self, strategy: Strategy, schedule: EvaluationSchedule) -> None:
        super().__init__(strategy)
        self.schedule = schedule

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.schedule.due(server_round):
            return []
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)
