"""The CPNS Server on PostgreSQL end to end: ``cpns server init --database postgresql://...``
then ``cpns server run``, with real gateway and device processes on loopback and the
session's real PostgreSQL cluster (scripts/pg-cluster). Every other test that uses the
``running`` fixture also runs on PostgreSQL; this one checks what only PostgreSQL adds."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
from tests.integration.conftest import PASSWORD, _make
from tests.postgres import raw

from cpns.store.postgres import redact_dsn
from cpns.types import EntityKind

pytestmark = pytest.mark.integration


def test_server_on_postgresql_serves_enrolment_and_eukey_assignment(
    tmp_path: Path, pg_dsn: str
) -> None:
    """DESIGN §6 on PostgreSQL: a server initialised with --database serves a PN GW
    enrolment and an EUKey assignment; the facts are rows of that database (no SQLite file
    is made), committed before the replies, so a restarted server still knows them; the
    server's log names the database without its password."""
    password = urlsplit(pg_dsn).password
    assert password
    net, tks = _make(tmp_path / "net", database=pg_dsn)
    with net.running():
        url = net.start_server()
        net.enroll_gateway(entity_id="gw-alice", user_id="alice", password=PASSWORD, server_url=url)
        pan_port = net.start_gateway()
        net.init_device("pne-1", entity_id="pne-1", tk=tks["pne-1"])
        net.start_device("pne-1", pan_port=pan_port, once=True, timeout=60)
        result = net.assign(pne_id="pne-1", user_id="alice", password=PASSWORD, wait=30)
        assert result.returncode == 0, result.stdout + result.stderr
        assert net.wait("pne-1", timeout=60) == 0, net.log("pne-1")

        rows = raw(
            pg_dsn,
            "SELECT entity_id, kind, owner, epoch, assigned_via FROM entities ORDER BY entity_id",
        )
        assert rows == [
            ("gw-alice", int(EntityKind.PN_GW), "alice", 1, None),
            ("pne-1", int(EntityKind.PNE), "alice", 1, "gw-alice"),
        ]
        assert not (net.server_dir / "cpns.db").exists()

        # The server restarts on the same database and still serves the enrolled PN GW.
        net.stop("server")
        net.start_server()
        again = net.assign(pne_id="pne-2", user_id="alice", password=PASSWORD, wait=0)
        assert again.returncode == 0, again.stdout + again.stderr
        [(epoch,)] = raw(pg_dsn, "SELECT epoch FROM entities WHERE entity_id = 'pne-2'")
        assert epoch == 1

    log = net.log("server")
    assert redact_dsn(pg_dsn) in log
    assert password not in log
    # The URL (with its password) is in server.toml, which only its owner can read.
    assert (net.server_dir / "server.toml").stat().st_mode & 0o777 == 0o600
