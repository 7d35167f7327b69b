"""Where the server keeps its checkpoints, and the per-round hook that writes them.

Called by the round's end (``RoundEnd``, ``fl_app/server/round_end.py``) after a round's
figures are computed and before they go to MLflow: the checkpoint holds the figures too, so a
crash between the two steps is healed on resume (the figures are logged from the checkpoint),
and every round is logged once.
Early stopping sees the round first (``RoundCheckpointer.early_stopping``), so the checkpoint
carries its decision: the best round, its adapter and the evaluations since it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from clinical_fl.settings.recovery import CheckpointSettings
from clinical_fl.settings.tracking import TrackingSettings
from clinical_fl.tracking.run_tracker import RunTracker, resolve_store
from strategies.checkpoint import ServerCheckpoint, save_checkpoint
from strategies.privacy_budget import PrivacyBudgetGate
from strategies.strategy_state import strategy_state
from strategies.update_check import UpdateCheck

if TYPE_CHECKING:
    from fl_app.server.early_stopping import EarlyStopping

log = logging.getLogger(__name__)

STATE_DIR = "server-state"
ARTIFACT_PATH = "checkpoint"


def state_root(checkpoint: CheckpointSettings, tracking: TrackingSettings,
               project_root: Path) -> Path:
    """The folder holding one sub-folder of server state per MLflow run."""
    if checkpoint.dir:
        return Path(checkpoint.dir).expanduser().resolve()
    uri, _ = resolve_store(tracking, project_root)
    if uri.startswith("sqlite:///"):  # beside the store's database and artifacts
        return Path(uri.removeprefix("sqlite:///")).parent / STATE_DIR
    return project_root / "mlruns" / STATE_DIR


class RoundCheckpointer:
    """``(round, global arrays, the round's metrics) -> None``: writes the checkpoint."""

    def __init__(self, directory: Path, tracker: RunTracker, template: ServerCheckpoint,
                 strategy: Strategy, gate: PrivacyBudgetGate, check: UpdateCheck,
                 hospital_of: Callable[[int], int], log_artifact: bool) -> None:
        self.directory = directory
        self.tracker = tracker
        self.template = template  # what does not change from round to round
        self.strategy = strategy
        self.gate = gate
        self.check = check
        self.hospital_of = hospital_of
        self.log_artifact = log_artifact
        # Set by the ServerApp when early stopping is on: shown every round before it is
        # checkpointed (fl_app/server/early_stopping.py).
        self.early_stopping: EarlyStopping | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord,
                 metrics: dict[str, float]) -> None:
        stopping = self.early_stopping
        if stopping is not None:
            stopping.observe(server_round, arrays, metrics)
        strategy_arrays, state = strategy_state(self.strategy)
        checkpoint = replace(
            self.template, round=server_round,
            arrays={k: v.numpy() for k, v in arrays.items()},
            strategy_arrays=strategy_arrays, strategy_state=state,
            excluded={self.hospital_of(node): why for node, why in self.gate.exhausted.items()},
            rejections=dict(self.check.rejected_total), metrics=dict(metrics),
            history={**self.tracker.history, server_round: dict(metrics)},
            early_stopping=stopping.state() if stopping is not None else {},
            best_arrays=stopping.best_arrays(server_round) if stopping is not None else {})
        path = save_checkpoint(checkpoint, self.directory)
        if self.log_artifact:
            self.tracker.log_artifact(path, ARTIFACT_PATH)
        log.debug("round %d checkpointed to %s", server_round, path)
