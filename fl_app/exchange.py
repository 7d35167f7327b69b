"""What server and hospital put into the records they exchange for secure aggregation.

The one module both sides import (besides ``fl_app/console.py``): the server's Grid
(``fl_app/server/grids/secure_aggregation.py``) and the hospital's mod
(``fl_app/hospital/secure_aggregation_mod.py``) build and read the same records, and neither
side may import the other's code. The record keys and refusal codes live in
``clinical_fl/protocol/``.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from clinical_fl.protocol import messages as m


def vector_record(vector: np.ndarray) -> ArrayRecord:
    return ArrayRecord({m.SECAGG_VECTOR: Array(np.ascontiguousarray(vector))})


def ciphertext_record(ciphertexts: list[bytes]) -> ArrayRecord:
    return ArrayRecord({f"ct-{i:05d}": Array(np.frombuffer(ct, dtype=np.uint8))
                        for i, ct in enumerate(ciphertexts)})


def ciphertexts_of(record: ArrayRecord) -> list[bytes]:
    return [record[name].numpy().tobytes() for name in sorted(record)]


def content_digest(content: RecordDict, leave_out: str,
                   skip_keys: tuple[str, ...] = ()) -> bytes:
    """SHA-256 of a message's records (all but ``leave_out``): array names, dtypes, shapes and
    bytes; config and metric items (but ``skip_keys``, which the receiver sets itself). Two
    hospitals told to train on different adapters or settings get different digests."""
    h = hashlib.sha256(b"clinical-fl message content v1")
    for name in sorted(content):
        if name == leave_out:
            continue
        record = content[name]
        h.update(json.dumps([name, type(record).__name__]).encode())
        for key in sorted(record):
            if key in skip_keys:
                continue
            value = record[key]
            if isinstance(value, Array):
                h.update(json.dumps([key, value.dtype, list(value.shape),
                                     len(value.data)]).encode())
                h.update(value.data)
            else:
                h.update(json.dumps([key, _plain(value)]).encode())
    return h.digest()


def _plain(value: object) -> object:
    """A config or metric value as JSON can hold it (bytes as hex)."""
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
