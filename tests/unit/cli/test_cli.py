"""The one ``cpns`` command (issue #2 item 4, DESIGN §7): exit codes scripts can trust,
TK import that reports a bad row by line and imports nothing, secrets shown only when
asked, and the demo's sequence diagram. Runs ``cpns.cli.main.main`` in-process on real
data directories."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from tests.postgres import raw as pg_raw

from cpns.cli.demo_cmd import sequence_diagram
from cpns.cli.diagram import LIFELINE as _LIFELINE
from cpns.cli.main import EXIT_OK, EXIT_USAGE, main
from cpns.records import EntityRecord
from cpns.server.admin import add_user
from cpns.server.config import load_server_config
from cpns.server.main import open_store
from cpns.store.postgres import redact_dsn
from cpns.types import EntityKind

TK = "ab" * 32


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """main() leaves an existing handler alone: keep its stderr handler out of capsys's
    streams, which pytest closes after each test."""
    logger = logging.getLogger("cpns")
    saved = logger.handlers[:]
    logger.handlers[:] = [logging.NullHandler()]
    yield
    logger.handlers[:] = saved


@pytest.fixture(params=["sqlite", "postgresql"])
def server_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """``cpns server init`` on port 0, on each back end (the default SQLite file, or
    ``--database`` with a fresh PostgreSQL database): the admin commands work on both."""
    data = tmp_path / "srv"
    argv = ["server", "init", "--data-dir", str(data), "--port", "0"]
    if request.param == "postgresql":
        argv += ["--database", request.getfixturevalue("pg_dsn")]
    assert main(argv) == EXIT_OK
    return data


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_no_command_prints_help_and_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``cpns`` alone teaches (prints the help) and exits 2."""
    code, out, _ = run(capsys)
    assert code == EXIT_USAGE
    assert "cpns demo" in out


def test_a_directory_that_is_not_a_server_is_a_clear_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Exit 2 and a message that says what to do, not a traceback."""
    code, _, err = run(capsys, "admin", "user", "list", "--data-dir", str(tmp_path))
    assert code == EXIT_USAGE
    assert "run 'cpns server init' first" in err


def test_server_init_twice_is_refused(capsys: pytest.CaptureFixture[str], server_dir: Path) -> None:
    """An initialised data directory (master key, database) is never overwritten."""
    code, _, err = run(capsys, "server", "init", "--data-dir", str(server_dir), "--port", "0")
    assert code == EXIT_USAGE
    assert "already initialised" in err


def test_server_init_keeps_the_master_key_private(server_dir: Path) -> None:
    """DESIGN §6: the master key is a 0600 file outside the database."""
    config = load_server_config(server_dir)
    assert config.path(config.master_key_file).stat().st_mode & 0o777 == 0o600


def test_tk_import_bad_row_names_its_line_and_imports_nothing(
    capsys: pytest.CaptureFixture[str], server_dir: Path, tmp_path: Path
) -> None:
    """Issue #2 item 4: a bad row is reported with its line number (exit 2) and nothing
    partial is imported; the same file once fixed imports every row."""
    csv = tmp_path / "factory.csv"
    csv.write_text(f"entity_id,tk\npne-1,{TK}\npne-2,{TK[:-2]}zz\n")
    argv = ("admin", "tk", "import", str(csv), "--data-dir", str(server_dir), "--quiet")
    code, _, err = run(capsys, *argv)
    assert code == EXIT_USAGE
    assert "line 3: the TK is not hexadecimal" in err
    with open_store(load_server_config(server_dir)) as store:
        assert store.get_tk("pne-1") is None
    csv.write_text(f"entity_id,tk\npne-1,{TK}\npne-2,{TK}\n")
    code, out, _ = run(capsys, *argv)
    assert code == EXIT_OK
    assert "imported 2 TK record(s)" in out


def test_entity_show_hides_secrets_unless_asked(
    capsys: pytest.CaptureFixture[str], server_dir: Path, tmp_path: Path
) -> None:
    """Issue #2 item 4: list and show never print an EUKey or a TK unless
    ``--show-secrets`` is given."""
    csv = tmp_path / "factory.csv"
    csv.write_text(f"entity_id,tk\npne-1,{TK}\n")
    run(capsys, "admin", "tk", "import", str(csv), "--data-dir", str(server_dir), "--quiet")
    eukey = bytes(range(32))
    with open_store(load_server_config(server_dir)) as store:
        add_user(store, "alice", "correct horse battery", realm="cpns")
        store.write(
            lambda tx: tx.put_entity(
                EntityRecord(
                    entity_id="pne-1",
                    kind=EntityKind.PNE,
                    owner="alice",
                    eukeys=(eukey,),
                    key_index=1,
                )
            )
        )
    base = ("admin", "entity", "show", "pne-1", "--data-dir", str(server_dir))
    _, hidden, _ = run(capsys, *base)
    _, listed, _ = run(capsys, "admin", "entity", "list", "--json", "--data-dir", str(server_dir))
    for text in (hidden, listed):
        assert eukey.hex() not in text
        assert TK not in text
    assert json.loads(hidden)["tk_record"] is True
    code, shown, _ = run(capsys, *base, "--show-secrets")
    assert code == EXIT_OK
    assert json.loads(shown)["eukeys"] == [eukey.hex()]
    assert json.loads(shown)["tk"] == TK


def test_user_add_reads_the_password_from_stdin(
    capsys: pytest.CaptureFixture[str], server_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--password-stdin`` lets scripts register users; a short password is exit 2."""
    argv = ("admin", "user", "add", "alice", "--data-dir", str(server_dir), "--password-stdin")
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert run(capsys, *argv)[0] == EXIT_USAGE
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
    assert run(capsys, *argv)[:2] == (EXIT_OK, "user alice added\n")
    _, out, _ = run(capsys, "admin", "user", "list", "--data-dir", str(server_dir))
    assert out == "alice\n"


