"""Labelled SHA-256 hashes and HMAC-SHA256 proofs (DESIGN §4, first two bullets).

``Hash(a, b)`` and ``Hash(a || b)`` in the seeds both become :func:`hash_values`: the
label and every value are length-prefixed, so no two different inputs encode alike.
A "hash" the seeds compute over a secret to prove knowledge of it (AuthData of 003, AN of
000, hash_PNE / hash_server of 002) becomes :func:`mac`, an HMAC keyed by that secret.

Encoding of one value (documented in docs/crypto.md, vectors in tests/vectors/):
``len(v) as 4-byte big endian || v``, where ``str`` is UTF-8 and ``int`` is an unsigned
8-byte big-endian integer. The label is encoded first the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable

from cpns.errors import AuthenticationFailed, LocalProtocolError

__all__ = ["KEY_LEN", "Part", "encode_parts", "hash_values", "mac", "verify_mac"]

#: Length in bytes of every symmetric key, hash and MAC in CPNS (SHA-256 / AES-256).
KEY_LEN = 32

type Part = bytes | str | int

#: A 4-byte big-endian length prefix, packed in one C call.
_LEN = struct.Struct(">I").pack


def _encode_one(value: Part) -> bytes:
    # Exact types first (the common case, and the hot path of the server's per-PNE
    # checks); subclasses such as IntEnum and bool take the general path below.
    if type(value) is bytes:
        return len(value).to_bytes(4, "big") + value
    if type(value) is str:
        raw = value.encode("utf-8")
        return len(raw).to_bytes(4, "big") + raw
    return _encode_general(value)


def _encode_general(value: Part) -> bytes:
    if isinstance(value, bool):  # bool is an int; refuse it rather than guess
        raise LocalProtocolError("bool is not a hashable CPNS value")
    if isinstance(value, int):
        if not 0 <= value < 2**64:
            raise LocalProtocolError("integer out of the unsigned 64-bit range")
        raw = value.to_bytes(8, "big")
    elif isinstance(value, str):
        raw = value.encode("utf-8")
    elif isinstance(value, bytes):
        raw = value
    else:  # pragma: no cover - typing forbids it; kept for callers without mypy
        raise LocalProtocolError(f"cannot encode {type(value).__name__}")
    return len(raw).to_bytes(4, "big") + raw


def encode_parts(label: str, parts: Iterable[Part]) -> bytes:
    """Return the unambiguous encoding of ``label`` followed by ``parts``."""
    if not label.startswith("cpns/"):
        raise LocalProtocolError("labels start with 'cpns/' and carry a version")
    # One loop with the exact-type cases inline (the server runs this a few times per PNE
    # authentication); the same bytes as _encode_one of each value.
    raw = label.encode("utf-8")
    out = [_LEN(len(raw)), raw]
    append = out.append
    for value in parts:
        if type(value) is bytes:
            append(_LEN(len(value)))
            append(value)
        elif type(value) is str:
            raw = value.encode("utf-8")
            append(_LEN(len(raw)))
            append(raw)
        else:
            append(_encode_general(value))
    return b"".join(out)


def hash_values(label: str, *parts: Part) -> bytes:
    """SHA-256 over the labelled encoding of ``parts``; 32 bytes."""
    return hashlib.sha256(encode_parts(label, parts)).digest()


def mac(key: bytes, label: str, *parts: Part) -> bytes:
    """HMAC-SHA256 keyed by ``key`` over the labelled encoding of ``parts``; 32 bytes."""
    if len(key) < 16:
        raise LocalProtocolError("MAC keys are at least 16 bytes")
    return hmac.new(key, encode_parts(label, parts), hashlib.sha256).digest()


def verify_mac(key: bytes, tag: bytes, label: str, *parts: Part) -> None:
    """Check ``tag`` in constant time; raise :class:`AuthenticationFailed` if it differs."""
    if not hmac.compare_digest(mac(key, label, *parts), tag):
        raise AuthenticationFailed("MAC mismatch for " + label)
