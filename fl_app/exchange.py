"""What server and hospital put into the records they exchange for secure aggregation.

The one module both sides import (besides ``fl_app/console.py``): the server's Grid
(``fl_app/server/grids/secure_aggregation.py``) and the hospital's mod
(``fl_app/hospital/secure_aggregation_mod.py``) build and read the same records, and neither
side may import the other's code. The record keys and refusal codes live in
``clinical_fl/protocol/``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from clinical_fl.protocol import messages as m


def vector_record(vector: np.ndarray) -> ArrayRecord:
    return ArrayRecord({m.SECAGG_VECTOR: Array(np.ascontiguousarray(vector))})


def ciphertext_record(ciphertexts: list[bytes]) -> ArrayRecord:
    return ArrayRecord({f"ct-{i:05d}": Array(np.frombuffer(ct, dtype=np.uint8))
                        for i, ct in enumerate(ciphertexts)})


def ciphertexts_of(record: ArrayRecord) -> list[bytes]:
    return [record[name].numpy().tobytes() for name in sorted(record)]
