"""Typed settings of run tracking: where MLflow keeps the run, and what is logged."""

from __future__ import annotations

import re
from dataclasses import dataclass

from clinical_fl.settings.checks import require

# What MLflow's registry accepts (mlflow/utils/validation.py): a model name without '/' or ':'
# (kept to plain characters here, so that models:/<name>@<alias> needs no quoting), an alias of
# word characters and '-' that is neither 'latest' (reserved: models:/<name>/latest is the
# newest version) nor v<number> (a version).
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ALIAS = re.compile(r"^[A-Za-z0-9_-]+$")
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


@dataclass
class TrackingSettings:
    # None: SQLite store and artifacts under mlruns/ at the project root.
    uri: str | None = None
    experiment: str = "clinical-fl"
    # None: a name made from the run's settings, e.g. fedavg-dp_sgd-eps8-r4
    # (clinical_fl/tracking/run_names.py).
    run_name: str | None = None
    log_per_hospital: bool = True
    save_adapter: bool = True
    # The MLflow Model of a run that finishes is registered under this name (None: not
    # registered), and the alias moves to its version: models:/<name>@<alias> is always the
    # latest finished run's model. A failed run moves nothing.
    registered_model: str | None = "clinical-fl-note-classifier"
    model_alias: str = "current"
    # CPU, memory, disk and network of the server's machine as system/* metrics, sampled
    # every this many seconds (needs psutil; None: not logged).
    system_metrics_interval_s: float | None = 10.0
    # Set by a sweep (clinical-fl -m): the MLflow parent run and the sweep's name.
    parent_run_id: str | None = None
    sweep: str | None = None

    def __post_init__(self) -> None:
        if self.registered_model is not None:
            require(bool(_MODEL_NAME.match(self.registered_model)), "tracking.registered_model",
                    self.registered_model, "letters, digits, '_', '.' or '-' (or null: the "
                    "model is not registered)")
        require(bool(_ALIAS.match(self.model_alias))
                and not _RESERVED_ALIAS.match(self.model_alias), "tracking.model_alias",
                self.model_alias, "letters, digits, '_' or '-', neither 'latest' nor v<number> "
                "(MLflow reserves both)")
        if self.system_metrics_interval_s is not None:
            require(self.system_metrics_interval_s >= 1, "tracking.system_metrics_interval_s",
                    self.system_metrics_interval_s, "at least 1 second, or null (not logged)")
