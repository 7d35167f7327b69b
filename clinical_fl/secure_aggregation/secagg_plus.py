"""SecAgg+ (Bell et al., CCS 2020), the stages of Flower's ``secaggplus_mod`` and
``SecAggPlusWorkflow`` on Message-API messages.

Why a port: in flwr 1.42 the workflow needs the legacy ``LegacyContext`` and ``FitIns`` path
and the mod reads ``fitres.*`` records, so neither can serve the Message-API strategies the
product runs (docs/architecture.md). The cryptography is Flower's and ``cryptography``'s:
ECDH key pairs (``flwr.supercore.primitives.asymmetric``), shared keys and Fernet encryption
of the shares (``flwr.common.secure_aggregation.crypto.symmetric_encryption``), Shamir's
secret sharing (``...crypto.shamir``), quantisation (``...quantization``); the masks come
from ChaCha20 (``masking.py``) instead of Flower's 32-bit-seeded generator.

One round, for the hospitals U the strategy sampled, secure against a server that lies
(Bonawitz et al., CCS 2017, section 6: signed keys and a consistency round):
1. setup: each hospital makes two key pairs and sends the public keys, signed with its
   long-term key (``signing.py``) over the run, the round and the round's parameters.
2. share keys: each gets the round's key list; it checks every key's signature against its
   own roster (one entry per roster hospital), and that the threshold is a majority of the
   list; then it Shamir-shares its self-mask seed and its first private key among them,
   each share encrypted to its owner.
3. collect: each receives the shares for it, trains, and sends its quantised weighted update
   plus a self mask plus a pairwise mask with every hospital that shared with it (+ or - by
   node id), mod 2^32.
4. consistency: each hospital that sent an update is told who did (the alive list); it
   checks it is listed, that every listed hospital shared with it, and signs its whole view
   of the round: key list, who shared with it, who is alive, and a digest of the train
   message it trained on (global adapter and settings).
5. unmask: with the signatures of every alive hospital over exactly its own view, each
   returns, for each alive hospital, its share of the self-mask seed, and for each that
   shared keys but is not alive, its share of the private key; the server removes the self
   masks and the dropped hospitals' pairwise masks and is left with the sum. The alive and
   dropped lists are the hospital's own view, never a list the server sends at this stage.

Why this holds with a majority threshold t > k/2 (k: the round's key list) against a server
that colludes with no hospital. Each hospital signs one view a round, and sets up each
round once a run and trains only for the round its keys are of (fl_app/hospital/
secure_aggregation_mod.py: a round run again with other hospitals alive would give sums
that differ by one deterministic update). If hospital u's seed
is revealed, u is alive in some view V that every alive hospital of V signed, u included; so
V's key list is u's and V's alive hospitals all shared keys with u and trained on the same
train message. To strip u's mask with an alive hospital v of V the server needs v's private
key: t shares from holders accepting a view W with v dropped, which every alive hospital of W
(at least t) signed, all of them holders of v's shares, so all in V's key list of k, and none
alive in V (those signed V). Two disjoint groups of t within k < 2t: impossible. So the
server learns at most the sum over V's alive hospitals, at least t of them, all trained on
one message; two such views have disjoint alive lists. A hospital never reveals both secrets
of one hospital (one unmask a round, by one view). With c colluding hospitals the same count
needs t > (k + c) / 2 (docs/secure-aggregation.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from clinical_fl.secure_aggregation import signing
from clinical_fl.secure_aggregation.masking import dequantize_sum, mask, quantize_vector


class SecAggError(ValueError):
    """A stage that cannot go on without weakening the protocol (the reason says why)."""


class KeyUnauthenticated(SecAggError):
    """A round key or signature that does not verify against the hospital's own roster:
    forged, swapped, replayed from another round, or of a hospital it does not know."""


class ViewInconsistent(SecAggError):
    """The server's lists of who shared and who is alive disagree with what this hospital
    saw, or too few hospitals signed the same view."""


class ThresholdRefused(SecAggError):
    """A reconstruction threshold below a majority of the hospitals this one shares with."""

    def __init__(self, threshold: int, hospitals: int) -> None:
        super().__init__(f"a reconstruction threshold of {threshold} among {hospitals} "
                         f"hospitals; a majority is at least {hospitals // 2 + 1}")
        self.counts = {"threshold": threshold, "hospitals": hospitals}


def majority(hospitals: int) -> int:
    """The smallest threshold t with 2t > ``hospitals``."""
    return hospitals // 2 + 1


def round_digest(round_: int, threshold: int, clipping_range: float, quantization_range: int,
                 max_weight: float) -> bytes:
    """What every hospital of a round must have been told alike, hashed. Pairwise masks are
    keyed by it: a server that gives hospitals different lattices, weights or thresholds (to
    make one hospital's levels readable in the low bits of a sum of two, or its weight round to
    zero) gets masks that do not cancel, and a sum that is noise."""
    text = json.dumps([int(round_), int(threshold), float(clipping_range),
                       int(quantization_range), float(max_weight)])
    return hashlib.sha256(b"clinical-fl secagg+ round v1|" + text.encode()).digest()


def pairwise_mask(shared_key: bytes, digest: bytes, length: int) -> np.ndarray:
    """The mask two hospitals agree on: their ECDH key, bound to the round's digest."""
    raw = shared_key if len(shared_key) == 32 else base64.urlsafe_b64decode(shared_key)
    return mask(hmac.new(raw, digest, hashlib.sha256).digest(), length)


