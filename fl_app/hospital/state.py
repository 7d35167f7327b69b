"""What a hospital keeps on its own side: its privacy policy and its privacy ledger.

Both live in the hospital's state directory (node config ``state-dir``; in
simulation one folder per partition under ``$FLWR_HOME``); the policy may also
be given as node config keys. The ledger is also mirrored in Flower's
``context.state``: in deployment a new ClientApp process may serve each message
and a SuperNode may restart, so the file is the durable copy, and of the two
copies of this run's ledger the one recording more spending wins.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import ConfigRecord, Context

from clinical_fl.settings.privacy import Accountant
from clinical_fl.settings.task import TaskSettings
from fl_app.hospital.node_config import is_deployed, state_dir
from tasks.errors import TaskInputError
from tasks.privacy.ledger import LedgerStore, LifetimeLedger, PrivacyLedger, most_spent
from tasks.privacy.policy import HospitalPolicy, load_policy

LEDGER_KEY = "privacy-ledger"
EVALUATIONS_FILE = "evaluations.json"


class EvaluationsExhausted(TaskInputError):
    """The hospital has answered as many evaluations in this run as it allows."""


LOCK_FILE = ".state.lock"


@contextmanager
def state_locked(context: Context) -> Iterator[None]:
    """One message at a time reads and writes this hospital's ledger and evaluation counts:
    two runs served at once would each load the ledger, train and save it, and the second
    save would drop the first run's spending. Held from the ledger's load to its save."""
    directory = state_dir(context)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LOCK_FILE).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def hospital_policy(context: Context, hospital: int) -> HospitalPolicy:
    """The hospital's privacy policy: ``privacy-policy.toml`` in its state directory and its
    node config keys (the stricter of the two). A deployed hospital owns its data mapping
    whether or not it has a policy file."""
    return load_policy(state_dir(context), context.node_config, hospital,
                       deployed=is_deployed(context))


def evaluation_bound(settings: TaskSettings, policy: HospitalPolicy) -> int:
    """How many evaluations this hospital answers in one run: its policy's max-evaluations,
    never more than the server planned (round 0 and each scheduled round)."""
    planned = settings.planned_evaluations or settings.planned_rounds + 1
    return min(planned, policy.max_evaluations) if policy.max_evaluations else planned


def count_evaluation(context: Context, settings: TaskSettings, policy: HospitalPolicy) -> int:
    """Count one more evaluation of this run, durably, before it is scored; refuse past the
    bound (scores of held-out records are released without noise, so each one counts)."""
    with state_locked(context):
        return _count_evaluation(context, settings, policy)


def _count_evaluation(context: Context, settings: TaskSettings, policy: HospitalPolicy) -> int:
    bound = evaluation_bound(settings, policy)
    path = state_dir(context) / EVALUATIONS_FILE
    try:
        counts = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        done = int(counts.get(str(context.run_id), 0))
    except (ValueError, TypeError, AttributeError) as err:
        raise EvaluationsExhausted(f"{path} is unreadable ({err}); no evaluation answered "
                                   "until it is repaired") from err
    if done >= bound:
        raise EvaluationsExhausted(
            f"run {context.run_id}: {done} evaluations answered, the bound is {bound} "
            f"(policy max-evaluations {policy.max_evaluations}, planned "
            f"{settings.planned_evaluations or settings.planned_rounds + 1})",
            key="max-evaluations", counts={"evaluations": bound})
    counts[str(context.run_id)] = done + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(counts, handle)
    os.replace(tmp, path)
    return done + 1


def ledger_run(settings: TaskSettings, context: Context) -> int:
    """The ledger entry this run's spending goes to: the server names the first run of a
    resumed training, so the accountant composes the whole training's steps in one history
    (a new entry would re-plan its noise as if the first run's rounds had not happened).
    Naming any entry loosens nothing: the lifetime budget composes every entry."""
    return settings.ledger_run if settings.ledger_run is not None else context.run_id


def load_ledger(context: Context, hospital: int, accountant: Accountant,
                run_id: int) -> tuple[LifetimeLedger, PrivacyLedger]:
    """(the hospital's lifetime ledger, the entry of run ``run_id`` in it)."""
    lifetime = LedgerStore(state_dir(context)).load(hospital, accountant)
    in_memory = None
    if LEDGER_KEY in context.state.config_records:
        in_memory = PrivacyLedger.from_json(str(context.state.config_records[LEDGER_KEY]["json"]))
        if in_memory.run_id != run_id:
            in_memory = None
    on_disk = lifetime.runs.get(run_id)
    run = most_spent(in_memory, on_disk)
    lifetime.runs[run_id] = run or PrivacyLedger(run_id=run_id, hospital=hospital)
    for copy in (in_memory, on_disk):  # whichever copy wins, no booking accountant is lost
        for name in copy.accountants if copy is not None else ():
            lifetime.runs[run_id].booked_by(Accountant(name))
    return lifetime, lifetime.runs[run_id]


def save_ledger(context: Context, lifetime: LifetimeLedger, run_id: int) -> Path:
    """This run's entry into ``context.state`` and the whole ledger to disk, the entry naming
    the accountant this run books with."""
    run = lifetime.run(run_id)
    run.booked_by(lifetime.accountant)
    context.state.config_records[LEDGER_KEY] = ConfigRecord({"json": run.to_json()})
    return LedgerStore(state_dir(context)).save(lifetime)
