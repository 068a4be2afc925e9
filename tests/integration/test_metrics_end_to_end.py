"""Operator metrics and health end to end (docs/metrics.md): real ``cpns server run`` and
``cpns gateway run`` processes with their operator listeners on loopback, scraped over
HTTP and parsed with prometheus_client's parser, on SQLite and on PostgreSQL."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.conftest import PASSWORD, _make
from tests.integration.test_server_limits import _closed_by_server, _refused, _start, _tls
from tests.metrics import Samples, free_port, get, scrape, value
from tests.postgres import PGCluster, with_database
from tests.postgres import raw as pg_raw

from cpns.localnet import LocalDeployment

pytestmark = pytest.mark.integration

TK003 = "eukey-assignment-tk-003"
UI004 = "eukey-assignment-ui-004"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str | None:
    """The server's database: the default SQLite file, or a fresh PostgreSQL database."""
    return request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None


def with_operator_ports(net: LocalDeployment) -> tuple[str, str]:
    """Give the server and the gateway an operator port (environment overrides, as a
    container would); return their base URLs."""
    server, gateway = free_port(), free_port()
    net.env["CPNS_SERVER_OPERATOR_PORT"] = str(server)
    net.env["CPNS_GATEWAY_OPERATOR_PORT"] = str(gateway)
    return f"http://127.0.0.1:{server}", f"http://127.0.0.1:{gateway}"


