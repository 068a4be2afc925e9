"""``cpns server``: initialise a data directory and run the HTTPS server.

The data directory holds ``server.toml``, the master key (0600), the SQLite database (unless
``database`` in server.toml is a PostgreSQL URL) and the TLS files. ``init`` creates them;
``run`` opens the store (applying schema migrations), wraps it in the service and the ASGI
app, and serves it with uvicorn over TLS 1.3 only. When the port is 0 the bound port is
written to ``server.port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import uvicorn

from cpns import metrics
from cpns.config import dump_toml
from cpns.crypto.kdf import derive_key
from cpns.errors import ConfigurationError
from cpns.protocol.digest import DigestAlgorithm, DigestServer
from cpns.protocol.key_assignment import AssignmentPolicy
from cpns.runtime import SystemRandom, run_event_loop, wall_time
from cpns.server.app import CPNSApp
from cpns.server.config import ServerConfig, load_server_config
from cpns.server.guard import AttemptGuard, GuardLimits
from cpns.server.health import start_operator, stop_operator
from cpns.server.http import ListenerLimits, effective_limits, listener_protocol
from cpns.server.service import CPNSService
from cpns.server.tls import generate_self_signed
from cpns.store.base import WriteTx
from cpns.store.masterkey import MasterKey, write_private_file
from cpns.store.postgres import is_dsn, redact_dsn
from cpns.store.sql import SQLStore

__all__ = ["build_app", "build_guard", "housekeeping", "init_server", "open_store", "run_server"]

log = logging.getLogger("cpns.server")

#: Seconds a stopping server lets requests in flight finish before it closes connections.
_SHUTDOWN_GRACE: Final = 5


def init_server(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8443,
    cert: Path | None = None,
    key: Path | None = None,
    server_id: str = "cpns-server",
    realm: str = "cpns",
    digest_algorithms: tuple[str, ...] = ("SHA-256",),
    database: str | None = None,
) -> ServerConfig:
    """Create a data directory: configuration, master key, TLS files and database.

    ``database`` is a PostgreSQL URL (the database must exist; its tables are created
    now) or a SQLite file name; None keeps the default SQLite file ``cpns.db``. A URL is
    written to ``server.toml``, which is then 0600 since the URL may hold a password.
    """
    if (data_dir / "server.toml").exists():
        raise ConfigurationError(f"{data_dir} is already initialised (server.toml exists)")
    if (cert is None) != (key is None):
        raise ConfigurationError("give both --cert and --key, or neither")
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    settings: dict[str, object] = {
        "host": host,
        "port": port,
        "server_id": server_id,
        "realm": realm,
        "digest_algorithms": digest_algorithms,
    }
    if cert is not None and key is not None:
        settings["cert_file"] = str(cert.resolve())
        settings["key_file"] = str(key.resolve())
    if database is not None:
        if "://" in database and not is_dsn(database):
            raise ConfigurationError(
                "--database takes a postgresql:// URL or a SQLite file name, got "
                + redact_dsn(database)
            )
        settings["database"] = database
    config = ServerConfig(data_dir=data_dir, **settings)  # type: ignore[arg-type]
    if cert is None:
        generate_self_signed(
            config.path(config.cert_file), config.path(config.key_file), common_name=server_id
        )
    MasterKey.generate(config.path(config.master_key_file))
    try:
        # Create the schema before server.toml exists: a database that cannot be reached
        # leaves no half-initialised directory behind (init can simply be run again).
        open_store(config).close()
    except BaseException:
        created = [config.master_key_file]
        if cert is None:
            created += [config.cert_file, config.key_file]
        for name in created:
            config.path(name).unlink(missing_ok=True)
        raise
    # 0600 from its first byte: a PostgreSQL URL in it may carry a password.
    write_private_file(data_dir / "server.toml", dump_toml(settings).encode(), overwrite=False)
    return config


def master_key(config: ServerConfig) -> MasterKey:
    """The master key from CPNS_MASTER_KEY, else from the configured 0600 file."""
    if os.environ.get("CPNS_MASTER_KEY"):
        return MasterKey.from_env()
    return MasterKey.load(config.path(config.master_key_file))


def open_store(config: ServerConfig) -> SQLStore:
    """Open (and migrate) the server database."""
    return SQLStore.open(config.store_target(), master_key=master_key(config))


def build_guard(config: ServerConfig, store: SQLStore) -> AttemptGuard:
    """The guessing guard and refusal audit aggregator with the configured limits."""
    return AttemptGuard(
        store,
        GuardLimits(
            per_user_source=config.max_auth_failures_per_user_source,
            per_source=config.max_auth_failures_per_source,
            per_user=config.max_auth_failures,
            window=config.auth_failure_window,
        ),
    )


def build_app(
    config: ServerConfig,
    store: SQLStore,
    *,
    clock: Callable[[], int] = wall_time,
    guard: AttemptGuard | None = None,
) -> CPNSApp:
    """Wire the service, the Digest verifier and the ASGI app over ``store``."""
    rng = SystemRandom()
    policy = AssignmentPolicy(
        server_id=config.server_id,
        time_window=config.time_window,
        chain_length=config.chain_length,
        max_auth_failures=config.max_auth_failures,
        auth_failure_window=config.auth_failure_window,
    )
    # Every server process sharing the master key accepts the others' Digest nonces.
    nonce_key = derive_key(master_key(config).key, salt=b"", label="cpns/v1/digest-nonce-key")
    digest = DigestServer(
        realm=config.realm,
        nonce_key=nonce_key,
        algorithms=tuple(DigestAlgorithm(a) for a in config.digest_algorithms),
        nc_window=config.digest_nc_window,
        # The nc replay guard lives in the database, shared by every server process.
        nc_in_memory=False,
    )
    guard = guard or build_guard(config, store)
    # A PostgreSQL read is a network round trip: off the event loop. A SQLite read is a
    # page-cache hit, cheaper than handing it to a thread.
    offload = store.backend == "postgresql"
    service = CPNSService(
        store=store, policy=policy, rng=rng, clock=clock, guard=guard, offload_reads=offload
    )
    return CPNSApp(
        service=service, store=store, digest=digest, rng=rng, clock=clock, offload_reads=offload
    )


def listener_limits(config: ServerConfig) -> ListenerLimits:
    """The HTTPS listener's limits from ``server.toml``, the total connection cap lowered
    to what the open-file limit allows."""
    try:
        limits = ListenerLimits(
            request_timeout=config.request_timeout,
            keep_alive_timeout=config.keep_alive_timeout,
            max_header_bytes=config.max_header_bytes,
            max_connections=config.max_connections,
            max_connections_per_source=config.max_connections_per_source,
        )
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    return effective_limits(limits)


def _tls_context(config: ServerConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3  # 004 §5.x.4 + DESIGN §2
    context.load_cert_chain(config.path(config.cert_file), config.path(config.key_file))
    return context


class _Server(uvicorn.Server):
    """uvicorn's server with our own signal handling (graceful stop, then store close)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Signals are handled by :func:`run_server` through the event loop."""
        yield


