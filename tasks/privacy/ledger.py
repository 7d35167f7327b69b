"""A hospital's privacy ledger: every DP-SGD step it ever took, run by run, on its own disk.

One ledger per hospital state directory, across runs: each run's accountant
history is kept under its run id, and the hospital's lifetime epsilon is the
composition of all of them (its patients do not get a fresh budget with each
run). The file is written atomically, with the directory synced, before an
update leaves the hospital; an unreadable ledger, or one kept for another
neighbouring relation, stops the hospital rather than start again from zero.

The history is the mechanism itself, ``(noise multiplier, sample rate, steps)``,
not an accountant's figure, so any accountant composes it: a ledger kept with
RDP is read by a run that accounts with PLD (and the other way round), which
computes the lifetime epsilon over the whole history with its own accountant.
Each accountant's figure is an upper bound on the same true epsilon, so a
budget checked with any of them holds. Each run's entry names the accountants
that booked it (``accountants``).

Every entry is checked when it is added and whenever a ledger is read (file,
Flower's ``context.state``): a noise multiplier that is not finite
and > 0, a rate outside (0, 1], a step count that is not a non-negative integer,
a delta outside (0, 1) are refused, naming the hospital, the file and the field.
JSON is written without NaN or Infinity and read refusing them: a hostile
server must not be able to make a hospital book a step the accountant would
read as safe (RDP sees sigma squared only, and NaN compares false to every cap).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clinical_fl.settings.privacy import Accountant
from tasks.errors import TaskInputError
from tasks.privacy.accounting import (
    NEIGHBOURING_RELATION,
    Step,
    check_delta,
    check_step,
    epsilon_spent,
)

LEDGER_FILE = "privacy-ledger.json"
# 2: the file names the neighbouring relation its epsilons hold under. A format-1 file has
# the same step history (a description of the mechanism, accounted the same way), so it is
# still read, as zero-out.
# 3: each run names the accountants that booked its entries (``accountants``), and the file's
# ``accountant`` is the one its last writer computed with; any accountant reads it. Formats 1
# and 2 were kept with the one accountant they name, so their runs are read as booked by it.
LEDGER_FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
# Ledgers of the versions of 2026-11-26, one file per run, before LEDGER_FILE replaced them.
# No longer read: one in the state directory stops the hospital (LedgerStore.load says why).
LEGACY_PATTERN = "privacy_ledger_run_*.json"
LEGACY_UNTIL = "2026-11-26"
ARCHIVE_DIR = "ledger-archive"


class LedgerError(TaskInputError):
    """The ledger on disk cannot be trusted: unreadable, or kept under other rules."""


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> float:
    raise _NonFinite(f"non-finite number {name} in a privacy ledger")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e999" parses to inf without passing parse_constant
        raise _NonFinite(f"non-finite number {text} in a privacy ledger")
    return value


def _non_finite_field(node: object, path: str = "") -> str | None:
    """Where the first non-finite number of parsed JSON is (e.g. ``runs[0].history[1][0]``),
    so that a refusal names the field."""
    if isinstance(node, float) and not math.isfinite(node):
        return path.lstrip(".") or "the top level"
    children = (node.items() if isinstance(node, dict) else
                enumerate(node) if isinstance(node, list) else ())
    for key, child in children:
        found = _non_finite_field(child, f"{path}.{key}" if isinstance(key, str)
                                  else f"{path}[{key}]")
        if found:
            return found
    return None


def loads_strict(text: str) -> object:
    """JSON as a ledger is read: NaN, Infinity, -Infinity and overflowing numbers refused
    (``ValueError`` naming the field)."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NonFinite as err:
        # Parsed again leniently only to say where: nothing of that parse is used.
        raise ValueError(f"{err}, at {_non_finite_field(json.loads(text))}") from None


def dumps_strict(data: object, indent: int | None = None) -> str:
    """JSON as a ledger is written: a non-finite number raises instead of writing NaN."""
    return json.dumps(data, indent=indent, allow_nan=False)