def test_server_init_on_postgresql_keeps_the_url_private(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, pg_dsn: str
) -> None:
    """``server init --database postgresql://...``: the URL goes into server.toml, which is
    0600 (the URL holds a password); what init prints shows the URL without its password;
    the admin commands then write to that database, secrets sealed as on SQLite."""
    password = urlsplit(pg_dsn).password
    assert password
    data = tmp_path / "srv"
    argv = ["server", "init", "--data-dir", str(data), "--port", "0", "--database", pg_dsn]
    code, out, err = run(capsys, *argv)
    assert code == EXIT_OK, err
    assert password not in out + err
    assert redact_dsn(pg_dsn) in out
    toml = data / "server.toml"
    assert toml.stat().st_mode & 0o777 == 0o600
    assert load_server_config(data).database == pg_dsn
    assert not (data / "cpns.db").exists()
    add = ("admin", "user", "add", "alice", "--data-dir", str(data), "--password-stdin")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
        assert run(capsys, *add)[0] == EXIT_OK
    [(user_id, sealed)] = pg_raw(pg_dsn, "SELECT user_id, password_key_sealed FROM users")
    assert user_id == "alice"
    with open_store(load_server_config(data)) as store:
        user = store.get_user("alice")
        assert user is not None
        assert user.password_key not in sealed


def test_server_init_with_an_unreachable_database_leaves_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, pg_dsn: str
) -> None:
    """A PostgreSQL URL that does not connect (wrong password) is exit 2 with a message that
    names the database without any password, and leaves no server.toml or master key, so
    init can be run again with the right URL."""
    password = urlsplit(pg_dsn).password
    assert password
    wrong = pg_dsn.replace(f":{password}@", ":wrong-password@")
    data = tmp_path / "srv"
    argv = ["server", "init", "--data-dir", str(data), "--port", "0", "--database"]
    code, out, err = run(capsys, *argv, wrong)
    assert code == EXIT_USAGE
    assert "127.0.0.1" in err
    assert "wrong-password" not in out + err
    assert not (data / "server.toml").exists()
    assert not (data / "master.key").exists()
    assert run(capsys, *argv, pg_dsn)[0] == EXIT_OK


def test_demo_sequence_diagram_keeps_its_lifelines_straight() -> None:
    """DESIGN §7: a flow shown as a sequence diagram the way the seeds draw their figures:
    below the two header lines every row has each party's lifeline in its column, every
    arrow has exactly one head, and the seed sections are named."""
    text = sequence_diagram(pne="headset-1", gw="phone-1", server="cpns-server", txid="ab", n=16)
    rows = text.splitlines()
    assert "headset-1" in rows[1]
    assert "phone-1" in rows[1]
    for row in rows[2:]:
        for column in _LIFELINE.values():
            assert row[column] in "|<>", row
        arrow = row[_LIFELINE["PNE"] : _LIFELINE["SRV"] + 1]
        if "-" in arrow:
            assert len(re.findall(r"[<>]", arrow)) == 1, row
    for section in ("003 §7.4.2.1.1.1", "003 §7.4.2.1.1.2", "003 §7.4.2.1.1.3"):
        assert section in text


def test_server_run_on_a_busy_port_is_a_clear_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A port another program holds gives exit 2 and says which address, no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        data = tmp_path / "srv"
        assert main(["server", "init", "--data-dir", str(data), "--port", str(port)]) == 0
        code, _, err = run(capsys, "server", "run", "--data-dir", str(data))
    assert code == EXIT_USAGE
    assert f"cannot listen on 127.0.0.1:{port}" in err


def test_gateway_enroll_with_an_unreadable_certificate_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --ca file that holds no certificate is a setting to fix (exit 2), not an
    unreachable peer (exit 4)."""
    bogus = tmp_path / "not-a-cert.pem"
    bogus.write_text("hello\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
    code, _, err = run(
        capsys,
        "gateway",
        "enroll",
        "--data-dir",
        str(tmp_path / "gw"),
        "--entity-id",
        "gw-1",
        "--server",
        "https://127.0.0.1:9",
        "--ca",
        str(bogus),
        "--user",
        "alice",
        "--password-stdin",
    )
    assert code == EXIT_USAGE
    assert "cannot load the server certificate" in err


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9", "HTTP://localhost:8443", "ftp://localhost", "localhost:8443"],
)
def test_gateway_enroll_refuses_a_server_url_that_is_not_https(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """Issue 5 item 4: over http the enrolment's password proof travels in clear (an
    offline dictionary attack), so any server URL that is not https is refused with a
    clear error and exit 2, before any password is read or any connection is made."""
    from cpns.server.tls import generate_self_signed

    cert = tmp_path / "cert.pem"
    generate_self_signed(cert, tmp_path / "key.pem", common_name="cpns-server")
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
    code, _, err = run(
        capsys,
        "gateway",
        "enroll",
        "--data-dir",
        str(tmp_path / "gw"),
        "--entity-id",
        "gw-1",
        "--server",
        url,
        "--ca",
        str(cert),
        "--user",
        "alice",
        "--password-stdin",
    )
    assert code == EXIT_USAGE
    assert "only https:// is allowed" in err
    assert not (tmp_path / "gw" / "gateway.toml").exists()
