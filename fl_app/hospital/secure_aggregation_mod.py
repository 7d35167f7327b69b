"""The hospital's side of secure aggregation: a mod around the train handler.

Train messages without the secure-aggregation record pass through untouched. With it, the
mod answers the protocol's key stages itself and, at the collect stage, hands the train
message (without its record) to the handler, then sends the server only the masked
(SecAgg+) or encrypted (CKKS) weighted update, never the adapter. Inner mods (client-level
DP clipping) act on the update before it is masked. Secrets live in ``context.state``.
"""

from __future__ import annotations

import os
import time
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import MessageType
from flwr.common.logger import log

from clinical_fl.protocol import messages as m
from clinical_fl.secure_aggregation import ckks, secagg_plus, signing
from clinical_fl.secure_aggregation.update_vector import flatten, weight_share, weighted_update
from fl_app.exchange import ciphertext_record, ciphertexts_of, content_digest, vector_record
from fl_app.hospital import signing_keys
from fl_app.hospital.node_config import (
    configured_ckks_context,
    hospital_name,
    hospital_number,
    is_deployed,
)

STATE_KEY = "secure-aggregation"
CKKS_ROUNDS_KEY = "ckks-rounds"  # the rounds this hospital encrypted in, and decrypted in
# The rounds of this run this hospital has set up SecAgg+ keys for: one masked update a round.
# A server that ran a round again with other hospitals and the same adapter would get sums
# that differ by one hospital's (deterministic) update.
SECAGG_ROUNDS_KEY = "secagg-rounds"


class StageRefused(ValueError):
    """This hospital will not do what the stage asks (the message says why)."""


def _who(context: Context) -> str:
    return hospital_name(context)


def _min_secure_sum(context: Context) -> int | None:
    """The hospital policy's ``min-secure-sum`` (None where it sets none): no sum of fewer
    hospitals holds its update, whatever threshold the server chose."""
    from fl_app.hospital.state import hospital_policy

    return hospital_policy(context, hospital_number(context)).min_secure_sum


def _hold_min_secure_sum(context: Context, threshold: int) -> None:
    from tasks.privacy.plan import PolicyRefusal

    floor = _min_secure_sum(context)
    if floor is not None and threshold < floor:
        raise PolicyRefusal(f"{_who(context)}: a round threshold of {threshold}, below its "
                            f"min-secure-sum {floor}", key="min-secure-sum")


def ckks_context_path(context: Context) -> Path:
    """The hospital's CKKS secret context: node config ``ckks-context`` (made by
    deploy/ckks-keys.sh). In simulation, where every hospital runs on one machine, the
    hospitals make one key per run under ``$FLWR_HOME``."""
    configured = configured_ckks_context(context)
    if configured is not None:
        return configured
    if is_deployed(context):
        raise ckks.KeyMaterialError(
            f"{_who(context)}: secure_aggregation=ckks, but the node config names no key "
            "material; make it once with `bash deploy/ckks-keys.sh DIR` and start the "
            "SuperNode with --node-config '... ckks-context=DIR/ckks-secret.ctx'")
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    return ckks.simulation_secret_context(
        home / "clinical-fl" / "simulation-ckks" / f"run-{context.run_id}")


def load_ckks_context(context: Context):  # noqa: ANN201 - TenSEAL's Context
    return ckks.load_secret_context(ckks_context_path(context), _who(context))


def secure_aggregation_mod(msg: Message, context: Context,
                           call_next: ClientAppCallable) -> Message:
    if (msg.metadata.message_type != MessageType.TRAIN or not msg.has_content()
            or m.SECAGG_RECORD not in msg.content):
        if msg.has_content() and m.CONFIG_RECORD in msg.content:
            # Only this mod says an update will be masked or encrypted, and in which round.
            for key in _SET_BY_THIS_MOD:
                msg.content[m.CONFIG_RECORD].pop(key, None)
        return call_next(msg, context)
    # What fails here leaves as a refusal code through the hospital's edge (outermost mod);
    # the train handler's own errors pass through untouched.
    record = msg.content[m.SECAGG_RECORD]
    stage = _field(record, m.SECAGG_STAGE, str)
    if stage == m.STAGE_CKKS_COLLECT:
        return _ckks_collect(msg, context, call_next)
    if stage == m.STAGE_CKKS_DECRYPT:
        return _ckks_decrypt(msg, context)
    if stage == m.STAGE_COLLECT:
        return _secagg_collect(msg, context, call_next)
    stages = {m.STAGE_SETUP: _setup, m.STAGE_SHARE_KEYS: _share_keys,
              m.STAGE_CONSISTENCY: _consistency, m.STAGE_UNMASK: _unmask}
    if stage not in stages:
        raise StageRefused(f"unknown secure aggregation stage {stage!r}")
    try:
        out = stages[stage](record, context)
    except (KeyError, TypeError) as err:  # a stage record without the fields it needs
        raise StageRefused(f"stage {stage!r}: malformed record ({err!r})") from err
    return Message(RecordDict({m.SECAGG_RECORD: ConfigRecord(out)}), reply_to=msg)


