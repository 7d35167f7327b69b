"""Early stopping: a non-private run ends when the federated validation score stops improving,
and its best round's global adapter is the run's model.

``clinical_fl/settings/early_stopping.py`` holds the settings and why they are what they are. Here:

- ``observe`` sees every round's figures, as the round's end (``fl_app/server/round_end.py``)
  computed them, before the round's checkpoint is written (``fl_app/server/round_checkpointer.py``
  calls it), so the checkpoint carries the best round, its score, its adapter and the
  evaluations since it;
- only rounds whose figures hold the metric count (evaluated rounds; round 0, the untrained
  adapter, is neither a candidate nor counted), and a NaN (a withheld score) does not count;
- an improvement is a score above the best so far by more than ``min_delta``; after
  ``patience`` evaluations in a row without one, the run stops after that round: the
  evaluate function Flower calls after each round raises ``EarlyStopped`` once the round is
  logged and printed, a ``TrainingStopped`` that the ServerApp already ends Flower's loop on
  (tagging ``stopped_early`` with the reason). The last planned round never stops the run
  early: it ends anyway;
- at the end, the MLflow tag ``best_round`` and the metric ``best/<metric>`` (at the best
  round's step), and the best round's adapter is the one saved.

Off in a private run (clinical_fl/settings/run.py refuses it there), for two reasons: the noise is
calibrated for the planned rounds; and although choosing among released adapters is
post-processing of them, the scores that would choose come from the hospitals' held-out
notes, which no epsilon of this product covers, so the choice would release something outside
the privacy analysis. A private run keeps its last round's adapter, as before.

Resume: the checkpoint carries the state, so a resumed run goes on with the best round and
the count it had. A run that had stopped early and is resumed unchanged trains until its next
evaluation and stops again unless the score improved there; a larger
``early_stopping.patience`` (or ``enabled=false``) trains on. A checkpoint written without
this state (before early stopping existed, or with it off), or one that followed another
metric, restarts the tracking from the resumed round: the rounds before it are not
candidates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from flwr.app import Array, ArrayRecord, MetricRecord

from clinical_fl.settings.early_stopping import EarlyStoppingSettings
from clinical_fl.settings.run import RunSettings
from clinical_fl.tracking.run_tracker import RunTracker
from strategies.checkpoint import ServerCheckpoint
from strategies.privacy_budget import TrainingStopped

log = logging.getLogger(__name__)

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
BEST_ROUND_TAG = "best_round"


class EarlyStopped(TrainingStopped):
    """The validation score stopped improving: training ends, cleanly, after this round."""


@dataclass
class BestRound:
    round: int
    value: float
    arrays: ArrayRecord  # the global adapter after that round


class EarlyStopping:
    def __init__(self, settings: EarlyStoppingSettings, num_rounds: int) -> None:
        self.metric = settings.metric
        self.patience = settings.patience
        self.min_delta = settings.min_delta
        self.num_rounds = num_rounds
        self.best: BestRound | None = None
        self.stale = 0  # evaluations since the best without an improvement
        self.reason: str | None = None  # set by the round that stops the run

    @classmethod
    def for_run(cls, settings: RunSettings,
                checkpoint: ServerCheckpoint | None = None) -> EarlyStopping | None:
        """The run's early stopping (None: off), with a resumed run's state put back."""
        if not settings.early_stopping.enabled:
            return None
        stopping = cls(settings.early_stopping, settings.num_rounds)
        if checkpoint is not None:
            stopping.restore(checkpoint)
        return stopping

    def observe(self, server_round: int, arrays: ArrayRecord,
                metrics: Mapping[str, float]) -> None:
        """A round's figures (before its checkpoint); decides whether the run stops after it."""
        self.reason = None
        value = metrics.get(self.metric)
        if server_round == 0 or value is None or not math.isfinite(value):
            return  # not evaluated, withheld, or the untrained adapter
        if self.best is None or value > self.best.value + self.min_delta:
            self.best, self.stale = BestRound(server_round, float(value), arrays), 0
            return
        self.stale += 1
        if self.stale >= self.patience and server_round < self.num_rounds:
            self.reason = (
                f"early stopping: {self.metric} did not improve by more than {self.min_delta}"
                f" for {self.stale} evaluation{'s' if self.stale != 1 else ''}; best round "
                f"{self.best.round} ({self.best.value:.3f}), stopped after round {server_round} "
                f"of {self.num_rounds}")

    def stop_after(self, evaluate: EvaluateFn) -> EvaluateFn:
        """Flower's evaluate function, which ends the loop once a round decided to stop
        (after the round is logged, checkpointed and printed)."""
        def evaluate_then_stop(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            result = evaluate(server_round, arrays)
            if self.reason:
                raise EarlyStopped(self.reason)
            return result
        return evaluate_then_stop

    def final_arrays(self, last: ArrayRecord) -> ArrayRecord:
        """The run's model: the best round's adapter (``last`` when no round was scored)."""
        return self.best.arrays if self.best is not None else last

    def record(self, tracker: RunTracker) -> None:
        """The best round as the MLflow tag ``best_round`` and the metric ``best/<metric>``."""
        if self.best is None:
            log.warning("early stopping: no round was scored by %s; the last round's adapter "
                        "is kept", self.metric)
            return
        tracker.set_tags({BEST_ROUND_TAG: str(self.best.round)})
        tracker.log_round(self.best.round, {f"best/{self.metric}": self.best.value})
        log.info("best round %d (%s %.3f): its adapter is the run's model", self.best.round,
                 self.metric, self.best.value)

    # -- the checkpoint's share --------------------------------------------------------------

    def state(self) -> dict:
        """What the checkpoint's JSON carries."""
        best = self.best
        return {"metric": self.metric, "stale": self.stale,
                "best_round": best.round if best else None,
                "best_value": best.value if best else None}

    def best_arrays(self, server_round: int) -> dict:
        """The best adapter's arrays for the checkpoint; none when it is the round's own
        (the checkpoint holds those already)."""
        if self.best is None or self.best.round == server_round:
            return {}
        return {k: v.numpy() for k, v in self.best.arrays.items()}

    def restore(self, checkpoint: ServerCheckpoint) -> None:
        """A resumed run's state, from its checkpoint (see the module's docstring)."""
        state = checkpoint.early_stopping
        after = checkpoint.round
        if not state or state.get("metric") != self.metric:
            log.info("early stopping: tracking %s from round %d on (the checkpoint holds "
                     "no best round%s)", self.metric, after + 1,
                     f" of {self.metric}" if state else "")
            return
        best_round = state.get("best_round")
        if best_round is None:
            return
        arrays = checkpoint.best_arrays or (checkpoint.arrays if best_round == after else {})
        if not arrays:
            log.warning("early stopping: the checkpoint names best round %d without its "
                        "adapter; tracking %s from round %d on", best_round, self.metric,
                        after + 1)
            return
        self.best = BestRound(int(best_round), float(state["best_value"]),
                              ArrayRecord({k: Array(v) for k, v in arrays.items()}))
        self.stale = int(state.get("stale", 0))
        log.info("early stopping: best round so far %d (%s %.3f), %d evaluation(s) since",
                 self.best.round, self.metric, self.best.value, self.stale)
        if self.stale >= self.patience:
            log.warning("early stopping: the run had stopped after round %d (%d evaluations "
                        "without improvement, patience %d); it stops again at its next "
                        "evaluation unless %s improves (early_stopping.patience above %d "
                        "trains on)", after, self.stale, self.patience, self.metric,
                        self.stale)
