"""The HTTPS listener's limits against a real ``cpns server`` process (issue 5 item 11).

Real sockets on loopback, real TLS 1.3, the server as its own process. Distinct loopback
addresses (127.0.0.2, ...) stand for distinct clients. Every test is bounded in the
number of connections and in time; none asserts a duration.

These run on the default SQLite store only: every limit here acts in the listener, before
a request reaches the application or the store, so the back end cannot change them (the
store-facing server tests, test_server_guards.py and the ``running`` fixture's, run on
both back ends).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cpns.localnet import LocalDeployment

pytestmark = pytest.mark.integration


def _start(net: LocalDeployment, *, fd_limit: int | None = None, **knobs: int) -> int:
    """Start the server with ``server.toml`` knobs given as CPNS_SERVER_* overrides."""
    net.init_server()
    env = {f"CPNS_SERVER_{name.upper()}": str(value) for name, value in knobs.items()}
    port_file = net.server_dir / "server.port"
    port_file.unlink(missing_ok=True)
    net.start(
        "server", "server", "run", "--data-dir", str(net.server_dir), env=env, fd_limit=fd_limit
    )
    return int(net.wait_for_file(port_file, name="server"))


@pytest.fixture
def net(tmp_path: Path) -> Iterator[LocalDeployment]:
    deployment = LocalDeployment(tmp_path / "net")
    with deployment.running():
        yield deployment


def _context(net: LocalDeployment) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(net.ca_file))


def _tls(net: LocalDeployment, port: int, source: str = "127.0.0.1") -> ssl.SSLSocket:
    """A connection that completed its TLS handshake (and sends nothing yet)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    try:
        return _context(net).wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


def _healthz(net: LocalDeployment, port: int, source: str) -> int:
    """One legitimate request from ``source`` on a new connection; its HTTP status."""
    transport = httpx.HTTPTransport(verify=_context(net), local_address=source)
    with httpx.Client(transport=transport, timeout=10) as client:
        return client.get(f"https://localhost:{port}/healthz").status_code


def _closed_by_server(conn: ssl.SSLSocket, wait: float) -> bool:
    """Whether the server closes ``conn`` within ``wait`` seconds (EOF or reset)."""
    conn.settimeout(wait)
    try:
        return conn.recv(1) == b""
    except TimeoutError:
        return False
    except (OSError, ssl.SSLError):
        return True


def _refused(net: LocalDeployment, port: int) -> bool:
    """Whether a new connection from 127.0.0.1 is refused (reset during the handshake, or
    at the first read on stacks that finish the client side of it first)."""
    try:
        extra = _tls(net, port)
    except (OSError, ssl.SSLError):
        return True
    with extra:
        extra.settimeout(5)
        try:
            return extra.recv(1) == b""
        except (OSError, ssl.SSLError):
            return True


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")  # pragma: no cover


def _server_pid(net: LocalDeployment) -> int:
    return net._daemons["server"].process.pid


def test_slowloris_connections_are_closed_and_legitimate_requests_served(
    net: LocalDeployment,
) -> None:
    """Issue 5 item 11: with a 256-descriptor limit, 237 connections that complete TLS and
    then go silent or trickle a header (the reported attack left 0 of 3 legitimate requests
    served) neither exhaust the server nor stay open: legitimate requests from another
    source are served meanwhile, every silent or trickling connection is closed by the
    request timeout, and then the attacker's own address is served again. (The attacker's
    address holds at most max_connections_per_source, 64, of them; the rest are reset on
    accept.)"""
    port = _start(net, fd_limit=256, request_timeout=3)
    held: list[ssl.SSLSocket] = []
    refused = 0
    try:
        for _ in range(237):
            try:
                held.append(_tls(net, port))
            except (OSError, ssl.SSLError):
                refused += 1  # over a cap: reset on accept
        assert held, "the attacker got no connection at all"
        trickling = held[::2]
        for conn in trickling:
            conn.sendall(b"POST /cpns/v1/messages HTTP/1.1\r\nHost: x\r\n")
        # The descriptors did not run out: three legitimate requests are served.
        assert [_healthz(net, port, "127.0.0.2") for _ in range(3)] == [200, 200, 200]
        # Trickle a byte a second for longer than the request timeout.
        stop = time.monotonic() + 5
        while time.monotonic() < stop:
            for conn in trickling:
                with contextlib.suppress(OSError, ssl.SSLError):
                    conn.sendall(b"X")
            time.sleep(1)
        closed = sum(_closed_by_server(conn, 5) for conn in held)
        assert closed == len(held)
        assert _healthz(net, port, "127.0.0.1") == 200
    finally:
        for conn in held:
            with contextlib.suppress(OSError):
                conn.close()
    assert net._daemons["server"].process.poll() is None


