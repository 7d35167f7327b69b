"""A hospital's privacy ledger: every DP-SGD step it ever took, run by run, on its own disk.

One ledger per hospital state directory, across runs: each run's accountant
history is kept under its run id, and the hospital's lifetime epsilon is the
composition of all of them (its patients do not get a fresh budget with each
run). The file is written atomically, with the directory synced, before an
update leaves the hospital; an unreadable ledger, or one kept with another
accountant, stops the hospital rather than start again from zero.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from settings.task import Accountant
from tasks.errors import TaskInputError
from tasks.privacy.accounting import Step, epsilon_spent

LEDGER_FILE = "privacy-ledger.json"
LEDGER_FORMAT = 1
# Ledgers of earlier versions, one file per run; still read, so no spending is forgotten.
LEGACY_PATTERN = "privacy_ledger_run_*.json"
ARCHIVE_DIR = "ledger-archive"


class LedgerError(TaskInputError):
    """The ledger on disk cannot be trusted: unreadable, or kept under other rules."""


@dataclass
class PrivacyLedger:
    """What a hospital has spent in one federated run, and the noise it committed to."""

    run_id: int
    hospital: int
    noise_multiplier: float | None = None  # fixed at the first private round
    delta: float | None = None
    history: list[Step] = field(default_factory=list)
    rounds_trained: list[int] = field(default_factory=list)

    def add_step(self, step: Step) -> None:
        """One more step; consecutive steps at the same (noise, rate) share one entry, so the
        accountant's work stays constant over hundreds of rounds (epsilon is the same)."""
        noise, rate, count = step
        if self.history and tuple(self.history[-1][:2]) == (noise, rate):
            last = self.history[-1]
            self.history[-1] = (last[0], last[1], int(last[2]) + int(count))
        else:
            self.history.append((noise, rate, int(count)))

    @property
    def steps(self) -> int:
        return sum(int(steps) for _, _, steps in self.history)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> PrivacyLedger:
        data = dict(data)
        data["history"] = [(float(z), float(q), int(n)) for z, q, n in data["history"]]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        return cls.from_dict(json.loads(text))


def most_spent(*ledgers: PrivacyLedger | None) -> PrivacyLedger | None:
    """Of several copies of the same run's ledger, the one recording the most steps.

    Copies can lag (a process died after writing one of them); taking the one
    with the most recorded spending never under-reports epsilon.
    """
    present = [ledger for ledger in ledgers if ledger is not None]
    return max(present, key=lambda ledger: (ledger.steps, len(ledger.rounds_trained)),
               default=None)


@dataclass
class LifetimeLedger:
    """Every run's spending of one hospital, and the record of any archiving."""

    hospital: int
    accountant: Accountant
    runs: dict[int, PrivacyLedger] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)

    def run(self, run_id: int) -> PrivacyLedger:
        """This run's ledger (created empty on first use)."""
        if run_id not in self.runs:
            self.runs[run_id] = PrivacyLedger(run_id=run_id, hospital=self.hospital)
        return self.runs[run_id]

    def history(self, except_run: int | None = None) -> list[Step]:
        """All steps of all runs, in run order (composition does not depend on the order)."""
        return [step for run_id, ledger in sorted(self.runs.items()) if run_id != except_run
                for step in ledger.history]

    def epsilon(self, delta: float) -> float:
        return epsilon_spent(self.history(), delta, self.accountant)

    def to_json(self) -> str:
        return json.dumps({"format": LEDGER_FORMAT, "hospital": self.hospital,
                           "accountant": self.accountant.value,
                           "runs": [asdict(r) for _, r in sorted(self.runs.items())],
                           "events": self.events}, indent=1)


def _atomic_write(path: Path, text: str) -> None:
    """A crash leaves the old file or the new one, never half; the rename itself is synced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class LedgerStore:
    """The durable ledger of one hospital, ``privacy-ledger.json`` in its state directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LEDGER_FILE

    def _unreadable(self, path: Path, err: Exception) -> LedgerError:
        # Never start again from zero on a damaged ledger: that would under-report.
        return LedgerError(f"privacy ledger {path} is unreadable ({err}); refusing to train "
                           "rather than forget spent privacy")

    def load(self, hospital: int, accountant: Accountant) -> LifetimeLedger:
        """The hospital's ledger; ``accountant`` must be the one it was kept with."""
        ledger = LifetimeLedger(hospital=hospital, accountant=accountant)
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("format") != LEDGER_FORMAT:
                    raise ValueError(f"format {data.get('format')!r}, expected {LEDGER_FORMAT}")
                kept_with = Accountant(data["accountant"])
                runs = [PrivacyLedger.from_dict(run) for run in data["runs"]]
                events = list(data.get("events", []))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise self._unreadable(self.path, err) from err
            if kept_with != accountant:
                raise LedgerError(
                    f"hospital {hospital}: privacy ledger {self.path} key 'accountant' is "
                    f"{kept_with.value!r} but this run uses privacy.dp_sgd.accountant="
                    f"{accountant.value!r}; a lifetime epsilon composes under one accountant. "
                    f"Run with accountant={kept_with.value}, or archive the ledger "
                    "(clinical-fl-ledger --archive) to start a new one.")
            ledger.runs = {run.run_id: run for run in runs}
            ledger.events = events
        for legacy in sorted(self.directory.glob(LEGACY_PATTERN)):
            try:
                run = PrivacyLedger.from_json(legacy.read_text(encoding="utf-8"))
            except (ValueError, KeyError, TypeError) as err:
                raise self._unreadable(legacy, err) from err
            ledger.runs[run.run_id] = most_spent(ledger.runs.get(run.run_id), run)
        return ledger

    def save(self, ledger: LifetimeLedger) -> Path:
        _atomic_write(self.path, ledger.to_json())
        return self.path

    def archive(self, reason: str, lifetime_epsilon: float | None = None) -> Path:
        """Move the ledger (and any legacy per-run files) to ``ledger-archive/<time>/`` and
        start a new ledger whose first event records what was archived, when and why."""
        if not reason.strip():
            raise LedgerError("archiving a privacy ledger needs a reason (--reason)")
        files = [p for p in [self.path, *self.directory.glob(LEGACY_PATTERN)] if p.exists()]
        if not files:
            raise LedgerError(f"no privacy ledger in {self.directory} to archive")
        data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.directory / ARCHIVE_DIR / stamp
        target.mkdir(parents=True, exist_ok=False)
        for path in files:
            shutil.move(str(path), target / path.name)
        event = {"event": "archived", "time": stamp, "reason": reason,
                 "archived_to": str(target), "lifetime_epsilon": lifetime_epsilon}
        fresh = {"format": LEDGER_FORMAT, "hospital": data.get("hospital", 0),
                 "accountant": data.get("accountant", Accountant.rdp.value), "runs": [],
                 "events": [*data.get("events", []), event]}
        _atomic_write(self.path, json.dumps(fresh, indent=1))
        return target
