"""Hydra callbacks that group a sweep in MLflow, and report accuracy against epsilon.

    clinical-fl -m strategy=fedavg,fedprox          # any sweep: one parent run
    clinical-fl -m +sweep=epsilon                   # and the accuracy-against-epsilon report

Every multirun gets one MLflow parent run (``SweepParentRun``, from ``conf/config.yaml``'s
``hydra.callbacks``), tagged ``kind=sweep`` and ``sweep.varies`` (the keys the sweep varies);
every job's federated run is nested under it and named by what it varies. A sweep that varies
privacy, or ``+sweep=epsilon`` (``PrivacySweepReport``, from ``conf/sweep/epsilon.yaml``),
gets ``kind=privacy-sweep`` and, at the end, ``privacy_sweep.csv``, ``privacy_sweep.md`` and
``accuracy_vs_epsilon.png`` in the sweep's output folder and on the parent run.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from clinical_fl.settings.tracking import TrackingSettings
from clinical_fl.tracking.paths import project_root
from clinical_fl.tracking.run_tracker import SWEEP_VARIES_TAG, experiment_id
from clinical_fl.tracking.sweep_report import collect_sweep, plot_accuracy_vs_epsilon, write_table

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "CLINICAL_FL_SWEEP_PARENT_RUN"
SWEEP_NAME_ENV = "CLINICAL_FL_SWEEP_NAME"
FAILED_JOBS: list[str] = []  # jobs of this process whose flwr run did not complete
SWEEP, PRIVACY_SWEEP = "sweep", "privacy-sweep"  # the parent run's kind tag
# The callback that opened this process's sweep parent run (one sweep at a time: Hydra runs
# every callback of a multirun; the first opens the run, the others join it).
_OPEN: list[SweepParentRun] = []


def _tracking(config: DictConfig) -> TrackingSettings:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrackingSettings),
                                               config.tracking))


def varied_keys(config: DictConfig) -> list[str]:
    """The keys a multirun varies (more than one value), as Hydra's basic sweeper reads them:
    the sweep preset's ``hydra.sweeper.params``, then the command line's, a later one of a
    key replacing an earlier."""
    params = [f"{key}={value}"
              for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    final: dict[str, bool] = {}
    for override in OverridesParser.create().parse_overrides(
            params + list(config.hydra.overrides.task)):
        sweeps = override.is_sweep_override()
        if sweeps and override.is_discrete_sweep():  # key=a is no sweep, nor is key=a,a
            sweeps = len(set(override.sweep_string_iterator())) > 1
        final[override.get_key_element().lstrip("+~")] = sweeps
    return [key for key, sweeps in final.items() if sweeps]


def varies_privacy(keys: list[str]) -> bool:
    return any(key == "privacy" or key.startswith("privacy.") for key in keys)


class SweepParentRun(Callback):
    """One MLflow parent run per multirun (``kind=sweep``); the privacy report where the
    sweep varies privacy."""

    privacy_report = False  # PrivacySweepReport: the report whatever the sweep varies

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _OPEN:  # another callback of this sweep opened the parent run: join it
            owner = _OPEN[0]
            if self.privacy_report and not owner.report:
                owner.report = True
                MlflowClient(owner.tracking_uri).set_tag(owner.parent_run_id, "kind",
                                                         PRIVACY_SWEEP)
            return
        FAILED_JOBS.clear()
        settings = _tracking(config)
        self.experiment_id = experiment_id(settings, project_root())
        self.tracking_uri = mlflow.get_tracking_uri()
        self.varied = varied_keys(config)
        self.report = self.privacy_report or varies_privacy(self.varied)
        kind = PRIVACY_SWEEP if self.report else SWEEP
        name = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = MlflowClient(self.tracking_uri).create_run(
            self.experiment_id, run_name=name,
            tags={"sweep": name, "kind": kind, SWEEP_VARIES_TAG: ",".join(self.varied),
                  "sweep.overrides": " ".join(config.hydra.overrides.task)[:5000]})
        self.parent_run_id = run.info.run_id
        os.environ[PARENT_RUN_ENV], os.environ[SWEEP_NAME_ENV] = run.info.run_id, name
        _OPEN.append(self)
        log.info("sweep %s (varies %s): MLflow parent run %s", name,
                 ", ".join(self.varied) or "nothing", run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not _OPEN or _OPEN[0] is not self:
            return  # the callback that opened the parent run closes it
        _OPEN.clear()
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(SWEEP_NAME_ENV, None)
        client = MlflowClient(self.tracking_uri)
        try:
            if self.report:
                self._write_report(client, Path(config.hydra.sweep.dir))
        finally:
            client.set_terminated(self.parent_run_id,
                                  "FAILED" if FAILED_JOBS else "FINISHED")
        print(f"sweep: MLflow parent run {self.parent_run_id}")
        if FAILED_JOBS:
            sys.exit("error: runs that did not complete: " + "; ".join(FAILED_JOBS))

    def _write_report(self, client: MlflowClient, out: Path) -> None:
        rows = collect_sweep(client, self.experiment_id, self.parent_run_id)
        csv_path, md_path = write_table(rows, out)
        png = plot_accuracy_vs_epsilon(rows, out / "accuracy_vs_epsilon.png")
        for path in (csv_path, md_path, png):
            if path is not None:
                client.log_artifact(self.parent_run_id, str(path))
        print(md_path.read_text(), end="")
        print(f"privacy sweep report: {out} (MLflow parent run {self.parent_run_id})")


class PrivacySweepReport(SweepParentRun):
    """``+sweep=epsilon``: the parent run gets the accuracy-against-epsilon report even when
    the command line fixes the one privacy level."""

    privacy_report = True
