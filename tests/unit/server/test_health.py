"""The server's operator listener and readiness probe (cpns.server.health), on a real
SQLStore of each back end and a real loopback socket (docs/metrics.md)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from tests.metrics import free_port, get

from cpns.errors import ConfigurationError
from cpns.server.config import ServerConfig
from cpns.server.health import StoreProbe, start_operator, stop_operator
from cpns.store import MasterKey, SQLStore

KEY = MasterKey(bytes(range(32)))


def test_probe_is_ready_on_a_reachable_store_and_not_once_it_is_closed(
    store_target: str,
) -> None:
    """/readyz: the probe runs a real store read: ready while the store answers, not
    ready (with the store's error) once it cannot, and not ready while stopping."""
    store = SQLStore.open(store_target, master_key=KEY)
    stopping = threading.Event()
    probe = StoreProbe(store, stopping=stopping.is_set)
    try:
        first = asyncio.run(probe())
        store.close()
        closed = asyncio.run(probe())
        stopping.set()
        stopped = asyncio.run(probe())
    finally:
        probe.close()
        store.close()
    assert first == (True, "")
    assert closed[0] is False
    assert "closed" in closed[1]
    assert stopped == (False, "server is stopping")


def test_concurrent_probes_share_one_store_read(tmp_path: Path) -> None:
    """/readyz under a probe storm: while one store read is in flight, more probes wait
    for it instead of starting reads of their own (no pile-up of blocked threads)."""
    store = SQLStore.open(tmp_path / "cpns.db", master_key=KEY)
    calls: list[int] = []
    gate = threading.Event()
    original = store.ping

    def slow_ping() -> None:
        calls.append(1)
        gate.wait(10)
        original()

    store.ping = slow_ping  # type: ignore[method-assign]
    probe = StoreProbe(store)

    async def scenario() -> list[tuple[bool, str]]:
        probes = [asyncio.ensure_future(probe()) for _ in range(5)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*probes)

    try:
        results = asyncio.run(scenario())
    finally:
        probe.close()
        store.close()
    assert results == [(True, "")] * 5
    assert calls == [1]


def test_operator_listener_is_off_by_default_and_writes_its_port(tmp_path: Path) -> None:
    """server.toml: operator_port = 0 (the default) starts no listener; a port starts
    one on operator_host, written to operator.port, whose /readyz reads the store."""
    store = SQLStore.open(tmp_path / "cpns.db", master_key=KEY)
    port = free_port()

    async def scenario() -> tuple[object, tuple[int, str]]:
        off = await start_operator(ServerConfig(data_dir=tmp_path), store)
        started = await start_operator(ServerConfig(data_dir=tmp_path, operator_port=port), store)
        try:
            ready = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/readyz")
        finally:
            await stop_operator(started)
        return off, ready

    try:
        off, ready = asyncio.run(scenario())
    finally:
        store.close()
    assert off is None
    assert ready == (200, "ready\n")
    assert (tmp_path / "operator.port").read_text() == f"{port}\n"


def test_bad_operator_settings_are_refused(tmp_path: Path) -> None:
    """server.toml: operator_port must be a port other than the protocol port."""
    with pytest.raises(ValueError, match="operator_port"):
        ServerConfig(operator_port=70000)
    with pytest.raises(ValueError, match="differ"):
        ServerConfig(port=9000, operator_port=9000)


def test_a_taken_operator_port_is_a_configuration_error(tmp_path: Path) -> None:
    """A clear ConfigurationError (exit code, no traceback) when the port is taken."""
    store = SQLStore.open(tmp_path / "cpns.db", master_key=KEY)

    async def scenario() -> None:
        blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = int(blocker.sockets[0].getsockname()[1])
        try:
            with pytest.raises(ConfigurationError, match="cannot listen on operator"):
                await start_operator(ServerConfig(data_dir=tmp_path, operator_port=port), store)
        finally:
            blocker.close()
            await blocker.wait_closed()

    try:
        asyncio.run(scenario())
    finally:
        store.close()