def _purge_audit(tx: WriteTx, *, before: int) -> int:
    return tx.purge_audit(before=before)


async def housekeeping(
    store: SQLStore, guard: AttemptGuard, config: ServerConfig, *, now: int
) -> int:
    """Flush the guard, purge expired nonces/replies/counters and audit events older than
    ``audit_retention_days`` (D-SRV-2); return how many rows were purged."""
    await guard.flush()
    removed = await asyncio.to_thread(store.purge_expired, now=now)
    before = now - config.audit_retention_days * 86400
    removed += await store.write_async(functools.partial(_purge_audit, before=before))
    return removed


async def _purge_loop(
    store: SQLStore, interval: float, *, guard: AttemptGuard, config: ServerConfig
) -> None:
    # The guard's counters and refusal aggregates are flushed every audit_flush_interval
    # seconds; expired rows and audit events past the retention go every ``interval``.
    last_purge = wall_time()
    while True:
        await asyncio.sleep(config.audit_flush_interval)
        if wall_time() - last_purge < interval:
            await guard.flush()
            continue
        last_purge = wall_time()
        removed = await housekeeping(store, guard, config, now=last_purge)
        if removed:
            log.info("purged %d expired nonces, replies and audit events", removed)


def bind_listener(config: ServerConfig) -> socket.socket:
    """The server's TCP socket, bound to the configured host and port (not listening yet).

    Raises: ConfigurationError: the address cannot be bound (in use, not local, ...).
    """
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        ) from None
    return sock


