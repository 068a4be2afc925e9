"""cpns.crypto.kdf: HKDF-SHA256 (RFC 5869) and the scrypt password key (RFC 7914).

``derive_key`` builds HKDF's ``info`` from a label and cannot take raw ``info``, so the RFC
5869 vectors are checked on the construction it wraps (cryptography's HKDF) and on the
hand-written reference HKDF of tests.helpers; that reference then checks ``derive_key``
on the self-made vectors of crypto_v1.json. The same chain for scrypt: RFC 7914 §12 on
``hashlib.scrypt``, which then checks ``password_key``.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from tests.helpers import ref_hkdf, ref_parts

from cpns.crypto.hashing import hash_values
from cpns.crypto.kdf import (
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    derive_key,
    password_key,
    password_salt,
)
from cpns.errors import LocalProtocolError

VECTORS = json.loads(
    (Path(__file__).parents[2] / "vectors" / "crypto_v1.json").read_text(encoding="ascii")
)

# RFC 5869 Appendix A, test cases 1-3 (SHA-256): ikm, salt, info, L, PRK, OKM.
RFC5869 = [
    pytest.param(
        "0b" * 22,
        "000102030405060708090a0b0c",
        "f0f1f2f3f4f5f6f7f8f9",
        42,
        "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        id="A.1",
    ),
    pytest.param(
        bytes(range(0x00, 0x50)).hex(),
        bytes(range(0x60, 0xB0)).hex(),
        bytes(range(0xB0, 0x100)).hex(),
        82,
        "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87",
        id="A.2",
    ),
    pytest.param(
        "0b" * 22,
        "",
        "",
        42,
        "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        id="A.3",
    ),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "prk", "okm"), RFC5869)
def test_rfc5869_on_cryptography_hkdf(
    ikm: str, salt: str, info: str, length: int, prk: str, okm: str
) -> None:
    """RFC 5869 Appendix A: the HKDF-SHA256 that derive_key wraps gives the RFC's OKM."""
    kdf = HKDF(
        algorithm=hashes.SHA256(),
        length=length,
        salt=bytes.fromhex(salt),
        info=bytes.fromhex(info),
    )
    assert kdf.derive(bytes.fromhex(ikm)).hex() == okm


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "prk", "okm"), RFC5869)
def test_rfc5869_on_reference_hkdf(
    ikm: str, salt: str, info: str, length: int, prk: str, okm: str
) -> None:
    """RFC 5869 Appendix A: the hand-written reference HKDF (PRK and OKM) is right, so it
    can stand as the independent check of derive_key below."""
    out = ref_hkdf(
        bytes.fromhex(ikm), salt=bytes.fromhex(salt), info=bytes.fromhex(info), length=length
    )
    assert out.hex() == okm
    assert ref_hkdf(bytes.fromhex(prk), salt=b"", info=b"", length=0) == b""


def test_derive_key_with_raw_equivalent_info() -> None:
    """DESIGN §4: derive_key is HKDF-SHA256 whose info is the labelled encoding of the
    context, and nothing else (salt passed through unchanged)."""
    secret, salt = b"\x0b" * 22, bytes(range(13))
    info = ref_parts("cpns/v1/x", "a", 7)
    expected = HKDF(algorithm=hashes.SHA256(), length=42, salt=salt, info=info).derive(secret)
    assert derive_key(secret, salt=salt, label="cpns/v1/x", context=("a", 7), length=42) == expected


@pytest.mark.parametrize("vector", VECTORS["derive_key"])
def test_derive_key_vector(vector: dict[str, Any]) -> None:
    """DESIGN §4 KEY_DERIVATION: derive_key against crypto_v1.json and the reference HKDF."""
    context: list[Any] = [
        bytes.fromhex(p["bytes"]) if "bytes" in p else p.get("str", p.get("int"))
        for p in vector["context"]
    ]
    secret, salt = bytes.fromhex(vector["secret"]), bytes.fromhex(vector["salt"])
    expected = bytes.fromhex(vector["okm"])
    got = derive_key(
        secret, salt=salt, label=vector["label"], context=context, length=vector["length"]
    )
    assert got == expected
    info = ref_parts(vector["label"], *context)
    assert ref_hkdf(secret, salt=salt, info=info, length=vector["length"]) == expected


