"""cpns.crypto.hashing: the labelled, length-prefixed encoding, SHA-256 and HMAC (DESIGN §4)."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import ref_encode, ref_parts

from cpns.crypto.hashing import KEY_LEN, encode_parts, hash_values, mac, verify_mac
from cpns.errors import AuthenticationFailed, ErrorCode, LocalProtocolError

VECTORS = json.loads(
    (Path(__file__).parents[2] / "vectors" / "crypto_v1.json").read_text(encoding="ascii")
)


def parts_of(items: list[dict[str, Any]]) -> list[bytes | str | int]:
    """Turn the JSON parts back into values."""
    out: list[bytes | str | int] = []
    for item in items:
        if "bytes" in item:
            out.append(bytes.fromhex(item["bytes"]))
        elif "str" in item:
            out.append(item["str"])
        else:
            out.append(item["int"])
    return out


@pytest.mark.parametrize("vector", VECTORS["encode_parts"])
def test_encode_parts_vector(vector: dict[str, Any]) -> None:
    """docs/crypto.md: each value is a 4-byte big-endian length then the value; str is UTF-8,
    int an unsigned 8-byte big-endian integer; the label comes first (crypto_v1.json)."""
    parts = parts_of(vector["parts"])
    expected = bytes.fromhex(vector["encoding"])
    assert encode_parts(vector["label"], parts) == expected
    assert ref_parts(vector["label"], *parts) == expected


def test_encoding_written_out_by_hand() -> None:
    """docs/crypto.md: the encoding of ("cpns/v1/x", b"ab", "c", 1) byte by byte."""
    assert encode_parts("cpns/v1/x", [b"ab", "c", 1]) == (
        b"\x00\x00\x00\x09cpns/v1/x"
        b"\x00\x00\x00\x02ab"
        b"\x00\x00\x00\x01c"
        b"\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00\x00\x01"
    )


@pytest.mark.parametrize("vector", VECTORS["hash"])
def test_hash_vector(vector: dict[str, Any]) -> None:
    """DESIGN §4: Hash(a, b) is SHA-256 over the labelled encoding (crypto_v1.json)."""
    parts = parts_of(vector["parts"])
    expected = bytes.fromhex(vector["digest"])
    assert hash_values(vector["label"], *parts) == expected
    assert hashlib.sha256(ref_parts(vector["label"], *parts)).digest() == expected


@pytest.mark.parametrize("vector", VECTORS["mac"])
def test_mac_vector(vector: dict[str, Any]) -> None:
    """DESIGN §4: a hash over a secret is HMAC-SHA256 keyed by it, labelled (crypto_v1.json)."""
    key = bytes.fromhex(vector["key"])
    parts = parts_of(vector["parts"])
    expected = bytes.fromhex(vector["tag"])
    assert mac(key, vector["label"], *parts) == expected
    assert hmac.new(key, ref_parts(vector["label"], *parts), hashlib.sha256).digest() == expected
    verify_mac(key, expected, vector["label"], *parts)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((b"ab", b"c"), (b"a", b"bc")),
        ((b"abc",), (b"ab", b"c")),
        ((b"",), ()),
        ((b"", b""), (b"",)),
        (("ab", "c"), ("a", "bc")),
        ((1,), (1, b"")),
    ],
)
def test_no_two_splits_encode_alike(first: tuple[Any, ...], second: tuple[Any, ...]) -> None:
    """DESIGN §4: the encoding is unambiguous, unlike the seeds' a | b concatenation: moving
    a boundary or adding an empty value changes the hash."""
    assert hash_values("cpns/v1/t", *first) != hash_values("cpns/v1/t", *second)


@pytest.mark.parametrize(
    ("first", "second"),
    [(("1",), (b"1",)), ((1,), (b"\x00" * 7 + b"\x01",)), (("",), (b"",))],
)
def test_values_carry_no_type_tag(first: tuple[Any, ...], second: tuple[Any, ...]) -> None:
    """docs/crypto.md: only the length prefixes the value, not its type: a str equals its
    UTF-8 bytes and an int its 8 big-endian bytes. Each procedure fixes the type of each
    position, so this is by design; the test pins it so a change is deliberate."""
    assert hash_values("cpns/v1/t", *first) == hash_values("cpns/v1/t", *second)


def test_label_separates_domains() -> None:
    """DESIGN §4: every hash starts with a label naming its use; two labels never collide."""
    assert hash_values("cpns/v1/a", b"x") != hash_values("cpns/v1/b", b"x")
    assert mac(b"k" * 32, "cpns/v1/a", b"x") != mac(b"k" * 32, "cpns/v1/b", b"x")


def test_outputs_are_key_len() -> None:
    """hashing: SHA-256 and HMAC-SHA256 outputs are KEY_LEN (32) bytes."""
    assert KEY_LEN == 32
    assert len(hash_values("cpns/v1/t")) == KEY_LEN
    assert len(mac(bytes(16), "cpns/v1/t")) == KEY_LEN


def test_verify_mac_accepts_the_right_tag() -> None:
    """STYLE §4: verify_mac returns None on success (it raises, never returns a bool)."""
    tag = mac(b"k" * 32, "cpns/v1/t", b"m", 5)
    assert verify_mac(b"k" * 32, tag, "cpns/v1/t", b"m", 5) is None


@pytest.mark.parametrize(
    "change",
    ["flipped-first", "flipped-last", "truncated", "extended", "empty", "other-key", "other-part"],
)
def test_verify_mac_raises_on_mismatch(change: str) -> None:
    """STYLE §4: a MAC that differs in any way raises AuthenticationFailed with the one code."""
    key, tag = b"k" * 32, mac(b"k" * 32, "cpns/v1/t", b"m")
    args: tuple[Any, ...] = (key, tag, "cpns/v1/t", b"m")
    match change:
        case "flipped-first":
            args = (key, bytes([tag[0] ^ 1]) + tag[1:], "cpns/v1/t", b"m")
        case "flipped-last":
            args = (key, tag[:-1] + bytes([tag[-1] ^ 0x80]), "cpns/v1/t", b"m")
        case "truncated":
            args = (key, tag[:-1], "cpns/v1/t", b"m")
        case "extended":
            args = (key, tag + b"\x00", "cpns/v1/t", b"m")
        case "empty":
            args = (key, b"", "cpns/v1/t", b"m")
        case "other-key":
            args = (b"K" * 32, tag, "cpns/v1/t", b"m")
        case "other-part":
            args = (key, tag, "cpns/v1/t", b"n")
    with pytest.raises(AuthenticationFailed) as info:
        verify_mac(*args)
    assert info.value.code is ErrorCode.AUTHENTICATION_FAILED


@pytest.mark.parametrize("label", ["", "v1/x", "CPNS/v1/x", "cpns", " cpns/v1/x"])
def test_labels_must_start_with_cpns(label: str) -> None:
    """STYLE §4 / DESIGN §4: every label starts with 'cpns/' (and carries a version)."""
    with pytest.raises(LocalProtocolError):
        hash_values(label, b"x")
    with pytest.raises(LocalProtocolError):
        mac(b"k" * 32, label, b"x")


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_refused(value: bool) -> None:
    """hashing: a bool is an int to Python; it is refused rather than encoded as 0 or 1."""
    with pytest.raises(LocalProtocolError):
        hash_values("cpns/v1/t", value)
    with pytest.raises(LocalProtocolError):
        encode_parts("cpns/v1/t", [1, value])


@pytest.mark.parametrize("value", [-1, 2**64, -(2**63)])
def test_integers_outside_uint64_are_refused(value: int) -> None:
    """docs/crypto.md: an int is an unsigned 8-byte integer; others are refused."""
    with pytest.raises(LocalProtocolError):
        hash_values("cpns/v1/t", value)


@pytest.mark.parametrize("value", [0, 2**64 - 1])
def test_integer_bounds_are_accepted(value: int) -> None:
    """docs/crypto.md: 0 and 2**64 - 1 are the unsigned 64-bit bounds, both encodable."""
    assert hash_values("cpns/v1/t", value) == hashlib.sha256(ref_parts("cpns/v1/t", value)).digest()
    assert ref_encode(value)[:4] == b"\x00\x00\x00\x08"


@pytest.mark.parametrize("value", [1.0, None, bytearray(b"x"), ["x"]])
def test_other_types_are_refused(value: Any) -> None:
    """hashing: only bytes, str and int are hashable CPNS values."""
    with pytest.raises(LocalProtocolError):
        hash_values("cpns/v1/t", value)


@pytest.mark.parametrize("length", [0, 1, 15])
def test_short_mac_keys_are_refused(length: int) -> None:
    """hashing: MAC keys are at least 16 bytes (a short key is a caller bug)."""
    with pytest.raises(LocalProtocolError):
        mac(bytes(length), "cpns/v1/t")
    assert len(mac(bytes(16), "cpns/v1/t")) == 32


def test_vectors_file_is_what_the_generator_writes() -> None:
    """tests/vectors/README.md: crypto_v1.json is exactly make_vectors.py's output, so the
    file and the script that documents its provenance cannot drift apart."""
    from tests.vectors import make_vectors

    assert make_vectors.OUT.read_text(encoding="ascii") == make_vectors.render()
