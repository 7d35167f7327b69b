"""Evaluation every k-th round: the schedule, and the wrapper that sends no evaluation
messages in between (the end-to-end check is in tests/test_e2e_secure_aggregation.py)."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord

from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.compose import compose_config, to_run_settings
from strategies.evaluation_schedule import EvaluateOnSchedule, EvaluationSchedule
from strategies.wrapper import StrategyWrapper


def test_rounds_between_the_schedule_are_not_evaluated_but_the_first_and_last_are():
    schedule = EvaluationSchedule(every=4, num_rounds=10)
    assert [r for r in range(11) if schedule.due(r)] == [0, 4, 8, 10]
    assert all(EvaluationSchedule(1, 3).due(r) for r in range(4))


def test_the_wrapper_sends_evaluation_only_when_due():
    class Asks(StrategyWrapper):
        def __init__(self) -> None:
            self.rounds: list[int] = []

        def configure_evaluate(self, server_round, arrays, config, grid):
            self.rounds.append(server_round)
            return ["message"]

    inner = Asks()
    strategy = EvaluateOnSchedule(inner, EvaluationSchedule(every=3, num_rounds=7))
    sent = {r: list(strategy.configure_evaluate(r, ArrayRecord(), ConfigRecord(), None))
            for r in range(1, 8)}
    assert inner.rounds == [3, 6, 7]
    assert sent[1] == [] and sent[3] == ["message"]


def test_evaluate_every_below_one_is_refused():
    with pytest.raises(ConfigError, match="evaluate_every"):
        to_run_settings(compose_config(["evaluate_every=0"]))
