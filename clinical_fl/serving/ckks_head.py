"""The classification head on encrypted note vectors (CKKS, via TenSEAL's SEAL binding).

The client encodes notes into the head's input vectors itself, encrypts them under a CKKS key
that never leaves it, and the service evaluates ``x @ W + b`` on the ciphertexts. Only the
client can decrypt the logits.

Packing (the hybrid diagonal method of Halevi and Shoup, for a d x k head). One ciphertext
has 4096 slots; they are cut into blocks of B slots, one note per block, so a ciphertext
carries 4096 / B notes (8 for MiniLM's 384 values and 6 classes). In its block a note's
vector x, zero-padded to D = k * 2^m values, is followed by a copy of its first k - 1 values,
so that rotating the whole ciphertext by i < k shifts every block's vector cyclically. Then

    z = sum_{i<k} rot(ct, i) * M_i,   M_i[f] = W[(f + i) mod D, f mod k]

holds, in the slots f = j (mod k) of a block, products whose sum over those slots is the
logit j; log2(D / k) rotate-and-add steps gather those sums into the block's first k slots.
A 0/1 mask then keeps only those slots (the client learns the logits, not partial sums of
the weights), the real part is taken (a conjugation: imaginary parts of the client's slots give
nothing back) and the bias is added. Cost per ciphertext: k - 1 + log2(D / k) rotations (11),
k + 1 plaintext products, whatever the number of notes in it. Where zero columns make blocks
smaller (5 classes of 384 values: D = 640 needs blocks of 1024; as 6 columns, D = 384 fits in
512), the head is evaluated as k' > k columns and packs twice the notes.

Rotations need Galois keys for exactly those steps and the conjugation: the client makes them
and uploads them once (8.4 MB for MiniLM's head); they let the service rotate, never decrypt.
Encryption is symmetric (seeded), which halves each uploaded ciphertext.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tenseal import sealapi

POLY_MODULUS_DEGREE = 8192
SLOTS = POLY_MODULUS_DEGREE // 2
# Special prime (60), two 40-bit levels (the head's products, the output mask), and a 60-bit
# base: 200 bits, within SEAL's 218 for 128-bit security at N = 8192.
COEFF_MODULUS_BITS = (60, 40, 40, 60)
SCALE_BITS = 40
# Decrypted logits are rounded: exact CKKS decryptions handed to someone who holds the
# ciphertexts reveal the secret key (Li and Micciancio, 2021); 1e-4 is far below what a
# softmax or an argmax notices and far above CKKS' noise.
LOGIT_DECIMALS = 4


class EncryptedInputError(ValueError):
    """A ciphertext or key that does not fit the head's encryption parameters or layout."""


