"""``resume=<MLflow run id>``: find the run's last checkpoint and the configuration it ran with,
and refuse, before any round, whatever would make the resumed run not the same run.

The configuration is the first run's (its overrides are in the checkpoint) plus the
overrides given with ``resume=``; only the keys in ``MAY_CHANGE`` may end up different
(more rounds, a longer timeout, evaluation spacing, where checkpoints go, early stopping).
Anything else, including a changed default in ``conf/`` after an upgrade, is refused, naming
each key with the value it had and the one it would get.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.compose import compose_config, to_run_settings
from clinical_fl.settings.run import RunSettings
from clinical_fl.settings.train import LearningRateSchedule
from clinical_fl.tracking.run_tracker import flatten, resolve_store
from fl_app.server.round_checkpointer import ARTIFACT_PATH, state_root
from strategies.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    ServerCheckpoint,
    load_checkpoint,
)

log = logging.getLogger(__name__)

# Keys a resume may change: none of them changes what a round computes or what it costs a
# hospital's privacy budget (hospitals keep the first run's planned rounds and DP plan); the
# fault drill is a rehearsal, ended or changed at will.
MAY_CHANGE = ("num_rounds", "evaluate_every", "strategy.round_timeout_s", "checkpoint.dir",
              "checkpoint.log_artifact", "drill.faults", "resume",
              # what MLflow registers and samples, not what trains (new keys in runs
              # checkpointed before they existed)
              "tracking.registered_model", "tracking.model_alias",
              "tracking.system_metrics_interval_s",
              # when a non-private run stops and which of its adapters it keeps, not what a
              # round computes (never on in a private run; fl_app/server/early_stopping.py)
              "early_stopping")


@dataclass
class Resume:
    checkpoint: ServerCheckpoint
    cfg: DictConfig  # the configuration the resumed run runs with
    overrides: list[str]  # the overrides it is composed from (the first run's + allowed)
    changes: dict[str, tuple[str, str]]  # allowed key -> (before, now)


def config_tree(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def prepare_resume(settings: RunSettings, overrides: list[str], project_root: Path) -> Resume:
    """The checkpoint and configuration to resume ``settings.resume`` with; errors name the
    run, the file or the keys that are wrong."""
    run_id = str(settings.resume)
    uri, _ = resolve_store(settings.tracking, project_root)
    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException as err:
        raise CheckpointError(f"resume={run_id}: no MLflow run with this id in {uri} (give the "
                              "run id shown in the MLflow UI, and the same tracking.uri as the "
                              "run)") from err
    checkpoint = _find_checkpoint(settings, run_id, client, project_root)
    if checkpoint.mlflow_run_id != run_id:
        raise CheckpointError(f"resume={run_id}: the checkpoint found belongs to MLflow run "
                              f"{checkpoint.mlflow_run_id}")
    given = [o for o in overrides if o.split("=", 1)[0] != "resume"]
    wanted = [*checkpoint.overrides, *given]
    try:
        cfg = compose_config(wanted)
    except ConfigError as err:
        raise ConfigError(f"resume={run_id}: the run's configuration no longer composes "
                          f"({err})") from err
    before, now = flatten(checkpoint.config), flatten(config_tree(cfg))
    changed = {k: (before.get(k, "<absent>"), now.get(k, "<absent>"))
               for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)}
    refused = {k: v for k, v in changed.items() if not k.startswith(MAY_CHANGE)}
    if refused:
        listed = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in refused.items())
        raise ConfigError(f"resume={run_id}: the configuration would change ({listed}); a "
                          f"resumed run keeps its configuration except {list(MAY_CHANGE)}. "
                          "Start a new run to train with other settings.")
    resumed = to_run_settings(cfg)
    if "num_rounds" in changed and resumed.train.lr_schedule != LearningRateSchedule.constant:
        # The schedule's factors are planned over num_rounds: more rounds would raise the rate
        # of the rounds still to come.
        raise ConfigError(f"resume={run_id}: num_rounds may not change with train.lr_schedule="
                          f"{resumed.train.lr_schedule.value} (its learning rates are planned "
                          "over the first run's rounds); start a new run to train longer",
                          "num_rounds")
    if checkpoint.round >= resumed.num_rounds:
        raise ConfigError(f"resume={run_id}: the run completed round {checkpoint.round} of "
                          f"num_rounds={resumed.num_rounds}; nothing to resume (to train more, "
                          f"give num_rounds above {checkpoint.round})")
    return Resume(checkpoint, cfg, wanted, changed)


def _find_checkpoint(settings: RunSettings, run_id: str, client: MlflowClient,
                     project_root: Path) -> ServerCheckpoint:
    """The state directory's checkpoint; if that folder is gone, the MLflow artifact's."""
    path = state_root(settings.checkpoint, settings.tracking, project_root) / run_id / \
        CHECKPOINT_FILE
    if path.is_file():
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            raise CheckpointError(
                f"resume={run_id}: {err}. The run's MLflow artifact {ARTIFACT_PATH}/"
                f"{CHECKPOINT_FILE} holds a copy (of the same or the previous round): move "
                f"{path} away to resume from it") from err
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, f"{ARTIFACT_PATH}/{CHECKPOINT_FILE}", tmp)
        except (MlflowException, OSError) as err:
            raise CheckpointError(
                f"resume={run_id}: no checkpoint at {path} and none logged to MLflow "
                f"({type(err).__name__}); the run was started before checkpoints existed, or "
                "its state directory was removed (checkpoint.dir names another)") from err
        log.warning("resume=%s: no checkpoint at %s; resuming from the MLflow artifact",
                    run_id, path)
        return load_checkpoint(Path(local))
