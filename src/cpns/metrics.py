"""Operator metrics (Prometheus) and the operator listener: ``/metrics``, ``/healthz``,
``/readyz``.

Every metric of every program is defined here, once, with :mod:`prometheus_client`
(docs/metrics.md is the reference; a test checks that it names each one). The shells
record into them: :mod:`cpns.server.app` and :mod:`cpns.server.service` (requests,
outcomes, latency, Digest and password-proof failures, pending procedures),
:mod:`cpns.store.sql` (group-commit batches), :mod:`cpns.gateway.daemon` and
:mod:`cpns.gateway.upstream` (PAN links, upstream exchanges, assignments). The sans-I/O
core never imports this module.

Labels are bounded sets chosen by the code (a procedure name, an ErrorCode name, a reason
class, an HTTP status the server itself sends, a message type): never an Entity ID, a User
ID, an address or anything else a peer chooses, so a flood cannot grow the series.

The operator listener
---------------------
:func:`serve_operator` starts a small plain-HTTP/1.1 listener, separate from the protocol
port, that answers:

``GET /metrics``
    Prometheus text exposition (``text/plain; version=0.0.4``).
``GET /healthz``
    Liveness: 200 ``ok`` as long as the process's event loop answers.
``GET /readyz``
    Readiness for a load balancer: the program's ``ready`` coroutine decides (the server
    runs one real store query); 200 ``ready``, or 503 with the reason on one line. A check
    that takes longer than ``ready_timeout`` is 503 too.

It reads one request per connection (head at most 8 KiB, within 5 s) and closes, and
holds at most 32 connections at once. It has no TLS and no authentication: bind it to
loopback (the default) or a management network only.

Several processes
-----------------
One server process counts into the default :data:`prometheus_client.REGISTRY` and serves
it itself. With several worker processes over one database (``cpns server run --workers
N``), each worker counts into its own files and the supervisor serves their sum, through
prometheus_client's multiprocess mode:

1. the supervisor calls :func:`prepare_multiprocess` with an empty private directory
   *before it starts any worker*: it empties the directory and sets
   ``PROMETHEUS_MULTIPROC_DIR`` in its environment, which the workers inherit;
2. each worker must be a fresh interpreter (``subprocess``/exec, or the ``spawn`` start
   method; not a bare ``fork`` of a process that imported this module), because
   prometheus_client chooses file-backed values when it is first imported;
   :func:`multiprocess_dir` tells a worker whether it is in that mode, and
   :func:`check_worker` raises if the variable came too late for this interpreter;
3. workers do not serve an operator port; the supervisor calls :func:`serve_operator`
   with ``multiprocess_dir`` set, which collects every worker's files at each scrape;
4. when a worker exits, the supervisor calls :func:`worker_exited` with its pid, so its
   gauges (pending procedures) stop counting; its counters and histograms keep counting
   (a restarted worker does not make a counter go down).

Gauges are declared ``livesum`` (the sum over live processes). Gauges computed at scrape
time from a process's own state (``cpns_gateway_pending_*``) exist only in
single-process mode, which is how the gateway runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client import values as _values

__all__ = [
    "ALL_METRICS",
    "MULTIPROC_ENV",
    "OperatorServer",
    "Readiness",
    "check_worker",
    "multiprocess_dir",
    "prepare_multiprocess",
    "serve_operator",
    "worker_exited",
]

log = logging.getLogger("cpns.operator")

#: The environment variable naming prometheus_client's multiprocess directory.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

#: A readiness check: (ready, reason). The reason is sent with a 503 (one short line).
type Readiness = Callable[[], Awaitable[tuple[bool, str]]]

#: Latency buckets (seconds) of the request and exchange histograms: a commit is about a
#: millisecond, an exchange through the gateway some; retries and timeouts go to seconds.
_LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_COMMIT_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# -- CPNS Server ------------------------------------------------------------------------

#: Every CPNS message the service answered, by procedure and protocol status.
SERVER_REQUESTS: Final = Counter(
    "cpns_server_requests",
    "CPNS messages answered by the server, by procedure and protocol status (ErrorCode name).",
    ["procedure", "status"],
)
#: Time from a decoded message to its reply being ready (its commit included).
SERVER_REQUEST_DURATION: Final = Histogram(
    "cpns_server_request_duration_seconds",
    "Time to run one procedure step, from the decoded request to the reply (commit included).",
    ["procedure"],
    buckets=_LATENCY_BUCKETS,
)
#: Procedure steps running now (between decode and reply).
SERVER_PENDING: Final = Gauge(
    "cpns_server_pending_procedures",
    "Procedure steps in progress (decoded, reply not yet ready).",
    multiprocess_mode="livesum",
)
#: Retries answered with the stored reply of the same transaction.
SERVER_RETRIES_ANSWERED: Final = Counter(
    "cpns_server_retries_answered",
    "Retried transactions answered with the reply already sent (idempotent retries).",
    ["procedure"],
)
#: HTTP responses of the protocol listener, by route and HTTP status.
SERVER_HTTP_RESPONSES: Final = Counter(
    "cpns_server_http_responses",
    "HTTP responses of the protocol port, by route and HTTP status code.",
    ["route", "code"],
)
#: Digest verifications that failed, by reason class.
SERVER_DIGEST_FAILURES: Final = Counter(
    "cpns_server_digest_failures",
    "HTTP Digest authentications that failed, by reason class.",
    ["reason"],
)
#: Password proofs (User ID + password key) that did not verify.
SERVER_PASSWORD_PROOF_FAILURES: Final = Counter(
    "cpns_server_password_proof_failures",
    "Password proofs that did not verify (WRONG_PASSWORD, AUTHENTICATION_FAILED), by procedure.",
    ["procedure"],
)
#: Per-PNE outcomes of the procedures that handle many PNEs at once (PN Establishment).
SERVER_PNE_OUTCOMES: Final = Counter(
    "cpns_server_pne_outcomes",
    "Per-PNE outcomes of multi-PNE procedures, by procedure, flow and outcome (ErrorCode name).",
    ["procedure", "flow", "outcome"],
)

#: HTTPS connections of the protocol port open now (admitted by the caps).
SERVER_CONNECTIONS: Final = Gauge(
    "cpns_server_connections",
    "HTTPS connections of the protocol port open now.",
    multiprocess_mode="livesum",
)
#: Connections reset on accept because a cap was reached.
SERVER_CONNECTIONS_REFUSED: Final = Counter(
    "cpns_server_connections_refused",
    "HTTPS connections reset on accept, before any TLS work, by the cap reached.",
    ["reason"],
)
#: Connections the listener closed for a limit: handshake failed, request timeout, head.
SERVER_CONNECTIONS_CLOSED: Final = Counter(
    "cpns_server_connections_closed",
    "HTTPS connections closed by the listener's limits, by reason.",
    ["reason"],
)

# -- Server store (group commit) --------------------------------------------------------

#: Write functions per committed transaction (the group-commit gain).
STORE_COMMIT_BATCH: Final = Histogram(
    "cpns_store_commit_batch_size",
    "Write functions committed in one transaction by the group-commit writer.",
    ["backend"],
    buckets=_BATCH_BUCKETS,
)
#: Time of one group-commit transaction, BEGIN to COMMIT done.
STORE_COMMIT_DURATION: Final = Histogram(
    "cpns_store_commit_duration_seconds",
    "Time of one group-commit transaction, from BEGIN to the durable COMMIT.",
    ["backend"],
    buckets=_COMMIT_BUCKETS,
)
#: Transactions of the writer that failed as a whole (nothing of the batch committed).
STORE_COMMIT_FAILURES: Final = Counter(
    "cpns_store_commit_failures",
    "Group-commit transactions that failed as a whole (no write of the batch committed).",
    ["backend"],
)

# -- PN GW ------------------------------------------------------------------------------

#: PAN links open now.
GATEWAY_PAN_CONNECTIONS: Final = Gauge(
    "cpns_gateway_pan_connections",
    "PAN links (TCP connections from PNEs) open now.",
    multiprocess_mode="livesum",
)
#: PNEs with at least one attached link.
GATEWAY_ATTACHED_PNES: Final = Gauge(
    "cpns_gateway_attached_pnes",
    "PNEs attached now (a PNEHello accepted on a live link).",
    multiprocess_mode="livesum",
)
#: PAN connections refused at accept by a cap.
GATEWAY_PAN_REFUSED: Final = Counter(
    "cpns_gateway_pan_connections_refused",
    "PAN connections refused on accept, by the cap reached.",
    ["reason"],
)
#: Faults of PAN peers: undecodable frames, unexpected messages, timeouts, refused links.
GATEWAY_PAN_FAULTS: Final = Counter(
    "cpns_gateway_pan_peer_faults",
    "PAN links refused or closed for a peer's fault (bad frame, wrong message, timeout).",
)
#: Exchanges with the CPNS Server, by message type and outcome.
GATEWAY_UPSTREAM_EXCHANGES: Final = Counter(
    "cpns_gateway_upstream_exchanges",
    "Exchanges with the CPNS Server, by request type and outcome.",
    ["message", "outcome"],
)
#: Time of one exchange with the CPNS Server (retries and Digest challenge included).
GATEWAY_UPSTREAM_DURATION: Final = Histogram(
    "cpns_gateway_upstream_duration_seconds",
    "Time of one exchange with the CPNS Server, retries and Digest challenge included.",
    ["message"],
    buckets=_LATENCY_BUCKETS,
)
#: Extra HTTP tries after a connection error, timeout or 5xx.
GATEWAY_UPSTREAM_RETRIES: Final = Counter(
    "cpns_gateway_upstream_retries",
    "HTTP tries to the CPNS Server repeated after a connection error, timeout or 5xx.",
)
#: Outcomes of 003 EUKey assignment requests (the server's answer, or why none).
GATEWAY_ASSIGNMENTS: Final = Counter(
    "cpns_gateway_assignments",
    "EUKey assignment requests (003) completed, by status and the hop that decided.",
    ["status", "hop"],
)
#: PNEs' with-UI enrolment requests relayed (004 over the PAN), by what the PNE was sent.
GATEWAY_PNE_ENROLMENTS: Final = Counter(
    "cpns_gateway_pne_enrolments",
    "PNE enrolment requests (004, with UI) relayed, by status sent to the PNE and deciding hop.",
    ["status", "hop"],
)
#: EUKeys whose delivery a PNE proved (a verified acknowledgement).
GATEWAY_DELIVERIES: Final = Counter(
    "cpns_gateway_deliveries",
    "EUKeys delivered to a PNE and proven by its acknowledgement.",
)
#: PNE records written per key store journal write (the gateway's group-commit gain).
GATEWAY_STORE_COMMIT_BATCH: Final = Histogram(
    "cpns_gateway_store_commit_batch_size",
    "PNE records written with one durable journal append by the PN GW's key store.",
    buckets=_BATCH_BUCKETS,
)
#: Requests stored and not yet answered by the server (resent by the retry loop).
GATEWAY_PENDING_REQUESTS: Final = Gauge(
    "cpns_gateway_pending_requests",
    "EUKey assignment requests stored and not yet answered by the CPNS Server.",
    multiprocess_mode="livesum",
)
#: Key sets stored and not yet proven delivered.
GATEWAY_PENDING_DELIVERIES: Final = Gauge(
    "cpns_gateway_pending_deliveries",
    "EUKey sets received from the server and not yet proven delivered to their PNE.",
    multiprocess_mode="livesum",
)

#: Every metric above (the documentation test walks this).
ALL_METRICS: Final[tuple[Counter | Gauge | Histogram, ...]] = (
    SERVER_REQUESTS,
    SERVER_REQUEST_DURATION,
    SERVER_PENDING,
    SERVER_RETRIES_ANSWERED,
    SERVER_HTTP_RESPONSES,
    SERVER_DIGEST_FAILURES,
    SERVER_PASSWORD_PROOF_FAILURES,
    SERVER_PNE_OUTCOMES,
    SERVER_CONNECTIONS,
    SERVER_CONNECTIONS_REFUSED,
    SERVER_CONNECTIONS_CLOSED,
    STORE_COMMIT_BATCH,
    STORE_COMMIT_DURATION,
    STORE_COMMIT_FAILURES,
    GATEWAY_PAN_CONNECTIONS,
    GATEWAY_ATTACHED_PNES,
    GATEWAY_PAN_REFUSED,
    GATEWAY_PAN_FAULTS,
    GATEWAY_UPSTREAM_EXCHANGES,
    GATEWAY_UPSTREAM_DURATION,
    GATEWAY_UPSTREAM_RETRIES,
    GATEWAY_ASSIGNMENTS,
    GATEWAY_PNE_ENROLMENTS,
    GATEWAY_DELIVERIES,
    GATEWAY_STORE_COMMIT_BATCH,
    GATEWAY_PENDING_REQUESTS,
    GATEWAY_PENDING_DELIVERIES,
)


# -- several processes ------------------------------------------------------------------


def multiprocess_dir() -> Path | None:
    """The multiprocess directory this process counts into, or None (single process)."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def check_worker() -> None:
    """In a worker: make sure its counts reach the multiprocess directory.

    Raises:
        RuntimeError: ``PROMETHEUS_MULTIPROC_DIR`` is set but prometheus_client was
            imported before it was (a ``fork`` of a process that had imported it): this
            process would count in memory only, and the supervisor's sum would miss it.
    """
    if multiprocess_dir() is None:
        return
    if not getattr(_values.ValueClass, "_multiprocess", False):
        raise RuntimeError(
            f"{MULTIPROC_ENV} is set but prometheus_client was imported before it was: start "
            "workers as fresh interpreters after prepare_multiprocess (docs/metrics.md)"
        )


