"""``clinical-fl``: start the same federated run from Hydra's command line.

    clinical-fl train.local_epochs=2 strategy=fedprox
    clinical-fl -m strategy=fedavg,fedprox          # one flwr run per combination
    clinical-fl -m +sweep=epsilon                   # accuracy against epsilon (conf/sweep/)
    CLINICAL_FL_FEDERATION_CONFIG="num-supernodes=8" clinical-fl ...   # 8 hospitals

Hydra parses the overrides here and they are checked as ``compose_config`` checks them
(every key in the schema, every group option a preset, no ``+key`` additions or ``~key``
deletions but of config groups, every value valid; in a sweep, every job's), and the data as
the server will read it (``fl_app/server/data_check.py``: path, columns, labels; with no
``CLINICAL_FL_CONNECTION`` the hospitals read ``data.path`` here too, so all of it), so a bad
one fails in seconds with ``error: ...``, before any Flower or Ray process starts; then they
go to ``flwr run`` through the Flower run config's ``overrides`` key, where the ServerApp
composes the same configuration again. ``flwr`` is the one next to this Python (the venv's),
else PATH's. ``flwr run`` exits 0 even when the run failed, so the run's final status is
asked from the SuperLink afterwards.

Hydra writes nothing here (``conf/config.yaml``'s ``hydra:`` block: no ``outputs/`` folder,
no log file); a sweep (``-m``) keeps its report folder under ``multirun/``.
"""

from __future__ import annotations

import argparse
import json
import os
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

from clinical_fl.settings.compose import (
    CONF_DIR,
    ConfigError,
    check_override_keys,
    compose_config,
    to_run_settings,
    validate_config,
)
from clinical_fl.tracking.paths import project_root
from fl_app.commands import local_superlink
from fl_app.commands.flower_env import flower_env, flower_executable
from fl_app.commands.flower_runs import COMPLETED, run_status, started_run_id
from fl_app.commands.sweep import FAILED_JOBS, PARENT_RUN_ENV, SWEEP_NAME_ENV
from fl_app.server.data_check import check_data

CONNECTION_ENV = "CLINICAL_FL_CONNECTION"  # a SuperLink from $FLWR_HOME/config.toml


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
    command = [flower_executable("flwr"), "run", str(project_root())]
    if connection:
        command.append(connection)
    command += ["--stream", "--run-config", str(run_config)]
    if federation_config:
        command += ["--federation-config", federation_config]
    return command


def _sweep_overrides(overrides: list[str]) -> list[str]:
    """Nest this job's run under the sweep's MLflow parent run; the run tracker names it by
    its settings and what the sweep varies (clinical_fl/tracking/run_names.py)."""
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent:
        return []
    return [f"tracking.parent_run_id={parent}",
            f"tracking.sweep={os.environ.get(SWEEP_NAME_ENV, '')}"]


def _stream(command: list[str], env: dict[str, str]) -> str:
    """Run ``command``, echoing its output while keeping it."""
    lines = []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line)
    return "".join(lines)


def check_data_of(cfg: DictConfig) -> None:
    """The data checks the server would make (all of them when the hospitals read
    ``data.path`` on this machine: a local simulation, no ``CLINICAL_FL_CONNECTION``)."""
    check_data(to_run_settings(cfg).data,
               hospitals_read_here=not os.environ.get(CONNECTION_ENV))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _run(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    try:
        # What compose_config checks, in the same order: the keys (Hydra would add a +key
        # the settings then drop), then every value; then the data as the server reads it.
        # All before flwr run starts anything.
        check_override_keys(overrides)
        check_data_of(validate_config(cfg))
    except ConfigError as err:
        sys.exit(f"error: {err}")
    overrides += _sweep_overrides(overrides)
    env = flower_env()
    connection = os.environ.get(CONNECTION_ENV)
    # Simulation only, e.g. "num-supernodes=8": how many hospitals Flower starts.
    federation_config = os.environ.get("CLINICAL_FL_FEDERATION_CONFIG")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_config = write_run_config(overrides, Path(tmp) / "run_config.toml")
            output = _stream(flwr_run_command(run_config, connection, federation_config), env)
        run_id = started_run_id(output)
        status, details = run_status(run_id, connection, env) if run_id else ("not started", "")
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    if status == COMPLETED:
        return  # the run's own summary (MLflow run id, scores, what next) was the last word
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
    """Everything ``compose_config`` refuses, refused before Hydra starts a job: the keys and
    group options (an unknown one fails naming the valid ones and the near misses; Hydra
    would only say it cannot override it), and for a sweep every job's configuration and
    data, so that no job's ``flwr run`` starts when a later one cannot. (A single run's
    values and data are checked in ``_run``.)"""
    overrides, multirun = command_line(argv)
    check_override_keys(overrides)
    if not multirun:
        return
    try:
        jobs = sweep_jobs(overrides)
    except HydraException:
        return  # a sweep Hydra cannot expand: Hydra reports it; each job is checked in _run
    checked = set()
    for job in jobs:
        cfg = compose_config(job)
        data = repr(cfg.data)
        if data not in checked:  # the jobs of a sweep mostly share their data: read it once
            check_data_of(cfg)
            checked.add(data)


def main() -> None:
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as err:
        sys.exit(f"error: {err}")
    # The same Flower home as scripts/run.sh: one local SuperLink, one set of hospital
    # ledgers (.flwr/clinical-fl/hospital-state/) whichever command started the run.
    os.environ.setdefault("FLWR_HOME", str(project_root() / ".flwr"))
    # flwr run starts a local SuperLink when none runs and leaves it behind; one this
    # command started (for one run or a whole sweep) is stopped by its PID at the end.
    started_here = not os.environ.get(CONNECTION_ENV) and not local_superlink.running()
    try:
        _run()
    finally:
        if started_here and local_superlink.running():
            pids = local_superlink.stop(Path(os.environ["FLWR_HOME"]))
            if pids:
                print(f"stopped the local SuperLink this command started (PID "
                      f"{', '.join(map(str, pids))})")


if __name__ == "__main__":
    main()
