"""The per-round hook: everything the server knows about a round goes to MLflow here.

Flower calls ``evaluate_fn(round, arrays)`` once before the first round and
after every round; this object is that function. It collects the aggregated
train and evaluation metrics, per-hospital values, bytes on the wire and wall
time, adds the optional centralized evaluation, and logs them at step = round.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import PrivacySpent

from strategies.metered_grid import MeteredGrid
from strategies.metric_rules import MetricRules
from strategies.tracking import RunTracker

CentralEvaluate = Callable[[ArrayRecord], dict[str, float]]
ClientLevelPrivacy = Callable[[], PrivacySpent | None]

# Aggregated metric key -> MLflow name.
_TRAIN_NAMES = {"train-loss": "train/loss", "train-seconds": "train/slowest_hospital_s",
                "num-examples": "train/records", "replies": "round/train_replies",
                # record-level DP: cumulative over the run, per hospital at its delta
                "epsilon": "privacy/epsilon_max", "epsilon-mean": "privacy/epsilon_mean",
                "delta": "privacy/delta", "noise-multiplier": "privacy/noise_multiplier",
                "clipping-norm": "privacy/clipping_norm", "sample-rate": "privacy/sample_rate",
                "dp-steps": "privacy/dp_steps",
                "lifetime-epsilon": "privacy/lifetime_epsilon_max",
                "lifetime-delta": "privacy/lifetime_delta",
                "can-train-next": "privacy/hospitals_within_budget"}
_EVAL_NAMES = {"eval-loss": "federated/loss", "accuracy": "federated/accuracy",
               "macro-f1": "federated/macro_f1", "num-examples": "federated/records",
               "replies": "round/evaluate_replies"}
_HOSPITAL_NAMES = {"train-loss": "train_loss", "train-seconds": "train_s",
                   "num-examples": "records", "eval-loss": "loss", "accuracy": "accuracy",
                   "macro-f1": "macro_f1", "epsilon": "epsilon",
                   "delta": "delta", "lifetime-epsilon": "lifetime_epsilon"}


class RoundLogger:
    def __init__(self, tracker: RunTracker, grid: MeteredGrid, train_rules: MetricRules,
                 evaluate_rules: MetricRules, central_evaluate: CentralEvaluate | None,
                 log_per_hospital: bool = True,
                 client_level_privacy: ClientLevelPrivacy | None = None) -> None:
        self.tracker = tracker
        self.grid = grid
        self.train_rules = train_rules
        self.evaluate_rules = evaluate_rules
        self.central_evaluate = central_evaluate
        self.log_per_hospital = log_per_hospital
        self.client_level_privacy = client_level_privacy
        self.latest_arrays: ArrayRecord | None = None  # the global adapter last evaluated
        self._round_started = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.latest_arrays = arrays
        metrics: dict[str, float] = {}
        for rules, names in ((self.train_rules, _TRAIN_NAMES),
                             (self.evaluate_rules, _EVAL_NAMES)):
            combined, per_hospital = rules.take()
            metrics.update({names[k]: v for k, v in combined.items() if k in names})
            if server_round > 0 and not combined:
                metrics[names["replies"]] = 0  # every hospital failed or none replied
            if self.log_per_hospital:
                for hospital, values in per_hospital.items():
                    for key, value in values.items():
                        if key in _HOSPITAL_NAMES:
                            metrics[f"hospital_{hospital}/{_HOSPITAL_NAMES[key]}"] = value
        spent = self.client_level_privacy() if self.client_level_privacy else None
        if spent is not None and spent.num_releases > 0:
            metrics.update({"privacy/client_level_epsilon": spent.epsilon,
                            "privacy/client_level_delta": spent.delta,
                            "privacy/client_level_releases": spent.num_releases})
        sent, received, errors = self.grid.take_counts()
        metrics.update({"comm/bytes_sent": sent, "comm/bytes_received": received,
                        "round/error_replies": errors})
        central = {}
        if self.central_evaluate is not None:
            central = self.central_evaluate(arrays)
            metrics.update({f"central/{k}": v for k, v in central.items()})
        now = time.perf_counter()
        metrics["round/seconds"] = now - self._round_started
        self._round_started = now
        self.tracker.log_round(server_round, metrics)
        return MetricRecord(central) if central else None
