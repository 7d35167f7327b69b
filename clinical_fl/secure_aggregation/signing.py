"""Long-term signing keys and the roster: what lets a hospital tell a neighbour's round keys
and signatures from ones the server made up.

SecAgg+ against a malicious server (Bonawitz et al., CCS 2017, section 6) needs two things
the honest-but-curious protocol does without: each hospital signs its round keys with a
long-term key, and the lists of who is alive are signed by the hospitals in a consistency
round. A signature is worth something only against a key the hospital already trusts, so
each hospital holds a **roster**: the long-term public keys of the federation's hospitals,
agreed out of band (deployment: OpenSSH public key lines, one per hospital, the SuperNode
authentication keys of ``deploy/hospital-key.sh``; simulation: one key per hospital state
directory on the one machine). The server relays keys and signatures; it never vouches.

Every statement signed here is domain-separated and length-prefixed, and names the run and
the round, so a signature cannot be replayed in another round, another run or another
stage.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

_KEYS_DOMAIN = b"clinical-fl secagg+ round keys v2"
_VIEW_DOMAIN = b"clinical-fl secagg+ consistency v2"
_CONTRIBUTION_DOMAIN = b"clinical-fl ckks contribution v1"
_MAX_ROSTER_BYTES = 1 << 20  # a roster of a few thousand hospitals at most

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class SigningKeyError(ValueError):
    """The hospital's signing key or roster is missing or unusable (the message names the
    file or node config key; it stays in the hospital's log)."""


class SignatureRefused(ValueError):
    """A key or signature the hospital cannot verify against its roster."""


def _digest(domain: bytes, parts: Iterable[bytes]) -> bytes:
    """SHA-256 of the domain and each part, each prefixed by its length: no two different
    part lists hash alike by shifting bytes between parts."""
    h = hashlib.sha256()
    for part in (domain, *parts):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def _int(value: int) -> bytes:
    return int(value).to_bytes(16, "big", signed=True)


def _nodes(nodes: Iterable[int]) -> bytes:
    return b"".join(_int(n) for n in sorted(set(nodes)))


def keys_statement(run_id: int, round_: int, digest: bytes, node: int, pk1: bytes,
                   pk2: bytes) -> bytes:
    """What a hospital signs at setup: its two round keys, as node ``node`` of this run's
    round, under this round's parameters (``secagg_plus.round_digest``)."""
    return _digest(_KEYS_DOMAIN, [_int(run_id), _int(round_), digest, _int(node), pk1, pk2])


def roster_view_hash(entries: dict[int, tuple[bytes, bytes, bytes]]) -> bytes:
    """The key list a hospital was given at share keys: node -> (pk1, pk2, signing key)."""
    parts = [b"".join((_int(node), *(len(x).to_bytes(4, "big") + x for x in entry)))
             for node, entry in sorted(entries.items())]
    return _digest(b"key list", parts)


def view_statement(run_id: int, round_: int, digest: bytes, key_list: bytes,
                   shared: Iterable[int], alive: Iterable[int], instructions: bytes) -> bytes:
    """What a hospital signs in the consistency round: the whole of its view of the round
    (the key list, who shared keys with it, who the server says sent an update, and the
    train message it trained on: global adapter and settings). Hospitals whose views differ
    in anything sign different statements, and each unmasks only a view every alive hospital
    signed."""
    return _digest(_VIEW_DOMAIN, [_int(run_id), _int(round_), digest, key_list,
                                  _nodes(shared), _nodes(alive), instructions])


def ciphertexts_digest(ciphertexts: Iterable[bytes]) -> bytes:
    """One hospital's encrypted update (CKKS ciphertexts, in order), hashed."""
    return _digest(b"ciphertexts", list(ciphertexts))


def contribution_statement(run_id: int, round_: int, node: int, ciphertexts: bytes) -> bytes:
    """What a hospital signs when it encrypts its CKKS update: node ``node`` sent these
    ciphertexts (``ciphertexts_digest``) in this run's round. A decryption request names its
    contributors with these signatures, so it cannot count a hospital that did not contribute
    in that round, nor a round's contribution in another."""
    return _digest(_CONTRIBUTION_DOMAIN, [_int(run_id), _int(round_), _int(node), ciphertexts])


