"""A SecAgg+ server played by hand, stage by stage, against the hospitals' real mods (edge,
secure aggregation, client-level clipping, in process: tests/secure_hospitals.py), so that
a test can lie at any stage: withhold shares, tell hospitals different alive lists, swap or
replay keys. What the hospitals answer is what reached the server."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from clinical_fl.protocol import messages as m
from clinical_fl.secure_aggregation import secagg_plus
from tests.secure_hospitals import ADAPTER, HospitalsGrid, records_of

CLIPPING_RANGE, LEVELS = 4.0, 2**24


@dataclass
class SignedKeys:
    """What a hospital sent at setup: its round keys, long-term key and signature."""

    pk1: bytes
    pk2: bytes
    signing_key: bytes
    signature: bytes

    def row(self) -> tuple[bytes, bytes, bytes, bytes]:
        return self.pk1, self.pk2, self.signing_key, self.signature


@dataclass
class LyingServer:
    nodes: list[int]
    threshold: int
    round_: int = 1
    max_weight: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.hospitals = HospitalsGrid(self.nodes)
        self.max_weight = float(max(records_of(n) for n in self.nodes))
        self.start = {k: v + 0.5 for k, v in ADAPTER.items()}

    # --- One message to one hospital, through its real ClientApp mods ----------------

    def ask(self, node: int, record: dict, train: bool = False,
            start: dict[str, np.ndarray] | None = None, config: dict | None = None) -> Message:
        """``start`` and ``config``: the train message's adapter and config (the collect
        stage), the round's own unless a liar gives this hospital others."""
        content = RecordDict({m.SECAGG_RECORD: ConfigRecord(
            {m.SECAGG_ROUND: self.round_, **record})})
        if train:
            content[m.ARRAYS_RECORD] = ArrayRecord(
                {k: Array(v) for k, v in (start or self.start).items()})
            content[m.CONFIG_RECORD] = ConfigRecord(
                {m.SERVER_ROUND_KEY: self.round_, **(config or {})})
        msg = Message(content, dst_node_id=node, message_type="train",
                      group_id=str(self.round_))
        return next(iter(self.hospitals.send_and_receive([msg])))

    @staticmethod
    def answer(reply: Message) -> ConfigRecord:
        assert reply.has_content(), reply.error.reason
        return reply.content[m.SECAGG_RECORD]

    # --- The stages, each with what a liar may change --------------------------------

    def setup(self, threshold: int | None = None) -> dict[int, SignedKeys]:
        keys = {}
        for node in self.nodes:
            record = self.answer(self.ask(node, {
                m.SECAGG_STAGE: m.STAGE_SETUP, m.SECAGG_THRESHOLD: threshold or self.threshold,
                m.SECAGG_CLIPPING_RANGE: CLIPPING_RANGE, m.SECAGG_QUANTIZATION_RANGE: LEVELS,
                m.SECAGG_MAX_WEIGHT: self.max_weight}))
            keys[node] = SignedKeys(*(bytes(record[k]) for k in (
                m.SECAGG_PUBLIC_KEY_1, m.SECAGG_PUBLIC_KEY_2, m.SECAGG_SIGNING_KEY,
                m.SECAGG_SIGNATURE)))
        return keys

    def share_keys(self, node: int, listing: dict[int, SignedKeys]) -> Message:
        nodes = sorted(listing)
        columns = zip(*(listing[n].row() for n in nodes), strict=True)
        record = {m.SECAGG_STAGE: m.STAGE_SHARE_KEYS, m.SECAGG_NODES: nodes}
        record.update(zip((m.SECAGG_PUBLIC_KEY_1, m.SECAGG_PUBLIC_KEY_2, m.SECAGG_SIGNING_KEY,
                           m.SECAGG_SIGNATURE), map(list, columns), strict=True))
        return self.ask(node, record)

    def share_all(self, keys: dict[int, SignedKeys]) -> dict[int, dict[int, bytes]]:
        """Every hospital gets the honest key list; the encrypted shares, by receiver then
        sender."""
        inbox: dict[int, dict[int, bytes]] = {n: {} for n in self.nodes}
        for node in self.nodes:
            record = self.answer(self.share_keys(node, keys))
            for dst, ciphertext in zip(record[m.SECAGG_DESTINATIONS],
                                       record[m.SECAGG_CIPHERTEXTS], strict=True):
                inbox[int(dst)][node] = bytes(ciphertext)
        return inbox

    def collect(self, node: int, shares: dict[int, bytes], **train: object) -> np.ndarray:
        """Hands ``node`` the shares chosen for it; it trains and sends its masked vector.
        ``train``: ``start`` or ``config`` of its own (see ``ask``)."""
        record = self.answer(self.ask(node, {
            m.SECAGG_STAGE: m.STAGE_COLLECT, m.SECAGG_SOURCES: list(shares),
            m.SECAGG_CIPHERTEXTS: list(shares.values())}, train=True, **train))
        return record[m.SECAGG_VECTOR].numpy()

    def consistency(self, node: int, alive: list[int]) -> Message:
        return self.ask(node, {m.SECAGG_STAGE: m.STAGE_CONSISTENCY, m.SECAGG_ALIVE: alive})

    def unmask(self, node: int, alive: list[int], signatures: dict[int, bytes]) -> Message:
        return self.ask(node, {m.SECAGG_STAGE: m.STAGE_UNMASK, m.SECAGG_ALIVE: alive,
                               m.SECAGG_SIGNERS: list(signatures),
                               m.SECAGG_SIGNATURE: list(signatures.values())})

    # --- What the hospitals keep (the test's oracle, never the server's) -------------

    def secrets_of(self, node: int) -> secagg_plus.HospitalSecrets:
        state = self.hospitals.contexts[node].state.config_records["secure-aggregation"]
        return secagg_plus.HospitalSecrets.from_json(str(state["json"]))

    def revealed(self) -> list[bytes]:
        """Every share value any hospital's reply carried to the server."""
        return [bytes(v) for _, content in self.hospitals.received if content is not None
                and m.SECAGG_RECORD in content
                for v in content[m.SECAGG_RECORD].get(m.SECAGG_SHARE_VALUES, [])]
