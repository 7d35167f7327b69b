"""What a hospital's node config says about where it runs (light: no torch, no Opacus)."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context


def is_deployed(context: Context) -> bool:
    """A real hospital names its own data file or state directory in its node config; a
    simulated one gets only a partition of the configured data."""
    return bool(context.node_config.get("data-path") or context.node_config.get("state-dir"))


def state_dir(context: Context) -> Path:
    """The node config's ``state-dir``; in simulation, one folder per partition under
    ``$FLWR_HOME`` (the hospitals of a simulation share one machine)."""
    configured = context.node_config.get("state-dir")
    if configured:
        return Path(str(configured)).expanduser()
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    partition = context.node_config.get("partition-id", context.node_id)
    return home / "clinical-fl" / "hospital-state" / f"partition-{partition}"
