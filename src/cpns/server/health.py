"""The CPNS Server's operator listener: its readiness check and how it is started.

``/readyz`` runs one real store read (:meth:`SQLStore.ping`) on a dedicated thread. A
store that does not answer within the listener's ``ready_timeout`` makes ``/readyz`` 503;
the read may still be stuck (a PostgreSQL server that vanished without closing the
socket), so probes do not pile up threads: while one read is in flight, later probes wait
for that same read. A stopping server is not ready either (the load balancer drains it
before its connections close). See docs/metrics.md.

With several worker processes (``cpns server run --workers N``) the supervisor, not the
workers, serves the operator port: it calls :func:`cpns.metrics.prepare_multiprocess`
before starting the workers (so ``PROMETHEUS_MULTIPROC_DIR`` is set in its environment
too), starts them with ``operator_port = 0``, and calls :func:`start_operator` with a
store it opened itself: the listener then serves the sum of the workers' metric files
and probes the shared database.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final

from cpns.errors import ConfigurationError, StoreError
from cpns.metrics import OperatorServer, multiprocess_dir, serve_operator
from cpns.server.config import ServerConfig
from cpns.store.masterkey import write_private_file
from cpns.store.sql import SQLStore

__all__ = ["OPERATOR_PORT_FILE", "StoreProbe", "start_operator"]

log = logging.getLogger("cpns.server")

#: Where the server writes the operator port it bound (scripts and tests read it).
OPERATOR_PORT_FILE: Final = "operator.port"


class StoreProbe:
    """Readiness of a store: one real read at a time on its own thread."""

    def __init__(self, store: SQLStore, *, stopping: Callable[[], bool] = lambda: False) -> None:
        self._store = store
        self._stopping = stopping
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="cpns-readyz"
        )
        self._inflight: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<StoreProbe {self._store!r}>"

    async def __call__(self) -> tuple[bool, str]:
        """(True, "") if the store answered a read; else (False, why)."""
        if self._stopping():
            return False, "server is stopping"
        if self._inflight is None or self._inflight.done():
            loop = asyncio.get_running_loop()
            self._inflight = asyncio.ensure_future(
                loop.run_in_executor(self._executor, self._store.ping)
            )
        try:
            await asyncio.shield(self._inflight)
        except StoreError as exc:
            return False, str(exc)
        return True, ""

    def close(self) -> None:
        """Release the probe's thread (without waiting for a stuck read)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


async def start_operator(
    config: ServerConfig, store: SQLStore, *, stopping: Callable[[], bool] = lambda: False
) -> tuple[OperatorServer, StoreProbe] | None:
    """Start the operator listener of a single-process server, if ``operator_port`` is set.

    Writes the bound port to ``<data_dir>/operator.port``. Returns None when the listener
    is disabled (``operator_port = 0``).

    Raises:
        ConfigurationError: the operator address cannot be bound.
    """
    if config.operator_port == 0:
        return None
    probe = StoreProbe(store, stopping=stopping)
    try:
        server = await serve_operator(
            config.operator_host,
            config.operator_port,
            ready=probe,
            multiprocess_dir=multiprocess_dir(),
            ready_timeout=config.readiness_timeout,
        )
    except OSError as exc:
        probe.close()
        raise ConfigurationError(
            f"cannot listen on operator {config.operator_host}:{config.operator_port}: "
            f"{exc.strerror or exc}"
        ) from None
    port_file: Path = config.path(OPERATOR_PORT_FILE)
    write_private_file(port_file, f"{server.port}\n".encode(), overwrite=True)
    log.info(
        "operator listener on http://%s:%d (/metrics, /healthz, /readyz)",
        config.operator_host,
        server.port,
    )
    return server, probe


async def stop_operator(started: tuple[OperatorServer, StoreProbe] | None) -> None:
    """Close what :func:`start_operator` started (None: nothing)."""
    if started is None:
        return
    server, probe = started
    await server.close()
    probe.close()
