"""The classification head on CKKS ciphertexts (clinical_fl/serving/ckks_head.py), in process."""

from __future__ import annotations

import numpy as np
import pytest
from tenseal import sealapi

from clinical_fl.serving import wire
from clinical_fl.serving.ckks_head import ClientKeys, EncryptedHead, EncryptedInputError, HeadLayout


def _head(dimension: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(dimension, classes)) * 0.2, rng.normal(size=classes)


@pytest.mark.parametrize(("dimension", "classes", "notes"),
                         [(384, 6, 19), (384, 5, 9), (64, 6, 3), (100, 3, 40), (10, 2, 1),
                          (384, 23, 5)])
def test_encrypted_logits_equal_the_plain_head(dimension, classes, notes):
    weight, bias = _head(dimension, classes)
    head = EncryptedHead(weight, bias)
    keys = ClientKeys(head.layout)
    vectors = np.random.default_rng(1).normal(size=(notes, dimension))
    answer = head.evaluate(keys.encrypt(vectors), head.load_keys(keys.evaluation_keys))
    logits = keys.decrypt(answer, notes)
    np.testing.assert_allclose(logits, vectors @ weight + bias, atol=1e-4)
    assert len(answer) == head.layout.ciphertexts_for(notes)


def test_minilm_head_packs_eight_notes_per_ciphertext_with_eleven_rotations():
    layout = HeadLayout(dimension=384, classes=6)
    assert (layout.padded, layout.block, layout.notes_per_ciphertext) == (384, 512, 8)
    assert layout.rotation_steps == [1, 2, 3, 4, 5, 6, 12, 24, 48, 96, 192]
    five = HeadLayout(dimension=384, classes=5)  # as 6 columns: blocks of 512, not 1024
    assert (five.width, five.block, five.notes_per_ciphertext) == (6, 512, 8)


def _raw_slots(keys: ClientKeys, answer: bytes, folder) -> np.ndarray:
    """All 4096 decrypted slots of one answer (complex), not only the logits."""
    (folder / "answer").write_bytes(answer)
    cipher = sealapi.Ciphertext()
    cipher.load(keys._context, str(folder / "answer"))
    plain = sealapi.Plaintext()
    keys._decryptor.decrypt(cipher, plain)
    return np.array(keys._encoder.decode_complex(plain))


def test_the_answer_holds_only_the_declared_notes_logits(tmp_path):
    """Every slot but the logit slots of the notes the request declared decrypts to (about)
    zero: no partial sums of the weights, nothing for blocks past the declared count (a
    client cannot get 8 answers for the price of 1)."""
    weight, bias = _head(384, 6)
    head = EncryptedHead(weight, bias)
    keys = ClientKeys(head.layout)
    vectors = np.random.default_rng(2).normal(size=(8, 384))
    (answer,) = head.evaluate(keys.encrypt(vectors), head.load_keys(keys.evaluation_keys),
                              notes=3)
    slots = _raw_slots(keys, answer, tmp_path)
    logit_slots = np.zeros(len(slots), bool)
    for j in range(3):
        logit_slots[j * 512:j * 512 + 6] = True
    assert np.abs(slots[~logit_slots]).max() < 1e-4
    np.testing.assert_allclose(slots[logit_slots].real.reshape(3, 6),
                               vectors[:3] @ weight + bias, atol=1e-4)


def test_inputs_hidden_in_imaginary_parts_give_nothing_back(tmp_path):
    """CKKS slots are complex; the service returns the real part only."""
    from clinical_fl.serving.ckks_head import _Bytes

    weight, bias = _head(64, 6)
    head = EncryptedHead(weight, bias)
    keys = ClientKeys(head.layout)
    values = np.zeros(head.layout.slots, complex)
    values[:64] = 1j * np.random.default_rng(4).normal(size=64)
    plain = sealapi.Plaintext()
    keys._encoder.encode(values.tolist(), 2.0 ** 40, plain)
    cipher = _Bytes.dump(keys._encryptor.encrypt_symmetric(plain))
    (answer,) = head.evaluate([cipher], head.load_keys(keys.evaluation_keys), notes=1)
    slots = _raw_slots(keys, answer, tmp_path)
    assert np.abs(slots.imag).max() < 1e-4
    np.testing.assert_allclose(slots[:6].real, bias, atol=1e-4)  # x_real = 0: bias only


def test_the_service_side_holds_no_secret_key_and_a_key_of_its_own_decrypts_garbage():
    weight, bias = _head(64, 6)
    head = EncryptedHead(weight, bias)
    assert not [v for v in vars(head).values() if isinstance(v, sealapi.SecretKey)]
    keys = ClientKeys(head.layout)
    vectors = np.random.default_rng(3).normal(size=(4, 64))
    answer = head.evaluate(keys.encrypt(vectors), head.load_keys(keys.evaluation_keys))
    # The best the service could do: a key pair of its own for the same parameters.
    guessed = ClientKeys(head.layout).decrypt(answer, 4)
    assert np.abs(guessed - (vectors @ weight + bias)).min() > 1.0


def test_keys_without_the_needed_rotations_and_foreign_ciphertexts_are_refused():
    head = EncryptedHead(*_head(64, 6))
    narrow = HeadLayout(dimension=64, classes=2)  # other rotation steps
    with pytest.raises(EncryptedInputError, match="lack the rotations"):
        head.load_keys(ClientKeys(narrow).evaluation_keys)
    with pytest.raises(EncryptedInputError, match="not SEAL Galois keys"):
        head.load_keys(b"not keys at all")
    keys = ClientKeys(head.layout)
    galois = head.load_keys(keys.evaluation_keys)
    other = ClientKeys(HeadLayout(dimension=64, classes=6, coeff_modulus_bits=(60, 40, 60)))
    with pytest.raises(EncryptedInputError, match="ciphertext 0 is not a CKKS ciphertext"):
        head.evaluate(other.encrypt(np.zeros((1, 64))), galois)
    with pytest.raises(EncryptedInputError, match="ciphertext 1"):
        head.evaluate([keys.encrypt(np.zeros((1, 64)))[0], b"\x00" * 100], galois)
    from clinical_fl.serving.ckks_head import _Bytes

    transparent = sealapi.Ciphertext(head.context)  # all zeros: SEAL would refuse mid-way
    transparent.resize(head.context, head.context.first_parms_id(), 2)
    with pytest.raises(EncryptedInputError, match="not a fresh encryption"):
        head.evaluate([_Bytes.dump(transparent)], galois)


def test_vectors_of_the_wrong_size_are_refused_before_encryption():
    keys = ClientKeys(HeadLayout(dimension=64, classes=6))
    with pytest.raises(EncryptedInputError, match="reads 64 values"):
        keys.encrypt(np.zeros((2, 65)))


def test_wire_format_round_trips_and_names_where_a_body_breaks():
    header, blobs = {"notes": 3, "key_id": "ab"}, [b"x" * 10, b"", b"yz"]
    assert wire.unpack(wire.pack(header, blobs)) == (header, blobs)
    body = wire.pack(header, blobs)
    with pytest.raises(wire.WireError, match="ciphertext 2 declares 2 bytes"):
        wire.unpack(body[:-1])
    with pytest.raises(wire.WireError, match="does not start with"):
        wire.unpack(b'{"notes": 3}')
    with pytest.raises(wire.WireError, match="not JSON"):
        wire.unpack(b"CFL1\x00\x00\x00\x03abc")
