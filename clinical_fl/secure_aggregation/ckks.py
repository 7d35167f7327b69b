"""CKKS homomorphic encryption (TenSEAL): the building blocks of encrypted aggregation.

Every hospital holds the same secret context (secret key + public key); the coordinator holds
only the public context. Hospitals encrypt their updates, the coordinator adds the ciphertexts
without being able to read any of them, and the hospitals decrypt the sum. Addition is the only
homomorphic operation used, so no Galois or relinearisation keys are made or shipped (they are
large and would only enable operations nobody needs).

Key material lives in two files made once by ``bash deploy/ckks-keys.sh DIR``:
``ckks-secret.ctx`` (to every hospital, never to the coordinator) and ``ckks-public.ctx``
(to the coordinator). ``fingerprint`` names a key so that parties can check they share one:
ciphertexts made under different keys add up to garbage without any error.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts

SECRET_FILE = "ckks-secret.ctx"
PUBLIC_FILE = "ckks-public.ctx"

_HOW_TO_MAKE = "make key material with `bash deploy/ckks-keys.sh DIR`"


class KeyMaterialError(ValueError):
    """Missing, unreadable or wrong CKKS key material (the message says how to fix it)."""


@dataclass(frozen=True)
class CkksParameters:
    """CKKS encryption parameters. The defaults give 4096 slots per ciphertext, at least
    128-bit security (SEAL's limit for N=8192 is 218 coefficient bits; these use 120) and
    absolute errors near 1e-8. Aggregation only adds ciphertexts, so no level is spent on
    multiplications: one data prime and the special prime suffice, and each ciphertext is
    131 KB instead of the 235 KB of the usual (60, 40, 40, 60) chain."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    global_scale_bits: int = 40


def generate_key_material(
    directory: Path, params: CkksParameters = CkksParameters()
) -> tuple[Path, Path]:
    """Write a fresh key to ``directory``: (secret context path (mode 0600), public path)."""
    directory = Path(directory)
    secret_path, public_path = directory / SECRET_FILE, directory / PUBLIC_FILE
    # A new key silently breaks every hospital that holds the old one, so never replace one.
    for path in (secret_path, public_path):
        if path.exists():
            raise KeyMaterialError(
                f"{path} exists; not overwritten (hospitals may hold that key). Choose another "
                f"directory, or delete the old files first if nobody uses them.")
    context = _new_context(params, directory)  # first: bad parameters leave no directory
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path, data, mode in ((secret_path, _secret_bytes(context), 0o600),
                             (public_path, public_bytes(context), 0o644)):
        try:
            _write_new(path, data, mode)
        except FileExistsError as err:  # someone wrote it between our check and now
            raise KeyMaterialError(f"{path} appeared while writing key material; not "
                                   f"overwritten. Check who else writes to {directory}.") from err
    return secret_path, public_path


def load_secret_context(path: Path, who: str) -> ts.Context:
    """A hospital's secret context from ``path``; ``who`` (e.g. "hospital 2") names it in errors."""
    path = Path(path)
    expected = (f"expected the secret CKKS context {SECRET_FILE} that every hospital shares "
                f"({_HOW_TO_MAKE}; give DIR/{SECRET_FILE} to the hospital)")
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise KeyMaterialError(f"{who}: CKKS key file {path} does not exist; {expected}") from err
    except OSError as err:
        raise KeyMaterialError(
            f"{who}: CKKS key file {path} cannot be read ({err.strerror}); {expected}") from err
    context = _parse(data, f"CKKS key file {path}", who, expected)
    if not context.has_secret_key():
        raise KeyMaterialError(
            f"{who}: CKKS key file {path} holds no secret key (is it {PUBLIC_FILE}, the "
            f"coordinator's file?); {expected}")
    if not context.has_public_key():
        # TenSEAL encrypts with the public key even when it has the secret one.
        raise KeyMaterialError(f"{who}: CKKS key file {path} holds no public key; {expected}")
    return context


def public_bytes(context: ts.Context) -> bytes:
    """The public part of ``context`` (public key only), serialized; the same bytes every time
    for the same key, so it can be fingerprinted and compared."""
    if not context.has_public_key():
        raise ValueError("this CKKS context holds no public key")
    public = context.copy()
    public.make_context_public()
    return public.serialize(save_public_key=True, save_secret_key=False,
                            save_galois_keys=False, save_relin_keys=False)


def load_public_context(data: bytes, who: str) -> ts.Context:
    """A public context from ``public_bytes`` output; refuses one that carries the secret key."""
    source = f"the public CKKS context ({len(data)} bytes)"
    expected = f"expected {PUBLIC_FILE} or public_bytes() of a secret context ({_HOW_TO_MAKE})"
    context = _parse(data, source, who, expected)
    if context.has_secret_key():
        raise KeyMaterialError(
            f"{who}: {source} holds the SECRET key, which the coordinator must never get; "
            f"{expected}. Treat that key as leaked: make new key material and give it to every "
            f"hospital.")
    return context


def fingerprint(public: bytes) -> str:
    """16 hex digits naming the key material (sha256 of the public context bytes)."""
    return hashlib.sha256(public).hexdigest()[:16]


def describe(context: ts.Context) -> str:
    """E.g. "CKKS N=8192, coefficient moduli 60/40/40/60 bits, scale 2^40"."""
    parms = context.seal_context().data.key_context_data().parms()
    scale = context.global_scale
    exponent = math.log2(scale)
    scale_text = f"2^{int(exponent)}" if exponent.is_integer() else f"{scale:g}"
    return (f"CKKS N={parms.poly_modulus_degree()}, coefficient moduli "
            f"{_coefficient_moduli_text(context)}, scale {scale_text}")


def slots(context: ts.Context) -> int:
    """Values per ciphertext: N/2."""
    return context.seal_context().data.key_context_data().parms().poly_modulus_degree() // 2


def encrypt(context: ts.Context, vector: np.ndarray) -> list[bytes]:
    """``vector`` (1-D floats) in ceil(len/slots) serialized ciphertexts. SEAL itself refuses
    non-finite values and values too large for the scale (ValueError)."""
    values = np.asarray(vector, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"encrypt takes a 1-D vector, got shape {values.shape}")
    step = slots(context)
    return [ts.ckks_vector(context, values[start:start + step].tolist()).serialize()
            for start in range(0, values.size, step)]


def add(context: ts.Context, encrypted: list[list[bytes]]) -> list[bytes]:
    """Element-wise sum of the parties' ciphertext lists, serialized. A public context is
    enough: addition needs no key."""
    if not encrypted:
        raise ValueError("nothing to add: no party's ciphertexts")
    count = len(encrypted[0])
    for index, party in enumerate(encrypted):
        if len(party) != count:
            raise ValueError(f"party {index} sent {len(party)} ciphertexts, party 0 sent {count}")
    total = []
    for chunk in range(count):
        accumulator = _load_vector(context, encrypted[0][chunk], 0, chunk)
        for index in range(1, len(encrypted)):
            addend = _load_vector(context, encrypted[index][chunk], index, chunk)
            if addend.size() != accumulator.size():
                raise ValueError(f"party {index}'s ciphertext {chunk} holds {addend.size()} "
                                 f"values, party 0's holds {accumulator.size()}")
            accumulator.add_(addend)
        total.append(accumulator.serialize())
    return total


def decrypt(context: ts.Context, ciphertexts: list[bytes], length: int) -> np.ndarray:
    """The float64 vector of ``length`` values in ``ciphertexts`` (needs the secret key)."""
    if not context.has_secret_key():
        raise ValueError("cannot decrypt: this CKKS context holds no secret key (a public "
                         "context, as the coordinator's); only hospitals decrypt")
    parts = [np.asarray(_load_vector(context, data, None, chunk).decrypt(), dtype=np.float64)
             for chunk, data in enumerate(ciphertexts)]
    values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    if values.size != length:
        raise ValueError(f"the ciphertexts hold {values.size} values, expected {length}")
    return values


def simulation_secret_context(directory: Path) -> Path:
    """directory/SECRET_FILE, made once for all simulated hospitals (which must share one key)
    even when several processes ask at the same time. Simulations only: deployments make keys
    with deploy/ckks-keys.sh."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret_path, public_path = directory / SECRET_FILE, directory / PUBLIC_FILE
    if not secret_path.exists():
        try:
            _write_new(secret_path, _secret_bytes(_new_context(CkksParameters(), directory)),
                       0o600)
        except FileExistsError:
            pass  # another process linked its key first: that one is the key
    if not public_path.exists():
        # Derived from whichever secret won; public_bytes is deterministic, so every process
        # would write the same bytes and losing this race is harmless too.
        winner = load_secret_context(secret_path, "simulation")
        try:
            _write_new(public_path, public_bytes(winner), 0o644)
        except FileExistsError:
            pass
    return secret_path


def _new_context(params: CkksParameters, directory: Path) -> ts.Context:
    try:
        context = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                             coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
        context.global_scale = 2.0 ** params.global_scale_bits
        # Bad parameter combinations (e.g. a scale too large for the moduli) only fail when
        # encrypting; find out now rather than in the first training round.
        probe = ts.ckks_vector(context, [1.0, -0.5]).decrypt()
    except (ValueError, RuntimeError, TypeError) as err:
        raise KeyMaterialError(f"no key material written to {directory}: CKKS parameters "
                               f"{params} are not usable ({err})") from err
    if not np.allclose(probe, [1.0, -0.5], atol=1e-3):
        raise KeyMaterialError(f"no key material written to {directory}: CKKS parameters "
                               f"{params} decrypt 1, -0.5 as {probe}; use a smaller scale")
    return context


def _secret_bytes(context: ts.Context) -> bytes:
    return context.serialize(save_public_key=True, save_secret_key=True,
                             save_galois_keys=False, save_relin_keys=False)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole or not at all, never replacing a file (FileExistsError): a temporary
    file in the same directory, hard-linked to the final name. Readers never see half a key,
    and of several concurrent writers exactly one wins."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            os.fchmod(stream.fileno(), mode)  # before any byte of a secret is written
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.link(temporary, path)
    finally:
        os.unlink(temporary)


def _parse(data: bytes, source: str, who: str, expected: str) -> ts.Context:
    try:
        context = ts.context_from(data)
    except Exception as err:  # TenSEAL raises ValueError or RuntimeError depending on the damage
        raise KeyMaterialError(f"{who}: {source} is not a TenSEAL context ({err}); "
                               f"{expected}") from err
    scheme = context.seal_context().data.key_context_data().parms().scheme()
    if scheme != ts.SCHEME_TYPE.CKKS.value:
        raise KeyMaterialError(f"{who}: {source} is a {scheme.name} context, not CKKS; {expected}")
    try:
        scale = context.global_scale  # TenSEAL raises when no scale was saved
    except ValueError:
        scale = 0.0
    if not scale > 0:  # ckks_vector() needs the context's scale
        raise KeyMaterialError(f"{who}: {source} has no CKKS scale; {expected}")
    return context


def _load_vector(context: ts.Context, data: bytes, party: int | None, chunk: int) -> ts.CKKSVector:
    try:
        return ts.ckks_vector_from(context, data)
    except (ValueError, RuntimeError, TypeError) as err:
        owner = f"party {party}'s " if party is not None else ""
        raise ValueError(f"{owner}ciphertext {chunk} is not a CKKS vector for this context "
                         f"({err})") from err


def _coefficient_moduli_text(context: ts.Context) -> str:
    """"60/40/40/60 bits". TenSEAL's own binding cannot return seal::Modulus objects, so the
    parameters go through SEAL's serialization into tenseal.sealapi, which can. Should that
    fail, the chain length and total bit count (which TenSEAL does expose) are the fallback."""
    key_level = context.seal_context().data.key_context_data()
    try:
        from tenseal import sealapi

        with tempfile.TemporaryDirectory() as scratch:
            saved = os.path.join(scratch, "parms")
            key_level.parms().save(saved)
            parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
            parms.load(saved)
        return "/".join(str(modulus.bit_count()) for modulus in parms.coeff_modulus()) + " bits"
    except Exception:  # an optional detail: describe() must not fail for it
        return (f"{key_level.chain_index() + 1} primes, "
                f"{key_level.total_coeff_modulus_bit_count()} bits in all")
