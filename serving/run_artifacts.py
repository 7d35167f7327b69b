"""Fetching what a finished run saved: its global adapter, named on a command line."""

from __future__ import annotations

import argparse
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


def add_adapter_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """--adapter DIR or --run-id ID (with --tracking-uri), and --base-model."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--adapter", help="folder with a saved adapter")
    source.add_argument("--run-id", help="MLflow run id whose 'adapter' artifact to use")
    parser.add_argument("--tracking-uri", help="MLflow store (default: <project>/mlruns)")
    parser.add_argument("--base-model", help="override the base model recorded with the adapter")


def adapter_from(args: argparse.Namespace) -> Path:
    """The adapter folder the arguments name (a run's is downloaded first)."""
    return Path(args.adapter) if args.adapter else download_adapter(args.run_id,
                                                                    args.tracking_uri)