_SET_BY_THIS_MOD = (m.SECURE_AGGREGATION_ON, m.SECURE_AGGREGATION_THRESHOLD,
                    m.SECURE_AGGREGATION_HOSPITALS)


def _field(record: ConfigRecord, key: str, kind: type) -> object:
    """A stage record's field, of the type the stage needs."""
    try:
        return kind(record[key])
    except (KeyError, TypeError, ValueError) as err:
        raise StageRefused(f"the stage record's {key!r} is missing or malformed") from err


# --- SecAgg+ ----------------------------------------------------------------------------

def _secrets(context: Context, round_: int) -> secagg_plus.HospitalSecrets:
    if STATE_KEY not in context.state.config_records:
        raise StageRefused("no keys from the setup stage of this round")
    secrets = secagg_plus.HospitalSecrets.from_json(
        str(context.state.config_records[STATE_KEY]["json"]))
    if secrets.round != round_:
        raise StageRefused(f"keys are of round {secrets.round}, the stage is of round {round_}")
    return secrets


def _keep(context: Context, secrets: secagg_plus.HospitalSecrets) -> None:
    context.state.config_records[STATE_KEY] = ConfigRecord({"json": secrets.to_json()})


def _setup(record: ConfigRecord, context: Context) -> dict:
    round_, threshold = int(record[m.SECAGG_ROUND]), int(record[m.SECAGG_THRESHOLD])
    done = [int(r) for r in context.state.config_records.get(
        SECAGG_ROUNDS_KEY, ConfigRecord({"rounds": []}))["rounds"]]
    if round_ in done:
        raise secagg_plus.ViewInconsistent(
            f"round {round_} was set up before in this run: one masked update a round (a "
            "round run again would give sums that differ by one hospital's update)")
    _hold_min_secure_sum(context, threshold)
    lattice = (float(record[m.SECAGG_CLIPPING_RANGE]),
               int(record[m.SECAGG_QUANTIZATION_RANGE]), float(record[m.SECAGG_MAX_WEIGHT]))
    signer, roster = signing_keys.signing_key(context), signing_keys.roster(context)
    if signing.public_bytes(signer) not in roster:
        raise signing_keys.SigningKeyMissing(
            f"{_who(context)}: its own signing key is not in its roster; the others could "
            "not verify its round keys", signing_keys.ROSTER)
    secrets, signature = secagg_plus.setup(round_, context.node_id, threshold, *lattice,
                                           int(context.run_id), signer)
    context.state.config_records[SECAGG_ROUNDS_KEY] = ConfigRecord({"rounds": done + [round_]})
    _keep(context, secrets)
    return {m.SECAGG_PUBLIC_KEY_1: secrets.pk1, m.SECAGG_PUBLIC_KEY_2: secrets.pk2,
            m.SECAGG_SIGNING_KEY: secrets.signing_key, m.SECAGG_SIGNATURE: signature}


