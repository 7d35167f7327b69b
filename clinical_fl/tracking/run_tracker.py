"""MLflow tracking of a federated run: one MLflow run per federated run, one step per round.

What a run gets beside its rounds' metrics: a name from its settings when none is given
(clinical_fl/tracking/run_names.py), the git commit of the checkout and the Flower run and app
bundle as tags (clinical_fl/tracking/provenance.py), the settings that take effect as params
(clinical_fl/tracking/params.py), the hospitals' and the server's data as dataset inputs
(clinical_fl/tracking/datasets.py), system metrics where psutil is installed, and, when it
finishes, its MLflow Model registered with the alias moved to it. ``RunTracker.summary`` is
all a closing report needs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clinical_fl.settings.tracking import TrackingSettings
from clinical_fl.tracking.datasets import HospitalCounts, Records, run_datasets
from clinical_fl.tracking.params import run_params
from clinical_fl.tracking.plots import plot_rounds
from clinical_fl.tracking.provenance import FlowerRun, git_tags
from clinical_fl.tracking.run_names import default_run_name, sweep_job_name

if TYPE_CHECKING:
    from mlflow.data.dataset import Dataset
    from mlflow.models.model import ModelInfo

    from clinical_fl.settings.data import DataSettings
    from clinical_fl.settings.run import RunSettings

log = logging.getLogger(__name__)

STORE_DIR = "mlruns"
CONFIG_ARTIFACT = "config/resolved_config.yaml"
# Tags of a finished run whose model was registered: models:/<name>/<version> (this run's
# version, for good), the name, the version, and the alias it was given (which moves on to
# later runs' versions); or why the registry refused. On a sweep's parent run: the keys the
# sweep varies.
REGISTERED_MODEL_TAG = "registered_model"
MODEL_NAME_TAG = "registered_model.name"
MODEL_VERSION_TAG = "registered_model.version"
MODEL_ALIAS_TAG = "registered_model.alias"
REGISTERED_MODEL_ERROR_TAG = "registered_model.error"
SWEEP_VARIES_TAG = "sweep.varies"
DB_FILE = "mlflow.db"
ARTIFACT_DIR = "artifacts"


def default_store(project_root: Path) -> tuple[str, str]:
    """(tracking URI, artifact location) of the SQLite store under ``<root>/mlruns/``.

    Absolute paths on purpose: the ServerApp does not run in the user's directory.
    """
    store = (project_root / STORE_DIR).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / DB_FILE}", (store / ARTIFACT_DIR).as_uri()


def flatten(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config to MLflow params: dotted keys, values as text."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)
    return flat


def resolve_store(settings: TrackingSettings, project_root: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment) from the settings."""
    if settings.uri and settings.uri.startswith("sqlite:///"):
        # Artifacts beside the database, never relative to the working directory.
        db = Path(settings.uri.removeprefix("sqlite:///"))
        db = db if settings.uri.startswith("sqlite:////") else db.resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{db}", (db.parent / ARTIFACT_DIR).as_uri()
    if settings.uri:
        return settings.uri, None  # a tracking server decides
    return default_store(project_root)


def experiment_id(settings: TrackingSettings, project_root: Path) -> str:
    """Point MLflow at the configured store; the experiment's id, created if needed."""
    uri, artifact_location = resolve_store(settings, project_root)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(settings.experiment)
    return (experiment.experiment_id if experiment else
            mlflow.create_experiment(settings.experiment, artifact_location=artifact_location))


@dataclass(frozen=True)
class RunSummary:
    """What a closing report prints about a run (``RunTracker.summary``)."""

    run_id: str
    run_name: str
    experiment_name: str
    experiment_id: str
    tracking_uri: str
    status: str  # RUNNING while the run is open, then FINISHED or FAILED
    registered_model: str | None = None  # None: not registered (not finished, or switched off)
    model_version: str | None = None
    model_alias: str | None = None

    @property
    def model_uri(self) -> str | None:
        """``models:/<name>@<alias>``: the latest finished run's model (None: not registered)."""
        if self.registered_model is None or self.model_alias is None:
            return None
        return f"models:/{self.registered_model}@{self.model_alias}"