def prepare_multiprocess(directory: Path) -> None:
    """Make ``directory`` the (empty) multiprocess directory of the workers to come.

    Call it in the supervisor before it starts any worker: the files of an earlier run
    are removed (their counts would be added to this run's), and ``PROMETHEUS_MULTIPROC_DIR``
    is set in this process's environment, inherited by every worker started afterwards.
    The directory is created 0700 if missing.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)


def worker_exited(pid: int, directory: Path | None = None) -> None:
    """Tell the collector that worker ``pid`` is gone: its live gauges stop counting."""
    path = directory or multiprocess_dir()
    if path is not None:
        _multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def exposition(multiprocess: Path | None = None) -> bytes:
    """The text exposition: this process's registry, or the sum of the workers' files."""
    if multiprocess is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry, path=str(multiprocess))  # type: ignore[no-untyped-call]
    return generate_latest(registry)


# -- the operator listener --------------------------------------------------------------

#: Longest request head (request line and headers) the operator listener reads.
_MAX_HEAD: Final = 8192
#: Seconds a client has to send its request head.
_HEAD_TIMEOUT: Final = 5.0
#: Most operator connections served at once; more are closed on accept.
_MAX_CONNECTIONS: Final = 32
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class OperatorServer:
    """The running operator listener (from :func:`serve_operator`)."""

    def __init__(
        self,
        *,
        ready: Readiness,
        multiprocess: Path | None,
        ready_timeout: float,
    ) -> None:
        self._ready = ready
        self._multiprocess = multiprocess
        self._ready_timeout = ready_timeout
        self._server: asyncio.Server | None = None
        self._open = 0

    def __repr__(self) -> str:
        where = f"port {self.port}" if self._server is not None else "closed"
        return f"<OperatorServer {where}>"

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._server is None:
            raise RuntimeError("the operator listener is closed")
        return int(self._server.sockets[0].getsockname()[1])

    async def _start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, limit=_MAX_HEAD)

    async def close(self) -> None:
        """Stop listening and close open connections."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                server.close_clients()
            await server.wait_closed()

    async def readiness(self) -> tuple[bool, str]:
        """Run the ``ready`` check within ``ready_timeout``; a failure is (False, reason)."""
        try:
            async with asyncio.timeout(self._ready_timeout):
                return await self._ready()
        except TimeoutError:
            return False, f"readiness check took longer than {self._ready_timeout:g}s"
        except Exception as exc:  # a failing check is "not ready", never a crash
            return False, f"readiness check failed: {type(exc).__name__}"

    async def _answer(self, method: str, path: str) -> tuple[int, bytes, str]:
        if method not in ("GET", "HEAD"):
            return 405, b"use GET\n", "text/plain; charset=utf-8"
        if path == "/metrics":
            body = await asyncio.to_thread(exposition, self._multiprocess)
            return 200, body, CONTENT_TYPE_LATEST
        if path == "/healthz":
            return 200, b"ok\n", "text/plain; charset=utf-8"
        if path == "/readyz":
            ok, reason = await self.readiness()
            if ok:
                return 200, b"ready\n", "text/plain; charset=utf-8"
            line = " ".join(reason.split())[:200] or "not ready"
            return 503, f"not ready: {line}\n".encode(), "text/plain; charset=utf-8"
        return 404, b"not found\n", "text/plain; charset=utf-8"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= _MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._open += 1
        try:
            try:
                async with asyncio.timeout(_HEAD_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                status, body, ctype = 400, b"bad request\n", "text/plain; charset=utf-8"
                method = "GET"
            else:
                method = parts[0].decode("ascii", "replace")
                path = parts[1].split(b"?", 1)[0].decode("ascii", "replace")
                try:
                    status, body, ctype = await self._answer(method, path)
                except Exception as exc:  # one scrape never takes the program down
                    log.error("operator listener: %s %s failed: %s", method, path, exc)
                    status, body, ctype = 500, b"internal error\n", "text/plain; charset=utf-8"
            head_out = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head_out if method == "HEAD" else head_out + body)
            with contextlib.suppress(OSError):
                async with asyncio.timeout(_HEAD_TIMEOUT):
                    await writer.drain()
        except OSError:
            return
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()


async def _always_ready() -> tuple[bool, str]:
    return True, ""


async def serve_operator(
    host: str,
    port: int,
    *,
    ready: Readiness = _always_ready,
    multiprocess_dir: Path | None = None,
    ready_timeout: float = 2.0,
) -> OperatorServer:
    """Start the operator listener on ``host:port`` (0: any free port; see ``.port``).

    Args:
        ready: the readiness check behind ``/readyz``, run at each request.
        multiprocess_dir: serve the sum of the worker processes' metric files in this
            directory (see "Several processes" above); None serves this process's own.
        ready_timeout: seconds ``ready`` may take before ``/readyz`` answers 503.

    Raises:
        OSError: the address cannot be bound.
    """
    server = OperatorServer(ready=ready, multiprocess=multiprocess_dir, ready_timeout=ready_timeout)
    await server._start(host, port)
    return server
