"""SecAgg+ arithmetic: quantisation to the integers modulo 2^32, and the masks.

Flower's ``quantize`` maps each value of [-c, c] to [0, T] with stochastic rounding; the
hospitals' quantised vectors add up in uint32 (wrapping modulo 2^32 is the protocol's
arithmetic), and the server turns the unmasked sum back into floats here.

The masks come from ChaCha20 (``cryptography``) keyed by a 32-byte secret. Flower's own
``pseudo_rand_gen`` seeds NumPy's Mersenne Twister with 32 bits of the secret: a server
could try all 2^32 seeds against a masked update, so we use a cryptographic generator.
"""

from __future__ import annotations

import base64

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.quantization import quantize

# The keystream of one key is used for one mask only (keys are fresh every round).
_NONCE = bytes(16)


def mask(secret: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint32 values derived from ``secret`` (32 raw bytes, or the urlsafe
    base64 of 32 bytes that Flower's ``generate_shared_key`` returns)."""
    key = secret if len(secret) == 32 else base64.urlsafe_b64decode(secret)
    if len(key) != 32:
        raise ValueError(f"a mask secret must be 32 bytes, got {len(key)}")
    stream = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor().update(
        bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def quantize_vector(vector: np.ndarray, clipping_range: float,
                    quantization_range: int) -> tuple[np.ndarray, int]:
    """(the vector quantised to uint32 in [0, quantization_range], how many values were
    clipped to the range)."""
    clipped = int(np.count_nonzero(np.abs(vector) > clipping_range))
    quantized = quantize([np.asarray(vector, dtype=np.float64)], clipping_range,
                         quantization_range)[0]
    return quantized.astype(np.uint32), clipped


def dequantize_sum(total: np.ndarray, contributors: int, clipping_range: float,
                   quantization_range: int) -> np.ndarray:
    """The float sum of ``contributors`` vectors from the uint32 sum of their quantised
    values: each value v was stored as (v + c) x T / 2c, so the sum of n is
    (total - n T / 2) x 2c / T, read modulo 2^32 as the nearest value to 0: exact for any
    sum within +-2^31 steps (256 c at T = 2^24), even when single vectors left [-c, c]
    (distributed DP's noisy shares, tasks/privacy/lattice.py)."""
    step = 2 * clipping_range / quantization_range
    offset = (contributors * quantization_range // 2) % 2**32
    centred = (total.astype(np.int64) - offset) % 2**32
    centred = np.where(centred >= 2**31, centred - 2**32, centred)
    if contributors * quantization_range % 2:  # an odd T x n: the half level
        return (centred - 0.5) * step
    return centred.astype(np.float64) * step
