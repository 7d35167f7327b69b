"""What a hospital's node config says about who it is and where it runs: the one place its
keys are read (light: no torch, no Opacus)."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context

from tasks.privacy.policy import PolicyError

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
STATE_DIR = "state-dir"
CKKS_CONTEXT = "ckks-context"
FAULT_DRILL = "fault-drill"  # a deployed hospital's own drill (fl_app/hospital/fault_drill.py)


def is_deployed(context: Context) -> bool:
    """A real hospital names its own data file or state directory in its node config; a
    simulated one gets only a partition of the configured data."""
    return bool(context.node_config.get(DATA_PATH) or context.node_config.get(STATE_DIR))


def state_dir(context: Context) -> Path:
    """The node config's ``state-dir``; in simulation, one folder per partition under
    ``$FLWR_HOME`` (the hospitals of a simulation share one machine)."""
    configured = context.node_config.get(STATE_DIR)
    if configured:
        return Path(str(configured)).expanduser()
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    partition = context.node_config.get(PARTITION_ID, context.node_id)
    return home / "clinical-fl" / "hospital-state" / f"partition-{partition}"


def hospital_name(context: Context) -> str:
    """How this hospital names itself in its own log: its partition id, else its node id."""
    return f"hospital {context.node_config.get(PARTITION_ID, context.node_id)}"


def hospital_number(context: Context) -> int:
    """The partition id as a number, -1 where it is missing or not a whole number (for
    naming a refusal before the node config is checked)."""
    number = context.node_config.get(PARTITION_ID, -1)
    return int(number) if str(number).lstrip("-").isdigit() else -1


def partition(context: Context, reads_own_file: bool) -> tuple[int, int]:
    """(hospital number, hospitals). A hospital with a data-path reads its own file and
    needs no num-partitions."""
    config = context.node_config
    try:
        partition_id = int(config[PARTITION_ID])
        if reads_own_file:
            return partition_id, int(config.get(NUM_PARTITIONS, partition_id + 1))
        return partition_id, int(config[NUM_PARTITIONS])
    except KeyError as err:
        raise PolicyError(
            f"node {context.node_id}: node config lacks {err.args[0]!r}; start the SuperNode with "
            "--node-config 'partition-id=<k> data-path=<file>' (or num-partitions=<n> "
            "to take a share of the configured data.path)", key=str(err.args[0])) from err
    except (TypeError, ValueError) as err:
        raise PolicyError(f"node {context.node_id}: partition-id / num-partitions must be "
                          f"whole numbers ({err})", key=PARTITION_ID) from err


def configured_ckks_context(context: Context) -> Path | None:
    """The node config's ``ckks-context`` (None where it names none)."""
    configured = context.node_config.get(CKKS_CONTEXT)
    return Path(str(configured)).expanduser() if configured else None


def own_fault_drill(context: Context) -> str | None:
    """The fault a deployed hospital drills on its own (node config ``fault-drill``)."""
    return context.node_config.get(FAULT_DRILL) or None
