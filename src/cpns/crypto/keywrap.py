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

__all__ = ["NONCE_LEN", "SEAL_OVERHEAD", "SEAL_VERSION", "SealingKey", "open_sealed", "seal"]

SEAL_VERSION = 1
NONCE_LEN = 12
_TAG_LEN = 16
#: Bytes a sealed blob adds to its plaintext.
SEAL_OVERHEAD = 1 + NONCE_LEN + _TAG_LEN


def _aead(secret: bytes, purpose: str) -> AESGCM:
    return AESGCM(derive_key(secret, salt=b"", label="cpns/v1/seal-key", context=(purpose,)))


def _ad(version: int, purpose: str, context: Iterable[Part]) -> bytes:
    return bytes([version]) + encode_parts("cpns/v1/seal/" + purpose, context)


class SealingKey:
    """The sealing key of one (secret, purpose) pair, derived once.

    :func:`seal` and :func:`open_sealed` derive it on every call (an HKDF and an AES key
    schedule), which is right for a protocol key used once or twice. A long-lived secret
    that seals many values for a few fixed purposes (the store's master key: one purpose
    per secret column) keeps one of these per purpose instead; the blobs are the same.
    Holds key material: never shown in its repr.
    """

    __slots__ = ("_aead", "purpose")

    def __init__(self, secret: bytes, purpose: str) -> None:
        self._aead = _aead(secret, purpose)
        self.purpose = purpose

    def __repr__(self) -> str:
        return f"SealingKey(purpose={self.purpose!r})"

    def seal(self, plaintext: bytes, *, context: Iterable[Part], nonce: bytes) -> bytes:
        """:func:`seal` under this key."""
        if len(nonce) != NONCE_LEN:
            raise LocalProtocolError("AES-GCM nonce is 12 bytes")
        ad = _ad(SEAL_VERSION, self.purpose, context)
        return bytes([SEAL_VERSION]) + nonce + self._aead.encrypt(nonce, plaintext, ad)

    def open(self, blob: bytes, *, context: Iterable[Part]) -> bytes:
        """:func:`open_sealed` under this key."""
        if len(blob) < SEAL_OVERHEAD or blob[0] != SEAL_VERSION:
            raise AuthenticationFailed("sealed value rejected")
        nonce, body = blob[1 : 1 + NONCE_LEN], blob[1 + NONCE_LEN :]
        try:
            return self._aead.decrypt(nonce, body, _ad(blob[0], self.purpose, context))
        except InvalidTag:
            raise AuthenticationFailed("sealed value rejected") from None


def seal(
    secret: bytes, plaintext: bytes, *, purpose: str, context: Iterable[Part], nonce: bytes
) -> bytes:
    """Seal ``plaintext`` under ``secret`` for ``purpose``, bound to ``context``.

    ``nonce`` is 12 random bytes from the injected RNG; it must never repeat under one
    (secret, purpose) pair.
    """
    if len(nonce) != NONCE_LEN:
        raise LocalProtocolError("AES-GCM nonce is 12 bytes")
    return SealingKey(secret, purpose).seal(plaintext, context=context, nonce=nonce)


def open_sealed(secret: bytes, blob: bytes, *, purpose: str, context: Iterable[Part]) -> bytes:
    """Open a blob made by :func:`seal`; one opaque :class:`AuthenticationFailed` otherwise."""
    if len(blob) < SEAL_OVERHEAD or blob[0] != SEAL_VERSION:
        raise AuthenticationFailed("sealed value rejected")
    return SealingKey(secret, purpose).open(blob, context=context)
