"""A learning rate that decays across the run's rounds (``train.lr_schedule=cosine``).

Early rounds move a fresh adapter far; late ones refine a model that is already close, where
full-size local steps on skewed hospitals make the global model swing from round to round.
The server computes each round's factor of the hospitals' learning rates and sends it with
the round's training message (``lr-factor``), as Flower's per-round fit configs do; each
hospital checks the factor against its settings (``fl_app/hospital/received.py``) before training.
The rates are not a privacy parameter: DP-SGD's noise and accounting do not depend on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clinical_fl.protocol import messages as m
from clinical_fl.settings.train import LearningRateSchedule, TrainSettings
from strategies.wrapper import StrategyWrapper


def round_lr_factor(settings: TrainSettings, server_round: int, num_rounds: int) -> float:
    """The factor of both learning rates in round ``server_round`` (from 1) of
    ``num_rounds``: 1 under a constant schedule; under cosine, f + (1 - f)(1 + cos(pi (r - 1)
    / R)) / 2 with f = the final fraction, so round 1 trains at the full rates."""
    if settings.lr_schedule == LearningRateSchedule.constant:
        return 1.0
    final = settings.lowest_lr_factor()
    progress = min(max(server_round - 1, 0), num_rounds) / num_rounds
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LearningRateScheduleStrategy(StrategyWrapper):
    """Adds the round's learning-rate factor to every training message's config."""

    def __init__(self, strategy: Strategy, settings: TrainSettings, num_rounds: int) -> None:
        super().__init__(strategy)
        self.settings = settings
        self.num_rounds = num_rounds

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        factor = round_lr_factor(self.settings, server_round, self.num_rounds)
        config = ConfigRecord({**dict(config), m.LR_FACTOR_KEY: factor})
        return self.strategy.configure_train(server_round, arrays, config, grid)
