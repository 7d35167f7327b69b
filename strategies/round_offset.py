"""A resumed run goes on from round k+1 inside Flower's own loop.

``Strategy.start`` always counts rounds from 1; a run resumed after round ``done`` calls it
for the remaining rounds and this wrapper shifts every round number by ``done``, so the
strategy (FedAdam's bias correction), the wrappers (evaluation schedule, budget gate), the
hospitals (their round-seeded randomness, their ledgers) and MLflow all see the run's own
round numbers, as in an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.wrapper import StrategyWrapper

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class AfterRound(StrategyWrapper):
    def __init__(self, strategy: Strategy, done: int) -> None:
        super().__init__(strategy)
        self.done = done

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.done, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.done, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.done, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.done, replies)

    def evaluate_fn(self, evaluate: EvaluateFn) -> EvaluateFn:
        """``evaluate`` at the run's round numbers. Flower's call for its round 0 is the
        checkpoint's round, already evaluated and logged before the crash: skipped."""
        def shifted(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            return None if server_round == 0 else evaluate(server_round + self.done, arrays)
        return shifted
