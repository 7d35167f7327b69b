"""What a hospital keeps on its own side: its privacy policy and its privacy ledger.

Both live in the hospital's state directory (node config ``state-dir``; in
simulation one folder per partition under ``$FLWR_HOME``); the policy may also
be given as node config keys. The ledger is also mirrored in Flower's
``context.state``: in deployment a new ClientApp process may serve each message
and a SuperNode may restart, so the file is the durable copy, and of the two
copies of this run's ledger the one recording more spending wins.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context

from fl_app.node_config import state_dir
from settings.task import Accountant
from tasks.privacy.ledger import LedgerStore, LifetimeLedger, PrivacyLedger, most_spent
from tasks.privacy.policy import HospitalPolicy, load_policy

LEDGER_KEY = "privacy-ledger"


def hospital_policy(context: Context, hospital: int) -> HospitalPolicy:
    """The hospital's privacy policy: ``privacy-policy.toml`` in its state directory and its
    node config keys (the stricter of the two)."""
    return load_policy(state_dir(context), context.node_config, hospital)


def load_ledger(context: Context, hospital: int,
                accountant: Accountant) -> tuple[LifetimeLedger, PrivacyLedger]:
    """(the hospital's lifetime ledger, this run's entry in it)."""
    lifetime = LedgerStore(state_dir(context)).load(hospital, accountant)
    in_memory = None
    if LEDGER_KEY in context.state.config_records:
        in_memory = PrivacyLedger.from_json(str(context.state.config_records[LEDGER_KEY]["json"]))
    run = most_spent(in_memory, lifetime.runs.get(context.run_id))
    lifetime.runs[context.run_id] = run or PrivacyLedger(run_id=context.run_id,
                                                         hospital=hospital)
    return lifetime, lifetime.runs[context.run_id]


def save_ledger(context: Context, lifetime: LifetimeLedger) -> Path:
    context.state.config_records[LEDGER_KEY] = ConfigRecord(
        {"json": lifetime.run(context.run_id).to_json()})
    return LedgerStore(state_dir(context)).save(lifetime)