async def run_server(
    config: ServerConfig,
    *,
    on_ready: Callable[[int], None] | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM. ``on_ready`` gets the bound port.

    ``sock``: a socket a supervisor bound (and shares with its other workers,
    :mod:`cpns.server.supervisor`); the port file is then the supervisor's to write.
    """
    store = open_store(config)
    log.info("store: %s %s", store.backend, redact_dsn(config.store_target()))
    try:
        guard = build_guard(config, store)
        app = build_app(config, store, guard=guard)
        worker = sock is not None
        if sock is None:
            sock = bind_listener(config)
        port = sock.getsockname()[1]
        limits = listener_limits(config)
        log.info(
            "HTTPS limits: %d connections (%d per source), request timeout %gs, "
            "keep-alive %gs, headers %d bytes",
            limits.max_connections,
            limits.max_connections_per_source,
            limits.request_timeout,
            limits.keep_alive_timeout,
            limits.max_header_bytes,
        )
        # The listener does the TLS handshake itself, after its connection caps admitted
        # the connection and under its request timeout (cpns.server.http): uvicorn gets a
        # plain socket and our protocol class.
        uv_config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="on",
            http=listener_protocol(limits, _tls_context(config)),
            loop="none",
            timeout_keep_alive=config.keep_alive_timeout,
            timeout_graceful_shutdown=_SHUTDOWN_GRACE,
        )
        uv_config.load()
        server = _Server(uv_config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        operator = await start_operator(config, store, stopping=lambda: server.should_exit)
        purge = asyncio.create_task(_purge_loop(store, 60.0, guard=guard, config=config))
        if not worker:
            (config.data_dir / "server.port").write_text(f"{port}\n")
        log.info("CPNS Server %s listening on https://%s:%d", config.server_id, config.host, port)
        if on_ready is not None:
            loop.call_later(0.05, on_ready, port)
        try:
            await server.serve(sockets=[sock])
        finally:
            await stop_operator(operator)
            purge.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purge
            await guard.flush()  # what was counted since the last flush survives a stop
            sock.close()
    finally:
        store.close()
        log.info("CPNS Server stopped")


def serve_forever(
    data_dir: Path, *, workers: int = 1, listen_fd: int | None = None, log_json: bool = False
) -> int:
    """Entry point of ``cpns server run``; returns the exit code.

    ``workers`` > 1: a supervisor and that many worker processes on one socket
    (:mod:`cpns.server.supervisor`). ``listen_fd``: this process is such a worker, serving
    on the supervisor's socket inherited as that file descriptor.
    """
    config = load_server_config(data_dir)
    if listen_fd is not None:
        try:
            metrics.check_worker()
        except RuntimeError as exc:
            raise ConfigurationError(str(exc)) from None
        sock = socket.socket(fileno=listen_fd)
        run_event_loop(run_server(config, sock=sock))
        return 0
    if workers != 1:
        from cpns.server.supervisor import supervise

        return supervise(config, workers=workers, log_json=log_json)
    run_event_loop(run_server(config))
    return 0
