"""``clinical-fl``: start the same federated run from Hydra's command line.

    clinical-fl train.local_epochs=2 strategy=fedprox
    clinical-fl -m strategy=fedavg,fedprox          # one flwr run per combination
    clinical-fl -m +sweep=epsilon                   # accuracy against epsilon (conf/sweep/)
    CLINICAL_FL_FEDERATION_CONFIG="num-supernodes=8" clinical-fl ...   # 8 hospitals

Hydra parses and validates the overrides here (so a typo fails at once), then
hands them to ``flwr run`` through the Flower run config, where the ServerApp
composes the same configuration again. ``flwr run`` exits 0 even when the run
failed, so the run's final status is asked from the SuperLink afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fl_app.flower_env import flower_env
from fl_app.flower_runs import COMPLETED, run_status, started_run_id
from fl_app.sweep import FAILED_JOBS, PARENT_RUN_ENV, SWEEP_NAME_ENV
from settings.compose import CONF_DIR, ConfigError, validate_config
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
    try:
        validate_config(cfg)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    overrides = list(HydraConfig.get().overrides.task)
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


def main() -> None:
    _run()


if __name__ == "__main__":
    main()
