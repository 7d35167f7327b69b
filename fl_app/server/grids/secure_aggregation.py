"""The server's side of secure aggregation: a Grid that runs the protocol under the strategy.

The strategy (FedAvg, FedAdam, the DP wrappers, the budget gate) sends its train messages
through this Grid as always. Here they become the protocol's stages; the strategy then
gets, from each hospital that contributed, a reply with its own metrics and the same
aggregate adapter (the weighted mean the hospitals' sum gives), so its aggregation, server
optimiser and client-level DP noise work unchanged on what is now the only thing the
server learns: the sum. A round that cannot release a sum of at least the reconstruction
threshold of hospitals gives the strategy error replies, and nothing is aggregated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid

from clinical_fl.protocol import messages as m
from clinical_fl.protocol.refusals import explain_reason
from clinical_fl.secure_aggregation import ckks, secagg_plus, signing
from clinical_fl.secure_aggregation.update_vector import summed, weighted_mean
from clinical_fl.settings.secure_aggregation import (
    SECAGG_MODULUS,
    SecureAggregationMode,
    SecureAggregationSettings,
)
from fl_app.exchange import ciphertext_record, ciphertexts_of
from fl_app.server.grids.base import GridWrapper
from fl_app.server.grids.metered import payload_bytes

log = logging.getLogger(__name__)


class RoundAborted(Exception):
    """The round cannot release a sum (the message says why)."""


@dataclass(frozen=True)
class _SecAggPlusRound:
    """What every SecAgg+ stage of one round shares: the round, its reconstruction
    threshold, each hospital's neighbours (those it shares its secrets with: all of the
    round's), the timeout."""

    round_: int
    threshold: int
    neighbours: dict[int, list[int]]
    timeout: float | None

    @property
    def group(self) -> str:
        """The stages' Flower group id: the round."""
        return str(self.round_)


