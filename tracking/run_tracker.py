"""MLflow tracking of a federated run: one MLflow run per federated run, one step per round."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import mlflow

from settings.tracking import TrackingSettings
from tracking.plots import plot_rounds

log = logging.getLogger(__name__)

STORE_DIR = "mlruns"
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


class RunTracker:
    """Opens the MLflow run on enter and always closes it: FINISHED, or FAILED on a crash."""

    def __init__(self, settings: TrackingSettings, project_root: Path,
                 resume_run_id: str | None = None) -> None:
        """``resume_run_id``: continue this run (a resumed federated run) instead of a new one."""
        self.settings = settings
        self.experiment_id = experiment_id(settings, project_root)
        self.uri = mlflow.get_tracking_uri()
        self.history: dict[int, dict[str, float]] = {}
        self.run_id: str | None = resume_run_id
        self._logged_params: dict[str, str] | None = None  # a resumed run's, before resuming

    def __enter__(self) -> RunTracker:
        if self.run_id:
            run = mlflow.start_run(run_id=self.run_id)
            self._logged_params = dict(run.data.params)
            log.info("MLflow run %s in %s, resumed", self.run_id, self.uri)
            return self
        # A run started by a sweep is nested under the sweep's parent run in the MLflow UI.
        tags = {"mlflow.parentRunId": self.settings.parent_run_id,
                "sweep": self.settings.sweep} if self.settings.parent_run_id else None
        run = mlflow.start_run(experiment_id=self.experiment_id,
                               run_name=self.settings.run_name, tags=tags)
        self.run_id = run.info.run_id
        log.info("MLflow run %s in %s", self.run_id, self.uri)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            mlflow.set_tag("failure", f"{exc_type.__name__}: {exc}"[:5000])
            mlflow.end_run(status="FAILED")
        else:
            mlflow.end_run(status="FINISHED")

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
