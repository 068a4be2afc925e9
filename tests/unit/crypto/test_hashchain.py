"""cpns.crypto.hashchain: the EUKey chain of 003 §7.4.2.1.1.2 step 4 (DESIGN §4)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import ref_parts

from cpns.crypto.hashchain import (
    CHAIN_LABEL,
    MAX_CHAIN_LEN,
    build_chain,
    chain_step,
    verify_chain_step,
)
from cpns.errors import AuthenticationFailed, ErrorCode, LocalProtocolError

VECTORS = json.loads(
    (Path(__file__).parents[2] / "vectors" / "crypto_v1.json").read_text(encoding="ascii")
)
SEED = bytes(range(32))


def ref_h(value: bytes) -> bytes:
    """H of the chain, written out: SHA-256 over the labelled encoding."""
    return hashlib.sha256(ref_parts("cpns/v1/eukey-chain", value)).digest()


@pytest.mark.parametrize("vector", VECTORS["chain"])
def test_chain_vector(vector: dict[str, Any]) -> None:
    """003 §7.4.2.1.1.2 step 4: EUKey_n = Hash(SeedPNE), EUKey_{i-1} = Hash(EUKey_i), checked
    against crypto_v1.json and an independent hashlib computation."""
    assert vector["label"] == CHAIN_LABEL
    seed, n = bytes.fromhex(vector["seed"]), vector["n"]
    expected = [bytes.fromhex(k) for k in vector["eukeys"]]
    assert build_chain(seed, n) == expected
    independent = [ref_h(seed)]  # EUKey_n
    for _ in range(n - 1):
        independent.append(ref_h(independent[-1]))
    assert list(reversed(independent)) == expected


def test_build_chain_order() -> None:
    """DESIGN §4: list index 0 holds EUKey_1; H(EUKey_{i+1}) == EUKey_i for every i, and
    EUKey_n == H(SeedPNE)."""
    keys = build_chain(SEED, 8)
    assert len(keys) == 8
    assert keys[-1] == chain_step(SEED) == ref_h(SEED)
    for i in range(7):
        assert chain_step(keys[i + 1]) == keys[i]
    assert len(set(keys)) == 8
    assert all(len(k) == 32 for k in keys)


def test_longer_chain_adds_keys_in_front() -> None:
    """hashchain: EUKey_n is always H(SeedPNE), so a chain one longer has one more hash in
    front: build_chain(seed, n + 1)[1:] == build_chain(seed, n)."""
    assert build_chain(SEED, 1) == [chain_step(SEED)]
    assert build_chain(SEED, 5)[1:] == build_chain(SEED, 4)
    assert build_chain(SEED, 5)[0] == chain_step(build_chain(SEED, 4)[0])


@pytest.mark.parametrize("n", [0, -1, MAX_CHAIN_LEN + 1])
def test_chain_length_bounds(n: int) -> None:
    """hashchain: n is 1..MAX_CHAIN_LEN (1024), so a request cannot make the server hash
    without end."""
    with pytest.raises(LocalProtocolError):
        build_chain(SEED, n)


def test_chain_length_edges_accepted() -> None:
    """hashchain: n = 1 and n = MAX_CHAIN_LEN are both legal."""
    assert len(build_chain(SEED, 1)) == 1
    assert len(build_chain(SEED, MAX_CHAIN_LEN)) == MAX_CHAIN_LEN


@pytest.mark.parametrize("length", [0, 31, 33])
def test_seed_must_be_32_bytes(length: int) -> None:
    """hashchain: SeedPNE is a 32-byte hash output."""
    with pytest.raises(LocalProtocolError):
        build_chain(bytes(length), 4)


def test_verify_next_key() -> None:
    """DESIGN §4: a receiver holding EUKey_i checks EUKey_{i+1} with one hash."""
    keys = build_chain(SEED, 6)
    for i in range(5):
        assert verify_chain_step(keys[i], keys[i + 1]) == 1


def test_verify_window() -> None:
    """DESIGN §5 bounded look-ahead: a key up to max_steps ahead is accepted, and the
    distance is returned; one step beyond the window is refused."""
    keys = build_chain(SEED, 6)
    assert verify_chain_step(keys[0], keys[3], max_steps=3) == 3
    assert verify_chain_step(keys[0], keys[2], max_steps=3) == 2
    assert verify_chain_step(keys[0], keys[5], max_steps=5) == 5
    with pytest.raises(AuthenticationFailed):
        verify_chain_step(keys[0], keys[4], max_steps=3)


@pytest.mark.parametrize(
    ("previous", "candidate"),
    [
        pytest.param(1, 1, id="same-key-replayed"),
        pytest.param(2, 1, id="older-key"),
        pytest.param(0, 2, id="two-ahead-window-one"),
        pytest.param(1, None, id="unrelated-value"),
    ],
)
def test_verify_failures(previous: int, candidate: int | None) -> None:
    """DESIGN §4: a replayed, older, too-distant or unrelated value raises the one opaque
    AuthenticationFailed (code AUTHENTICATION_FAILED)."""
    keys = build_chain(SEED, 4)
    value = bytes(32) if candidate is None else keys[candidate]
    with pytest.raises(AuthenticationFailed) as info:
        verify_chain_step(keys[previous], value)
    assert info.value.code is ErrorCode.AUTHENTICATION_FAILED


def test_verify_zero_window_refuses_everything() -> None:
    """hashchain: max_steps=0 checks nothing and so accepts nothing."""
    keys = build_chain(SEED, 2)
    with pytest.raises(AuthenticationFailed):
        verify_chain_step(keys[0], keys[1], max_steps=0)
