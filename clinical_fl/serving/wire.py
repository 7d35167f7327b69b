"""The encrypted endpoints' body: a small JSON header and binary ciphertexts, no base64.

    b"CFL1" | u32 header length | header (JSON, UTF-8) | (u32 length | bytes) per ciphertext

All lengths big-endian. Ciphertexts are 130-200 KB each, so a text encoding would add a third
to every request for nothing.
"""

from __future__ import annotations

import json
import struct

MAGIC = b"CFL1"
MEDIA_TYPE = "application/x-clinical-fl-ciphertexts"
_LENGTH = struct.Struct(">I")
MAX_HEADER_BYTES = 64 * 1024


class WireError(ValueError):
    """A body that is not in this format (the message says where it breaks)."""


def pack(header: dict, blobs: list[bytes]) -> bytes:
    encoded = json.dumps(header).encode()
    parts = [MAGIC, _LENGTH.pack(len(encoded)), encoded]
    for blob in blobs:
        parts += [_LENGTH.pack(len(blob)), blob]
    return b"".join(parts)


def unpack(body: bytes) -> tuple[dict, list[bytes]]:
    if body[:4] != MAGIC:
        raise WireError(f"body does not start with {MAGIC!r}; send {MEDIA_TYPE} made by "
                        "clinical_fl.serving.client (or see clinical_fl/serving/wire.py)")
    at = 4

    def take(what: str) -> bytes:
        nonlocal at
        if at + 4 > len(body):
            raise WireError(f"body ends inside the length of {what}")
        (length,) = _LENGTH.unpack_from(body, at)
        at += 4
        if at + length > len(body):
            raise WireError(f"{what} declares {length} bytes; only {len(body) - at} follow")
        at += length
        return body[at - length:at]

    if len(body) >= 8 and _LENGTH.unpack_from(body, 4)[0] > MAX_HEADER_BYTES:
        raise WireError(f"the header is over {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(take("the header"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise WireError(f"the header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise WireError("the header must be a JSON object")
    blobs = []
    while at < len(body):
        blobs.append(take(f"ciphertext {len(blobs)}"))
    return header, blobs
