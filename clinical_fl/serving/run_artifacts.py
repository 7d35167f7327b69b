"""Fetching what a finished run saved: its global adapter, named on a command line.

    --adapter DIR                  a folder holding a saved adapter
    --run-id ID                    the run's ``adapter`` artifact
    --model runs:/ID               the same
    --model models:/NAME@ALIAS     the run that registered model version came from
    --model models:/NAME/VERSION
    --model models:/NAME@latest    (or models:/NAME/latest) its newest version: MLflow reserves
                                   the alias "latest" for that, nobody can set it

A registered version is resolved to its source run and that run's ``adapter`` artifact is used:
the MLflow Model a version points at carries the same adapter, and the run's copy is the one
every path of this project reads. Downloads go to a temporary folder that is removed when the
``adapter_folder`` context ends.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.errors import TaskInputError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
MODEL_URI_FORMS = "runs:/<run id>, models:/<name>@<alias> or models:/<name>/<version>"
# Paths inside a run that name its model: the adapter artifact, or the MLflow Model beside it.
_RUN_MODEL_PATHS = ("", "adapter", "model")


@dataclass(frozen=True)
class ModelUri:
    """A parsed --model: a run id, or a registered model's name with an alias or a version."""

    text: str
    run_id: str | None = None
    name: str | None = None
    alias: str | None = None
    version: str | None = None


def parse_model_uri(text: str) -> ModelUri:
    """``runs:/ID``, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (argparse type)."""
    if text.startswith("runs:/"):
        run_id, _, path = text.removeprefix("runs:/").strip("/").partition("/")
        if run_id and path in _RUN_MODEL_PATHS:
            return ModelUri(text, run_id=run_id)
    elif text.startswith("models:/"):
        rest = text.removeprefix("models:/").rstrip("/")
        name, at, alias = rest.rpartition("@")
        if at and name and alias:
            return ModelUri(text, name=name, alias=alias)
        name, slash, version = rest.rpartition("/")
        if slash and name and version.isdigit():
            return ModelUri(text, name=name, version=version)
        if slash and name and version.lower() == "latest":  # MLflow's spelling of @latest
            return ModelUri(text, name=name, alias="latest")
        if slash and name and version:
            raise argparse.ArgumentTypeError(
                f"{text}: '{version}' is not a version number; for an alias write "
                f"models:/{name}@{version}")
    raise argparse.ArgumentTypeError(f"{text}: expected {MODEL_URI_FORMS}")


def tracking_store(tracking_uri: str | None) -> str:
    """The MLflow store to read (default: the project's SQLite store under <project>/mlruns)."""
    if tracking_uri:
        return tracking_uri
    from clinical_fl.tracking.paths import project_root
    from clinical_fl.tracking.run_tracker import default_store

    return default_store(project_root())[0]


def run_of_model(model: ModelUri, tracking_uri: str) -> str:
    """The id of the run ``model`` names: itself, or the source run of a registered version."""
    if model.run_id:
        return model.run_id
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    _registered(client, model.name, tracking_uri)
    try:
        version = (client.get_model_version_by_alias(model.name, model.alias) if model.alias
                   else client.get_model_version(model.name, model.version))
    except MlflowException as err:  # MLflow's codes vary (an unknown alias is "invalid")
        what = f"no alias '{model.alias}'" if model.alias else f"no version {model.version}"
        raise TaskInputError(f"{model.text}: registered model '{model.name}' has {what} in the "
                             f"MLflow store {tracking_uri} (MLflow: {err.message})") from err
    run_id = version.run_id
    if not run_id and getattr(version, "model_id", None):  # registered from a logged model
        run_id = client.get_logged_model(version.model_id).source_run_id
    if not run_id:
        raise TaskInputError(f"{model.text}: version {version.version} of '{model.name}' was "
                             f"not registered from a run (source {version.source}), so it has "
                             "no run adapter to serve; use --adapter with a folder")
    # Which version an alias pointed at when the service started: for its log.
    log.info("%s is version %s of '%s', from run %s", model.text, version.version, model.name,
             run_id)
    return run_id


def _registered(client: MlflowClient, name: str, tracking_uri: str) -> None:
    """Fails, naming the models there are, when the store has no registered model ``name``."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":  # an unreadable store, a bad name
            raise TaskInputError(f"MLflow store {tracking_uri}: cannot read registered model "
                                 f"'{name}': {err.message}") from err
        known = sorted(m.name for m in client.search_registered_models(max_results=20))
        listed = f"; it has {', '.join(known)}" if known else "; it has none"
        raise TaskInputError(f"no registered model named '{name}' in the MLflow store "
                             f"{tracking_uri}{listed}") from err


def download_adapter(run_id: str, tracking_uri: str | None = None,
                     dst: Path | None = None) -> Path:
    """The run's ``adapter`` artifact in ``dst`` (without one: a fresh folder the caller must
    remove; ``adapter_folder`` removes its own)."""
    import mlflow

    tracking_uri = tracking_store(tracking_uri)
    target = dst if dst is not None else Path(tempfile.mkdtemp(prefix="adapter-"))
    try:
        return Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="adapter", dst_path=str(target),
            tracking_uri=tracking_uri))
    except Exception as err:  # MLflow raises several types for a missing run or artifact
        raise TaskInputError(f"run {run_id}: cannot fetch its 'adapter' artifact from "
                             f"{tracking_uri}: {err}") from err


def add_adapter_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """--adapter DIR, --run-id ID or --model URI (with --tracking-uri), and --base-model."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--adapter", help="folder with a saved adapter")
    source.add_argument("--run-id", help="MLflow run id whose 'adapter' artifact to use")
    source.add_argument("--model", type=parse_model_uri, metavar="URI",
                        help=f"{MODEL_URI_FORMS}: a run, or a registered model version's run")
    parser.add_argument("--tracking-uri", help="MLflow store (default: <project>/mlruns)")
    parser.add_argument("--base-model", help="override the base model recorded with the adapter")


def describe_source(args: argparse.Namespace) -> str:
    """What the arguments name, for log lines."""
    if args.adapter:
        return args.adapter
    return args.model.text if args.model else f"run {args.run_id}"


@contextmanager
def adapter_folder(args: argparse.Namespace) -> Iterator[Path]:
    """The adapter folder the arguments name; a run's is downloaded into a temporary folder
    that is gone when the context ends (load the model inside it)."""
    if args.adapter:
        yield Path(args.adapter)
        return
    tracking_uri = tracking_store(args.tracking_uri)
    run_id = args.run_id or run_of_model(args.model, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="adapter-") as target:
        yield download_adapter(run_id, tracking_uri, Path(target))