def _share_keys(record: ConfigRecord, context: Context) -> dict:
    secrets = _secrets(context, int(record[m.SECAGG_ROUND]))
    nodes = [int(n) for n in record[m.SECAGG_NODES]]
    if len(set(nodes)) != len(nodes):
        raise secagg_plus.ViewInconsistent("the key list names a node twice")
    columns = [record[k] for k in (m.SECAGG_PUBLIC_KEY_1, m.SECAGG_PUBLIC_KEY_2,
                                   m.SECAGG_SIGNING_KEY, m.SECAGG_SIGNATURE)]
    rows = {n: tuple(bytes(v) for v in row) for n, *row in zip(nodes, *columns, strict=True)}
    destinations, ciphertexts = secagg_plus.share_keys(
        secrets, {n: (r[0], r[1]) for n, r in rows.items()}, {n: r[2] for n, r in rows.items()},
        {n: r[3] for n, r in rows.items()}, signing_keys.roster(context))
    _keep(context, secrets)
    log(INFO, "%s: secure aggregation round %s: key shares sent to %d neighbours",
        _who(context), secrets.round, len(destinations))
    return {m.SECAGG_DESTINATIONS: destinations, m.SECAGG_CIPHERTEXTS: ciphertexts}


def _consistency(record: ConfigRecord, context: Context) -> dict:
    secrets = _secrets(context, int(record[m.SECAGG_ROUND]))
    signature = secagg_plus.consistency(secrets, [int(n) for n in record[m.SECAGG_ALIVE]],
                                        signing_keys.signing_key(context))
    _keep(context, secrets)
    log(INFO, "%s: secure aggregation round %s: signed a view with %d of %d hospitals alive",
        _who(context), secrets.round, len(secrets.alive), len(secrets.pk1_of))
    return {m.SECAGG_SIGNATURE: signature}


def _unmask(record: ConfigRecord, context: Context) -> dict:
    secrets = _secrets(context, int(record[m.SECAGG_ROUND]))
    signers = [int(n) for n in record[m.SECAGG_SIGNERS]]
    signatures = [bytes(s) for s in record[m.SECAGG_SIGNATURE]]
    if len(set(signers)) != len(signers) or len(signers) != len(signatures):
        raise secagg_plus.ViewInconsistent("the signatures are not one per named hospital")
    # The round's secrets are done with whatever the answer: a refused unmask is not asked
    # again with other lists.
    del context.state.config_records[STATE_KEY]
    owners, shares = secagg_plus.unmask_shares(
        secrets, [int(n) for n in record[m.SECAGG_ALIVE]], dict(zip(signers, signatures,
                                                                    strict=True)))
    return {m.SECAGG_SHARE_OWNERS: owners, m.SECAGG_SHARE_VALUES: shares}


def _train(msg: Message, context: Context, call_next: ClientAppCallable, threshold: int,
           hospitals: int) -> tuple[Message, dict[str, np.ndarray]]:
    """The handler's reply to the train message without the protocol's record, and the
    global adapter it started from. ``threshold``: the fewest hospitals in a sum this round
    releases; ``hospitals``: those this hospital shares the round with (itself included)."""
    start = {name: a.numpy() for name, a in msg.content[m.ARRAYS_RECORD].items()}
    msg.content = RecordDict({k: v for k, v in msg.content.items() if k != m.SECAGG_RECORD})
    config = msg.content[m.CONFIG_RECORD]
    config[m.SECURE_AGGREGATION_ON] = True
    config[m.SECURE_AGGREGATION_THRESHOLD] = int(threshold)
    config[m.SECURE_AGGREGATION_HOSPITALS] = int(hospitals)
    log(INFO, "%s: secure aggregation: training for round %s", _who(context),
        msg.content[m.CONFIG_RECORD].get(m.SERVER_ROUND_KEY, "?"))
    return call_next(msg, context), start


def _trained(reply: Message) -> dict[str, np.ndarray]:
    return {name: a.numpy() for name, a in reply.content[m.ARRAYS_RECORD].items()}


def _share_arrays(reply: Message, start: dict[str, np.ndarray],
                  encoding: str) -> dict[str, np.ndarray]:
    """Distributed DP's share from the train handler, checked against the global adapter."""
    described = reply.content[m.DISTRIBUTED_SHARE_RECORD]
    if described.get(m.SHARE_ENCODING) != encoding:
        raise StageRefused(f"a distributed DP share encoded as "
                           f"{described.get(m.SHARE_ENCODING)!r}, this stage takes {encoding!r}")
    arrays = _trained(reply)
    if [(k, a.shape) for k, a in arrays.items()] != [(k, a.shape) for k, a in start.items()]:
        raise StageRefused("the distributed DP share's arrays differ from the global adapter's")
    return arrays