# --- Keys --------------------------------------------------------------------------------

def public_bytes(key: PrivateKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
                 ) -> bytes:
    """A public key as one OpenSSH line without comment (``ecdsa-sha2-nistp384 AAAA...``):
    the form roster files hold and the setup stage sends."""
    public = key.public_key() if hasattr(key, "private_bytes") else key
    return public.public_bytes(serialization.Encoding.OpenSSH,
                               serialization.PublicFormat.OpenSSH)


def load_private_key(path: Path, source: str) -> PrivateKey:
    """An OpenSSH (``ssh-keygen``) or PEM private key without passphrase. ``source`` names
    where the path came from, for the error."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SigningKeyError(f"{source}: cannot read the signing key {path} ({err})") from err
    loaders = ((serialization.load_ssh_private_key, serialization.load_pem_private_key)
               if data.lstrip().startswith(b"-----BEGIN OPENSSH") else
               (serialization.load_pem_private_key, serialization.load_ssh_private_key))
    for loader in loaders:
        try:
            key = loader(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        if isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            return key
        raise SigningKeyError(f"{source}: {path} is a {type(key).__name__}; the signing key "
                              "must be ECDSA or Ed25519")
    raise SigningKeyError(f"{source}: {path} is not an unencrypted OpenSSH or PEM private key")


def sign(key: PrivateKey, statement: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(statement)
    return key.sign(statement, ec.ECDSA(hashes.SHA384()))


def verify(public: bytes, signature: bytes, statement: bytes) -> bool:
    """Whether ``signature`` over ``statement`` verifies under the OpenSSH public key line."""
    try:
        key = serialization.load_ssh_public_key(public)
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, statement)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, statement, ec.ECDSA(hashes.SHA384()))
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def new_private_key(path: Path) -> PrivateKey:
    """A fresh ECDSA P-384 key (OS entropy) written as PEM, mode 0600, with its public line
    beside it (``path`` + ``.pub``); never overwrites."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    path.with_name(path.name + ".pub").write_bytes(public_bytes(key) + b"\n")
    return key


# --- The roster --------------------------------------------------------------------------

@dataclass(frozen=True)
class Roster:
    """The long-term public keys this hospital trusts, one per hospital of the federation."""

    keys: frozenset[bytes]

    def __contains__(self, public: bytes) -> bool:
        return public in self.keys

    def __len__(self) -> int:
        return len(self.keys)


def canonical_public(line: bytes) -> bytes:
    """An OpenSSH public key line (with or without comment) as ``public_bytes`` writes it."""
    fields = line.split()
    if len(fields) < 2:
        raise ValueError("not an OpenSSH public key line")
    return public_bytes(serialization.load_ssh_public_key(b" ".join(fields[:2])))


def parse_roster(lines: Iterable[bytes], source: str) -> Roster:
    """A roster from OpenSSH public key lines (``authorized_keys`` style; ``#`` comments and
    blank lines skipped). A line that is not a key is an error, never skipped: a roster
    that silently lost a hospital would lower the majority the hospital checks."""
    keys = set()
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            keys.add(canonical_public(line))
        except (ValueError, TypeError, UnsupportedAlgorithm) as err:
            raise SigningKeyError(f"{source}: line {number} is not an OpenSSH public key "
                                  "line") from err
    if not keys:
        raise SigningKeyError(f"{source}: the roster holds no public key")
    return Roster(frozenset(keys))


def load_roster(path: Path, source: str) -> Roster:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_ROSTER_BYTES + 1)
    except OSError as err:
        raise SigningKeyError(f"{source}: cannot read the roster {path} ({err})") from err
    if len(data) > _MAX_ROSTER_BYTES:
        raise SigningKeyError(f"{source}: the roster {path} is over {_MAX_ROSTER_BYTES} bytes")
    return parse_roster(data.splitlines(), f"{source} ({path})")