def wait_for(url: str, name: str, predicate: object, net: LocalDeployment) -> Samples:
    """Scrape ``url`` until ``predicate(samples)`` holds (bounded): counters of work the
    processes finish after answering (a delivery stored) may lag a moment."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(url)
        if predicate(samples):  # type: ignore[operator]
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}: condition not met:\n" + net.log(name))
        time.sleep(0.1)


def test_metrics_count_an_enrolment_and_assignments(tmp_path: Path, database: str | None) -> None:
    """docs/metrics.md end to end: after a PN GW enrolment, one delivered EUKey assignment
    and one refused for a wrong password, the server's /metrics counts each request under
    its procedure and status (with latency, HTTP responses, a password-proof failure and
    group commits of its back end) and the gateway's /metrics counts its upstream
    exchanges, the assignments by status and hop, and the delivery; no request is left
    pending; /healthz and /readyz answer 200 on both."""
    net, tks = _make(tmp_path / "net", database=database)
    server_url, gateway_url = with_operator_ports(net)
    backend = "sqlite" if database is None else "postgresql"
    with net.running():
        url = net.start_server()
        net.enroll_gateway(entity_id="gw-alice", user_id="alice", password=PASSWORD, server_url=url)
        pan_port = net.start_gateway()
        net.init_device("pne-1", entity_id="pne-1", tk=tks["pne-1"])
        net.start_device("pne-1", pan_port=pan_port, once=True, timeout=60)
        result = net.assign(pne_id="pne-1", user_id="alice", password=PASSWORD, wait=30)
        assert result.returncode == 0, result.stdout + result.stderr
        assert net.wait("pne-1", timeout=60) == 0, net.log("pne-1")
        refused = net.assign(pne_id="pne-2", user_id="alice", password="not the password")
        assert refused.returncode != 0

        server = scrape(server_url + "/metrics")
        gateway = wait_for(
            gateway_url + "/metrics",
            "gw",
            lambda s: (
                value(s, "cpns_gateway_deliveries_total") == 1
                and value(s, "cpns_gateway_pan_connections") == 0
            ),
            net,
        )
        health = [
            get(base + path)
            for base in (server_url, gateway_url)
            for path in ("/healthz", "/readyz")
        ]

    def requests(procedure: str, status: str) -> float:
        return value(server, "cpns_server_requests_total", procedure=procedure, status=status)

    assert requests(UI004, "OK") == 1  # the enrolment
    assert requests(TK003, "OK") == 1
    assert requests(TK003, "WRONG_PASSWORD") == 1
    assert value(server, "cpns_server_request_duration_seconds_count", procedure=TK003) == 2
    assert value(server, "cpns_server_password_proof_failures_total", procedure=TK003) == 1
    assert value(server, "cpns_server_pending_procedures") == 0
    assert value(server, "cpns_server_http_responses_total", route="messages", code="200") == 3
    # The gateway's first Digest exchange is challenged once (no nonce yet).
    assert value(server, "cpns_server_http_responses_total", route="messages", code="401") == 1
    assert value(server, "cpns_server_digest_failures_total", reason="wrong_response") == 0
    # At least the enrolment's and the assignment's commits, in batches of that back end.
    assert value(server, "cpns_store_commit_batch_size_count", backend=backend) >= 2
    assert value(server, "cpns_store_commit_duration_seconds_count", backend=backend) >= 2
    assert value(server, "cpns_store_commit_failures_total", backend=backend) == 0

    kind = "EUKEY_ASSIGNMENT_REQUEST"
    exchanges = value(
        gateway, "cpns_gateway_upstream_exchanges_total", message=kind, outcome="answered"
    )
    assert exchanges == 2
    assert value(gateway, "cpns_gateway_upstream_duration_seconds_count", message=kind) == 2
    assert value(gateway, "cpns_gateway_assignments_total", status="OK", hop="none") == 1
    assignments = value(
        gateway, "cpns_gateway_assignments_total", status="WRONG_PASSWORD", hop="server"
    )
    assert assignments == 1
    assert value(gateway, "cpns_gateway_pending_requests") == 0
    assert value(gateway, "cpns_gateway_pending_deliveries") == 0
    assert health == [(200, "ok\n"), (200, "ready\n"), (200, "ok\n"), (200, "ready\n")]


def test_readyz_fails_when_the_sqlite_file_is_gone(tmp_path: Path) -> None:
    """docs/metrics.md, /readyz: 200 while the SQLite database can be read; once the file
    is gone from its place (a volume unmounted, a file moved away) the next probe is 503
    with the reason, while /healthz (liveness) stays 200."""
    net, _ = _make(tmp_path / "net")
    server_url, _ = with_operator_ports(net)
    with net.running():
        net.start_server()
        before = get(server_url + "/readyz")
        for path in net.server_dir.glob("cpns.db*"):
            path.rename(path.with_name("moved-" + path.name))
        after = get(server_url + "/readyz")
        alive = get(server_url + "/healthz")
    assert before == (200, "ready\n")
    assert after[0] == 503
    assert after[1].startswith("not ready: cannot read store")
    assert "cpns.db" in after[1]
    assert alive == (200, "ok\n")


@pytest.fixture
def own_cluster() -> Iterator[PGCluster]:
    """A PostgreSQL cluster of this test alone (the test stops it)."""
    cluster = PGCluster.start()
    try:
        yield cluster
    finally:
        if cluster.directory.exists():
            cluster.stop()


def test_readyz_fails_when_postgresql_stops(tmp_path: Path, own_cluster: PGCluster) -> None:
    """docs/metrics.md, /readyz: 200 while PostgreSQL answers; once the database server
    is stopped the next probe is 503 with the reason (no password in it), while /healthz
    stays 200."""
    own_cluster.admin("CREATE DATABASE readyz")
    dsn = with_database(own_cluster.admin_dsn, "readyz")
    net, _ = _make(tmp_path / "net", database=dsn)
    server_url, _ = with_operator_ports(net)
    with net.running():
        net.start_server()
        before = get(server_url + "/readyz")
        own_cluster.stop()
        after = get(server_url + "/readyz")
        alive = get(server_url + "/healthz")
        net.stop("server", kill=True)  # its database is gone: no graceful flush
    assert before == (200, "ready\n")
    assert after[0] == 503, after
    assert after[1].startswith("not ready: ")
    password = dsn.split("@")[0].rsplit(":", 1)[1]
    assert password not in after[1]
    assert alive == (200, "ok\n")


def test_a_postgresql_restart_is_survived_without_a_server_restart(
    tmp_path: Path, own_cluster: PGCluster
) -> None:
    """Issue 7 item 7 (PostgreSQL restarted mid-load): while the database is down the
    server reports itself not ready (/readyz 503) and refuses cleanly (the PN GW's user
    gets a status, not a hang); once the database is back, /readyz returns to 200, the
    next assignment succeeds on the same server process, whose lost writer and read
    connections are replaced by themselves, and the refused request, which the PN GW
    keeps, is resent by its retry loop (every 30 s) and lands: nothing is lost."""
    own_cluster.admin("CREATE DATABASE restart")
    dsn = with_database(own_cluster.admin_dsn, "restart")
    net, _ = _make(tmp_path / "net", database=dsn, extra_tks=1)
    server_url, _ = with_operator_ports(net)
    with net.running():
        url = net.start_server()
        net.enroll_gateway(entity_id="gw-alice", user_id="alice", password=PASSWORD, server_url=url)
        net.start_gateway()
        assert net.assign(pne_id="pne-1", user_id="alice", password=PASSWORD).returncode == 0
        own_cluster.down()
        down = get(server_url + "/readyz")
        refused = net.assign(pne_id="pne-2", user_id="alice", password=PASSWORD)
        own_cluster.up()
        deadline = time.monotonic() + 30
        while (ready := get(server_url + "/readyz"))[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        after = net.assign(pne_id="pne-3", user_id="alice", password=PASSWORD)
        deadline = time.monotonic() + 60
        while not _stored(dsn, "pne-2") and time.monotonic() < deadline:
            time.sleep(0.5)
        stored = {e: _stored(dsn, e) for e in ("pne-1", "pne-2", "pne-3")}
    assert down[0] == 503, down
    assert refused.returncode == 4, refused.stdout + refused.stderr  # peer unreachable
    assert ready == (200, "ready\n")
    assert after.returncode == 0, after.stdout + after.stderr
    assert stored == {"pne-1": True, "pne-2": True, "pne-3": True}


def _stored(dsn: str, entity_id: str) -> bool:
    return bool(pg_raw(dsn, "SELECT 1 FROM entities WHERE entity_id = %s", (entity_id,)))


def test_listener_limits_are_counted(tmp_path: Path) -> None:
    """docs/metrics.md, the HTTPS listener: a connection over the per-source cap counts in
    cpns_server_connections_refused_total, a TLS handshake with garbage, a silent
    connection past request_timeout and a head over max_header_bytes each count once in
    cpns_server_connections_closed_total under their reason; cpns_server_connections
    follows the open connections (back to 0 once they are closed)."""
    net = LocalDeployment(tmp_path / "net")
    with net.running():
        operator = free_port()
        port = _start(
            net,
            max_connections_per_source=2,
            request_timeout=10,
            max_header_bytes=4096,
            operator_port=operator,
        )
        metrics_url = f"http://127.0.0.1:{operator}/metrics"
        held = [_tls(net, port), _tls(net, port)]
        try:
            assert _refused(net, port)
            during = scrape(metrics_url)
            big = _tls(net, port, "127.0.0.2")
            with big:
                big.sendall(b"GET /" + b"a" * 8192 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
                big.settimeout(10)
                assert big.recv(4096).startswith(b"HTTP/1.1 431 ")
            with socket.create_connection(
                ("127.0.0.1", port), timeout=10, source_address=("127.0.0.3", 0)
            ) as junk:
                junk.sendall(b"this is not a TLS ClientHello\r\n\r\n")
                assert _closed_by_server(junk, 10)  # type: ignore[arg-type]
            # The silent connections are closed by the request timeout.
            assert all(_closed_by_server(conn, 30) for conn in held)
        finally:
            for conn in held:
                conn.close()
        after = wait_for(
            metrics_url,
            "server",
            lambda s: value(s, "cpns_server_connections") == 0,
            net,
        )

    def closed(reason: str) -> float:
        return value(after, "cpns_server_connections_closed_total", reason=reason)

    assert value(during, "cpns_server_connections") == 2
    refused = value(
        after, "cpns_server_connections_refused_total", reason="max_connections_per_source"
    )
    assert refused == 1
    assert closed("head_too_large") == 1
    assert closed("tls_handshake_failed") == 1
    assert closed("request_timeout") == 2
