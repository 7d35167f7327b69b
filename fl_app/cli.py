"""``clinical-fl``: start the same federated run from Hydra's command line.

    clinical-fl train.local_epochs=2 strategy=fedprox
    clinical-fl -m strategy=fedavg,fedprox          # one flwr run per combination

Hydra parses and validates the overrides here (so a typo fails at once), then
hands them to ``flwr run`` through the Flower run config, where the ServerApp
composes the same configuration again.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fl_app.config import CONF_DIR, ConfigError, validate_config
from fl_app.paths import project_root

OFFLINE_FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


def flwr_run_command(overrides: list[str], connection: str | None = None) -> list[str]:
    """The ``flwr run`` command line carrying these Hydra overrides."""
    text = " ".join(shlex.quote(o) for o in overrides)
    command = ["flwr", "run", str(project_root())]
    if connection:
        command.append(connection)
    # json.dumps gives a valid TOML basic string, whatever quotes the overrides hold.
    return command + ["--stream", "--run-config", f"overrides={json.dumps(text)}"]


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _run(cfg: DictConfig) -> None:
    try:
        validate_config(cfg)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    overrides = list(HydraConfig.get().overrides.task)
    env = {**OFFLINE_FLOWER_ENV, **os.environ}
    connection = os.environ.get("CLINICAL_FL_CONNECTION")  # a SuperLink from config.toml
    completed = subprocess.run(flwr_run_command(overrides, connection), env=env, check=False)
    if completed.returncode != 0:
        sys.exit(completed.returncode)


def main() -> None:
    _run()


if __name__ == "__main__":
    main()
