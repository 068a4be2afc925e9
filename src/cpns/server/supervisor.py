"""``cpns server run --workers N``: one socket, N worker processes, one supervisor.

Theory of operation
-------------------
The supervisor binds the listening socket once (so the port is known and held before any
worker exists), applies the schema migrations once, and starts N workers: each is
``cpns server run`` started again with the socket inherited as a file descriptor
(``--listen-fd``, not for operators), running the whole server (TLS listener, service,
store connections, guard flushes, purges) on its own event loop. The kernel hands each
new connection to one of the workers accepting on the shared socket.

No worker holds state another needs: pending procedure state, the Digest ``nc`` replay
guard, idempotent-retry replies, used random values and the attempt counters are rows of
the one database (docs/deployment.md, "What state lives where"), so a request may land on
any worker, and a worker that dies loses only the requests it had not answered.

* A worker that exits while the supervisor is not stopping is started again, after a
  pause that doubles (up to :data:`MAX_RESTART_DELAY`) while workers keep dying within
  :data:`STABLE_AFTER` seconds of their start, so a broken configuration does not spin.
* SIGTERM or SIGINT to the supervisor: it forwards SIGTERM to every worker (each finishes
  its requests in flight and flushes its counters, as a single server does), waits for
  them, and kills those still running after :data:`STOP_TIMEOUT` seconds.
* The operator endpoint of the group (metrics summed over the workers, health, readiness
  on the shared database) belongs to the supervisor and is started by
  :func:`operator_endpoint`, the one place for it; the workers run with
  ``operator_port = 0`` (docs/metrics.md).

Several workers need PostgreSQL: over SQLite they would queue on the one file's write
lock and each fsync its own commits, slower than one process whose group commit shares
one fsync among all the requests in flight (docs/deployment.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

from cpns.errors import ConfigurationError
from cpns.server.config import ServerConfig
from cpns.store.postgres import is_dsn

__all__ = ["MAX_WORKERS", "check_workers", "operator_endpoint", "supervise"]

log = logging.getLogger("cpns.server.supervisor")

#: Most worker processes one supervisor starts.
MAX_WORKERS: Final = 64
#: Seconds a worker must live for its exit not to count as a crash loop.
STABLE_AFTER: Final = 10.0
#: Longest pause before restarting a worker that keeps dying.
MAX_RESTART_DELAY: Final = 30.0
#: Seconds the workers get to stop after SIGTERM before they are killed.
STOP_TIMEOUT: Final = 20.0
#: Listen backlog of the shared socket (connections waiting for a worker's accept).
BACKLOG: Final = 2048
_POLL: Final = 0.2


@dataclass
class _Worker:
    slot: int
    process: subprocess.Popen[bytes]
    started: float


def check_workers(config: ServerConfig, workers: int) -> None:
    """Refuse a worker count this configuration cannot run.

    Raises: ConfigurationError: ``workers`` out of 1..MAX_WORKERS, or > 1 on SQLite.
    """
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigurationError(f"--workers must be 1..{MAX_WORKERS}, got {workers}")
    if workers > 1 and not is_dsn(config.store_target()):
        raise ConfigurationError(
            "--workers above 1 needs a PostgreSQL database: on SQLite the processes would "
            "queue on the file's single write lock (one process with group commit is "
            "faster); see 'Several server processes' in docs/deployment.md"
        )


#: The supervisor's multiprocess metrics directory, under the data directory.
METRICS_DIR: Final = "metrics-workers"


@contextlib.asynccontextmanager
async def operator_endpoint(
    config: ServerConfig, *, workers: int, stopping: Callable[[], bool]
) -> AsyncIterator[dict[str, str]]:
    """The operator endpoint (metrics, health) of a group of ``workers`` processes.

    The one place where the supervisor deals with it; entered before the first worker
    starts and left after the last one stopped. Yields the environment every worker gets:
    ``operator_port = 0``, so that only the supervisor binds the operator port. When
    ``operator_port`` is set, the workers count into a fresh multiprocess directory
    (``<data_dir>/metrics-workers``, :func:`cpns.metrics.prepare_multiprocess`) and the
    supervisor serves the sum of their metrics and a readiness probe on the shared
    database (:func:`cpns.server.health.start_operator`, docs/metrics.md).

    Raises: ConfigurationError: the operator port cannot be bound.
    """
    from cpns import metrics
    from cpns.server.health import start_operator, stop_operator
    from cpns.server.main import open_store

    env = {"CPNS_SERVER_OPERATOR_PORT": "0"}
    if config.operator_port == 0:
        yield env
        return
    metrics.prepare_multiprocess(config.path(METRICS_DIR))
    store = await asyncio.to_thread(open_store, config)
    try:
        started = await start_operator(config, store, stopping=stopping)
        try:
            log.info("operator listener of %d workers started", workers)
            yield env
        finally:
            await stop_operator(started)
    finally:
        store.close()


def _worker_command(config: ServerConfig, fd: int, *, log_json: bool) -> list[str]:
    args = [sys.executable, "-m", "cpns.cli.main", "server", "run"]
    args += ["--data-dir", str(config.data_dir), "--listen-fd", str(fd)]
    return [*args, "--log-json"] if log_json else args


def supervise(config: ServerConfig, *, workers: int, log_json: bool = False) -> int:
    """Run ``workers`` worker processes on one socket until SIGTERM/SIGINT; exit code 0.

    Raises: ConfigurationError: see :func:`check_workers`, or the port cannot be bound,
    or the database cannot be opened and migrated.
    """
    # Imported here: the supervisor process itself needs none of the server's machinery
    # unless it runs.
    from cpns.runtime import run_event_loop
    from cpns.server.main import bind_listener, open_store

    check_workers(config, workers)
    open_store(config).close()  # migrations once, and a clear error before any worker
    sock = bind_listener(config)
    try:
        sock.listen(BACKLOG)
        sock.set_inheritable(True)
        run_event_loop(_Supervisor(config, workers, sock, log_json=log_json).run())
    finally:
        sock.close()
        (config.data_dir / "server.workers").unlink(missing_ok=True)
        log.info("CPNS Server stopped (%d workers)", workers)
    return 0


class _Supervisor:
    """The supervisor's event loop: start, watch, restart and stop the workers."""

    def __init__(
        self, config: ServerConfig, workers: int, sock: socket.socket, *, log_json: bool
    ) -> None:
        self._config = config
        self._workers = workers
        self._sock = sock
        self._log_json = log_json
        self._running: dict[int, _Worker] = {}
        self._stop = asyncio.Event()
        self._delay = 0.0

    def _start(self, slot: int, env: dict[str, str]) -> None:
        fd = self._sock.fileno()
        # Our own `cpns` with sys.executable; argv holds only the data directory and fd.
        command = _worker_command(self._config, fd, log_json=self._log_json)
        process = subprocess.Popen(  # noqa: S603
            command, pass_fds=(fd,), env={**os.environ, **env}
        )
        self._running[slot] = _Worker(slot, process, time.monotonic())
        log.info("worker %d started (pid %d)", slot, process.pid)

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` or until a stop is asked, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def run(self) -> None:
        config = self._config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            async with operator_endpoint(
                config, workers=self._workers, stopping=self._stop.is_set
            ) as env:
                try:
                    for slot in range(self._workers):
                        self._start(slot, env)
                    port = self._sock.getsockname()[1]
                    (config.data_dir / "server.port").write_text(f"{port}\n")
                    _write_pids(config, self._running)
                    log.info(
                        "CPNS Server %s: %d workers on https://%s:%d",
                        config.server_id,
                        self._workers,
                        config.host,
                        port,
                    )
                    await self._watch(env)
                    await self._stop_all()
                finally:
                    self._kill_all()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _watch(self, env: dict[str, str]) -> None:
        """Restart workers that exit, until a stop is asked."""
        from cpns import metrics

        while not self._stop.is_set():
            await self._pause(_POLL)
            for slot, worker in list(self._running.items()):
                code = worker.process.poll()
                if code is None or self._stop.is_set():
                    continue
                metrics.worker_exited(worker.process.pid)
                lived = time.monotonic() - worker.started
                self._delay = (
                    0.0
                    if lived >= STABLE_AFTER
                    else min(MAX_RESTART_DELAY, max(0.5, self._delay * 2))
                )
                log.warning(
                    "worker %d (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                    slot,
                    worker.process.pid,
                    code,
                    lived,
                    self._delay,
                )
                await self._pause(self._delay)
                if not self._stop.is_set():
                    self._start(slot, env)
                    _write_pids(self._config, self._running)

    async def _stop_all(self) -> None:
        """SIGTERM to every worker, then wait; SIGKILL to those still up after STOP_TIMEOUT."""
        for worker in self._running.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and any(
            w.process.poll() is None for w in self._running.values()
        ):
            await asyncio.sleep(_POLL)
        for worker in self._running.values():
            if worker.process.poll() is None:
                log.warning(
                    "worker %d (pid %d) did not stop; killing it", worker.slot, worker.process.pid
                )

    def _kill_all(self) -> None:
        for worker in self._running.values():
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()


def _write_pids(config: ServerConfig, running: dict[int, _Worker]) -> None:
    """``server.workers``: one worker pid a line, in slot order (for operators and tests)."""
    lines = "".join(f"{running[s].process.pid}\n" for s in sorted(running))
    path = config.data_dir / "server.workers"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(lines)
    tmp.replace(path)
