"""``clinical-fl``: start the same federated run from Hydra's command line.

    clinical-fl train.local_epochs=2 strategy=fedprox
    clinical-fl -m strategy=fedavg,fedprox          # one flwr run per combination
    clinical-fl -m +sweep=epsilon                   # accuracy against epsilon (conf/sweep/)
    CLINICAL_FL_FEDERATION_CONFIG="num-supernodes=8" clinical-fl ...   # 8 hospitals

Hydra parses the overrides here and they are checked as ``compose_config`` checks them
(every key in the schema, no ``+key`` additions or ``~key`` deletions but of config groups,
every value valid; in a sweep, every job's), so a bad one fails at once, before any Flower
or Ray process starts; then they go to ``flwr run`` through the Flower run config, where the
ServerApp composes the same configuration again. ``flwr run`` exits 0 even when the run
failed, so the run's final status is asked from the SuperLink afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import hydra
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from fl_app.flower_env import flower_env
from fl_app.flower_runs import COMPLETED, run_status, started_run_id
from fl_app.sweep import FAILED_JOBS, PARENT_RUN_ENV, SWEEP_NAME_ENV
from settings.compose import (
    CONF_DIR,
    ConfigError,
    check_override_keys,
    compose_config,
    validate_config,
)
from tracking.paths import project_root


def write_run_config(overrides: list[str], path: Path) -> Path:
    """A TOML run-config file carrying these Hydra overrides as one string.

    A file, not ``--run-config 'overrides=...'``: Flower's inline parser takes a
    quoted value up to the next quote of the same kind, so overrides holding
    quotes of both kinds (``tracking.run_name='a b'`` after shell quoting) would
    not survive it. The file is read with a real TOML parser.
    """
    text = " ".join(shlex.quote(o) for o in overrides)
    path.write_text(f"overrides = {json.dumps(text)}\n", encoding="utf-8")  # a TOML basic string
    return path


def flwr_run_command(run_config: Path, connection: str | None = None,
                     federation_config: str | None = None) -> list[str]:
    """The ``flwr run`` command line for the app with this run-config file.

    ``federation_config`` is Flower's simulation setting, e.g. ``num-supernodes=8``.
    """
    command = ["flwr", "run", str(project_root())]
    if connection:
        command.append(connection)
    command += ["--stream", "--run-config", str(run_config)]
    if federation_config:
        command += ["--federation-config", federation_config]
    return command


def _sweep_overrides(overrides: list[str]) -> list[str]:
    """Nest this job's run under the sweep's MLflow parent run, named by what it varies."""
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent:
        return []
    extra = [f"tracking.parent_run_id={parent}",
             f"tracking.sweep={os.environ.get(SWEEP_NAME_ENV, '')}"]
    if not any(o.startswith("tracking.run_name=") for o in overrides):
        # e.g. "target_epsilon-8": plain characters, so nothing needs quoting on the way
        varied = [o.split("=", 1) for o in overrides if o.startswith("privacy.")]
        name = "_".join(f"{key.rsplit('.', 1)[-1]}-{value}" for key, value in varied)
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", name) or f"job-{HydraConfig.get().job.num}"
        extra.append(f"tracking.run_name={name}")
    return extra


def _stream(command: list[str], env: dict[str, str]) -> str:
    """Run ``command``, echoing its output while keeping it."""
    lines = []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line)
    return "".join(lines)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _run(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    try:
        # What compose_config checks, in the same order: the keys (Hydra would add a +key
        # the settings then drop), then every value. All before flwr run starts anything.
        check_override_keys(overrides)
        validate_config(cfg)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    overrides += _sweep_overrides(overrides)
    env = flower_env()
    connection = os.environ.get("CLINICAL_FL_CONNECTION")  # a SuperLink from config.toml
    # Simulation only, e.g. "num-supernodes=8": how many hospitals Flower starts.
    federation_config = os.environ.get("CLINICAL_FL_FEDERATION_CONFIG")
    with tempfile.TemporaryDirectory() as tmp:
        run_config = write_run_config(overrides, Path(tmp) / "run_config.toml")
        output = _stream(flwr_run_command(run_config, connection, federation_config), env)
    run_id = started_run_id(output)
    status, details = run_status(run_id, connection, env) if run_id else ("not started", "")
    if status == COMPLETED:
        print(f"flwr run {run_id}: {status}")
        return
    problem = f"flwr run {run_id or '-'} ({' '.join(overrides)}): {status} {details}".strip()
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        FAILED_JOBS.append(problem)  # the sweep goes on; its report names the failures
        print(f"error: {problem}", file=sys.stderr)
        return
    sys.exit(f"error: {problem}")


def command_line(argv: list[str]) -> tuple[list[str], bool]:
    """The overrides of a ``clinical-fl`` command line and whether it is a sweep (``-m``), read
    by Hydra's own parser (a sweep's ``key=a,b`` stays one override). A command line Hydra
    cannot read gives none: Hydra reports it."""
    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        args, _ = parser.parse_known_args(argv)
    except (argparse.ArgumentError, SystemExit):
        return [], False
    return list(args.overrides or []), bool(args.multirun)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The overrides of every job of ``clinical-fl -m``, as Hydra's basic sweeper makes them:
    the sweep preset's ``hydra.sweeper.params`` (``+sweep=epsilon``'s levels), then the
    command line's, each key's values crossed with the others'."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = GlobalHydra.instance().hydra.compose_config(
            "config", overrides, run_mode=RunMode.MULTIRUN)
    params = [f"{key}={value}" for key, value in (cfg.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + overrides)
    return BasicSweeper.split_arguments(parsed, None)[0]


def check_command_line(argv: list[str]) -> None:
    """Everything ``compose_config`` refuses, refused before Hydra starts a job: the keys (an
    unknown key fails naming the valid ones of its section; Hydra would only say it cannot
    override it), and for a sweep every job's configuration, so that no job's ``flwr run``
    starts when a later one cannot. (A single run's values are checked in ``_run``.)"""
    overrides, multirun = command_line(argv)
    check_override_keys(overrides)
    if not multirun:
        return
    try:
        jobs = sweep_jobs(overrides)
    except HydraException:
        return  # a sweep Hydra cannot expand: Hydra reports it; each job is checked in _run
    for job in jobs:
        compose_config(job)


def main() -> None:
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as err:
        sys.exit(f"error: {err}")
    _run()


if __name__ == "__main__":
    main()