def _lattice_share(reply: Message, start: dict[str, np.ndarray],
                   secrets: secagg_plus.HospitalSecrets) -> np.ndarray:
    """The share's uint32 levels, on the lattice this round's SecAgg+ sums."""
    described = reply.content[m.DISTRIBUTED_SHARE_RECORD]
    arrays = _share_arrays(reply, start, m.SHARE_LATTICE)
    lattice = (float(described[m.SHARE_CLIPPING_RANGE]), int(described[m.SHARE_LEVELS]))
    if lattice != (secrets.clipping_range, secrets.quantization_range):
        raise StageRefused(f"the distributed DP share is on the lattice (clipping range, "
                           f"levels) {lattice}; this round sums on "
                           f"{(secrets.clipping_range, secrets.quantization_range)}")
    if int(described[m.SHARE_THRESHOLD]) > secrets.threshold:
        raise StageRefused(f"the distributed DP noise share assumes at least "
                           f"{described[m.SHARE_THRESHOLD]} hospitals in every released sum; "
                           f"this round's SecAgg+ threshold is {secrets.threshold}")
    if any(a.dtype != np.uint32 for a in arrays.values()):
        raise StageRefused("a distributed DP share on the lattice must be uint32 levels")
    return np.concatenate([a.ravel() for a in arrays.values()])


def _metrics(reply: Message, seconds: float):  # noqa: ANN202
    metrics = reply.content[m.METRICS_RECORD]
    metrics[m.SECAGG_SECONDS] = seconds
    return metrics


