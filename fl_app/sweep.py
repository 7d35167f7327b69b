"""Hydra callback that groups a privacy sweep in MLflow and reports accuracy against epsilon.

    clinical-fl -m +sweep=epsilon

On start it opens one MLflow parent run; every job's federated run is nested
under it. At the end it writes ``privacy_sweep.csv``, ``privacy_sweep.md`` and
``accuracy_vs_epsilon.png`` into the sweep's output folder and logs them to the
parent run.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from settings.tracking import TrackingSettings
from tracking.paths import project_root
from tracking.run_tracker import experiment_id
from tracking.sweep_report import collect_sweep, plot_accuracy_vs_epsilon, write_table

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "CLINICAL_FL_SWEEP_PARENT_RUN"
SWEEP_NAME_ENV = "CLINICAL_FL_SWEEP_NAME"
FAILED_JOBS: list[str] = []  # jobs of this process whose flwr run did not complete


def _tracking(config: DictConfig) -> TrackingSettings:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrackingSettings),
                                               config.tracking))


class PrivacySweepReport(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        settings = _tracking(config)
        self.experiment_id = experiment_id(settings, project_root())
        name = f"privacy-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        run = MlflowClient().create_run(self.experiment_id, run_name=name,
                                        tags={"sweep": name, "kind": "privacy-sweep"})
        self.parent_run_id = run.info.run_id
        os.environ[PARENT_RUN_ENV], os.environ[SWEEP_NAME_ENV] = run.info.run_id, name
        log.info("privacy sweep %s: MLflow parent run %s", name, run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        client = MlflowClient()
        rows = collect_sweep(client, self.experiment_id, self.parent_run_id)
        out = Path(config.hydra.sweep.dir)
        csv_path, md_path = write_table(rows, out)
        png = plot_accuracy_vs_epsilon(rows, out / "accuracy_vs_epsilon.png")
        for path in (csv_path, md_path, png):
            if path is not None:
                client.log_artifact(self.parent_run_id, str(path))
        print(md_path.read_text(), end="")
        print(f"privacy sweep report: {out} (MLflow parent run {self.parent_run_id})")
        client.set_terminated(self.parent_run_id, "FAILED" if FAILED_JOBS else "FINISHED")
        if FAILED_JOBS:
            sys.exit("error: runs that did not complete: " + "; ".join(FAILED_JOBS))
