"""One message to one hospital's real ClientApp handlers, as a SuperNode would deliver it:

    python -m tests.hospital_process SETTINGS_YAML STATE_DIR RUN_ID ROUND [NODE_CONFIG_JSON]

Prints the reply's metrics as JSON. The process starts with an empty Flower
context, so anything it knows about earlier rounds or runs comes from the state
directory. Tests also call ``hospital_train``/``hospital_preflight`` in-process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clinical_fl.protocol import messages as m
from clinical_fl.settings.compose import task_settings_from_yaml
from fl_app.hospital.client_app import app
from tasks.model.build import build_model, load_tokenizer, trainable_state

NODE = 7


def _context(run_id: int, state_dir: str | Path, node_config: dict | None) -> Context:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, int(run_id), NODE
    # A state-dir makes it a deployed hospital, which requires de-identification unless its
    # policy allows it off: the tests switch it off for speed (tests/test_deid.py covers it).
    config = {"partition-id": 0, "num-partitions": 2, "state-dir": str(state_dir),
              "deid": "allowed"}
    return Context(run_id=int(run_id), node_id=NODE, state=RecordDict(), run_config={},
                   node_config=config | (node_config or {}))


def initial_arrays(text: str) -> ArrayRecord:
    """The untrained adapter, as the ServerApp builds it from these settings."""
    settings = task_settings_from_yaml(text)
    model = build_model(settings.model, settings.data.labels, settings.seed,
                        load_tokenizer(settings.model))
    return ArrayRecord(trainable_state(model))


def hospital_train(settings_yaml: str, state_dir: str | Path, run_id: int, server_round: int,
                   node_config: dict | None = None) -> dict:
    """The train reply's metrics, or ``{"error": reason, "code": code}``."""
    return hospital_train_reply(settings_yaml, state_dir, run_id, server_round, node_config)[0]


def hospital_train_reply(settings_yaml: str, state_dir: str | Path, run_id: int,
                         server_round: int, node_config: dict | None = None,
                         arrays: ArrayRecord | None = None, round_config: dict | None = None
                         ) -> tuple[dict, ArrayRecord | None]:
    """(the train reply's metrics or ``{"error": reason, "code": code}``, its arrays), from
    ``arrays`` (default: the untrained adapter); ``round_config``: more keys of the round's
    config (a learning-rate factor, a proximal term)."""
    context = _context(run_id, state_dir, node_config)
    config = ConfigRecord({m.TASK_KEY: settings_yaml, m.SERVER_ROUND_KEY: int(server_round),
                           **(round_config or {})})
    sent = arrays if arrays is not None else initial_arrays(settings_yaml)
    msg = Message(RecordDict({m.ARRAYS_RECORD: sent, m.CONFIG_RECORD: config}),
                  dst_node_id=NODE, message_type="train")
    reply = app(msg, context)  # through the mods, as a SuperNode delivers it
    if reply.has_error():
        return {"error": reply.error.reason, "code": reply.error.code}, None
    return (dict(reply.content.metric_records[m.METRICS_RECORD]),
            reply.content.array_records[m.ARRAYS_RECORD])


def hospital_evaluate(settings_yaml: str, state_dir: str | Path, run_id: int,
                      node_config: dict | None = None) -> dict:
    context = _context(run_id, state_dir, node_config)
    msg = Message(RecordDict({m.ARRAYS_RECORD: initial_arrays(settings_yaml),
                              m.CONFIG_RECORD: ConfigRecord({m.TASK_KEY: settings_yaml})}),
                  dst_node_id=NODE, message_type="evaluate")
    reply = app(msg, context)
    if reply.has_error():
        return {"error": reply.error.reason, "code": reply.error.code}
    return dict(reply.content.metric_records[m.METRICS_RECORD])


def hospital_preflight(settings_yaml: str, state_dir: str | Path, run_id: int,
                       node_config: dict | None = None) -> dict:
    """The preflight reply's status (ok, problem, declined)."""
    context = _context(run_id, state_dir, node_config)
    msg = Message(RecordDict({m.CONFIG_RECORD: ConfigRecord({m.TASK_KEY: settings_yaml})}),
                  dst_node_id=NODE, message_type=f"query.{m.PREFLIGHT_QUERY}")
    reply = app(msg, context)
    if reply.has_error():
        return {"ok": False, "problem": reply.error.reason, "declined": ""}
    return dict(reply.content[m.PREFLIGHT_STATUS_RECORD])


def hospital_preflight_counts(settings_yaml: str, state_dir: str | Path, run_id: int,
                              node_config: dict | None = None) -> tuple[dict, list[int] | None]:
    """(the preflight reply's status, the label counts it sent; None: none sent)."""
    context = _context(run_id, state_dir, node_config)
    msg = Message(RecordDict({m.CONFIG_RECORD: ConfigRecord({m.TASK_KEY: settings_yaml})}),
                  dst_node_id=NODE, message_type=f"query.{m.PREFLIGHT_QUERY}")
    reply = app(msg, context)
    if reply.has_error():
        return {"ok": False, "problem": reply.error.reason, "declined": ""}, None
    counts = reply.content[m.PREFLIGHT_COUNTS_RECORD]
    return (dict(reply.content[m.PREFLIGHT_STATUS_RECORD]),
            [int(c) for c in counts[m.LABEL_COUNTS]] if m.LABEL_COUNTS in counts else None)


def main(settings_file: str, state_dir: str, run_id: str, server_round: str,
         node_config: str = "{}") -> None:
    print(json.dumps(hospital_train(Path(settings_file).read_text(), state_dir, int(run_id),
                                    int(server_round), json.loads(node_config))))


if __name__ == "__main__":
    main(*sys.argv[1:])
