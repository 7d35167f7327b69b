"""Fetching what a finished run saved: its global adapter."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tasks.errors import TaskInputError


def download_adapter(run_id: str, tracking_uri: str | None = None) -> Path:
    """The run's ``adapter`` artifact in a fresh local folder (default store: <project>/mlruns)."""
    import mlflow

    from tracking.paths import project_root
    from tracking.run_tracker import default_store

    mlflow.set_tracking_uri(tracking_uri or default_store(project_root())[0])
    target = Path(tempfile.mkdtemp(prefix="adapter-"))
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter",
                                                        dst_path=str(target)))
    except Exception as err:  # MLflow raises several types for a missing run or artifact
        raise TaskInputError(f"run {run_id}: cannot fetch its 'adapter' artifact from "
                             f"{mlflow.get_tracking_uri()}: {err}") from err
