"""One training round of one hospital in a process of its own, as a SuperNode would run it:

    python -m tests.hospital_process SETTINGS_YAML STATE_DIR RUN_ID ROUND

Prints the reply's metrics as JSON. The process starts with an empty Flower
context, so anything it knows about earlier rounds comes from the state directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_app.client_app import TASK_KEY, train
from fl_app.config import task_settings_from_yaml
from tasks.model import build_model, load_tokenizer, trainable_state


def main(settings_file: str, state_dir: str, run_id: str, server_round: str) -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, int(run_id), 7
    text = Path(settings_file).read_text()
    settings = task_settings_from_yaml(text)
    model = build_model(settings.model, settings.data.labels, settings.seed,
                        load_tokenizer(settings.model))
    msg = Message(RecordDict({"arrays": ArrayRecord(trainable_state(model)),
                              "config": ConfigRecord({TASK_KEY: text,
                                                      "server-round": int(server_round)})}),
                  dst_node_id=7, message_type="train")
    context = Context(run_id=int(run_id), node_id=7, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "num-partitions": 2,
                                   "state-dir": state_dir})
    reply = train(msg, context)
    if reply.has_error():
        print(json.dumps({"error": reply.error.reason}))
    else:
        print(json.dumps(dict(reply.content.metric_records["metrics"])))


if __name__ == "__main__":
    main(*sys.argv[1:])
