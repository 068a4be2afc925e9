"""``cpns device init``: the factory TK comes from a file or standard input, never from
the command line (issue 5 item 13), and is checked before anything is stored."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpns.cli.device_cmd import parse_tk
from cpns.cli.main import EXIT_OK, EXIT_USAGE, main
from cpns.store.keystore import LocalKeyStore

TK = bytes(range(32))


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """Keep main()'s stderr handler out of capsys's streams."""
    logger = logging.getLogger("cpns")
    saved = logger.handlers[:]
    logger.handlers[:] = [logging.NullHandler()]
    yield
    logger.handlers[:] = saved


def _init(capsys: pytest.CaptureFixture[str], data: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["device", "init", "--data-dir", str(data), "--entity-id", "pne-1", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _stored_tk(data: Path) -> bytes:
    tk = LocalKeyStore.open_or_create(data, "device").load()["tk"]
    assert isinstance(tk, bytes)
    return tk


def _tk_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "tk.hex"
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


def test_tk_from_an_owner_only_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Issue 5 item 13: ``--tk-file`` reads the TK as hex digits from a 0600 (or 0400) file;
    a trailing newline and surrounding spaces are fine."""
    for mode in (0o600, 0o400):
        data = tmp_path / f"pne-{mode:o}"
        path = _tk_file(tmp_path, b"  " + TK.hex().upper().encode() + b"\n", mode)
        assert _init(capsys, data, "--tk-file", str(path))[0] == EXIT_OK
        assert _stored_tk(data) == TK
        os.chmod(path, 0o600)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_tk_file_open_to_others_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mode: int
) -> None:
    """Issue 5 item 13: a TK file the group or others may read or write is refused (exit
    2, with the chmod to run), and no device store is created."""
    path = _tk_file(tmp_path, TK.hex().encode(), mode)
    code, _, err = _init(capsys, tmp_path / "pne", "--tk-file", str(path))
    assert code == EXIT_USAGE
    assert f"chmod 600 {path}" in err
    assert TK.hex() not in err
    assert not (tmp_path / "pne" / "device.key").exists()


def test_tk_from_standard_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 5 item 13: ``--tk-stdin`` (also the default without ``--tk-file``) reads the
    TK from one line of standard input, so it never shows in the process list."""
    monkeypatch.setattr("sys.stdin", io.StringIO(TK.hex() + "\n"))
    assert _init(capsys, tmp_path / "a", "--tk-stdin")[0] == EXIT_OK
    assert _stored_tk(tmp_path / "a") == TK
    monkeypatch.setattr("sys.stdin", io.StringIO(TK.hex() + "\n"))
    assert _init(capsys, tmp_path / "b")[0] == EXIT_OK
    assert _stored_tk(tmp_path / "b") == TK


def test_tk_on_the_command_line_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Issue 5 item 13: ``--tk-hex`` is gone; using it says why and what to use instead
    (exit 2), and stores nothing."""
    code, _, err = _init(capsys, tmp_path / "pne", "--tk-hex", TK.hex())
    assert code == EXIT_USAGE
    assert "--tk-file" in err
    assert "--tk-stdin" in err
    assert not (tmp_path / "pne" / "device.key").exists()


@pytest.mark.parametrize(
    "content",
    [
        TK,  # raw bytes: not the documented format
        TK.hex().encode()[:-1],  # odd number of digits
        TK.hex().encode()[:30],  # 15 bytes: too short
        (bytes(65)).hex().encode(),  # 65 bytes: too long
        b"zz" * 32,
        b"",
        TK.hex().encode() + b"\n" + TK.hex().encode(),  # two lines
    ],
    ids=["raw", "odd", "short", "long", "not-hex", "empty", "two-lines"],
)
def test_tk_content_is_checked_and_never_echoed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes
) -> None:
    """Issue 5 item 13: the one TK format is 32 to 128 hex digits (16 to 64 bytes); any
    other content is a usage error whose message does not repeat the input."""
    path = _tk_file(tmp_path, content)
    code, _, err = _init(capsys, tmp_path / "pne", "--tk-file", str(path))
    assert code == EXIT_USAGE
    assert "TK" in err
    if content:
        assert content.hex() not in err
        assert content.decode("latin-1")[:20] not in err
    assert not (tmp_path / "pne" / "device.key").exists()


def test_parse_tk_accepts_16_to_64_bytes() -> None:
    """The documented range: the same as the server's TK CSV import."""
    assert parse_tk(bytes(16).hex().encode()) == bytes(16)
    assert parse_tk(bytes(64).hex().encode() + b"\r\n") == bytes(64)
