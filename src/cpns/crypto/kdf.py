"""Key derivation: HKDF-SHA256 (RFC 5869) and the password key (scrypt, RFC 7914).

KEY_DERIVATION of the seeds is :func:`derive_key`: HKDF-SHA256 with both parties' nonces
as salt and a labelled, versioned info string (DESIGN §4), so a key differs per run.

``Hash(Password)`` of 003 §7.4.2.1.1.1 step 3 is :func:`password_key`: scrypt over the
password with a salt bound to the realm and the User ID. The seed's plain hash would let
anyone holding the server's database run a fast dictionary attack; see docs/deviations.md.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from cpns.crypto.hashing import KEY_LEN, Part, encode_parts, hash_values
from cpns.errors import LocalProtocolError

__all__ = ["SCRYPT_N", "SCRYPT_P", "SCRYPT_R", "derive_key", "password_key"]

#: scrypt cost parameters for :func:`password_key` (16 MiB, about 50 ms on one core).
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1


def derive_key(
    secret: bytes,
    *,
    salt: bytes,
    label: str,
    context: Iterable[Part] = (),
    length: int = KEY_LEN,
) -> bytes:
    """HKDF-SHA256 of ``secret``; ``info`` is the labelled encoding of ``context``."""
    if not secret:
        raise LocalProtocolError("HKDF input keying material must not be empty")
    info = encode_parts(label, context)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def password_salt(realm: str, user_id: str) -> bytes:
    """The scrypt salt of a CPNS User: bound to the realm and the User ID."""
    return hash_values("cpns/v1/password-salt", realm, user_id)


def password_key(password: str, *, realm: str, user_id: str) -> bytes:
    """Hash(Password) of 003: scrypt(NFKC(password), salt(realm, user_id)); 32 bytes.

    The server stores this value sealed (Secure Storage), never the password. The
    client side (the UI that asks the user) computes it and the PN GW daemon only ever
    sees the derived key.
    """
    if not password:
        raise LocalProtocolError("empty password")
    normalised = unicodedata.normalize("NFKC", password).encode("utf-8")
    kdf = Scrypt(
        salt=password_salt(realm, user_id), length=KEY_LEN, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P
    )
    return kdf.derive(normalised)
