"""Fixtures for loopback end-to-end tests: real ``cpns`` processes, real sockets, and the
server's database on SQLite or on the session's real PostgreSQL cluster."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cpns.localnet import LocalDeployment

PASSWORD = "correct horse battery"
OTHER_PASSWORD = "bob's own password"


@dataclass
class Net:
    """A running server and enrolled, running gateway, for one test."""

    net: LocalDeployment
    url: str
    pan_port: int
    tk: dict[str, bytes]


def _make(
    base: Path, *, extra_tks: int = 0, database: str | None = None
) -> tuple[LocalDeployment, dict[str, bytes]]:
    tks = {f"pne-{i}": secrets.token_bytes(32) for i in range(1, 3 + extra_tks)}
    net = LocalDeployment(base)
    net.init_server(
        users=[("alice", PASSWORD), ("bob", OTHER_PASSWORD)],
        tk_records=sorted(tks.items()),
        database=database,
    )
    return net, tks


@pytest.fixture(params=["sqlite", "postgresql"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalDeployment]:
    """A deployment whose server is not initialised yet, once per back end: its
    ``init_server`` makes the default SQLite file, or uses a fresh database of the
    session's PostgreSQL cluster. Every process is stopped afterwards."""
    database = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    net = LocalDeployment(tmp_path / "net", database=database)
    with net.running():
        yield net


@pytest.fixture(params=["sqlite", "postgresql"])
def running(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Net]:
    """Server running; alice's PN GW 'gw-alice' enrolled and its daemon running. Once per
    back end: ``cpns server init`` with its default SQLite file, and with ``--database``
    naming a fresh database of the session's PostgreSQL cluster."""
    database = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    net, tks = _make(tmp_path / "net", database=database)
    with net.running():
        url = net.start_server()
        net.enroll_gateway(entity_id="gw-alice", user_id="alice", password=PASSWORD, server_url=url)
        pan_port = net.start_gateway()
        yield Net(net, url, pan_port, tks)
