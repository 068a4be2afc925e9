"""The master key of Secure Storage (002 §3.2, DESIGN §6): where it comes from, who may read it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cpns.errors import ConfigurationError
from cpns.store import MasterKey

RAW = bytes(range(32))


def private_file(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_generate_writes_a_private_file_that_loads_back(tmp_path: Path) -> None:
    """generate() creates a 0600 hex key file; load() returns the same key."""
    path = tmp_path / "master.key"
    key = MasterKey.generate(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key.key.hex() + "\n"
    assert MasterKey.load(path) == key
    assert len(key.key) == 32
    assert [p.name for p in tmp_path.iterdir()] == ["master.key"]  # no temp file left


def test_generate_never_overwrites(tmp_path: Path) -> None:
    """A master key is never replaced: generate() on an existing path fails, file intact."""
    path = tmp_path / "master.key"
    first = MasterKey.generate(path)
    with pytest.raises(ConfigurationError, match="already exists"):
        MasterKey.generate(path)
    assert MasterKey.load(path) == first
    assert [p.name for p in tmp_path.iterdir()] == ["master.key"]


def test_generated_keys_differ(tmp_path: Path) -> None:
    """Each generated key comes from the OS CSPRNG."""
    assert MasterKey.generate(tmp_path / "a") != MasterKey.generate(tmp_path / "b")


def test_load_accepts_raw_and_hex(tmp_path: Path) -> None:
    """A key file holds 32 raw bytes or 64 hex digits (whitespace around is fine)."""
    assert MasterKey.load(private_file(tmp_path / "raw", RAW)).key == RAW
    hex_file = private_file(tmp_path / "hex", b"  " + RAW.hex().upper().encode() + b"\n")
    assert MasterKey.load(hex_file).key == RAW


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o601, 0o660])
def test_load_refuses_a_key_file_others_can_access(tmp_path: Path, mode: int) -> None:
    """A key file with any group/other permission bit (mode & 0o077) is refused."""
    path = private_file(tmp_path / "master.key", RAW.hex().encode(), mode)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        MasterKey.load(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"abcd", b"00" * 31, b"00" * 33, b"zz" * 32, RAW[:31], RAW + b"\x00\x01"],
)
def test_load_refuses_a_malformed_key(tmp_path: Path, content: bytes) -> None:
    """Anything but a 32-byte key is a ConfigurationError."""
    with pytest.raises(ConfigurationError):
        MasterKey.load(private_file(tmp_path / "master.key", content))


def test_load_refuses_missing_file_directory_and_symlink(tmp_path: Path) -> None:
    """Missing file, a directory, or a symlink (which could be swapped) are refused."""
    with pytest.raises(ConfigurationError, match="does not exist"):
        MasterKey.load(tmp_path / "nope")
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigurationError):
        MasterKey.load(directory)
    target = private_file(tmp_path / "real.key", RAW)
    link = tmp_path / "link.key"
    link.symlink_to(target)
    with pytest.raises(ConfigurationError):
        MasterKey.load(link)


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_env() reads 64 hex digits from CPNS_MASTER_KEY (or the variable named)."""
    monkeypatch.setenv("CPNS_MASTER_KEY", RAW.hex())
    assert MasterKey.from_env().key == RAW
    assert MasterKey.from_env("OTHER", environ={"OTHER": RAW.hex() + "\n"}).key == RAW


@pytest.mark.parametrize(
    "env", [{}, {"CPNS_MASTER_KEY": ""}, {"CPNS_MASTER_KEY": "xyz"}, {"CPNS_MASTER_KEY": "00" * 16}]
)
def test_from_env_refuses_missing_or_bad_values(env: dict[str, str]) -> None:
    """An unset, empty, non-hex or short variable is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="CPNS_MASTER_KEY"):
        MasterKey.from_env(environ=env)


def test_repr_hides_the_key() -> None:
    """Logs carry key IDs, never keys (DESIGN §5): repr/str show only the 8-hex key id."""
    key = MasterKey(RAW)
    for text in (repr(key), str(key), f"{key}", f"{key!r}"):
        assert RAW.hex() not in text
        assert RAW.hex()[:8] not in text
        assert key.key_id in text
    assert len(key.key_id) == 8
    int(key.key_id, 16)
    assert MasterKey(bytes(32)).key_id != key.key_id


def test_constructor_checks_length() -> None:
    """The raw constructor accepts exactly 32 bytes."""
    with pytest.raises(ConfigurationError):
        MasterKey(b"short")


def test_generate_respects_no_umask_leak(tmp_path: Path) -> None:
    """Even with a permissive umask the key file is created 0600."""
    old = os.umask(0)
    try:
        MasterKey.generate(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
