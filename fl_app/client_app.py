"""ClientApp: what runs inside each hospital. Turns Flower messages into calls on ``tasks``."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fl_app.config import task_settings_from_yaml
from fl_app.replies import evaluate_reply, preflight_reply, train_reply
from tasks.data import load_hospital_data
from tasks.errors import TaskInputError
from tasks.hospital import Hospital

TASK_KEY = "task"  # ConfigRecord key holding the server's task settings (YAML)

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise TaskInputError(
            f"node {context.node_id}: node config lacks {err.args[0]!r}; start the SuperNode with "
            "--node-config 'partition-id=<k> num-partitions=<n>'") from err


def _hospital(msg: Message, context: Context) -> Hospital:
    settings = task_settings_from_yaml(str(msg.content["config"][TASK_KEY]))
    partition_id, num_partitions = _partition(context)
    return Hospital(settings, settings.data.labels, partition_id, num_partitions)


@app.query("preflight")
def preflight(msg: Message, context: Context) -> Message:
    """Check this hospital's data against the server's settings before any training."""
    partition_id = int(context.node_config.get("partition-id", -1))
    try:
        settings = task_settings_from_yaml(str(msg.content["config"][TASK_KEY]))
        partition_id, num_partitions = _partition(context)
        data = load_hospital_data(settings.data, settings.data.labels, partition_id,
                                  num_partitions)
    except (TaskInputError, ValueError) as err:
        return preflight_reply(msg, partition_id, None, 0, 0, problem=str(err))
    return preflight_reply(msg, partition_id, data.label_counts(settings.data.labels),
                           len(data.train), len(data.eval))


@app.train()
def train(msg: Message, context: Context) -> Message:
    hospital = _hospital(msg, context)
    config = msg.content["config"]
    global_state = msg.content["arrays"].to_torch_state_dict()
    state, outcome = hospital.train(global_state, int(config.get("server-round", 0)),
                                    proximal_mu=float(config.get("proximal-mu", 0.0)))
    return train_reply(msg, state, outcome, hospital.data.hospital)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    hospital = _hospital(msg, context)
    arrays: ArrayRecord = msg.content["arrays"]
    outcome = hospital.evaluate(arrays.to_torch_state_dict())
    return evaluate_reply(msg, outcome, hospital.data.hospital)