def test_derive_key_differs_per_salt_label_and_context() -> None:
    """DESIGN §4: both parties' nonces are the salt, so a key differs per run; the label
    and the context separate purposes."""
    base = derive_key(b"s" * 32, salt=b"n1", label="cpns/v1/a", context=("x",))
    assert base != derive_key(b"s" * 32, salt=b"n2", label="cpns/v1/a", context=("x",))
    assert base != derive_key(b"s" * 32, salt=b"n1", label="cpns/v1/b", context=("x",))
    assert base != derive_key(b"s" * 32, salt=b"n1", label="cpns/v1/a", context=("y",))
    assert len(base) == 32


def test_derive_key_refuses_empty_secret_and_bad_label() -> None:
    """kdf: empty input keying material and a label without 'cpns/' are caller bugs."""
    with pytest.raises(LocalProtocolError):
        derive_key(b"", salt=b"", label="cpns/v1/a")
    with pytest.raises(LocalProtocolError):
        derive_key(b"s", salt=b"", label="v1/a")


def test_rfc7914_scrypt_vector_on_hashlib_and_cryptography() -> None:
    """RFC 7914 §12 ("password", "NaCl", N=1024, r=8, p=16, 64 bytes): hashlib.scrypt and
    the Scrypt that password_key wraps agree with the RFC."""
    expected = (
        "fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162"
        "2eaf30d92e22a3886ff109279d9830dac727afb94a83ee6d8360cbdfa2cc0640"
    )
    assert hashlib.scrypt(b"password", salt=b"NaCl", n=1024, r=8, p=16, dklen=64).hex() == expected
    assert Scrypt(salt=b"NaCl", length=64, n=1024, r=8, p=16).derive(b"password").hex() == expected


def test_scrypt_parameters_are_the_documented_ones() -> None:
    """docs/crypto.md: the password key is scrypt with N=2^14, r=8, p=1, 32 bytes."""
    assert (SCRYPT_N, SCRYPT_R, SCRYPT_P) == (2**14, 8, 1)


def test_password_salt_is_bound_to_realm_and_user() -> None:
    """docs/crypto.md: salt = Hash("cpns/v1/password-salt", realm, User ID)."""
    expected = hashlib.sha256(ref_parts("cpns/v1/password-salt", "cpns", "alice")).digest()
    assert password_salt("cpns", "alice") == expected
    assert password_salt("cpns", "alice") == hash_values("cpns/v1/password-salt", "cpns", "alice")
    assert password_salt("cpns", "bob") != expected
    assert password_salt("other", "alice") != expected


@pytest.mark.parametrize("vector", VECTORS["password_key"])
def test_password_key_vector(vector: dict[str, Any]) -> None:
    """003 §7.4.2.1.1.1 step 3 Hash(Password) = scrypt(NFKC(password), salt(realm, user))
    (D-003-1), against crypto_v1.json and an independent hashlib.scrypt."""
    params = vector["scrypt"]
    assert (params["n"], params["r"], params["p"], params["dklen"]) == (2**14, 8, 1, 32)
    salt = hashlib.sha256(
        ref_parts("cpns/v1/password-salt", vector["realm"], vector["user_id"])
    ).digest()
    assert salt.hex() == vector["salt"]
    independent = hashlib.scrypt(
        unicodedata.normalize("NFKC", vector["password"]).encode("utf-8"),
        salt=salt,
        n=params["n"],
        r=params["r"],
        p=params["p"],
        dklen=params["dklen"],
    )
    assert independent.hex() == vector["key"]
    got = password_key(vector["password"], realm=vector["realm"], user_id=vector["user_id"])
    assert got.hex() == vector["key"]


def test_password_key_normalises_nfkc() -> None:
    """kdf: the password is NFKC-normalised, so the same password typed in full-width
    forms gives the same key (the two vectors of crypto_v1.json)."""
    first, second = VECTORS["password_key"]
    assert first["password"] != second["password"]
    assert first["key"] == second["key"]


def test_password_key_refuses_empty_password() -> None:
    """kdf: an empty password is refused rather than hashed."""
    with pytest.raises(LocalProtocolError):
        password_key("", realm="cpns", user_id="alice")