def _secagg_collect(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    record = msg.content[m.SECAGG_RECORD]
    secrets = _secrets(context, int(record[m.SECAGG_ROUND]))
    secagg_plus.receive_shares(secrets, [int(n) for n in record[m.SECAGG_SOURCES]],
                               [bytes(c) for c in record[m.SECAGG_CIPHERTEXTS]])
    # The keys' round is the round it trains for: a train message of another round under
    # this round's masks is refused (nothing kept: the shares received are dropped).
    trains_for = msg.content[m.CONFIG_RECORD].get(m.SERVER_ROUND_KEY) \
        if m.CONFIG_RECORD in msg.content else None
    if trains_for is None or int(trains_for) != secrets.round:
        raise secagg_plus.ViewInconsistent(
            f"a train message for round {trains_for} under the keys of round {secrets.round}")
    # What it is told to train on goes into the view it signs: a server that sends the
    # others other adapters or settings (to make their updates known) gets no unmasking.
    secrets.instructions = content_digest(msg.content, m.SECAGG_RECORD, _SET_BY_THIS_MOD)
    _keep(context, secrets)
    reply, start = _train(msg, context, call_next, secrets.threshold, len(secrets.pk1_of))
    if reply.has_error():
        return reply  # a refusal (its own budget) keeps its code; its masks are removed
    started = time.perf_counter()
    levels = weight_share(float(reply.content[m.METRICS_RECORD][m.WEIGHT_KEY]),
                          secrets.max_weight, secrets.quantization_range)
    if m.DISTRIBUTED_SHARE_RECORD in reply.content:  # distributed DP: on the lattice already
        masked, clipped = secagg_plus.masked_levels(
            secrets, _lattice_share(reply, start, secrets), levels), 0
    else:
        update = weighted_update(_trained(reply), start, levels / secrets.quantization_range)
        masked, clipped = secagg_plus.masked_update(secrets, update[:-1], levels)
    _keep(context, secrets)
    if clipped:
        # The hospital's own log only: the count is a statistic of this hospital's update (and
        # Flower's log is the server's console in simulation).
        from fl_app.hospital.edge import write_hospital_log

        write_hospital_log(context, f"{_who(context)}: {clipped} update values beyond "
                                    f"secure_aggregation.clipping_range="
                                    f"{secrets.clipping_range} were clipped; raise it")
    return Message(RecordDict({m.SECAGG_RECORD: vector_record(masked),
                               m.METRICS_RECORD: _metrics(reply,
                                                          time.perf_counter() - started)}),
                   reply_to=msg)


# --- CKKS -------------------------------------------------------------------------------

def _ckks_collect(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    record = msg.content[m.SECAGG_RECORD]
    key = load_ckks_context(context)  # before training: no key, no work
    signer = _own_signing_key(context)
    max_weight = _field(record, m.SECAGG_MAX_WEIGHT, float)
    round_ = _field(record, m.SECAGG_ROUND, int)
    threshold = _field(record, m.SECAGG_THRESHOLD, int)
    nodes = {int(n) for n in _field(record, m.SECAGG_NODES, list)}
    if context.node_id not in nodes:
        raise StageRefused("asked to encrypt for a round whose hospitals do not include it")
    if threshold < 2:
        raise StageRefused(f"a round threshold of {threshold}: the sum of one hospital is its "
                           "update")
    _hold_min_secure_sum(context, threshold)
    if round_ in [int(r) for r in _ckks_rounds(context)["encrypted"]]:
        raise StageRefused(f"already encrypted an update in round {round_}")
    trains_for = msg.content[m.CONFIG_RECORD].get(m.SERVER_ROUND_KEY) \
        if m.CONFIG_RECORD in msg.content else None
    if trains_for is None or int(trains_for) != round_:
        raise StageRefused(f"a train message for round {trains_for} encrypted as round {round_}")
    reply, start = _train(msg, context, call_next, threshold, len(nodes))
    if reply.has_error():
        return reply
    started = time.perf_counter()
    share = float(reply.content[m.METRICS_RECORD][m.WEIGHT_KEY]) / max_weight
    if not 0 <= share <= 1:
        raise StageRefused(f"aggregation weight beyond the server's max-weight {max_weight}")
    if m.DISTRIBUTED_SHARE_RECORD in reply.content:  # distributed DP: the noisy values
        values = np.append(flatten(_share_arrays(reply, start, m.SHARE_VALUES)), share)
    else:
        values = weighted_update(_trained(reply), start, share)
    ciphertexts = ckks.encrypt(key, values)
    digest = signing.ciphertexts_digest(ciphertexts)
    signature = signing.sign(signer, signing.contribution_statement(
        int(context.run_id), round_, context.node_id, digest))
    rounds = _ckks_rounds(context)
    rounds["encrypted"] = [int(r) for r in rounds["encrypted"]] + [round_]
    rounds["digests"] = [bytes(d) for d in rounds.get("digests", [])] + [digest]
    # The fewest hospitals a sum holding this update may be decrypted with: the round's
    # threshold, and the t a distributed DP noise share assumes.
    assumes = int(reply.content[m.DISTRIBUTED_SHARE_RECORD][m.SHARE_THRESHOLD]) \
        if m.DISTRIBUTED_SHARE_RECORD in reply.content else 2
    rounds["assumes"] = [int(t) for t in rounds.get("assumes", [])] + [max(threshold, assumes)]
    context.state.config_records[CKKS_ROUNDS_KEY] = rounds
    contribution = ConfigRecord({m.SECAGG_SIGNING_KEY: signing.public_bytes(signer),
                                 m.SECAGG_SIGNATURE: signature})
    return Message(RecordDict({m.SECAGG_RECORD: ciphertext_record(ciphertexts),
                               m.SECAGG_CONTRIBUTION_RECORD: contribution,
                               m.METRICS_RECORD: _metrics(reply,
                                                          time.perf_counter() - started)}),
                   reply_to=msg)


def _own_signing_key(context: Context) -> signing.PrivateKey:
    """The hospital's long-term key, which must be in its own roster (others check it)."""
    signer = signing_keys.signing_key(context)
    if signing.public_bytes(signer) not in signing_keys.roster(context):
        raise signing_keys.SigningKeyMissing(
            f"{_who(context)}: its own signing key is not in its roster; the others could "
            "not verify its signatures", signing_keys.ROSTER)
    return signer


def _check_contributors(record: ConfigRecord, context: Context, round_: int,
                        contributors: list[int], threshold: int, own_digest: bytes) -> None:
    """The request's contributors are at least ``threshold`` distinct hospitals of this
    hospital's roster, each with its signature of its ciphertexts in this run's round, this
    hospital's own being the ciphertexts it sent. (Whether the ciphertext to decrypt is their
    sum, a hospital cannot tell: docs/secure-aggregation.md.)"""
    columns = [list(_field(record, key, list)) for key in (
        m.SECAGG_SIGNING_KEY, m.SECAGG_SIGNATURE, m.SECAGG_DIGEST)]
    if any(len(column) != len(contributors) for column in columns) \
            or len(set(contributors)) != len(contributors):
        raise secagg_plus.KeyUnauthenticated("the contributors are not one signed entry each")
    roster = signing_keys.roster(context)
    keys, signatures, digests = ([bytes(v) for v in column] for column in columns)
    if len(set(keys)) != len(keys):
        raise secagg_plus.KeyUnauthenticated("one roster hospital is listed under two node ids")
    for node, key, signature, digest in zip(contributors, keys, signatures, digests,
                                            strict=True):
        statement = signing.contribution_statement(int(context.run_id), round_, node, digest)
        if key not in roster or not signing.verify(key, signature, statement):
            raise secagg_plus.KeyUnauthenticated(
                f"node {node}'s contribution is not signed by a roster hospital for this run "
                "and round")
        if node == context.node_id and digest != own_digest:
            raise secagg_plus.KeyUnauthenticated("the request's entry for this hospital is not "
                                                 "the update it encrypted")


def _ckks_rounds(context: Context) -> ConfigRecord:
    return context.state.config_records.get(
        CKKS_ROUNDS_KEY, ConfigRecord({"encrypted": [], "decrypted": [], "assumes": []}))


# The decrypted sum goes back on a grid of 2^-20 (the size of SecAgg+'s quantisation step)
# after noise of a quarter step: exact CKKS decryptions together with their ciphertext can
# reveal the secret key (Li and Micciancio, EUROCRYPT 2021).
DECRYPTION_GRID = 2.0**-20


def _ckks_decrypt(msg: Message, context: Context) -> Message:
    """Decrypt what the server says is the round's sum. A hospital decrypts only in a round it
    encrypted its own update in, at most once a round, a sum the request says it contributed
    to, of at least two hospitals: limits on a server that would use it to decrypt one
    hospital's update (docs/secure-aggregation.md says what they do not stop)."""
    record = msg.content[m.SECAGG_RECORD]
    round_ = _field(record, m.SECAGG_ROUND, int)
    contributors = [int(n) for n in _field(record, m.SECAGG_NODES, list)]
    rounds = _ckks_rounds(context)
    encrypted = [int(r) for r in rounds["encrypted"]]
    if round_ not in encrypted:
        raise StageRefused(f"asked to decrypt in round {round_}, in which this hospital "
                           "encrypted no update")
    # Its own plan's t, not only the server's word: a sum of fewer hospitals than this
    # hospital's noise share assumes is never decrypted.
    assumes = [int(t) for t in rounds.get("assumes", [])]
    own = assumes[encrypted.index(round_)] if len(assumes) == len(encrypted) else 2
    threshold = max(2, _field(record, m.SECAGG_THRESHOLD, int), own,
                    _min_secure_sum(context) or 2)
    if context.node_id not in contributors:
        raise StageRefused("asked to decrypt a sum this hospital did not contribute to")
    if len(set(contributors)) < threshold:
        raise StageRefused(f"a sum of {len(set(contributors))} hospital(s), fewer than "
                           f"{threshold}")
    decrypted = [int(r) for r in rounds["decrypted"]]
    if round_ in decrypted:
        raise StageRefused(f"already decrypted one sum in round {round_}")
    digests = [bytes(d) for d in rounds.get("digests", [])]
    _check_contributors(record, context, round_, contributors, threshold,
                        digests[encrypted.index(round_)] if len(digests) == len(encrypted)
                        else b"")
    rounds["decrypted"] = decrypted + [round_]
    context.state.config_records[CKKS_ROUNDS_KEY] = rounds
    key = load_ckks_context(context)
    vector = ckks.decrypt(key, ciphertexts_of(msg.content[m.ARRAYS_RECORD]),
                          int(record[m.SECAGG_LENGTH]))
    noise = np.random.default_rng().normal(0.0, DECRYPTION_GRID / 4, vector.shape)
    vector = np.round((vector + noise) / DECRYPTION_GRID) * DECRYPTION_GRID
    return Message(RecordDict({m.ARRAYS_RECORD: ArrayRecord(
        {m.SECAGG_VECTOR: Array(vector)})}), reply_to=msg)