class SecureAggregationGrid(GridWrapper):
    """Delegates to the real Grid; train messages go through the configured protocol.

    ``max_weight``: the largest aggregation weight a hospital may send (its training
    records, or 1 under client-level DP); ``ckks_public``: the public CKKS context;
    ``sum_updates``: the strategy gets the adapter plus the plain sum of the updates, not
    their weighted mean (distributed DP: the hospitals' shares of one noisy step add up)."""

    def __init__(self, grid: Grid, settings: SecureAggregationSettings, max_weight: float,
                 ckks_public: bytes | None = None,
                 hospital_of: Callable[[int], object] = lambda node: node,
                 sum_updates: bool = False, noise_threshold: int = 2,
                 on_abort: Callable[[int, str], None] | None = None) -> None:
        """``noise_threshold``: the t distributed DP's noise shares assume (each hospital adds
        sigma/sqrt(t)); no sum of fewer hospitals is released whatever the settings say.
        ``on_abort``: (round, reason) of a round that released nothing, e.g. for MLflow."""
        super().__init__(grid)
        self.settings = settings
        self.noise_threshold = int(noise_threshold)
        self.on_abort = on_abort
        self.max_weight = float(max_weight)
        self._combine = summed if sum_updates else weighted_mean
        self._ckks = (ckks.load_public_context(ckks_public, "the server")
                      if ckks_public is not None else None)
        self._hospital_of = hospital_of
        self._stats: dict[str, float] = {}

    # --- What MLflow gets per round -----------------------------------------------------

    def take_round_stats(self) -> dict[str, float]:
        stats, self._stats = self._stats, {}
        return stats

    def _add(self, key: str, value: float) -> None:
        self._stats[key] = self._stats.get(key, 0.0) + value

    # --- The protocol -------------------------------------------------------------------

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or any(msg.metadata.message_type != MessageType.TRAIN
                               for msg in messages):
            return self._grid.send_and_receive(messages, timeout=timeout)
        self._errors: dict[int, Message] = {}
        try:
            if self.settings.mode == SecureAggregationMode.secagg_plus:
                return self._secagg_plus(messages, timeout)
            return self._ckks_round(messages, timeout)
        except RoundAborted as abort:
            log.error("secure aggregation: round dropped, nothing released: %s", abort)
            if self.on_abort:
                self.on_abort(self._round_facts(messages)[0], str(abort))
            # A hospital's own error (a refusal over its budget) keeps its code and reason.
            return [self._errors.get(msg.metadata.dst_node_id) or Message(
                Error(code=m.SECURE_AGGREGATION_FAILED, reason=str(abort)), reply_to=msg)
                for msg in messages]

    def _stage(self, contents: dict[int, RecordDict], group_id: str,
               timeout: float | None) -> tuple[dict[int, Message], dict[int, Message]]:
        """Send one protocol stage; (replies with content, error replies) by node."""
        sent = [Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                        group_id=group_id) for node, content in contents.items()]
        started = time.perf_counter()
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        self._add("secure_aggregation/stage_seconds", time.perf_counter() - started)
        self._add("secure_aggregation/stage_bytes",
                  sum(payload_bytes(msg.content) for msg in sent)
                  + sum(payload_bytes(r.content) for r in replies if r.has_content()))
        ok = {r.metadata.src_node_id: r for r in replies if r.has_content()}
        failed = {r.metadata.src_node_id: r for r in replies if not r.has_content()}
        for node, reply in failed.items():
            log.warning("secure aggregation: hospital %s failed a stage: %s",
                        self._hospital_of(node), explain_reason(reply.error.reason))
        return ok, failed

    def _collect(self, messages: list[Message], extra: dict[int, ConfigRecord],
                 timeout: float | None) -> tuple[dict[int, Message], list[Message]]:
        """The strategy's own train messages (one copy of the content per hospital: Flower's
        strategies share one RecordDict) with each hospital's stage record added."""
        sent = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in extra:
                continue
            content = RecordDict(dict(msg.content.items()))
            content[m.SECAGG_RECORD] = extra[node]
            sent.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                                group_id=msg.metadata.group_id))
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        uploaded = [r for r in replies if r.has_content()]
        self._add("secure_aggregation/update_bytes",
                  sum(payload_bytes(r.content) for r in uploaded))
        failed = [r for r in replies if not r.has_content()]
        self._errors.update({r.metadata.src_node_id: r for r in failed})
        return {r.metadata.src_node_id: r for r in uploaded}, failed

    def _replies(self, contributed: dict[int, Message], failed: list[Message],
                 aggregate: dict[str, np.ndarray]) -> list[Message]:
        """Each contributor's reply, now with its metrics and the aggregate adapter."""
        arrays = ArrayRecord({name: Array(value) for name, value in aggregate.items()})
        for reply in contributed.values():
            reply.content = RecordDict({m.ARRAYS_RECORD: arrays,
                                        m.METRICS_RECORD: reply.content[m.METRICS_RECORD]})
        return [*contributed.values(), *failed]

    def _round_facts(self, messages: list[Message]) -> tuple[int, dict[str, np.ndarray]]:
        first = messages[0].content
        round_ = int(first[m.CONFIG_RECORD].get(m.SERVER_ROUND_KEY, 0))
        start = {name: array.numpy() for name, array in first[m.ARRAYS_RECORD].items()}
        return round_, start

    def _threshold(self, hospitals: int) -> int:
        """The fewest hospitals a sum of this round may hold: the settings' threshold for a
        round of ``hospitals``, and never fewer than distributed DP's noise assumes."""
        return max(self.settings.threshold_for(hospitals), self.noise_threshold)

    def _check_count(self, hospitals: int, threshold: int, stage: str) -> None:
        if hospitals < threshold:
            raise RoundAborted(f"{stage}: {hospitals} hospital(s), fewer than the "
                               f"reconstruction threshold {threshold}")

    def _secagg_plus(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """SecAgg+'s stages in order: setup (signed public keys), share keys, collect
        (masked updates), consistency (signed views), unmask (the shares that remove the
        masks), then the released sum."""
        round_, start = self._round_facts(messages)
        nodes = sorted(msg.metadata.dst_node_id for msg in messages)
        threshold = self._threshold(len(nodes))
        self._check_secagg_plus_round(nodes, threshold)
        run = _SecAggPlusRound(
            round_=round_, threshold=threshold, timeout=timeout,
            # The complete graph: every hospital shares with every other (no ring: the
            # consistency stage compares whole views, docs/secure-aggregation.md).
            neighbours={node: nodes for node in nodes})
        public, failed = self._setup_keys(run, nodes)
        shared, failed_sharing = self._share_keys(run, public)
        failed.update(failed_sharing)
        uploaded, refused = self._collect(messages, self._routed_shares(run, shared), timeout)
        masked = self._masked_updates(uploaded, sum(a.size for a in start.values()) + 1)
        dropped = sorted(set(shared) - set(masked))
        self._check_count(len(masked), threshold, "updates received")
        log.info("secure aggregation round %s: %d masked updates, %d dropped after sharing "
                 "keys", round_, len(masked), len(dropped))
        signatures = self._consistency(run, masked, public)
        shares = self._unmask_shares(run, masked, signatures)
        aggregate = self._release(run, start, masked, shares, public, dropped)
        return self._replies(uploaded, refused + list(failed.values()), aggregate)

    def _check_secagg_plus_round(self, nodes: list[int], threshold: int) -> None:
        """Enough hospitals sampled, and not so many that their quantised sum wraps around."""
        self._check_count(len(nodes), threshold, "sampled")
        if self.settings.shares_for(len(nodes)) < len(nodes):
            raise RoundAborted(f"num_shares {self.settings.num_shares}: a ring among "
                               f"{len(nodes)} hospitals; SecAgg+ shares among all of them")
        if len(nodes) * self.settings.quantization_range >= SECAGG_MODULUS:
            raise RoundAborted(f"{len(nodes)} hospitals x quantization_range "
                               f"{self.settings.quantization_range} would wrap around 2^32")

    def _setup_keys(self, run: _SecAggPlusRound, nodes: list[int],
                    ) -> tuple[dict[int, tuple[bytes, ...]], dict[int, Message]]:
        """Stage setup: the round's parameters to every sampled hospital; (each hospital's
        two public keys, its long-term signing key and its signature of the two; error
        replies) by node. The server relays them; each hospital checks them."""
        settings = self.settings
        setup = ConfigRecord({
            m.SECAGG_STAGE: m.STAGE_SETUP, m.SECAGG_ROUND: run.round_,
            m.SECAGG_THRESHOLD: run.threshold, m.SECAGG_CLIPPING_RANGE: settings.clipping_range,
            m.SECAGG_QUANTIZATION_RANGE: settings.quantization_range,
            m.SECAGG_MAX_WEIGHT: self.max_weight})
        keyed, failed = self._stage({n: RecordDict({m.SECAGG_RECORD: setup}) for n in nodes},
                                    run.group, run.timeout)
        public = {node: tuple(bytes(r.content[m.SECAGG_RECORD][key]) for key in (
            m.SECAGG_PUBLIC_KEY_1, m.SECAGG_PUBLIC_KEY_2, m.SECAGG_SIGNING_KEY,
            m.SECAGG_SIGNATURE)) for node, r in keyed.items()}
        self._check_count(len(public), run.threshold, "after setup")
        return public, failed

    def _share_keys(self, run: _SecAggPlusRound, public: dict[int, tuple[bytes, ...]],
                    ) -> tuple[dict[int, Message], dict[int, Message]]:
        """Stage share keys: each hospital gets the signed keys of its neighbours that
        answered setup; (replies with its encrypted shares, error replies) by node."""

        def share_request(node: int) -> RecordDict:
            known = [n for n in run.neighbours[node] if n in public]
            keys = (m.SECAGG_PUBLIC_KEY_1, m.SECAGG_PUBLIC_KEY_2, m.SECAGG_SIGNING_KEY,
                    m.SECAGG_SIGNATURE)
            return RecordDict({m.SECAGG_RECORD: ConfigRecord({
                m.SECAGG_STAGE: m.STAGE_SHARE_KEYS, m.SECAGG_ROUND: run.round_,
                m.SECAGG_NODES: known,
                **{key: [public[n][col] for n in known] for col, key in enumerate(keys)}})})

        shared, failed = self._stage({n: share_request(n) for n in public}, run.group,
                                     run.timeout)
        self._check_count(len(shared), run.threshold, "after sharing keys")
        return shared, failed

    def _routed_shares(self, run: _SecAggPlusRound,
                       shared: dict[int, Message]) -> dict[int, ConfigRecord]:
        """Stage collect's record for each hospital that shared keys: the encrypted shares
        addressed to it (those to a hospital that did not share keys are dropped)."""
        inbox: dict[int, list[tuple[int, bytes]]] = {n: [] for n in shared}
        for source, reply in shared.items():
            record = reply.content[m.SECAGG_RECORD]
            for dst, ciphertext in zip(record[m.SECAGG_DESTINATIONS],
                                       record[m.SECAGG_CIPHERTEXTS], strict=True):
                if dst in inbox:
                    inbox[int(dst)].append((source, bytes(ciphertext)))
        return {node: ConfigRecord({
            m.SECAGG_STAGE: m.STAGE_COLLECT, m.SECAGG_ROUND: run.round_,
            m.SECAGG_SOURCES: [s for s, _ in inbox[node]],
            m.SECAGG_CIPHERTEXTS: [c for _, c in inbox[node]]}) for node in shared}

    def _masked_updates(self, uploaded: dict[int, Message], length: int) -> dict[int, np.ndarray]:
        """Each uploaded masked vector of the expected shape; a hospital that sent anything
        else is removed from ``uploaded`` and treated as dropped."""
        masked = {}
        for node, reply in list(uploaded.items()):
            vector = reply.content[m.SECAGG_RECORD][m.SECAGG_VECTOR].numpy()
            if vector.dtype != np.uint32 or vector.size != length:
                log.warning("secure aggregation: hospital %s sent %d %s values, not %d uint32; "
                            "treated as dropped", self._hospital_of(node), vector.size,
                            vector.dtype, length)
                del uploaded[node]
                continue
            masked[node] = vector
        return masked

    def _consistency(self, run: _SecAggPlusRound, masked: dict[int, np.ndarray],
                     public: dict[int, tuple[bytes, ...]]) -> dict[int, bytes]:
        """Stage consistency: every hospital that uploaded is told who did (the same list
        to all) and signs its view of the round; the signatures, by node. A hospital
        refuses to unmask without every alive hospital's signature over its own view, so a
        round whose hospitals saw different rounds (or trained on different messages)
        releases nothing."""
        alive = sorted(masked)
        signed, _ = self._stage({n: RecordDict({m.SECAGG_RECORD: ConfigRecord({
            m.SECAGG_STAGE: m.STAGE_CONSISTENCY, m.SECAGG_ROUND: run.round_,
            m.SECAGG_ALIVE: alive})}) for n in alive}, run.group, run.timeout)
        signatures = {node: bytes(r.content[m.SECAGG_RECORD][m.SECAGG_SIGNATURE])
                      for node, r in signed.items()}
        if len(signatures) < len(alive):
            # Every alive hospital must sign: one that uploaded and then was lost cannot.
            raise RoundAborted(f"views signed: {len(signatures)} of the {len(alive)} "
                               "hospitals that sent an update; each unmasks only a view all "
                               "of them signed")
        return signatures

    def _unmask_shares(self, run: _SecAggPlusRound, masked: dict[int, np.ndarray],
                       signatures: dict[int, bytes]) -> dict[int, list[bytes]]:
        """Stage unmask: each hospital that uploaded gets the alive list and the view
        signatures; the shares it returns (of the alive hospitals' seeds and of the
        dropped ones' keys, by its own view), by the hospital whose secret they are of."""
        signers = sorted(signatures)

        def request() -> RecordDict:
            return RecordDict({m.SECAGG_RECORD: ConfigRecord({
                m.SECAGG_STAGE: m.STAGE_UNMASK, m.SECAGG_ROUND: run.round_,
                m.SECAGG_ALIVE: sorted(masked), m.SECAGG_SIGNERS: signers,
                m.SECAGG_SIGNATURE: [signatures[n] for n in signers]})})

        unmasked, _ = self._stage({n: request() for n in masked}, run.group, run.timeout)
        shares: dict[int, list[bytes]] = {}
        for reply in unmasked.values():
            record = reply.content[m.SECAGG_RECORD]
            for owner, share in zip(record[m.SECAGG_SHARE_OWNERS],
                                    record[m.SECAGG_SHARE_VALUES], strict=True):
                shares.setdefault(int(owner), []).append(bytes(share))
        return shares

    def _release(self, run: _SecAggPlusRound, start: dict[str, np.ndarray],
                 masked: dict[int, np.ndarray], shares: dict[int, list[bytes]],
                 public: dict[int, tuple[bytes, ...]],
                 dropped: list[int]) -> dict[str, np.ndarray]:
        """The masks removed from the sum of the masked updates, dequantised and combined
        with the round's start into the aggregate adapter; the round's range used."""
        settings = self.settings
        started = time.perf_counter()
        try:
            digest = secagg_plus.round_digest(run.round_, run.threshold,
                                              settings.clipping_range,
                                              settings.quantization_range, self.max_weight)
            total = secagg_plus.unmasked_sum(masked, shares, run.neighbours,
                                             {n: pk[0] for n, pk in public.items()}, dropped,
                                             run.threshold, digest)
            released = secagg_plus.dequantized_sum(
                total, len(masked), settings.clipping_range, settings.quantization_range)
            aggregate = self._combine(released, start)
        except ValueError as err:  # SecAggError, shares that do not combine, no weight
            raise RoundAborted(f"unmasking failed: {err}") from err
        # How much of what the modulus can carry the released sum used (it decodes exactly
        # within +-2^31 levels = 256 x clipping_range): a function of the released sum only.
        decodable = 2**31 * 2 * settings.clipping_range / settings.quantization_range
        self._stats["secure_aggregation/range_used"] = float(
            np.abs(released[:-1]).max() / decodable) if released.size > 1 else 0.0
        self._add("secure_aggregation/server_seconds", time.perf_counter() - started)
        return aggregate

    def _ckks_round(self, messages: list[Message], timeout: float | None) -> list[Message]:
        if self._ckks is None:
            raise RoundAborted("no public CKKS context on the server")
        round_, start = self._round_facts(messages)
        nodes = sorted(msg.metadata.dst_node_id for msg in messages)
        threshold = self._threshold(len(nodes))
        self._check_count(len(nodes), threshold, "sampled")
        # Each hospital checks the round's threshold against the t its noise share assumes.
        collect = {node: ConfigRecord({m.SECAGG_STAGE: m.STAGE_CKKS_COLLECT,
                                       m.SECAGG_ROUND: round_, m.SECAGG_THRESHOLD: threshold,
                                       m.SECAGG_NODES: nodes,
                                       m.SECAGG_MAX_WEIGHT: self.max_weight})
                   for node in nodes}
        uploaded, refused = self._collect(messages, collect, timeout)
        self._check_count(len(uploaded), threshold, "updates received")
        started = time.perf_counter()
        encrypted = {node: ciphertexts_of(r.content[m.SECAGG_RECORD])
                     for node, r in uploaded.items()}
        signed = self._contributions(uploaded, encrypted)
        try:
            total = ckks.add(self._ckks, list(encrypted.values()))
        except ValueError as err:
            raise RoundAborted(f"encrypted updates do not add up: {err}") from err
        self._add("secure_aggregation/server_seconds", time.perf_counter() - started)
        length = sum(a.size for a in start.values()) + 1
        contributors = sorted(uploaded)
        # One contributor decrypts the sum; if it cannot, the next one is asked.
        for node in contributors:
            request = RecordDict({m.SECAGG_RECORD: ConfigRecord({
                m.SECAGG_STAGE: m.STAGE_CKKS_DECRYPT, m.SECAGG_ROUND: round_,
                m.SECAGG_NODES: contributors, m.SECAGG_THRESHOLD: threshold,
                m.SECAGG_LENGTH: length, **signed}),
                m.ARRAYS_RECORD: ciphertext_record(total)})
            decrypted, _ = self._stage({node: request}, str(round_), timeout)
            if node in decrypted:
                vector = decrypted[node].content[m.ARRAYS_RECORD][m.SECAGG_VECTOR].numpy()
                if vector.size != length:
                    continue
                try:
                    return self._replies(uploaded, refused, self._combine(vector, start))
                except ValueError as err:
                    raise RoundAborted(f"decrypted sum unusable: {err}") from err
        raise RoundAborted("no contributing hospital decrypted the sum")

    @staticmethod
    def _contributions(uploaded: dict[int, Message], encrypted: dict[int, list[bytes]],
                       ) -> dict[str, list[bytes]]:
        """The decryption request's binding: each contributor's long-term key, its signature
        of its ciphertexts in this round, and their digest, in contributor order."""
        contributors = sorted(uploaded)
        records = [uploaded[n].content.get(m.SECAGG_CONTRIBUTION_RECORD) for n in contributors]
        if any(r is None for r in records):
            raise RoundAborted("an encrypted update came without its contribution signature")
        return {m.SECAGG_SIGNING_KEY: [bytes(r[m.SECAGG_SIGNING_KEY]) for r in records],
                m.SECAGG_SIGNATURE: [bytes(r[m.SECAGG_SIGNATURE]) for r in records],
                m.SECAGG_DIGEST: [signing.ciphertexts_digest(encrypted[n])
                                  for n in contributors]}

    # --- Train messages only through the protocol; the rest is GridWrapper's ----------

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if any(msg.metadata.message_type == MessageType.TRAIN for msg in messages):
            # Train replies pulled one by one would bypass the protocol: fail loudly.
            raise RuntimeError("with secure aggregation, train messages go through "
                               "send_and_receive, which runs the protocol")
        return self._grid.push_messages(messages)
