"""``cpns device enroll``: the password is read like ``cpns gateway enroll`` reads it (one
line of stdin with ``--password-stdin``, else a prompt without echo) and only its key is
used; usage errors and an unreachable PN GW have their exit codes."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.metrics import free_port

from cpns.cli.main import EXIT_UNREACHABLE, EXIT_USAGE, main

PASSWORD = "correct horse battery"


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """Keep main()'s stderr handler out of capsys's streams."""
    logger = logging.getLogger("cpns")
    saved = logger.handlers[:]
    logger.handlers[:] = [logging.NullHandler()]
    yield
    logger.handlers[:] = saved


def _enroll(tmp_path: Path, *extra: str) -> int:
    return main(
        [
            "device",
            "enroll",
            "--data-dir",
            str(tmp_path / "pne"),
            "--gateway",
            f"127.0.0.1:{free_port()}",
            "--user",
            "alice",
            *extra,
        ]
    )


def test_password_from_stdin_and_no_gateway(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Our rule (the CLI's exit codes): with ``--password-stdin`` the password is one line
    of standard input; with no PN GW listening the PNE tries ``--tries`` links and exits 4
    (unreachable). The password never appears in the output."""
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    code = _enroll(
        tmp_path, "--entity-id", "pne-ui", "--password-stdin", "--tries", "2", "--timeout", "2"
    )
    out, err = capsys.readouterr()
    assert code == EXIT_UNREACHABLE
    assert "after 2 tries" in err
    assert PASSWORD not in out + err


def test_the_password_is_asked_for_without_echo(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Like ``cpns gateway enroll``: without ``--password-stdin`` the password comes from
    a prompt without echo (getpass)."""
    asked: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        asked.append(prompt)
        return PASSWORD

    monkeypatch.setattr("getpass.getpass", fake_getpass)
    code = _enroll(tmp_path, "--entity-id", "pne-ui", "--tries", "1", "--timeout", "2")
    capsys.readouterr()
    assert asked == ["Password: "]
    assert code == EXIT_UNREACHABLE


@pytest.mark.parametrize(
    "extra",
    [["--password-stdin", "--tries", "0"], ["--password-stdin", "--timeout", "0"]],
    ids=["no-tries", "no-timeout"],
)
def test_usage_errors(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    extra: list[str],
) -> None:
    """Our rule: ``--tries`` below 1 or a ``--timeout`` of 0 is a usage error (exit 2),
    found before the password is read or anything is stored."""
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert _enroll(tmp_path, "--entity-id", "pne-ui", *extra) == EXIT_USAGE
    capsys.readouterr()
    assert not (tmp_path / "pne").exists()


def test_a_new_pne_needs_its_entity_id(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Our rule: with no device store, ``--entity-id`` is needed to create one (exit 2)."""
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert _enroll(tmp_path, "--password-stdin") == EXIT_USAGE
    assert "--entity-id" in capsys.readouterr().err