def _pairwise_sign(own: int, other: int) -> int:
    # Node pairs agree on one mask; the larger id adds it, the smaller subtracts it.
    return 1 if own > other else -1


@dataclass
class HospitalSecrets:
    """What a hospital keeps between the stages of one round (in Flower's context.state)."""

    round: int
    node_id: int
    run_id: int
    threshold: int
    clipping_range: float
    quantization_range: int
    max_weight: float
    sk1: bytes
    pk1: bytes
    sk2: bytes
    pk2: bytes
    stage: str
    signing_key: bytes = b""  # this hospital's long-term public key (OpenSSH line)
    rd_seed: bytes = b""
    pk1_of: dict[int, bytes] = field(default_factory=dict)
    share_key_of: dict[int, bytes] = field(default_factory=dict)
    rd_seed_shares: dict[int, bytes] = field(default_factory=dict)
    sk1_shares: dict[int, bytes] = field(default_factory=dict)
    mask_partners: list[int] = field(default_factory=list)
    signing_key_of: dict[int, bytes] = field(default_factory=dict)
    key_list: bytes = b""  # signing.roster_view_hash of the key list it was given
    alive: list[int] = field(default_factory=list)  # the alive list it signed
    instructions: bytes = b""  # digest of the train message it trained on (adapter, settings)

    @property
    def shared(self) -> list[int]:
        """Who shared keys with this hospital, itself included."""
        return sorted({self.node_id, *self.mask_partners})

    def view(self) -> bytes:
        """The statement it signs in the consistency round, and checks others' against."""
        return signing.view_statement(self.run_id, self.round, self.digest, self.key_list,
                                      self.shared, self.alive, self.instructions)

    @property
    def digest(self) -> bytes:
        return round_digest(self.round, self.threshold, self.clipping_range,
                            self.quantization_range, self.max_weight)

    def to_json(self) -> str:
        def enc(value: object) -> object:
            if isinstance(value, bytes):
                return {"b": base64.b64encode(value).decode()}
            if isinstance(value, dict):
                return {str(k): enc(v) for k, v in value.items()}
            return value
        return json.dumps({k: enc(v) for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> HospitalSecrets:
        def dec(value: object) -> object:
            if isinstance(value, dict) and set(value) == {"b"}:
                return base64.b64decode(value["b"])
            if isinstance(value, dict):
                return {int(k): dec(v) for k, v in value.items()}
            return value
        return cls(**{k: dec(v) for k, v in json.loads(text).items()})


# --- The hospital's side ----------------------------------------------------------------

def _expect_stage(secrets: HospitalSecrets, done: str, asked: str) -> None:
    """Each stage once a round, in order (as Flower's mod checks)."""
    if secrets.stage != done:
        raise SecAggError(f"{asked} asked after stage {secrets.stage!r}, not after {done!r}")


def setup(round_: int, node_id: int, threshold: int, clipping_range: float,
          quantization_range: int, max_weight: float, run_id: int,
          signer: signing.PrivateKey) -> tuple[HospitalSecrets, bytes]:
    """Stage 1: fresh key pairs for this round. Returns (the round's secrets, the signature
    of its public keys with the hospital's long-term key)."""
    if threshold < 2:
        raise SecAggError(f"a reconstruction threshold of {threshold}: one share would reveal "
                          "a secret (at least 2)")
    if not (math.isfinite(clipping_range) and clipping_range > 0
            and math.isfinite(max_weight) and max_weight > 0
            and 2 <= quantization_range <= 2**30):
        raise SecAggError(f"a lattice (clipping range {clipping_range}, {quantization_range} "
                          f"levels) or max weight {max_weight} out of range")
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    secrets = HospitalSecrets(round_, node_id, run_id, threshold, clipping_range,
                              quantization_range, max_weight, private_key_to_bytes(sk1),
                              public_key_to_bytes(pk1), private_key_to_bytes(sk2),
                              public_key_to_bytes(pk2), stage="setup",
                              signing_key=signing.public_bytes(signer))
    signature = signing.sign(signer, signing.keys_statement(
        run_id, round_, secrets.digest, node_id, secrets.pk1, secrets.pk2))
    return secrets, signature


def share_keys(secrets: HospitalSecrets, public_keys: dict[int, tuple[bytes, bytes]],
               signing_keys: dict[int, bytes], signatures: dict[int, bytes],
               roster: signing.Roster) -> tuple[list[int], list[bytes]]:
    """Stage 2: check the round's key list against the roster, then Shamir shares of the
    self-mask seed and of the first private key, one per listed hospital, each encrypted
    with the key agreed with it. Returns (destinations, ciphertexts)."""
    _expect_stage(secrets, "setup", "share keys")
    if set(signing_keys) != set(public_keys) or set(signatures) != set(public_keys):
        raise KeyUnauthenticated("the key list lacks a signing key or a signature for some "
                                 "hospitals")
    if public_keys.get(secrets.node_id) != (secrets.pk1, secrets.pk2) \
            or signing_keys.get(secrets.node_id) != secrets.signing_key:
        raise KeyUnauthenticated("the server's list does not hold this hospital's own keys")
    _check_signed_keys(secrets, public_keys, signing_keys, signatures, roster)
    if secrets.threshold < majority(len(public_keys)):
        raise ThresholdRefused(secrets.threshold, len(public_keys))
    if len(public_keys) < secrets.threshold:
        raise SecAggError(f"{len(public_keys)} neighbours, fewer than the reconstruction "
                          f"threshold {secrets.threshold}")
    keys = [k for pair in public_keys.values() for k in pair]
    if len(set(keys)) != len(keys):
        raise SecAggError("two neighbours sent the same public key")
    secrets.signing_key_of = dict(signing_keys)
    secrets.key_list = signing.roster_view_hash(
        {n: (*public_keys[n], signing_keys[n]) for n in public_keys})
    secrets.rd_seed = os.urandom(32)
    seed_shares = create_shares(secrets.rd_seed, secrets.threshold, len(public_keys))
    key_shares = create_shares(secrets.sk1, secrets.threshold, len(public_keys))
    destinations, ciphertexts = [], []
    own_sk2 = bytes_to_private_key(secrets.sk2)
    for idx, (node, (pk1, pk2)) in enumerate(sorted(public_keys.items())):
        secrets.pk1_of[node] = pk1
        if node == secrets.node_id:
            secrets.rd_seed_shares[node], secrets.sk1_shares[node] = (seed_shares[idx],
                                                                      key_shares[idx])
            continue
        shared = generate_shared_key(own_sk2, bytes_to_public_key(pk2))
        secrets.share_key_of[node] = shared
        plaintext = share_keys_plaintext_concat(secrets.node_id, node, seed_shares[idx],
                                                key_shares[idx])
        destinations.append(node)
        ciphertexts.append(encrypt(shared, plaintext))
    secrets.stage = "share-keys"
    return destinations, ciphertexts


def _check_signed_keys(secrets: HospitalSecrets, public_keys: dict[int, tuple[bytes, bytes]],
                       signing_keys: dict[int, bytes], signatures: dict[int, bytes],
                       roster: signing.Roster) -> None:
    """Every listed hospital is a distinct hospital of the roster, and signed these round
    keys for this run, round and round parameters."""
    if len(set(signing_keys.values())) != len(signing_keys):
        raise KeyUnauthenticated("one roster hospital is listed under two node ids")
    for node, (pk1, pk2) in public_keys.items():
        if signing_keys[node] not in roster:
            raise KeyUnauthenticated(f"node {node}'s signing key is not in this hospital's "
                                     "roster")
        statement = signing.keys_statement(secrets.run_id, secrets.round, secrets.digest,
                                           node, pk1, pk2)
        if not signing.verify(signing_keys[node], signatures[node], statement):
            raise KeyUnauthenticated(f"node {node}'s round keys are not signed by its roster "
                                     "key for this run, round and round parameters")


def receive_shares(secrets: HospitalSecrets, sources: list[int],
                   ciphertexts: list[bytes]) -> None:
    """Stage 3, before training: keep the neighbours' shares meant for this hospital; each
    neighbour that sent one gets a pairwise mask."""
    # Once per round: a second masked update under the same masks would give the server the
    # difference of the two updates.
    _expect_stage(secrets, "share-keys", "collect")
    if len(sources) + 1 < secrets.threshold:
        raise SecAggError(f"shares from {len(sources)} neighbours: with this hospital, fewer "
                          f"than the reconstruction threshold {secrets.threshold}")
    if len(set(sources)) != len(sources):
        raise SecAggError("shares from one neighbour listed twice")
    for source, ciphertext in zip(sources, ciphertexts, strict=True):
        if source not in secrets.share_key_of:
            raise SecAggError(f"shares from node {source}, which is not a neighbour")
        sender, receiver, seed_share, key_share = share_keys_plaintext_separate(
            decrypt(secrets.share_key_of[source], ciphertext))
        if sender != source or receiver != secrets.node_id:
            raise SecAggError(f"a share from node {sender} for node {receiver} arrived as "
                              f"node {source}'s share for this hospital")
        secrets.rd_seed_shares[source] = seed_share
        secrets.sk1_shares[source] = key_share
    secrets.mask_partners = sorted(sources)
    secrets.stage = "shares-received"


def masked_update(secrets: HospitalSecrets, update: np.ndarray,
                  share_levels: int) -> tuple[np.ndarray, int]:
    """Stage 3, after training: the quantised weighted update (``update``: already multiplied
    by the weight share) with the share's integer appended, plus the self mask and the
    pairwise masks, modulo 2^32. Returns (masked vector, values clipped to the range)."""
    quantized, clipped = quantize_vector(update, secrets.clipping_range,
                                         secrets.quantization_range)
    return masked_levels(secrets, quantized, share_levels), clipped


def masked_levels(secrets: HospitalSecrets, levels: np.ndarray,
                  share_levels: int) -> np.ndarray:
    """Stage 3 for a vector already on the lattice (uint32 levels: distributed DP's shares,
    built in integers so that no rounding follows their noise): the share's integer
    appended, plus the self mask and the pairwise masks, modulo 2^32."""
    _expect_stage(secrets, "shares-received", "masking")
    if levels.dtype != np.uint32:
        raise SecAggError(f"lattice levels must be uint32, got {levels.dtype}")
    vector = np.append(levels, np.uint32(share_levels))
    vector += mask(secrets.rd_seed, vector.size)  # uint32 arithmetic wraps modulo 2^32
    own_sk1 = bytes_to_private_key(secrets.sk1)
    for node in secrets.mask_partners:
        pairwise = pairwise_mask(
            generate_shared_key(own_sk1, bytes_to_public_key(secrets.pk1_of[node])),
            secrets.digest, vector.size)
        if _pairwise_sign(secrets.node_id, node) > 0:
            vector += pairwise
        else:
            vector -= pairwise
    secrets.stage = "collect"
    return vector


def consistency(secrets: HospitalSecrets, alive: list[int],
                signer: signing.PrivateKey) -> bytes:
    """Stage 4: the server's list of the hospitals whose masked update it holds. This
    hospital signs its whole view of the round only if it is listed itself, every listed
    hospital shared keys with it, and the list reaches the threshold; once a round."""
    _expect_stage(secrets, "collect", "consistency")
    if len(set(alive)) != len(alive):
        raise ViewInconsistent("the alive list names a hospital twice")
    if secrets.node_id not in alive:
        raise ViewInconsistent("the alive list leaves out this hospital, which sent its "
                               "update: it would be unmasked as dropped")
    strangers = set(alive) - set(secrets.shared)
    if strangers:
        raise ViewInconsistent(f"the alive list names {len(strangers)} hospital(s) that did "
                               "not share keys with this one")
    if len(alive) < secrets.threshold:
        raise ViewInconsistent(f"{len(alive)} alive hospitals, fewer than the reconstruction "
                               f"threshold {secrets.threshold}")
    secrets.alive = sorted(alive)
    secrets.stage = "consistency"
    return signing.sign(signer, secrets.view())


def unmask_shares(secrets: HospitalSecrets, alive: list[int],
                  signatures: dict[int, bytes]) -> tuple[list[int], list[bytes]]:
    """Stage 5: with the signatures of every alive hospital over exactly this hospital's
    view, its self-mask seed shares of the alive hospitals and its private-key shares of
    those that shared keys but are not alive. Returns (owners, shares)."""
    _expect_stage(secrets, "consistency", "unmask")
    if sorted(set(alive)) != secrets.alive or len(set(alive)) != len(alive):
        raise ViewInconsistent("the alive list differs from the one this hospital signed")
    statement = secrets.view()
    signed = {secrets.node_id} | {
        node for node, signature in signatures.items()
        if node in secrets.alive and node in secrets.signing_key_of
        and signing.verify(secrets.signing_key_of[node], signature, statement)}
    if set(secrets.alive) - signed:
        raise ViewInconsistent(f"{len(set(secrets.alive) - signed)} of the "
                               f"{len(secrets.alive)} alive hospitals did not sign this "
                               "hospital's view of the round")
    secrets.stage = "unmask"
    active = secrets.alive
    dropped = [n for n in secrets.shared if n not in active]
    owners = list(active) + dropped
    shares = ([secrets.rd_seed_shares[n] for n in active]
              + [secrets.sk1_shares[n] for n in dropped])
    return owners, shares


# --- The server's side ------------------------------------------------------------------

def unmasked_sum(masked: dict[int, np.ndarray], shares: dict[int, list[bytes]],
                 neighbours: dict[int, list[int]], pk1_of: dict[int, bytes],
                 dropped: list[int], threshold: int, digest: bytes) -> np.ndarray:
    """The uint32 sum of the active hospitals' quantised vectors. ``masked``: each active
    hospital's masked vector; ``shares``: the shares collected per owner; ``neighbours`` and
    ``pk1_of``: the round's graph and first public keys; ``dropped``: hospitals that shared
    keys but sent no update; ``digest``: ``round_digest`` of what the setup stage said."""
    total = np.zeros_like(next(iter(masked.values())))
    for vector in masked.values():
        total += vector
    for owner in list(masked) + list(dropped):
        if len(shares.get(owner, [])) < threshold:
            raise SecAggError(f"{len(shares.get(owner, []))} shares of node {owner}'s secret, "
                              f"fewer than the reconstruction threshold {threshold}")
        secret = combine_shares(shares[owner])
        if owner in masked:
            total -= mask(secret, total.size)
            continue
        # A dropped hospital's private key rebuilds its pairwise masks with the active ones.
        sk1 = bytes_to_private_key(secret)
        for node in neighbours[owner]:
            if node == owner or node not in masked:
                continue
            pairwise = pairwise_mask(generate_shared_key(sk1, bytes_to_public_key(pk1_of[node])),
                                     digest, total.size)
            # The active node applied the sign seen from its side; undo it.
            if _pairwise_sign(node, owner) > 0:
                total -= pairwise
            else:
                total += pairwise
    return total


def dequantized_sum(total: np.ndarray, contributors: int, clipping_range: float,
                    quantization_range: int) -> np.ndarray:
    """The float sum of the weighted updates, with the sum of the weight shares last."""
    out = dequantize_sum(total[:-1], contributors, clipping_range, quantization_range)
    return np.append(out, float(total[-1]) / quantization_range)
