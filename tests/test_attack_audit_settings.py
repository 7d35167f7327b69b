"""A mistaken or malicious server against the privacy audit's settings (``audit.*``), through
one deployed hospital's real ClientApp (its edge, its mods, its handlers).

The audit's canaries are for simulation only: a deployed hospital must never let the server
add records to its training set (they count in its record count, its sampling rate and its
aggregation weight) nor name a file on its machine for it to read. A hospital is deployed when
its node config names a ``data-path`` or a ``state-dir`` (``fl_app/hospital/node_config.py``);
one with a ``state-dir`` and no ``data-path`` trains on synthetic notes (a demo or drill
deployment), and is deployed all the same.
"""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clinical_fl.protocol import messages as m
from clinical_fl.protocol.refusals import is_refusal_line, parse_refusal
from clinical_fl.settings.compose import task_settings_to_yaml
from fl_app.hospital.client_app import app
from tasks.audit.canaries import make_canaries, write_canaries
from tasks.data.synthetic_notes import SPECIALTIES
from tests.hostile_server import spy_on_steps, task_identity
from tests.support import task

NODE, RUN = 7, 43
LABELS = list(SPECIALTIES)


@pytest.fixture(scope="module")
def identity():
    with task_identity(RUN, NODE):
        yield


@pytest.fixture
def spy(monkeypatch):
    return spy_on_steps(monkeypatch)


def _canaries_file(tmp_path):
    canaries = make_canaries(50, len(LABELS))
    for canary in canaries:
        canary.included = True
    return write_canaries(canaries, tmp_path / "canaries.jsonl")


def _message(text: str, kind: str) -> Message:
    message_type = {"preflight": f"query.{m.PREFLIGHT_QUERY}"}.get(kind, kind)
    return Message(RecordDict({m.CONFIG_RECORD: ConfigRecord({m.TASK_KEY: text,
                                                              m.SERVER_ROUND_KEY: 1})}),
                   dst_node_id=NODE, message_type=message_type)


@pytest.mark.parametrize("canaries_path", ["file", "/dev/zero"])
def test_attack_a_deployed_hospital_without_data_path_refuses_audit_canaries(
        tiny_bert, tmp_path, identity, spy, monkeypatch, canaries_path):
    """State-dir only (synthetic notes): the server's canaries file is never read (not a
    file of the server's naming, not /dev/zero, which would fill the hospital's memory), no
    record is added, and the preflight is refused on audit.canaries_path."""
    read = []
    monkeypatch.setattr("tasks.audit.canaries.Path.read_text",
                        lambda self, *a, **k: read.append(str(self)) or "")
    path = str(_canaries_file(tmp_path)) if canaries_path == "file" else canaries_path
    settings = task(tiny_bert, f"audit.canaries_path={path}", planned_rounds=1)
    state = tmp_path / "state"
    context = Context(run_id=RUN, node_id=NODE, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "num-partitions": 2,
                                   "state-dir": str(state), "deid": "allowed"})
    reply = app(_message(task_settings_to_yaml(settings), "preflight"), context)
    if reply.has_error():
        line = reply.error.reason
    else:
        status = reply.content[m.PREFLIGHT_STATUS_RECORD]
        line = status[m.PREFLIGHT_PROBLEM] or status[m.PREFLIGHT_DECLINED]
    assert line and is_refusal_line(line), "a deployed hospital accepted the audit's canaries"
    assert parse_refusal(line).key == "audit.canaries_path", line
    assert not read, f"the hospital read {read}"
    assert not spy.calls
