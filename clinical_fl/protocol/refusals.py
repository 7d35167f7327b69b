"""What a hospital says when it does not do what it was asked: one code from this table,
the setting key it concerns, and counts. Nothing else.

A refusal never carries a cell value, a column header, a path the server did not send, or
exception text: any of them can hold patient data (a label column pointed at the notes
returns a whole note in a ``KeyError``). The details (row, value, traceback) go to the
hospital's own log (``fl_app/hospital/edge.py``). The server turns a code back into words
with this table and tells its operator what the hospital's operator should check.

On the wire a refusal is one line, e.g. ``4003 data-mapping-refused key=data.label_column``
or ``4005 labels-unknown key=data.labels records=12``: Flower's ``Error(code, reason)`` for
train, evaluate and secure-aggregation stages, the ``problem`` or ``declined`` field of a
preflight reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RefusalCode:
    code: int
    name: str
    meaning: str  # what the server logs
    check: str  # what the hospital's operator should look at


CODES: tuple[RefusalCode, ...] = (
    RefusalCode(4001, "settings-invalid", "a task setting the server sent is out of range or "
                "inconsistent", "the named key in the server's configuration"),
    RefusalCode(4002, "settings-unreadable", "the task settings are missing, malformed or too "
                "large", "that the server and hospital run the same product version"),
    RefusalCode(4003, "data-mapping-refused", "a data setting differs from the hospital's own "
                "data mapping (its node config or policy file)", "the named key: leave it unset "
                "on the server, or agree the value with the hospital"),
    RefusalCode(4004, "data-unreadable", "the hospital's data cannot be read as it is mapped "
                "(file, column or row)", "the hospital's data-path and column keys; its log "
                "names the file, row and column"),
    RefusalCode(4005, "labels-unknown", "records carry labels outside the server's label set "
                "(count: records)", "data.labels against the hospital's label column"),
    RefusalCode(4006, "data-too-small", "the hospital holds too few records for what was asked",
                "the hospital's data and data.eval_fraction"),
    RefusalCode(4007, "policy-refused", "the hospital's privacy policy rules out what the server "
                "asked", "the named policy key at the hospital, or the server's privacy settings"),
    RefusalCode(4008, "policy-invalid", "the hospital's own policy or node config is invalid",
                "the named key in the hospital's node config or privacy-policy.toml"),
    RefusalCode(4009, "privacy-plan-invalid", "a privacy parameter the server sent does not fit "
                "the round it came with", "the named key, and the round's hospitals"),
    RefusalCode(4010, "evaluations-exhausted", "the hospital has answered as many evaluations "
                "in this run as its policy allows", "the hospital's max-evaluations"),
    RefusalCode(4011, "stage-refused", "a secure-aggregation stage out of order or "
                "inconsistent with the round", "the server's secure-aggregation logs"),
    RefusalCode(4012, "key-material", "the hospital's CKKS key material or SecAgg+ signing key "
                "or roster is missing or does not match", "the named node config key "
                "(ckks-context, secagg-signing-key, secagg-roster)"),
    RefusalCode(4013, "model-unavailable", "the model cannot be loaded at the hospital",
                "model.name_or_path against what the hospital has installed"),
    RefusalCode(4014, "compute-unavailable", "the device or precision asked for is not at the "
                "hospital", "train.device and train.precision"),
    RefusalCode(4015, "ledger-unreadable", "the hospital's privacy ledger cannot be trusted; "
                "it trains no more until its operator looks", "the hospital's privacy ledger"),
    RefusalCode(4016, "secagg-unauthenticated", "a SecAgg+ round key or signature that does "
                "not verify against the hospital's roster (forged, swapped, replayed, unknown)",
                "the hospitals' roster files and the server's secure-aggregation logs"),
    RefusalCode(4017, "secagg-inconsistent", "the server's lists of who shared keys and who "
                "is alive disagree with the hospital's view, or too few hospitals signed it",
                "the server's secure-aggregation logs (a lying or faulty server)"),
    RefusalCode(4018, "secagg-threshold-refused", "a SecAgg+ threshold below a majority of the "
                "hospitals it shares with (counts: threshold, hospitals)",
                "secure_aggregation.reconstruction_threshold"),
    RefusalCode(4031, "privacy-budget-refused", "the hospital's privacy budget rules out this "
                "round", "the hospital's max-epsilon and the run's privacy settings"),
    RefusalCode(4032, "secure-aggregation-failed", "the hospital could not complete a "
                "secure-aggregation stage", "the hospital's log"),
    RefusalCode(4099, "internal-error", "an unexpected error at the hospital", "the hospital's "
                "log (it holds the traceback)"),
)

BY_NAME = {row.name: row for row in CODES}
BY_CODE = {row.code: row for row in CODES}

# Names of the counts a refusal may carry.
COUNT_NAMES = ("records", "labels", "hospitals", "threshold", "expected", "evaluations")

# A key or count name is a dotted setting key or a policy key: letters, digits, '_', '-', '.'.
_KEY = re.compile(r"^[a-z][a-z0-9_.\-]{0,79}$")
_LINE = re.compile(r"^(?P<code>\d{4}) (?P<name>[a-z\-]+)(?: key=(?P<key>\S+))?"
                   r"(?P<counts>(?: [a-z]+=\d{1,12})*)$")


@dataclass(frozen=True)
class Refusal:
    """A refusal as it leaves the hospital."""

    name: str
    key: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def row(self) -> RefusalCode:
        return BY_NAME[self.name]

    @property
    def code(self) -> int:
        return self.row.code

    def wire(self) -> str:
        """The one line that leaves the hospital."""
        parts = [f"{self.code} {self.name}"]
        if self.key:
            parts.append(f"key={self.key}")
        parts += [f"{name}={int(value)}" for name, value in self.counts.items()]
        return " ".join(parts)

    def explain(self) -> str:
        """What the server tells its operator."""
        where = f" ({self.key})" if self.key else ""
        counts = "".join(f", {k} {v}" for k, v in self.counts.items())
        return f"{self.name}{where}{counts}: {self.row.meaning}; check {self.row.check}"


def make_refusal(name: str, key: str = "", counts: dict[str, int] | None = None,
                 allowed_keys: frozenset[str] | None = None) -> Refusal:
    """A refusal that can only hold what the table allows: a known code, a key of the shape
    of a setting key (and in ``allowed_keys`` when given), integer counts of known names.
    Anything else is dropped, never sent."""
    if name not in BY_NAME:
        name = "internal-error"
    if not _KEY.match(key or "") or (allowed_keys is not None and key not in allowed_keys):
        key = ""
    kept = {k: int(v) for k, v in (counts or {}).items()
            if k in COUNT_NAMES and isinstance(v, int) and not isinstance(v, bool)
            and 0 <= v < 10**12}
    return Refusal(name, key, kept)


def parse_refusal(text: str) -> Refusal | None:
    """A refusal line back into its parts; None if ``text`` is not one (the server then
    shows that the hospital sent something outside the protocol, never the text itself)."""
    match = _LINE.match(text or "")
    if not match or int(match["code"]) not in BY_CODE:
        return None
    row = BY_CODE[int(match["code"])]
    if row.name != match["name"]:
        return None
    counts = dict(pair.split("=") for pair in match["counts"].split())
    return make_refusal(row.name, match["key"] or "", {k: int(v) for k, v in counts.items()})


def is_refusal_line(text: str) -> bool:
    """Exactly a line the table allows (nothing dropped by ``make_refusal`` on the way)."""
    refusal = parse_refusal(text)
    return refusal is not None and refusal.wire() == text


def explain_reason(text: str) -> str:
    """What the server shows for a hospital's error reason or preflight finding: the
    table's words for a refusal line; for anything else, only that it was outside the
    protocol (its text is never shown, logged or stored: it could hold patient data)."""
    refusal = parse_refusal(text)
    if refusal is None:
        return "a reply outside the protocol (not shown; the hospital's log has the details)"
    return refusal.explain()
