"""cpns.crypto.keywrap: "encrypt K with X" as AES-256-GCM with one opaque failure (DESIGN §4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tests.helpers import ref_seal_ad, ref_seal_key

from cpns.crypto.keywrap import (
    NONCE_LEN,
    SEAL_OVERHEAD,
    SEAL_VERSION,
    Sealer,
    open_sealed,
    seal,
)
from cpns.errors import AuthenticationFailed, ErrorCode, LocalProtocolError

VECTORS = json.loads(
    (Path(__file__).parents[2] / "vectors" / "crypto_v1.json").read_text(encoding="ascii")
)

SECRET = bytes([0x5E]) * 32
NONCE = bytes(range(12))
CONTEXT = ("cpns-server", "gw-alice", "pne-1", 3)


def sealed(plaintext: bytes = b"k" * 32, **kw: Any) -> bytes:
    """A blob sealed with the module defaults (overridable)."""
    args: dict[str, Any] = {"purpose": "test/p", "context": CONTEXT, "nonce": NONCE}
    args.update(kw)
    return seal(SECRET, plaintext, **args)


def rejected(secret: bytes, blob: bytes, **kw: Any) -> AuthenticationFailed:
    """Open and expect the one opaque failure; return it for comparison."""
    args: dict[str, Any] = {"purpose": "test/p", "context": CONTEXT}
    args.update(kw)
    with pytest.raises(AuthenticationFailed) as info:
        open_sealed(secret, blob, **args)
    return info.value


def assert_opaque(error: AuthenticationFailed) -> None:
    """STYLE §4: every failure is the same error: same class, code and text (no oracle)."""
    assert type(error) is AuthenticationFailed
    assert error.code is ErrorCode.AUTHENTICATION_FAILED
    assert str(error) == "sealed value rejected"


@pytest.mark.parametrize("vector", VECTORS["seal"])
def test_seal_vector(vector: dict[str, Any]) -> None:
    """docs/crypto.md: blob = 0x01 || nonce || AES-256-GCM(HKDF(secret, "cpns/v1/seal-key",
    purpose), plaintext, ad = 0x01 || labelled context); checked against crypto_v1.json and
    the raw AES-GCM primitive."""
    secret, nonce = bytes.fromhex(vector["secret"]), bytes.fromhex(vector["nonce"])
    plaintext = bytes.fromhex(vector["plaintext"])
    context: list[Any] = [
        bytes.fromhex(p["bytes"]) if "bytes" in p else p.get("str", p.get("int"))
        for p in vector["context"]
    ]
    expected = bytes.fromhex(vector["blob"])
    blob = seal(secret, plaintext, purpose=vector["purpose"], context=context, nonce=nonce)
    assert blob == expected
    aead = AESGCM(ref_seal_key(secret, vector["purpose"]))
    body = aead.encrypt(nonce, plaintext, ref_seal_ad(vector["purpose"], *context))
    assert b"\x01" + nonce + body == expected
    assert open_sealed(secret, expected, purpose=vector["purpose"], context=context) == plaintext


@pytest.mark.parametrize("plaintext", [b"", b"x", b"k" * 32, bytes(range(256)) * 4])
def test_round_trip(plaintext: bytes) -> None:
    """keywrap: open_sealed(seal(x)) == x, and the blob is SEAL_OVERHEAD (29) bytes longer."""
    blob = sealed(plaintext)
    assert len(blob) == len(plaintext) + SEAL_OVERHEAD == len(plaintext) + 1 + NONCE_LEN + 16
    assert blob[0] == SEAL_VERSION == 1
    assert blob[1 : 1 + NONCE_LEN] == NONCE
    assert open_sealed(SECRET, blob, purpose="test/p", context=CONTEXT) == plaintext


def test_nonce_changes_the_blob() -> None:
    """keywrap: the nonce is an argument (from the injected RNG); two nonces, two blobs."""
    assert sealed(nonce=bytes(12)) != sealed(nonce=bytes(11) + b"\x01")


@pytest.mark.parametrize("length", [0, 11, 13, 16])
def test_nonce_must_be_12_bytes(length: int) -> None:
    """keywrap: an AES-GCM nonce is 12 bytes; another length is a caller bug."""
    with pytest.raises(LocalProtocolError):
        sealed(nonce=bytes(length))


def test_wrong_key() -> None:
    """DESIGN §4: a blob opened with another secret is the opaque failure."""
    assert_opaque(rejected(bytes([0x5F]) * 32, sealed()))


def test_other_purpose() -> None:
    """keywrap: one secret never keys two purposes; another purpose is the opaque failure."""
    assert_opaque(rejected(SECRET, sealed(), purpose="test/q"))
    assert_opaque(rejected(SECRET, sealed(), purpose="test/"))


@pytest.mark.parametrize(
    "context",
    [
        pytest.param(("cpns-server", "gw-alice", "pne-1", 4), id="other-index"),
        pytest.param(("cpns-server", "gw-bob", "pne-1", 3), id="other-gateway"),
        pytest.param(("cpns-server", "gw-alice", "pne-1"), id="element-missing"),
        pytest.param((*CONTEXT, 0), id="element-added"),
        pytest.param(("cpns-server", "gw-alice", "pne-1", "3"), id="int-as-str"),
        pytest.param(("cpns-servergw-alice", "", "pne-1", 3), id="boundary-moved"),
        pytest.param((), id="empty"),
    ],
)
def test_other_context(context: tuple[Any, ...]) -> None:
    """DESIGN §4: the associated data binds the message context; a sealed value moved into
    another message does not open."""
    assert_opaque(rejected(SECRET, sealed(), context=context))


def test_flipped_byte_at_every_position() -> None:
    """STYLE §8 failure table: altering any single byte of a short blob (version, nonce,
    ciphertext, tag), in its lowest or highest bit, gives the same opaque failure."""
    blob = sealed(b"k")
    for position in range(len(blob)):
        for bit in (0x01, 0x80):
            altered = bytearray(blob)
            altered[position] ^= bit
            assert_opaque(rejected(SECRET, bytes(altered)))


def test_truncated_at_every_length() -> None:
    """keywrap: every proper prefix of a blob (including the empty blob) is refused alike."""
    blob = sealed(b"kk")
    for length in range(len(blob)):
        assert_opaque(rejected(SECRET, blob[:length]))


def test_extended_blob() -> None:
    """keywrap: a byte appended after the tag is refused alike."""
    assert_opaque(rejected(SECRET, sealed() + b"\x00"))


@pytest.mark.parametrize("version", [0, 2, 0xFF])
def test_wrong_version_byte(version: int) -> None:
    """STYLE §8: a wrong key-wrap version is refused, even with an otherwise intact blob."""
    blob = sealed()
    assert_opaque(rejected(SECRET, bytes([version]) + blob[1:]))


def test_version_byte_is_authenticated() -> None:
    """keywrap: the version byte is in the associated data. A blob re-sealed with the same
    key for another version (ad starting 0x02) does not open as version 1."""
    nonce, plaintext = bytes(12), b"k" * 32
    aead = AESGCM(ref_seal_key(SECRET, "test/p"))
    forged_ad = b"\x02" + ref_seal_ad("test/p", *CONTEXT)[1:]
    forged = b"\x01" + nonce + aead.encrypt(nonce, plaintext, forged_ad)
    assert_opaque(rejected(SECRET, forged))


def test_empty_blob() -> None:
    """keywrap: an empty blob is the opaque failure, not an IndexError."""
    assert_opaque(rejected(SECRET, b""))


def test_all_failures_are_indistinguishable() -> None:
    """STYLE §4: wrong key, wrong purpose, wrong context, tampering, truncation, version and
    emptiness all give errors with equal class, code, reason and text."""
    blob = sealed()
    errors = [
        rejected(bytes(32), blob),
        rejected(SECRET, blob, purpose="x/y"),
        rejected(SECRET, blob, context=()),
        rejected(SECRET, blob[:-1] + bytes([blob[-1] ^ 1])),
        rejected(SECRET, blob[:10]),
        rejected(SECRET, b"\x02" + blob[1:]),
        rejected(SECRET, b""),
    ]
    assert {(type(e), e.code, e.reason, str(e), e.__cause__) for e in errors} == {
        (
            AuthenticationFailed,
            ErrorCode.AUTHENTICATION_FAILED,
            "sealed value rejected",
            "sealed value rejected",
            None,
        )
    }
    assert all(e.__suppress_context__ or e.__context__ is None for e in errors)


def test_a_sealer_seals_and_opens_as_the_functions_do() -> None:
    """DESIGN §4 (one seal construction): a Sealer, which derives the AES key of its
    (secret, purpose) once, makes the very blobs seal() makes, opens theirs, and fails
    the same single way on another context, purpose or altered byte; its repr names
    the purpose only."""
    sealer = Sealer(SECRET, "test/p")
    blob = sealer.seal(b"k" * 32, context=CONTEXT, nonce=NONCE)
    assert blob == sealed()
    assert sealer.open(sealed(), context=CONTEXT) == b"k" * 32
    for bad in (
        lambda: sealer.open(blob, context=(*CONTEXT[:3], 4)),
        lambda: Sealer(SECRET, "test/q").open(blob, context=CONTEXT),
        lambda: sealer.open(blob[:-1] + bytes([blob[-1] ^ 1]), context=CONTEXT),
        lambda: sealer.open(blob[: SEAL_OVERHEAD - 1], context=CONTEXT),
    ):
        with pytest.raises(AuthenticationFailed):
            bad()
    with pytest.raises(LocalProtocolError):
        sealer.seal(b"x", context=CONTEXT, nonce=b"short")
    assert repr(sealer) == "<Sealer 'test/p'>"
    assert SECRET.hex() not in repr(sealer)