def test_a_source_over_its_cap_is_refused_and_others_are_served(net: LocalDeployment) -> None:
    """Issue 5 item 11: at max_connections_per_source (8 here) a source's next connection
    is refused on accept (no TLS handshake), while a request from another source
    (127.0.0.2) is served; once the source's connections close, it is served again."""
    port = _start(net, max_connections_per_source=8, request_timeout=30)
    held = [_tls(net, port) for _ in range(8)]
    try:
        assert _refused(net, port)
        assert _healthz(net, port, "127.0.0.2") == 200
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 10
    status = 0
    while time.monotonic() < deadline and status != 200:
        with contextlib.suppress(OSError, httpx.HTTPError):
            status = _healthz(net, port, "127.0.0.1")
        if status != 200:
            time.sleep(0.2)
    assert status == 200


def _oversized_head(net: LocalDeployment, port: int, total: int, results: list[bytes]) -> None:
    """Send a request whose one header grows to ``total`` bytes, stopping as soon as the
    server answers; record what it answered."""
    conn = _tls(net, port)
    answer = b""
    try:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: ")
        chunk = b"a" * 65536
        sent = 0
        while sent < total:
            readable, _, _ = select.select([conn], [], [], 0)
            if readable:
                # The socket is also readable for TLS records that carry no application
                # data (TLS 1.3 session tickets): stop only on a real answer.
                conn.setblocking(False)
                try:
                    answer = conn.recv(4096)
                except ssl.SSLWantReadError:
                    answer = b""
                except (OSError, ssl.SSLError):
                    break
                finally:
                    conn.setblocking(True)
                if answer:
                    break
            try:
                conn.sendall(chunk)
            except (OSError, ssl.SSLError):
                break
            sent += len(chunk)
        conn.settimeout(10)
        with contextlib.suppress(OSError, ssl.SSLError):
            while len(answer) < 200:
                data = conn.recv(4096)
                if not data:
                    break
                answer += data
    finally:
        conn.close()
    results.append(answer)


def test_oversized_headers_get_431_and_memory_stays_bounded(net: LocalDeployment) -> None:
    """Issue 5 item 11: four concurrent requests with a header growing to 64 MiB (they took
    the server from 133 to 467 MB, and one was answered 200) are each answered 431 and
    closed; the server's RSS grows by less than 32 MiB and it keeps serving."""
    port = _start(net)
    pid = _server_pid(net)
    assert _healthz(net, port, "127.0.0.1") == 200
    before = _rss_kib(pid)
    results: list[bytes] = []
    threads = [
        threading.Thread(target=_oversized_head, args=(net, port, 64 << 20, results))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    after = _rss_kib(pid)
    assert len(results) == 4
    for answer in results:
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    assert after - before < 32 * 1024, (before, after)
    assert _healthz(net, port, "127.0.0.2") == 200


def test_a_long_url_gets_431(net: LocalDeployment) -> None:
    """Issue 5 item 11: the request line counts toward the header limit: a 40 KB URL is
    answered 431, a normal request on a new connection is served."""
    port = _start(net, max_header_bytes=16384)
    conn = _tls(net, port)
    try:
        conn.sendall(b"GET /" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        conn.settimeout(10)
        assert conn.recv(4096).startswith(b"HTTP/1.1 431 ")
    finally:
        conn.close()
    assert _healthz(net, port, "127.0.0.1") == 200


def test_an_idle_keep_alive_connection_is_closed(net: LocalDeployment) -> None:
    """Issue 5 item 11: after a response, a connection that sends nothing more is closed
    after keep_alive_timeout (2 s here)."""
    port = _start(net, keep_alive_timeout=2)
    conn = _tls(net, port)
    try:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        conn.settimeout(10)
        answer = b""
        while not answer.endswith(b"ok\n"):
            answer += conn.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert _closed_by_server(conn, 10)
    finally:
        conn.close()
