"""In-process hospitals for secure-aggregation tests: a Grid that hands each message to the
real secure-aggregation mod of the hospital it is addressed to, around a train handler
that moves the adapter by a fixed, hospital-specific step (the protocol is under test
here; real training runs in the flwr run tests)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from uuid import uuid4

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from clinical_fl.protocol import messages as m
from clinical_fl.secure_aggregation import signing
from fl_app.hospital.clipping_mod import asks_for_clipping, clip_update_for_client_level_dp
from fl_app.hospital.edge import HOSPITAL_LOG, hospital_edge_mod
from fl_app.hospital.node_config import state_dir
from fl_app.hospital.secure_aggregation_mod import secure_aggregation_mod

ADAPTER = {"lora_A": np.zeros((8, 64), np.float32), "lora_B": np.zeros((64, 8), np.float32),
           "head.weight": np.zeros((3, 64), np.float32)}


def provision_signing_keys(contexts: Iterable[Context], directory: Path) -> Path:
    """What deploy/ does for deployed hospitals: a signing key each (node config
    ``secagg-signing-key``) and one roster of their public keys (``secagg-roster``)."""
    contexts = list(contexts)
    directory.mkdir(parents=True, exist_ok=True)
    roster = directory / "roster"
    lines = []
    for context in contexts:
        key = directory / f"node-{context.node_id}.pem"
        if not key.exists():
            signing.new_private_key(key)
        lines.append(key.with_name(key.name + ".pub").read_bytes())
        context.node_config["secagg-signing-key"] = str(key)
        context.node_config["secagg-roster"] = str(roster)
    roster.write_bytes(b"".join(lines))
    return roster


def through_hospital(msg: Message, context: Context, handler) -> Message:  # noqa: ANN001
    """A train message through the hospital's edge and secure-aggregation mods, as the
    ClientApp registers them, around ``handler``."""
    return hospital_edge_mod(msg, context,
                             lambda msg, ctx: secure_aggregation_mod(msg, ctx, handler))


def hospital_log(context: Context) -> str:
    """The hospital's own log (details of its refusals; never sent)."""
    return (state_dir(context) / HOSPITAL_LOG).read_text()


def step_of(node: int) -> dict[str, np.ndarray]:
    """What hospital ``node``'s training adds to the adapter: small, like one round's change."""
    rng = np.random.default_rng(node)
    return {name: rng.normal(0, 0.02, a.shape).astype(np.float32) for name, a in ADAPTER.items()}


def records_of(node: int) -> int:
    return 50 + 10 * (node % 7)


class HospitalsGrid(Grid):
    """``silent``: node -> the stage at which that hospital stops answering (it dropped out);
    ``refusing``: nodes whose train handler refuses the round (its privacy budget)."""

    def __init__(self, nodes: list[int], silent: dict[int, str] | None = None,
                 refusing: Iterable[int] = (), node_config: dict | None = None) -> None:
        self.nodes = nodes
        self.silent = silent or {}
        self.refusing = set(refusing)
        self.contexts = {n: Context(run_id=7, node_id=n, node_config={
            "partition-id": k, **(node_config or {})}, state=RecordDict(), run_config={})
            for k, n in enumerate(nodes)}
        # The spy: (hospital, content) of every reply that reached the server, as it arrived.
        self.received: list[tuple[int, RecordDict | None]] = []

    def _handler(self, msg: Message, context: Context) -> Message:
        node = context.node_id
        if node in self.refusing:
            return Message(Error(code=m.PRIVACY_BUDGET_REFUSED,
                                 reason="4031 privacy-budget-refused"), reply_to=msg)
        start = {k: a.numpy() for k, a in msg.content[m.ARRAYS_RECORD].items()}
        trained = {k: Array(start[k] + step_of(node)[k]) for k in start}
        # As fl_app/hospital/replies.py: equal weights under client-level DP.
        weight = 1 if asks_for_clipping(msg) else records_of(node)
        metrics = MetricRecord({m.NUM_EXAMPLES: records_of(node), m.WEIGHT_KEY: weight,
                                m.HOSPITAL: node})
        return Message(RecordDict({m.ARRAYS_RECORD: ArrayRecord(trained),
                                   m.METRICS_RECORD: metrics}), reply_to=msg)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            node = msg.metadata.dst_node_id
            record = msg.content.get(m.SECAGG_RECORD)
            stage = str(record[m.SECAGG_STAGE]) if record is not None else "plain"
            if self.silent.get(node) == stage:
                self.silent[node] = "all"
            if self.silent.get(node) == "all":
                continue
            # The ClientApp's mods, in its order, around the handler.
            replies.append(through_hospital(
                msg, self.contexts[node],
                lambda msg, ctx: clip_update_for_client_level_dp(msg, ctx, self._handler)))
        self.received.extend((r.metadata.src_node_id,
                              RecordDict(dict(r.content.items())) if r.has_content() else None)
                             for r in replies)
        return replies

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def create_message(self, *args):  # noqa: ANN002, ANN201
        raise NotImplementedError

    def set_run(self, run):  # noqa: ANN001, ANN201
        pass

    @property
    def run(self):  # noqa: ANN201
        return None

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def get_nodes(self):  # noqa: ANN201
        return []


def fedavg_of(nodes: Iterable[int], start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Plain FedAvg of the hospitals' trained adapters, weighted by records."""
    nodes = list(nodes)
    total = sum(records_of(n) for n in nodes)
    return {k: sum((start[k] + step_of(n)[k]) * records_of(n) for n in nodes) / total
            for k in start}
