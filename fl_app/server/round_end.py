"""The server's end of a round: everything it knows about the round, gathered and logged.

Flower calls ``evaluate_fn(round, arrays)`` once before the first round and after every
round; a ``RoundEnd`` is that function. It collects the aggregated train and evaluation
metrics, per-hospital values, bytes on the wire and wall time, runs the optional
centralized evaluation, hands the round to the checkpointer
(``fl_app/server/round_checkpointer.py``), and logs the figures at step = round under the
names of ``clinical_fl/tracking/round_log.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import PrivacySpent

from clinical_fl.protocol import messages as m
from clinical_fl.tracking.per_class import per_class_metrics
from clinical_fl.tracking.round_log import EVAL_NAMES, HOSPITAL_NAMES, TRAIN_NAMES, mlflow_metrics
from clinical_fl.tracking.run_tracker import RunTracker
from fl_app.server.grids.metered import MeteredGrid
from strategies.metric_rules import MetricRules
from strategies.update_check import Rejection

CentralEvaluate = Callable[[ArrayRecord], dict[str, float | list[int]]]
# Per-class counts a central evaluation may add (consumed here, not logged as such).
CENTRAL_COUNTS = ("true_positives", "false_positives", "false_negatives")
ClientLevelPrivacy = Callable[[], PrivacySpent | None]
Checkpoint = Callable[[int, ArrayRecord, dict[str, float]], None]


class RoundEnd:
    """Flower's ``evaluate_fn``: called once before the first round and after every round."""


    def __init__(self, tracker: RunTracker, grid: MeteredGrid, train_rules: MetricRules,
                 evaluate_rules: MetricRules, central_evaluate: CentralEvaluate | None,
                 log_per_hospital: bool = True,
                 client_level_privacy: ClientLevelPrivacy | None = None,
                 round_extras: Callable[[], dict[str, float]] | None = None,
                 evaluate_due: Callable[[int], bool] = lambda _: True,
                 checks: Callable[[], tuple[list[Rejection], float | None]] | None = None,
                 checkpoint: Checkpoint | None = None,
                 labels: Sequence[str] | None = None) -> None:
        """``round_extras``: more of the round's figures (secure aggregation's bytes and
        times), taken once per round. ``evaluate_due``: whether a round is evaluated (federated
        and central); the others log their training figures only. ``checks``: the
        update checks' round (replies left out, largest accepted update norm).
        ``checkpoint``: called with the round's arrays and figures before they are logged
        (fl_app/server/round_checkpointer.py). ``labels``: the label set, for per-class recall
        and F1 (clinical_fl/tracking/per_class.py)."""
        self.tracker = tracker
        self.grid = grid
        self.train_rules = train_rules
        self.evaluate_rules = evaluate_rules
        self.central_evaluate = central_evaluate
        self.log_per_hospital = log_per_hospital
        self.client_level_privacy = client_level_privacy
        self.round_extras = round_extras
        self.evaluate_due = evaluate_due
        self.checks = checks
        self.checkpoint = checkpoint
        self.labels = list(labels or [])
        self.latest_arrays: ArrayRecord | None = None  # the global adapter last evaluated
        self._round_started = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.latest_arrays = arrays
        metrics: dict[str, float] = {}
        for rules, names in ((self.train_rules, TRAIN_NAMES),
                             (self.evaluate_rules, EVAL_NAMES)):
            combined, per_hospital = rules.take()
            metrics.update(mlflow_metrics(combined, names))
            if self.labels and all(key in combined for key in m.COUNT_KEYS):
                metrics.update(per_class_metrics(
                    "federated", self.labels, *(combined[key] for key in m.COUNT_KEYS)))
            evaluated = names is TRAIN_NAMES or self.evaluate_due(server_round)
            if server_round > 0 and not combined and evaluated:
                metrics[names[m.REPLIES]] = 0  # every hospital failed or none replied
            if self.log_per_hospital:
                for hospital, values in per_hospital.items():
                    for key, value in values.items():
                        if HOSPITAL_NAMES[key] is not None:
                            metrics[f"hospital_{hospital}/{HOSPITAL_NAMES[key]}"] = value
        spent = self.client_level_privacy() if self.client_level_privacy else None
        if spent is not None and spent.num_releases > 0:
            metrics.update({"privacy/client_level_epsilon": spent.epsilon,
                            "privacy/client_level_delta": spent.delta,
                            "privacy/client_level_releases": spent.num_releases})
        sent, received, errors = self.grid.take_counts()
        metrics.update({"comm/bytes_sent": sent, "comm/bytes_received": received,
                        "round/error_replies": errors})
        if self.round_extras is not None:
            metrics.update(self.round_extras())
        rejected, largest = self.checks() if self.checks is not None else ([], None)
        metrics["round/rejected_replies"] = len(rejected)
        if largest is not None:  # what update_checks.max_update_norm is set against
            metrics["round/update_norm_max"] = largest
        central = {}
        if self.central_evaluate is not None and self.evaluate_due(server_round):
            central = dict(self.central_evaluate(arrays))
            counts = [central.pop(key, None) for key in CENTRAL_COUNTS]
            metrics.update({f"central/{k}": v for k, v in central.items()})
            if self.labels and all(c is not None for c in counts):
                metrics.update(per_class_metrics("central", self.labels, *counts))
        now = time.perf_counter()
        metrics["round/seconds"] = now - self._round_started
        self._round_started = now
        if self.checkpoint is not None:
            self.checkpoint(server_round, arrays, metrics)
        self.tracker.log_round(server_round, metrics)
        if rejected:  # which hospital, and why: one record per round that rejected any
            self.tracker.log_text(json.dumps([asdict(r) for r in rejected], indent=1),
                                  f"rejections/round_{server_round:04d}.json")
        return MetricRecord(central) if central else None
