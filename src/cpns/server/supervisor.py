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
* The operator endpoint of the group (metrics, health) belongs to the supervisor and is
  started by :func:`operator_endpoint`, the one place for it.

Several workers need PostgreSQL: over SQLite they would queue on the one file's write
lock and each fsync its own commits, slower than one process whose group commit shares
one fsync among all the requests in flight (docs/deployment.md).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Final

from cpns.errors import ConfigurationError
from cpns.server.config import ServerConfig
from cpns.store.postgres import is_dsn

__all__ = ["MAX_WORKERS", "operator_endpoint", "supervise"]

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


@contextlib.contextmanager
def operator_endpoint(config: ServerConfig, *, workers: int) -> Iterator[None]:
    """The operator endpoint (metrics, health) of a group of ``workers`` processes.

    Entered once by the supervisor after the workers started and left after they stopped.
    No such endpoint is configured in this version, so nothing is served here; a single
    server process (``--workers 1``) has no supervisor and serves its own.
    """
    del config, workers
    yield


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
    from cpns.server.main import bind_listener, open_store

    check_workers(config, workers)
    open_store(config).close()  # migrations once, and a clear error before any fork
    sock = bind_listener(config)
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    running: dict[int, _Worker] = {}
    delay = 0.0

    def start(slot: int) -> None:
        # Our own `cpns` with sys.executable; argv holds only the data directory and fd.
        command = _worker_command(config, sock.fileno(), log_json=log_json)
        process = subprocess.Popen(command, pass_fds=(sock.fileno(),))  # noqa: S603
        running[slot] = _Worker(slot, process, time.monotonic())
        log.info("worker %d started (pid %d)", slot, process.pid)

    try:
        for slot in range(workers):
            start(slot)
        (config.data_dir / "server.port").write_text(f"{port}\n")
        _write_pids(config, running)
        log.info(
            "CPNS Server %s: %d workers on https://%s:%d",
            config.server_id,
            workers,
            config.host,
            port,
        )
        with operator_endpoint(config, workers=workers):
            while not stopping:
                time.sleep(_POLL)
                for slot, worker in list(running.items()):
                    code = worker.process.poll()
                    if code is None or stopping:
                        continue
                    lived = time.monotonic() - worker.started
                    delay = (
                        0.0
                        if lived >= STABLE_AFTER
                        else min(MAX_RESTART_DELAY, max(0.5, delay * 2))
                    )
                    log.warning(
                        "worker %d (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                        slot,
                        worker.process.pid,
                        code,
                        lived,
                        delay,
                    )
                    _sleep_unless(lambda: stopping, delay)
                    if not stopping:
                        start(slot)
                        _write_pids(config, running)
            _stop_all(running)
    finally:
        for worker in running.values():
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        (config.data_dir / "server.workers").unlink(missing_ok=True)
        log.info("CPNS Server stopped (%d workers)", workers)
    return 0


def _sleep_unless(stop: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop():
        time.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))


def _write_pids(config: ServerConfig, running: dict[int, _Worker]) -> None:
    """``server.workers``: one worker pid a line, in slot order (for operators and tests)."""
    lines = "".join(f"{running[s].process.pid}\n" for s in sorted(running))
    path = config.data_dir / "server.workers"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(lines)
    tmp.replace(path)


def _stop_all(running: dict[int, _Worker]) -> None:
    """SIGTERM to every worker, then wait; SIGKILL to those still up after STOP_TIMEOUT."""
    for worker in running.values():
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for worker in running.values():
        try:
            worker.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning(
                "worker %d (pid %d) did not stop; killing it", worker.slot, worker.process.pid
            )
            worker.process.kill()
            worker.process.wait()
