"""Operations on a real deployment (issue 7 item 6): backup, restore into a fresh database
of the OTHER back end, master-key rotation, bulk imports, all through the ``cpns`` command
with real server and PN GW processes; the PN GW keeps working across each."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import tomllib
from pathlib import Path

import pytest
from tests.integration.conftest import PASSWORD, Net
from tests.postgres import PGCluster

from cpns.protocol.key_assignment import claim_code
from cpns.store.masterkey import MasterKey, write_private_file

pytestmark = pytest.mark.integration


def _entity(running: Net, entity_id: str) -> dict[str, object]:
    shown = running.net.cpns(
        "admin", "entity", "show", entity_id, "--data-dir", str(running.net.server_dir)
    ).stdout
    result: dict[str, object] = json.loads(shown)
    return result


def _switch_database(server_dir: Path, database: str | None) -> None:
    """Point server.toml at another database (None: the default SQLite file)."""
    path = server_dir / "server.toml"
    settings = tomllib.loads(path.read_text())
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("database =")]
    if database is not None:
        lines.append(f'database = "{database}"')
    elif settings.get("database", "cpns.db").startswith("postgres"):
        lines.append('database = "restored.db"')
    write_private_file(path, ("\n".join(lines) + "\n").encode(), overwrite=True)


def test_backup_restore_to_the_other_back_end_then_rotate(
    running: Net, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A PN GW enrols and a PNE is assigned; a backup is made while the server runs; the
    server is stopped and pointed at a fresh, empty database of the other back end
    (SQLite -> PostgreSQL, PostgreSQL -> SQLite); restore; restart: the PN GW
    authenticates with its old EUKey and assigns another PNE, and pne-1's assignment is
    there. Then the master key is rotated with the server stopped, and after a restart
    the PN GW works again (its outstanding Digest nonce became stale and was renewed)."""
    net = running.net
    first = net.assign(pne_id="pne-1", user_id="alice", password=PASSWORD, wait=0)
    assert first.returncode == 0, first.stdout + first.stderr
    before = _entity(running, "pne-1")

    backup = tmp_path / "cpns.backup"
    out = net.cpns("admin", "backup", str(backup), "--data-dir", str(net.server_dir)).stdout
    assert "back the master key up separately" in out
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600

    net.stop("server")
    settings = tomllib.loads((net.server_dir / "server.toml").read_text())
    if str(settings.get("database", "")).startswith("postgres"):
        _switch_database(net.server_dir, None)  # PostgreSQL -> a new SQLite file
    else:
        cluster: PGCluster = request.getfixturevalue("pg_cluster")
        stack = contextlib.ExitStack()
        request.addfinalizer(stack.close)
        dsn = stack.enter_context(cluster.database())
        _switch_database(net.server_dir, dsn)  # SQLite -> a new PostgreSQL database
    out = net.cpns("admin", "restore", str(backup), "--data-dir", str(net.server_dir)).stdout
    assert "restored" in out
    # A second restore finds the database no longer empty and is refused.
    again = net.cpns(
        "admin", "restore", str(backup), "--data-dir", str(net.server_dir), check=False
    )
    assert again.returncode != 0
    assert "is not empty" in again.stderr

    net.start_server()
    assert _entity(running, "pne-1") == before
    second = net.assign(pne_id="pne-2", user_id="alice", password=PASSWORD, wait=0)
    assert second.returncode == 0, second.stdout + second.stderr + net.log("gw")

    key_file = net.server_dir / "master.key"
    old = MasterKey.load(key_file)
    net.stop("server")
    out = net.cpns("admin", "master-key", "rotate", "--data-dir", str(net.server_dir)).stdout
    assert f"from {old.key_id}" in out
    assert MasterKey.load(key_file) != old
    net.start_server()
    # A new TK import seals under the new key; its PNE is then assigned through the PN GW.
    tk = secrets.token_bytes(32)
    csv = tmp_path / "pne-3.csv"
    write_private_file(csv, f"entity_id,tk\npne-3,{tk.hex()}\n".encode(), overwrite=False)
    net.cpns("admin", "tk", "import", str(csv), "--data-dir", str(net.server_dir))
    net.claim_codes["pne-3"] = claim_code(tk, "pne-3")
    third = net.assign(pne_id="pne-3", user_id="alice", password=PASSWORD, wait=0)
    assert third.returncode == 0, third.stdout + third.stderr + net.log("gw")
    assert _entity(running, "pne-3")["owner"] == "alice"


def test_bulk_user_and_tk_import_then_enrol(running: Net, tmp_path: Path) -> None:
    """``cpns admin user import`` with precomputed password keys and with passwords, and
    ``cpns admin tk import``: the imported user enrols a PN GW with the password whose key
    was precomputed; progress bars go to stderr only when asked (--progress)."""
    from cpns.crypto.kdf import password_key

    net = running.net
    keys = tmp_path / "users-keys.csv"
    rows = ["user_id,password_key"]
    rows += [f"bulk-{i}," + secrets.token_hex(32) for i in range(200)]
    rows.append("carol," + password_key(PASSWORD, realm="cpns", user_id="carol").hex())
    write_private_file(keys, ("\n".join(rows) + "\n").encode(), overwrite=False)
    quiet = net.cpns("admin", "user", "import", str(keys), "--data-dir", str(net.server_dir))
    assert "imported 201 user(s)" in quiet.stdout
    assert quiet.stderr == ""

    passwords = tmp_path / "users-passwords.csv"
    write_private_file(
        passwords,
        b"user_id,password\ndave,dave's password\nerin,erin's password\n",
        overwrite=False,
    )
    shown = net.cpns(
        "admin", "user", "import", str(passwords), "--data-dir", str(net.server_dir), "--progress"
    )
    assert "imported 2 user(s)" in shown.stdout
    assert "hashing passwords" in shown.stderr

    tks = tmp_path / "tk.csv"
    tk_rows = ["entity_id,tk", *(f"bulk-pne-{i},{secrets.token_hex(32)}" for i in range(500))]
    write_private_file(tks, ("\n".join(tk_rows) + "\n").encode(), overwrite=False)
    out = net.cpns("admin", "tk", "import", str(tks), "--data-dir", str(net.server_dir)).stdout
    assert "imported 500 TK record(s)" in out

    enrolled = net.enroll_gateway(
        entity_id="gw-carol", user_id="carol", password=PASSWORD, server_url=running.url, name="gwc"
    )
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
