"""A hospital export with a canary in every cell, and a server that tampers with what it sends:
what the hostile-server tests (``pytest -k hostile_server``) share.

Every cell of the export holds a unique canary string (the label column excepted: its values
are the label set the server itself sends), and one extra column's name is a canary too. A
canary anywhere the server can read (a reply, an error reason, its log, its MLflow store) is
patient data that left the hospital.
"""

from __future__ import annotations

import contextlib
import csv
import secrets
from collections.abc import Iterator
from pathlib import Path

import yaml

from tasks.data.synthetic_notes import SPECIALTIES, generate_hospital_notes

# Letters that appear together nowhere else: a canary is this prefix and a counter.
CANARY = "QZXCANARY"
CANARY_COLUMN = f"{CANARY}column"
LABELS = list(SPECIALTIES[:4])


def write_canary_export(path: Path, hospital: int, notes: int = 40) -> Path:
    """A CSV export of ``notes`` notes: text, label, patient_name, mrn, dob and a column whose
    name is a canary; every cell but the labels holds a canary."""
    tag = secrets.token_hex(3)
    rows = []
    for k, note in enumerate(generate_hospital_notes(hospital, notes, seed=hospital,
                                                     labels=tuple(LABELS))):
        canary = f"{CANARY}{tag}h{hospital}r{k}"
        rows.append({"text": f"{note.text} {canary}text", "label": note.label,
                     "patient_name": f"{canary}name", "mrn": f"{canary}mrn",
                     "dob": f"{canary}dob", CANARY_COLUMN: f"{canary}extra"})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def tampered(task_yaml: str, changes: dict[str, object]) -> str:
    """The task settings' YAML with dotted keys set to any value, NaN and inf included: what a
    server that skips its own validation (or a malicious one) sends."""
    tree = yaml.safe_load(task_yaml)
    for dotted, value in changes.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return yaml.safe_dump(tree, sort_keys=False)


def holds_canary(*texts: object) -> bool:
    return any(CANARY in (t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t))
               for t in texts)


class StepSpy:
    """Stands in for every training step and scoring: a message the hospital must refuse
    reaches none."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, name: str):  # noqa: ANN204
        def step(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.calls.append(name)
            raise AssertionError(f"{name} ran for a message the hospital must refuse")
        return step


# Each step a hospital may take, where it is called: the mechanisms (tasks/privacy/mechanisms/)
# and the hospital's evaluation.
STEPS = {"train_with_dp_sgd": "tasks.privacy.mechanisms.dp_sgd",
         "train_locally": "tasks.privacy.mechanisms.no_dp",
         "clipped_gradient_sum": "tasks.privacy.mechanisms.distributed_dp",
         "evaluate": "tasks.hospital"}


def spy_on_steps(monkeypatch) -> StepSpy:  # noqa: ANN001
    """Every step of STEPS replaced by the spy, for the rest of the test."""
    spy = StepSpy()
    for name, caller in STEPS.items():
        monkeypatch.setattr(f"{caller}.{name}", spy(name))
    return spy


@contextlib.contextmanager
def task_identity(run_id: int, node_id: int) -> Iterator[None]:
    """Flower's task identity of a ClientApp called in-process (what a SuperNode sets before
    running it), cleared after."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, node_id
    try:
        yield
    finally:
        TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None
