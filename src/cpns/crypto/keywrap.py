"""Sealed key delivery: "encrypt K with X" of the seeds (DESIGN §4, third bullet).

``seal`` is AES-256-GCM under a key derived from the wrapping secret with HKDF and a
purpose label, so one secret never keys two purposes. The associated data binds the
message context (sender, receiver, message type, transaction ID, ...), so a sealed value
cannot be replayed into another message.

Blob layout: ``version (1 byte, 0x01) || nonce (12 bytes) || ciphertext || tag (16)``.
The version byte is also authenticated. Every failure of :func:`open_sealed` (short blob,
unknown version, wrong key, altered byte, other context) is the same
:class:`AuthenticationFailed`, so there is no oracle.
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cpns.crypto.hashing import Part, encode_parts
from cpns.crypto.kdf import derive_key
from cpns.errors import AuthenticationFailed, LocalProtocolError

__all__ = ["NONCE_LEN", "SEAL_OVERHEAD", "SEAL_VERSION", "Sealer", "open_sealed", "seal"]

SEAL_VERSION = 1
NONCE_LEN = 12
_TAG_LEN = 16
#: Bytes a sealed blob adds to its plaintext.
SEAL_OVERHEAD = 1 + NONCE_LEN + _TAG_LEN


def _aead(secret: bytes, purpose: str) -> AESGCM:
    return AESGCM(derive_key(secret, salt=b"", label="cpns/v1/seal-key", context=(purpose,)))


def _ad(version: int, purpose: str, context: Iterable[Part]) -> bytes:
    return bytes([version]) + encode_parts("cpns/v1/seal/" + purpose, context)


class Sealer:
    """:func:`seal` and :func:`open_sealed` for one (secret, purpose) pair, with the AES key
    derived once: for a party that seals many values under one long-lived secret (a key
    store). Same blobs, same single failure as the functions."""

    __slots__ = ("_aead", "_purpose")

    def __init__(self, secret: bytes, purpose: str) -> None:
        self._aead = _aead(secret, purpose)
        self._purpose = purpose

    def __repr__(self) -> str:
        return f"<Sealer {self._purpose!r}>"

    def seal(self, plaintext: bytes, *, context: Iterable[Part], nonce: bytes) -> bytes:
        """As :func:`seal` under this sealer's secret and purpose."""
        if len(nonce) != NONCE_LEN:
            raise LocalProtocolError("AES-GCM nonce is 12 bytes")
        body = self._aead.encrypt(nonce, plaintext, _ad(SEAL_VERSION, self._purpose, context))
        return bytes([SEAL_VERSION]) + nonce + body

    def open(self, blob: bytes, *, context: Iterable[Part]) -> bytes:
        """As :func:`open_sealed` under this sealer's secret and purpose."""
        if len(blob) < SEAL_OVERHEAD or blob[0] != SEAL_VERSION:
            raise AuthenticationFailed("sealed value rejected")
        nonce, body = blob[1 : 1 + NONCE_LEN], blob[1 + NONCE_LEN :]
        try:
            return self._aead.decrypt(nonce, body, _ad(blob[0], self._purpose, context))
        except InvalidTag:
            raise AuthenticationFailed("sealed value rejected") from None


def seal(
    secret: bytes, plaintext: bytes, *, purpose: str, context: Iterable[Part], nonce: bytes
) -> bytes:
    """Seal ``plaintext`` under ``secret`` for ``purpose``, bound to ``context``.

    ``nonce`` is 12 random bytes from the injected RNG; it must never repeat under one
    (secret, purpose) pair.
    """
    return Sealer(secret, purpose).seal(plaintext, context=context, nonce=nonce)


def open_sealed(secret: bytes, blob: bytes, *, purpose: str, context: Iterable[Part]) -> bytes:
    """Open a blob made by :func:`seal`; one opaque :class:`AuthenticationFailed` otherwise."""
    return Sealer(secret, purpose).open(blob, context=context)