class RunTracker:
    """Opens the MLflow run on enter and always closes it: FINISHED, or FAILED on a crash."""

    def __init__(self, settings: TrackingSettings, project_root: Path,
                 resume_run_id: str | None = None, *, run_settings: RunSettings | None = None,
                 overrides: Sequence[str] = (), flower: FlowerRun | None = None) -> None:
        """``resume_run_id``: continue this run (a resumed federated run) instead of a new one.
        ``run_settings`` and ``overrides``: what names a run without ``tracking.run_name``.
        ``flower``: the Flower run and app bundle, for the tags that join MLflow and Flower."""
        self.settings = settings
        self.project_root = project_root
        self.experiment_id = experiment_id(settings, project_root)
        self.uri = mlflow.get_tracking_uri()
        self.history: dict[int, dict[str, float]] = {}
        self.run_id: str | None = resume_run_id
        self.run_settings = run_settings
        self.overrides = list(overrides)
        self.flower = flower
        self.status = "RUNNING"
        self.model_version: str | None = None  # set when the finished run's model is registered
        self._run_name: str | None = None
        self._model_uri: str | None = None  # the MLflow Model this run logged
        self._monitor = None  # mlflow's SystemMetricsMonitor, while the run is open
        self._provenance: dict[str, str] = {}  # git and Flower tags, found on enter
        self._logged_params: dict[str, str] | None = None  # a resumed run's, before resuming

    # What a summary needs; every name stays valid after the run is closed.
    @property
    def run_name(self) -> str | None:
        return self._run_name

    @property
    def experiment_name(self) -> str:
        return self.settings.experiment

    @property
    def tracking_uri(self) -> str:
        return self.uri

    @property
    def registered_model(self) -> str | None:
        """The registry name this run's model was registered under (None: not registered)."""
        return self.settings.registered_model if self.model_version else None

    @property
    def model_alias(self) -> str | None:
        return self.settings.model_alias if self.model_version else None

    @property
    def summary(self) -> RunSummary:
        return RunSummary(run_id=self.run_id or "", run_name=self._run_name or "",
                          experiment_name=self.experiment_name,
                          experiment_id=self.experiment_id, tracking_uri=self.uri,
                          status=self.status, registered_model=self.registered_model,
                          model_version=self.model_version, model_alias=self.model_alias)

    def __enter__(self) -> RunTracker:
        client = MlflowClient(self.uri)
        self._provenance = self._provenance_tags()
        if self.run_id:
            run = mlflow.start_run(run_id=self.run_id)
            self._logged_params = dict(run.data.params)
            self._run_name = run.info.run_name
            # A resumed run keeps the tags of its first Flower run; runs from before these
            # tags existed get them now.
            missing = {k: v for k, v in self._provenance.items() if k not in run.data.tags}
            if missing:
                mlflow.set_tags(missing)
            self._start_system_metrics(resumed=True)
            log.info("MLflow run %s in %s, resumed", self.run_id, self.uri)
            return self
        tags = dict(self._provenance)
        if self.settings.parent_run_id:
            # A run started by a sweep is nested under the sweep's parent run in the MLflow UI.
            tags.update({"mlflow.parentRunId": self.settings.parent_run_id,
                         "sweep": self.settings.sweep or ""})
        run = mlflow.start_run(experiment_id=self.experiment_id, run_name=self._name(client),
                               tags=tags)
        self.run_id, self._run_name = run.info.run_id, run.info.run_name
        self._start_system_metrics(resumed=False)
        log.info("MLflow run %s (%s) in %s", self.run_id, self._run_name, self.uri)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop_system_metrics()
        if exc is not None:
            mlflow.set_tag("failure", f"{exc_type.__name__}: {exc}"[:5000])
            mlflow.end_run(status="FAILED")
            self.status = "FAILED"
            return
        try:
            self._register_model()
        finally:
            mlflow.end_run(status="FINISHED")
            self.status = "FINISHED"

    def _name(self, client: MlflowClient) -> str | None:
        """``tracking.run_name``, else one made from the settings (None: MLflow picks one)."""
        if self.settings.run_name:
            return self.settings.run_name
        if self.run_settings is None:
            return None
        varied: list[str] = []
        if self.settings.parent_run_id:
            try:
                parent = client.get_run(self.settings.parent_run_id)
                varied = [k for k in parent.data.tags.get(SWEEP_VARIES_TAG, "").split(",") if k]
            except MlflowException as err:
                log.warning("sweep parent run %s: %s", self.settings.parent_run_id, err)
        if varied:
            return sweep_job_name(self.run_settings, self.overrides, varied)
        return default_run_name(self.run_settings)

    def _provenance_tags(self) -> dict[str, str]:
        tags = git_tags(self.project_root)
        if self.flower is not None:
            tags.update(self.flower.tags())
        return tags

    def _start_system_metrics(self, resumed: bool) -> None:
        """CPU, memory, disk and network as system/* metrics, every
        ``tracking.system_metrics_interval_s`` (MLflow's monitor, on its own thread)."""
        interval = self.settings.system_metrics_interval_s
        if interval is None or importlib.util.find_spec("psutil") is None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval,
                                           resume_logging=resumed, tracking_uri=self.uri)
            monitor.start()
        except Exception as err:  # monitoring is never a reason to fail a run
            log.warning("system metrics are not logged: %s", err)
            return
        self._monitor = monitor

    def _stop_system_metrics(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    def model_logged(self, model: ModelInfo) -> None:
        """The run's MLflow Model (clinical_fl/serving/pyfunc.py::log_note_model's answer):
        registered when the run finishes."""
        self._model_uri = model.model_uri

    def _register_model(self) -> None:
        """Register this run's model and move the alias to its version. A registry that
        refuses (a tracking server without one) leaves the run FINISHED, the reason in the tag
        ``registered_model.error``."""
        name, alias = self.settings.registered_model, self.settings.model_alias
        if not name or not self._model_uri:
            return
        client = MlflowClient(self.uri)
        try:
            # The version carries the run's commit and Flower run too.
            # MLflow prints two lines of its own to stderr here; the log line below says it
            with contextlib.redirect_stderr(io.StringIO()):
                version = mlflow.register_model(self._model_uri, name, tags=self._provenance)
            client.set_registered_model_alias(name, alias, version.version)
        except Exception as err:  # the training finished: that stands
            log.warning("model not registered as %s: %s: %s", name, type(err).__name__, err)
            mlflow.set_tag(REGISTERED_MODEL_ERROR_TAG, f"{type(err).__name__}: {err}"[:5000])
            return
        self.model_version = str(version.version)
        mlflow.set_tags({REGISTERED_MODEL_TAG: f"models:/{name}/{self.model_version}",
                         MODEL_NAME_TAG: name, MODEL_VERSION_TAG: self.model_version,
                         MODEL_ALIAS_TAG: alias})
        log.info("model registered: models:/%s/%s, alias %s", name, self.model_version, alias)

    def log_config(self, config: Mapping, yaml_text: str) -> None:
        """The settings that take effect as params (clinical_fl/tracking/params.py), from the
        resolved configuration as a nested dict; the whole of it, as YAML, as the artifact
        ``config/resolved_config.yaml``."""
        self.log_params(run_params(config))
        self.log_text(yaml_text, CONFIG_ARTIFACT)

    def log_datasets(self, datasets: Sequence[tuple[Dataset, str]]) -> None:
        """Dataset inputs, each with its context (``training``, ``evaluation``)."""
        if datasets:
            mlflow.log_inputs(datasets=[d for d, _ in datasets],
                              contexts=[c for _, c in datasets], tags_list=[None] * len(datasets))

    def log_run_datasets(self, reports: Iterable[HospitalCounts], labels: Sequence[str],
                         data: DataSettings,
                         read_test_records: Callable[[], Records] | None = None) -> None:
        """Each hospital taking part (its preflight report's counts) and the server's test
        set as dataset inputs (clinical_fl/tracking/datasets.py). Metadata only: a failure is
        logged, and the run goes on."""
        try:
            self.log_datasets(run_datasets(reports, labels, data, read_test_records))
        except Exception as err:  # never a reason to stop a federated run
            log.warning("datasets not logged to MLflow: %s: %s", type(err).__name__, err)

    def log_params(self, params: Mapping) -> None:
        """In a resumed run, only params not logged before: MLflow refuses to change one (a
        resume's allowed changes are recorded in its ``resume/`` tags)."""
        flat = flatten(params)
        if self._logged_params is not None:
            flat = {k: v for k, v in flat.items() if k not in self._logged_params}
        if flat:
            mlflow.log_params(flat)

    def tag(self, name: str) -> str | None:
        return mlflow.tracking.MlflowClient(self.uri).get_run(self.run_id).data.tags.get(name)

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which this run has ``key`` (a resumed run's rounds logged so far)."""
        client = mlflow.tracking.MlflowClient(self.uri)
        return {m.step for m in client.get_metric_history(self.run_id, key)}

    def set_tags(self, tags: Mapping[str, str]) -> None:
        mlflow.set_tags(dict(tags))

    def record_refusal(self, hospital: int, reason: str) -> None:
        """A hospital refused work (its budget or its privacy policy): the reason as a tag."""
        log.warning("hospital %s refused: %s", hospital, reason)
        mlflow.set_tag(f"refused/hospital_{hospital}", reason[:5000])

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self.history.setdefault(server_round, {}).update(values)
        mlflow.log_metrics(values, step=server_round)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_artifacts(self, directory: Path, artifact_path: str) -> None:
        mlflow.log_artifacts(str(directory), artifact_path)

    def log_artifact(self, path: Path, artifact_path: str) -> None:
        mlflow.log_artifact(str(path), artifact_path)

    def log_round_plot(self) -> None:
        """A PNG of the per-round curves, from what was logged in this run."""
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_rounds(self.history, Path(tmp) / "metrics_per_round.png")
            if png:
                mlflow.log_artifact(str(png))
