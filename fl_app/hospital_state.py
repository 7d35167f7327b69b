"""What a hospital keeps between messages: its privacy ledger, in Flower's ``context.state``
and durably in its own state directory.

In deployment a new ClientApp process may serve each message and a SuperNode
may restart, so ``context.state`` alone is not enough; the file alone would do,
but both are kept and the copy recording more spending wins.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import ConfigRecord, Context

from tasks.privacy.accounting import LedgerStore, PrivacyLedger, most_spent

LEDGER_KEY = "privacy-ledger"


def state_dir(context: Context) -> Path:
    """The node config's ``state-dir``; in simulation, one folder per partition under
    ``$FLWR_HOME`` (the hospitals of a simulation share one machine)."""
    configured = context.node_config.get("state-dir")
    if configured:
        return Path(str(configured)).expanduser()
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    partition = context.node_config.get("partition-id", context.node_id)
    return home / "clinical-fl" / "hospital-state" / f"partition-{partition}"


def node_max_epsilon(context: Context) -> float | None:
    """The hospital's own privacy budget, ``max-epsilon`` in its node config."""
    value = context.node_config.get("max-epsilon")
    return float(value) if value not in (None, "") else None


def load_ledger(context: Context, hospital: int) -> PrivacyLedger:
    in_memory = None
    if LEDGER_KEY in context.state.config_records:
        in_memory = PrivacyLedger.from_json(str(context.state.config_records[LEDGER_KEY]["json"]))
    on_disk = LedgerStore(state_dir(context)).load(context.run_id)
    return most_spent(in_memory, on_disk) or PrivacyLedger(run_id=context.run_id,
                                                           hospital=hospital)


def save_ledger(context: Context, ledger: PrivacyLedger) -> Path:
    context.state.config_records[LEDGER_KEY] = ConfigRecord({"json": ledger.to_json()})
    return LedgerStore(state_dir(context)).save(ledger)