@dataclass
class PrivacyLedger:
    """What a hospital has spent in one federated run, and the noise it committed to."""

    run_id: int
    hospital: int
    noise_multiplier: float | None = None  # fixed at the first private round
    delta: float | None = None
    history: list[Step] = field(default_factory=list)
    rounds_trained: list[int] = field(default_factory=list)
    # The noisy label counts this run released (booked in history; tasks/privacy/
    # label_counts.py), sent again as they are on a second preflight of the run.
    released_label_counts: list[int] | None = None
    released_labels: list[str] | None = None  # the labels of those counts, in their order
    # The accountants (privacy.*.accountant) of the runs that booked these entries, in the
    # order they first did: a record for the privacy officer, never used to compute epsilon
    # (every reading composes the whole history with its own accountant).
    accountants: list[str] = field(default_factory=list)

    def _refused(self, field_name: str, err: Exception) -> LedgerError:
        return LedgerError(f"hospital {self.hospital}: privacy ledger of run {self.run_id}: "
                           f"{field_name}: {err}; refused")

    def check(self) -> None:
        """Raise ``LedgerError`` (naming the hospital, run and field) unless every entry and
        the committed noise multiplier and delta are ones the accountant can stand on."""
        for index, step in enumerate(self.history):
            try:
                if len(step) != 3:
                    raise ValueError(f"{step!r} is not (noise multiplier, sample rate, steps)")
                check_step(tuple(step))
            except (TypeError, ValueError) as err:
                raise self._refused(f"history[{index}]", err) from err
        if self.noise_multiplier is not None:
            try:
                check_step((self.noise_multiplier, 1.0, 0))
            except ValueError as err:
                raise self._refused("noise_multiplier", err) from err
        if self.delta is not None:
            try:
                check_delta(self.delta)
            except ValueError as err:
                raise self._refused("delta", err) from err
        counts = self.released_label_counts
        if counts is not None and not (isinstance(counts, list) and all(
                type(c) is int and c >= 0 for c in counts)):
            raise self._refused("released_label_counts",
                                ValueError("not a list of counts (integers >= 0)"))
        if counts is not None and not any(rate == 1.0 and steps >= 1
                                          for _, rate, steps in self.history):
            raise self._refused("released_label_counts",
                                ValueError("counts without their release in the history"))
        labels = self.released_labels
        if (counts is None) != (labels is None) or labels is not None and not (
                isinstance(labels, list) and len(labels) == len(counts)
                and all(isinstance(label, str) for label in labels)):
            raise self._refused("released_labels",
                                ValueError("not one label name per released count"))
        known = {accountant.value for accountant in Accountant}
        if not (isinstance(self.accountants, list)
                and all(isinstance(name, str) and name in known for name in self.accountants)):
            raise self._refused("accountants", ValueError(
                f"not a list of accountant names ({', '.join(sorted(known))})"))

    def booked_by(self, accountant: Accountant) -> None:
        """Record that a run accounting with ``accountant`` booked entries here."""
        if accountant.value not in self.accountants:
            self.accountants.append(accountant.value)

    def add_step(self, step: Step) -> None:
        """One more step; consecutive steps at the same (noise, rate) share one entry, so the
        accountant's work stays constant over hundreds of rounds (epsilon is the same).
        A step the accountant cannot stand on raises ``LedgerError`` and is not booked."""
        try:
            check_step(tuple(step))
        except (TypeError, ValueError) as err:
            raise self._refused("step", err) from err
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
        self.check()
        return dumps_strict(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> PrivacyLedger:
        """A run's ledger as stored; ``LedgerError`` on any entry ``check`` refuses. Values
        are checked as stored (no int() of 2.7 steps, no float() of a string)."""
        data = dict(data)
        data["history"] = [tuple(step) for step in data["history"]]
        ledger = cls(**data)
        ledger.check()
        ledger.history = [(float(z), float(q), int(n)) for z, q, n in ledger.history]
        return ledger

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        try:
            data = loads_strict(text)
        except ValueError as err:
            raise LedgerError(f"privacy ledger: {err}; refused") from err
        return cls.from_dict(data)


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
    """Every run's spending of one hospital, and the record of any archiving. ``accountant``
    is the one this reading computes epsilon with (the run's), whichever booked the entries."""

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
        for run in self.runs.values():
            run.check()  # never write what would be refused on reading
        return dumps_strict({**_header(self.hospital, self.accountant.value),
                             "runs": [asdict(r) for _, r in sorted(self.runs.items())],
                             "events": self.events}, indent=1)


def _header(hospital: int, accountant: str) -> dict:
    """What every ledger file states first: its format, whose it is, and the rules its
    epsilons are computed under."""
    return {"format": LEDGER_FORMAT, "hospital": hospital, "accountant": accountant,
            "neighbouring_relation": NEIGHBOURING_RELATION}


def _relation(data: dict) -> str:
    """The neighbouring relation a ledger file was kept for: format 1 predates the key and
    its step history is accounted exactly as zero-out (the product's only relation)."""
    if data["format"] == 1:
        return data.get("neighbouring_relation", NEIGHBOURING_RELATION)
    return data["neighbouring_relation"]


def _booked(run: object, file_format: int, kept_with: Accountant) -> object:
    """A run as stored, naming its accountants: before format 3 a file was kept with one
    accountant (another was refused), the one it names."""
    if file_format < 3 and isinstance(run, dict) and "accountants" not in run:
        return {**run, "accountants": [kept_with.value]}
    return run


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
        """The hospital's ledger, its epsilons computed with ``accountant`` over the whole
        history, whichever accountant kept it. The runs of a format-1 or format-2 file, kept
        with the one accountant the file names, are read as booked by it."""
        ledger = LifetimeLedger(hospital=hospital, accountant=accountant)
        if self.path.exists():
            try:
                data = loads_strict(self.path.read_text(encoding="utf-8"))
                if data.get("format") not in READABLE_FORMATS:
                    raise ValueError(f"format {data.get('format')!r}, expected one of "
                                     f"{READABLE_FORMATS}")
                kept_with = Accountant(data["accountant"])
                relation = _relation(data)
                runs = [PrivacyLedger.from_dict(_booked(run, data["format"], kept_with))
                        for run in data["runs"]]
                events = list(data.get("events", []))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                # LedgerError is a ValueError: a refused entry names the file here too.
                raise self._unreadable(self.path, err) from err
            if relation != NEIGHBOURING_RELATION:
                raise LedgerError(
                    f"hospital {hospital}: privacy ledger {self.path} key "
                    f"'neighbouring_relation' is {relation!r} but this product's epsilons hold "
                    f"under {NEIGHBOURING_RELATION!r}; its history cannot be composed here. "
                    "Archive the ledger (clinical-fl-ledger --archive) to start a new one.")
            ledger.runs = {run.run_id: run for run in runs}
            ledger.events = events
        self._refuse_per_run_files()
        return ledger

    def _refuse_per_run_files(self) -> None:
        """Stop at a per-run ledger file of the earliest format: its spending may be in no
        lifetime ledger, and a hospital never goes on as if it had not been spent."""
        found = sorted(self.directory.glob(LEGACY_PATTERN))
        if found:
            legacy = found[0]
            raise LedgerError(
                f"privacy ledger {legacy} is a per-run ledger file in the format of "
                f"{LEGACY_UNTIL}, before {LEDGER_FILE} replaced it; this version no longer "
                "reads it and refuses to train rather than forget spent privacy. Every later "
                f"version copied its run into {self.path} when it saved the ledger: move "
                f"{legacy.name} out of {self.directory} (e.g. into {ARCHIVE_DIR}/), then check "
                f"that `clinical-fl-ledger {self.directory}` lists its run.")

    def save(self, ledger: LifetimeLedger) -> Path:
        _atomic_write(self.path, ledger.to_json())
        return self.path

    def archive(self, reason: str, lifetime_epsilon: float | None = None) -> Path:
        """Move the ledger (and any per-run files of the earliest format) to
        ``ledger-archive/<time>/`` and start a new ledger whose first event records what was
        archived, when and why."""
        if not reason.strip():
            raise LedgerError("archiving a privacy ledger needs a reason (--reason)")
        files = [p for p in [self.path, *self.directory.glob(LEGACY_PATTERN)] if p.exists()]
        if not files:
            raise LedgerError(f"no privacy ledger in {self.directory} to archive")
        try:
            data = (loads_strict(self.path.read_text(encoding="utf-8")) if self.path.exists()
                    else {})
        except ValueError as err:
            raise self._unreadable(self.path, err) from err
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.directory / ARCHIVE_DIR / stamp
        target.mkdir(parents=True, exist_ok=False)
        for path in files:
            shutil.move(str(path), target / path.name)
        # Unbounded is written "inf" (JSON has no inf); a NaN would be unbounded too.
        recorded = (lifetime_epsilon if lifetime_epsilon is None or math.isfinite(lifetime_epsilon)
                    else "inf")
        event = {"event": "archived", "time": stamp, "reason": reason,
                 "archived_to": str(target), "lifetime_epsilon": recorded}
        fresh = {**_header(data.get("hospital", 0),
                           data.get("accountant", Accountant.rdp.value)),
                 "runs": [], "events": [*data.get("events", []), event]}
        _atomic_write(self.path, dumps_strict(fresh, indent=1))
        return target