@dataclass(frozen=True)
class HeadLayout:
    """Where each note's values sit in a ciphertext, for a head of ``dimension`` x ``classes``."""

    dimension: int
    classes: int
    poly_modulus_degree: int = POLY_MODULUS_DEGREE
    coeff_modulus_bits: tuple[int, ...] = COEFF_MODULUS_BITS
    scale_bits: int = SCALE_BITS

    def __post_init__(self) -> None:
        if self.dimension < 1 or self.classes < 2:
            raise EncryptedInputError(f"a head of {self.dimension} x {self.classes} cannot be "
                                      "evaluated; need at least 1 input and 2 classes")
        if self.block > self.slots:
            raise EncryptedInputError(
                f"a {self.dimension}-value vector for {self.classes} classes needs {self.block} "
                f"slots, more than the {self.slots} of one ciphertext")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @staticmethod
    def _shape(dimension: int, width: int) -> tuple[int, int, int]:
        """(D, B, rotations) when the head is evaluated as ``width`` columns."""
        padded = width * 2 ** math.ceil(math.log2(max(1, dimension / width)))
        block = 2 ** math.ceil(math.log2(padded + width - 1))
        return padded, block, width - 1 + int(math.log2(padded // width))

    @property
    def width(self) -> int:
        """k': the head's columns as evaluated, zero columns added where that packs more notes
        per ciphertext (5 classes of 384 values: as 6, blocks of 512 rather than 1024)."""
        return min(range(self.classes, 2 * self.classes + 1),
                   key=lambda w: self._shape(self.dimension, w)[1:] + (w,))

    @property
    def padded(self) -> int:
        """D: the vector length, zero-padded to k' x a power of two."""
        return self._shape(self.dimension, self.width)[0]

    @property
    def block(self) -> int:
        """B: slots per note (a power of two, so blocks tile the ciphertext)."""
        return self._shape(self.dimension, self.width)[1]

    @property
    def notes_per_ciphertext(self) -> int:
        return self.slots // self.block

    @property
    def fold_steps(self) -> list[int]:
        return [self.width * 2 ** i for i in range(int(math.log2(self.padded // self.width)))]

    @property
    def rotation_steps(self) -> list[int]:
        return list(range(1, self.width)) + self.fold_steps

    def galois_elements(self) -> list[int]:
        """SEAL's Galois element of a left rotation by s slots is 3^s mod 2N; 2N - 1 is the
        complex conjugation that keeps only the real part of the answer."""
        return [pow(3, step, 2 * self.poly_modulus_degree) for step in self.rotation_steps] + [
            2 * self.poly_modulus_degree - 1]

    def ciphertexts_for(self, notes: int) -> int:
        return math.ceil(notes / self.notes_per_ciphertext)

    def pack(self, vectors: np.ndarray) -> list[np.ndarray]:
        """Slot values of each ciphertext for ``vectors`` (notes x dimension)."""
        vectors = np.asarray(vectors, dtype=np.float64)
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise EncryptedInputError(f"vectors of shape {vectors.shape}; the head reads "
                                      f"{self.dimension} values per note")
        packed = []
        per = self.notes_per_ciphertext
        for start in range(0, len(vectors), per):
            slots = np.zeros(self.slots)
            for j, vector in enumerate(vectors[start:start + per]):
                at = j * self.block
                slots[at:at + self.dimension] = vector
                # The wrap-around copy: rotations by i < k read it as x[0..k-2].
                head = vector[:self.width - 1]
                slots[at + self.padded:at + self.padded + len(head)] = head
            packed.append(slots)
        return packed

    def unpack(self, slot_values: list[np.ndarray], notes: int) -> np.ndarray:
        """The logits (notes x classes) from the decrypted output slots."""
        rows = [values[j * self.block:j * self.block + self.classes]
                for values in slot_values for j in range(self.notes_per_ciphertext)]
        return np.array(rows[:notes])

    def to_dict(self) -> dict:
        return {**asdict(self), "coeff_modulus_bits": list(self.coeff_modulus_bits),
                "width": self.width, "notes_per_ciphertext": self.notes_per_ciphertext,
                "rotation_steps": self.rotation_steps}

    @classmethod
    def from_dict(cls, spec: dict) -> HeadLayout:
        return cls(dimension=int(spec["dimension"]), classes=int(spec["classes"]),
                   poly_modulus_degree=int(spec["poly_modulus_degree"]),
                   coeff_modulus_bits=tuple(int(b) for b in spec["coeff_modulus_bits"]),
                   scale_bits=int(spec["scale_bits"]))

    def seal_context(self) -> sealapi.SEALContext:
        """Parameters only: no key of any kind."""
        params = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
        params.set_poly_modulus_degree(self.poly_modulus_degree)
        params.set_coeff_modulus(sealapi.CoeffModulus.Create(
            self.poly_modulus_degree, list(self.coeff_modulus_bits)))
        context = sealapi.SEALContext(params, True, sealapi.SEC_LEVEL_TYPE.TC128)
        if not context.parameters_set():
            raise EncryptedInputError(f"CKKS parameters rejected by SEAL: "
                                      f"{context.parameters_error_message()}")
        return context


class _Bytes:
    """SEAL's Python binding saves and loads through files: a private scratch folder."""

    _folder = Path(tempfile.mkdtemp(prefix="clinical-fl-seal-",
                                    dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    atexit.register(shutil.rmtree, _folder, ignore_errors=True)

    @classmethod
    def dump(cls, item: object) -> bytes:
        fd, name = tempfile.mkstemp(dir=cls._folder)
        os.close(fd)
        try:
            item.save(name)
            return Path(name).read_bytes()
        finally:
            os.unlink(name)

    @classmethod
    def load(cls, item: object, context: sealapi.SEALContext, data: bytes) -> object:
        fd, name = tempfile.mkstemp(dir=cls._folder)
        try:
            os.write(fd, data)
            os.close(fd)
            item.load(context, name)
            return item
        finally:
            os.unlink(name)


def key_id(evaluation_keys: bytes) -> str:
    return hashlib.sha256(evaluation_keys).hexdigest()


class ClientKeys:
    """The client's side: a secret key (only in this object's memory), encryption and
    decryption, and the Galois keys the service needs to rotate."""

    def __init__(self, layout: HeadLayout) -> None:
        self.layout = layout
        self._context = layout.seal_context()
        keygen = sealapi.KeyGenerator(self._context)
        secret = keygen.secret_key()
        self._encryptor = sealapi.Encryptor(self._context, secret)
        self._decryptor = sealapi.Decryptor(self._context, secret)
        self._encoder = sealapi.CKKSEncoder(self._context)
        self.evaluation_keys = _Bytes.dump(keygen.create_galois_keys(layout.galois_elements()))
        self.key_id = key_id(self.evaluation_keys)

    def encrypt(self, vectors: np.ndarray) -> list[bytes]:
        """One seeded ciphertext per ``notes_per_ciphertext`` vectors."""
        out = []
        for slots in self.layout.pack(vectors):
            plain = sealapi.Plaintext()
            self._encoder.encode(slots.tolist(), 2.0 ** self.layout.scale_bits, plain)
            out.append(_Bytes.dump(self._encryptor.encrypt_symmetric(plain)))
        return out

    def decrypt(self, ciphertexts: list[bytes], notes: int) -> np.ndarray:
        """Logits (notes x classes) from the service's answer."""
        slot_values = []
        for data in ciphertexts:
            cipher = _load_ciphertext(self._context, data, "answer ciphertext")
            plain = sealapi.Plaintext()
            self._decryptor.decrypt(cipher, plain)
            slot_values.append(np.array(self._encoder.decode_double(plain)))
        if len(slot_values) != self.layout.ciphertexts_for(notes):
            raise EncryptedInputError(f"the answer has {len(slot_values)} ciphertexts for "
                                      f"{notes} notes; expected "
                                      f"{self.layout.ciphertexts_for(notes)}")
        return np.round(self.layout.unpack(slot_values, notes), LOGIT_DECIMALS)


def _load_ciphertext(context: sealapi.SEALContext, data: bytes, what: str
                     ) -> sealapi.Ciphertext:
    try:
        return _Bytes.load(sealapi.Ciphertext(), context, data)
    except Exception as err:  # SEAL raises ValueError / RuntimeError with its own wording
        raise EncryptedInputError(f"{what} is not a CKKS ciphertext for these encryption "
                                  f"parameters ({err})") from err


class EncryptedHead:
    """The service's side: the head's weights as plaintexts and SEAL's evaluator. It holds
    the encryption parameters and the clients' Galois keys; no secret or public key."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        weight, bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
        if weight.ndim != 2 or bias.shape != (weight.shape[1],):
            raise ValueError(f"head weight {weight.shape} and bias {bias.shape} do not fit")
        if not np.isfinite(weight).all() or not np.isfinite(bias).all() or not weight.any():
            raise ValueError("the head's weights must be finite and not all zero")
        self.layout = HeadLayout(dimension=weight.shape[0], classes=weight.shape[1])
        self.context = self.layout.seal_context()
        self._evaluator = sealapi.Evaluator(self.context)
        self._encoder = sealapi.CKKSEncoder(self.context)
        self._scale = 2.0 ** self.layout.scale_bits
        self._bias = bias
        layout = self.layout
        padded = np.zeros((layout.padded, layout.width))
        padded[:layout.dimension, :layout.classes] = weight
        f = np.arange(layout.padded)
        # (rotation, plaintext) for each non-zero diagonal: a product with a zero plaintext
        # would be a transparent ciphertext, which SEAL refuses to go on with.
        self._diagonals: list[tuple[int, sealapi.Plaintext]] = []
        for i in range(layout.width):
            row = padded[(f + i) % layout.padded, f % layout.width]
            if not row.any():
                continue
            slots = np.zeros(layout.slots)
            for j in range(layout.notes_per_ciphertext):
                slots[j * layout.block:j * layout.block + layout.padded] = row
            self._diagonals.append((i, self._encode(slots, self.context.first_parms_id())))
        self._plaintexts: dict[tuple, sealapi.Plaintext] = {}  # masks and biases, by level

    def _encode(self, values: np.ndarray, parms_id: list[int], scale: float | None = None
                ) -> sealapi.Plaintext:
        plain = sealapi.Plaintext()
        self._encoder.encode(values.tolist(), parms_id, scale or self._scale, plain)
        return plain

    def _per_note(self, kind: str, notes: int, cipher: sealapi.Ciphertext) -> sealapi.Plaintext:
        """The output mask (0.5 on the first ``notes`` blocks' logit slots: the real part is
        taken by adding the conjugate) or the bias, encoded at ``cipher``'s level and scale."""
        key = (kind, notes, tuple(cipher.parms_id()), cipher.scale)
        if key not in self._plaintexts:
            layout, values = self.layout, np.zeros(self.layout.slots)
            for j in range(notes):
                at = j * layout.block
                values[at:at + layout.classes] = 0.5 if kind == "mask" else self._bias
            scale = None if kind == "mask" else cipher.scale
            self._plaintexts[key] = self._encode(values, cipher.parms_id(), scale)
        return self._plaintexts[key]

    def load_keys(self, data: bytes) -> sealapi.GaloisKeys:
        """The client's Galois keys, checked to be for these parameters and these rotations."""
        try:
            keys = _Bytes.load(sealapi.GaloisKeys(), self.context, data)
        except Exception as err:
            raise EncryptedInputError(f"evaluation keys are not SEAL Galois keys for these "
                                      f"encryption parameters ({err})") from err
        steps = [*self.layout.rotation_steps, "conjugation"]
        missing = [s for s, e in zip(steps, self.layout.galois_elements(), strict=True)
                   if not keys.has_key(e)]
        if missing:
            raise EncryptedInputError(f"evaluation keys lack the rotations {missing} this head "
                                      "needs")
        return keys

    def evaluate(self, ciphertexts: list[bytes], keys: sealapi.GaloisKeys,
                 notes: int | None = None) -> list[bytes]:
        """The logits of ``notes`` notes (default: as many as the ciphertexts hold); blocks
        past them come back as zeros, so a request is answered for what it declared."""
        per = self.layout.notes_per_ciphertext
        notes = len(ciphertexts) * per if notes is None else notes
        if not 0 < notes <= len(ciphertexts) * per or len(ciphertexts) != -(-notes // per):
            raise EncryptedInputError(f"{notes} notes do not fill {len(ciphertexts)} "
                                      f"ciphertexts of {per} notes")
        return [_Bytes.dump(self._evaluate_one(i, data, keys, min(per, notes - i * per)))
                for i, data in enumerate(ciphertexts)]

    def _evaluate_one(self, index: int, data: bytes, keys: sealapi.GaloisKeys, notes: int
                      ) -> sealapi.Ciphertext:
        layout = self.layout
        cipher = _load_ciphertext(self.context, data, f"ciphertext {index}")
        if (cipher.parms_id() != self.context.first_parms_id() or cipher.size() != 2
                or cipher.is_transparent() or not cipher.is_ntt_form()
                or not math.isclose(cipher.scale, self._scale, rel_tol=1e-9)):
            raise EncryptedInputError(
                f"ciphertext {index} is not a fresh encryption at scale 2^{layout.scale_bits} "
                f"(size {cipher.size()}, scale 2^{math.log2(max(cipher.scale, 1)):.1f}); "
                "encrypt with the parameters from /encrypted/spec")
        try:
            return self._head_of(cipher, keys, notes)
        except (RuntimeError, ValueError) as err:  # SEAL's refusal of a malformed ciphertext
            raise EncryptedInputError(f"ciphertext {index} cannot be evaluated: {err}") from err

    def _head_of(self, cipher: sealapi.Ciphertext, keys: sealapi.GaloisKeys, notes: int
                 ) -> sealapi.Ciphertext:
        ev = self._evaluator
        total, term = sealapi.Ciphertext(), sealapi.Ciphertext()
        for n, (shift, diagonal) in enumerate(self._diagonals):
            if shift:
                ev.rotate_vector(cipher, shift, keys, term)
                ev.multiply_plain_inplace(term, diagonal)
            else:
                ev.multiply_plain(cipher, diagonal, term)
            if n == 0:
                total, term = term, sealapi.Ciphertext()
            else:
                ev.add_inplace(total, term)
        ev.rescale_to_next_inplace(total)
        for step in reversed(self.layout.fold_steps):
            ev.rotate_vector(total, step, keys, term)
            ev.add_inplace(total, term)
        ev.multiply_plain_inplace(total, self._per_note("mask", notes, total))
        ev.rescale_to_next_inplace(total)
        # Real part: z/2 + conj(z)/2. A client that hid inputs in the imaginary parts of its
        # slots gets nothing back for them.
        ev.complex_conjugate(total, keys, term)
        ev.add_inplace(total, term)
        ev.add_plain_inplace(total, self._per_note("bias", notes, total))
        return total
