"""train.lr_schedule=cosine: the server's factor of the learning rates each round
(strategies/learning_rate_schedule.py), checked and used by the hospital's real handlers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from clinical_fl.protocol import messages as m
from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.compose import compose_config, task_settings_to_yaml, to_run_settings
from clinical_fl.settings.train import LearningRateSchedule, TrainSettings
from strategies.learning_rate_schedule import LearningRateScheduleStrategy, round_lr_factor
from tasks.learning.training import make_optimizer
from tests.hospital_process import hospital_train_reply, initial_arrays
from tests.support import task


def test_lr_schedule_cosine_factors_match_a_hand_computation():
    cosine = TrainSettings(lr_schedule=LearningRateSchedule.cosine)
    # f + (1 - f)(1 + cos(pi (r - 1) / 4)) / 2 with f = 0.1
    expected = [1.0, 0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2, 0.55,
                0.1 + 0.9 * (1 - math.sqrt(0.5)) / 2]
    assert [round_lr_factor(cosine, r, 4) for r in (1, 2, 3, 4)] == pytest.approx(expected)
    half = TrainSettings(lr_schedule="cosine", final_lr_fraction=0.5)
    assert round_lr_factor(half, 3, 4) == pytest.approx(0.75)
    assert round_lr_factor(half, 99, 4) == pytest.approx(0.5)  # past the plan: the floor
    assert round_lr_factor(TrainSettings(), 3, 4) == 1.0


def test_lr_schedule_settings_refuse_a_fraction_of_a_schedule_that_is_off():
    with pytest.raises(ConfigError, match="train.final_lr_fraction"):
        TrainSettings(final_lr_fraction=0.2)
    for value in (0.0, 1.5, math.nan):
        with pytest.raises(ConfigError, match="train.final_lr_fraction"):
            TrainSettings(lr_schedule="cosine", final_lr_fraction=value)
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        to_run_settings(compose_config(["privacy=distributed_dp", "secure_aggregation=ckks",
                                        "train.lr_schedule=cosine"]))


def test_lr_schedule_factor_scales_both_parameter_groups():
    model = torch.nn.Sequential()
    model.lora_A = torch.nn.Linear(2, 2)
    model.classifier = torch.nn.Linear(2, 2)
    settings = TrainSettings(learning_rate=1e-3, head_learning_rate=3e-2)
    rates = [group["lr"] for group in make_optimizer(model, settings, 0.25).param_groups]
    assert rates == pytest.approx([2.5e-4, 7.5e-3])


def test_lr_schedule_wrapper_sends_each_rounds_factor(process_identity):
    settings = TrainSettings(lr_schedule="cosine")
    seen: list[float] = []

    class Spy(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN202
            seen.append(config[m.LR_FACTOR_KEY])
            return []

    strategy = LearningRateScheduleStrategy(Spy(), settings, 4)
    for server_round in (1, 3):
        strategy.configure_train(server_round, None, ConfigRecord({"x": 1}), None)
    assert seen == pytest.approx([1.0, 0.55])


def _update_norm(tiny_bert, tmp_path, factor: float) -> float:
    text = task_settings_to_yaml(task(tiny_bert, "train.lr_schedule=cosine"))
    sent = initial_arrays(text)
    metrics, arrays = hospital_train_reply(text, tmp_path / f"state-{factor}", 3, 1,
                                           arrays=sent,
                                           round_config={m.LR_FACTOR_KEY: factor})
    assert arrays is not None, metrics
    before, after = sent.to_numpy_ndarrays(), arrays.to_numpy_ndarrays()
    return float(np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before,
                                                                    strict=True))))


def test_lr_schedule_a_smaller_factor_moves_a_real_hospital_less(tiny_bert, tmp_path,
                                                                 process_identity):
    # AdamW's steps scale with the rate, but a few steps' sum is not exactly 10x smaller (0.32
    # in one fresh-clone run); it would be about 1 if the factor were ignored.
    full, tenth = _update_norm(tiny_bert, tmp_path, 1.0), _update_norm(tiny_bert, tmp_path, 0.1)
    assert 0 < tenth < 0.5 * full, (tenth, full)
