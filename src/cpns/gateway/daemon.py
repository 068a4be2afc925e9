"""The PN GW daemon: enrolment, EUKey assignment for PNEs without UI (003), the PAN side.

Theory of operation
-------------------
The daemon is a thin asyncio shell around the sans-I/O machines of
:mod:`cpns.protocol.key_assignment` (STYLE §7). It holds three things:

* the **key store** (:class:`~cpns.store.keystore.LocalKeyStore` ``gateway``): its own
  EUKey, and per PNE (one sealed record file each, so a write costs the same with 2 PNEs
  or 2,000) the outstanding request and the received TK + EUKey set. It is the only state
  that matters: everything in memory can be rebuilt from it;
* the **PAN listener**: TCP, one framed CPNS message per frame
  (:mod:`cpns.transport.stream`). A PNE attaches with :class:`PNEHello` (``dst`` is the
  literal ``"pan"``: whichever PN GW answers the link) and the daemon keeps a routing
  table Entity ID -> live links (several: a hello proves nothing, so a new one never ends
  a live link, D-PAN-1). Timeouts and caps bound idle and excess links (D-PAN-3);
* the **control socket**: a Unix socket in the (0700) data directory speaking JSON lines,
  used by ``cpns gateway assign`` / ``status``. The password key travels over it; the
  password itself never reaches the daemon (the CLI derives the key).

The 003 PN GW role, step by step, with what is persisted *before* what depends on it
(DESIGN §6):

1. ``assign``: :meth:`EUKeyAssignmentGateway.start` builds the request. Its encoding is
   stored (``request``) **before** it is sent, so a restart resends the same bytes and the
   server, which keeps the reply of every transaction, answers with the same response.
2. The response is fed to the machine. On :class:`EUKeySetReceived` the TK, the set, the
   selected index and the txid are stored (``set``, ``delivered=False``) **before** the
   Notification goes to the PNE (003 §7.4.2.1.1.3 step 1 "SHALL store", then step 3).
3. The Notification is sent if the PNE is attached, else when it attaches; after a
   restart the machine is rebuilt with :meth:`EUKeyAssignmentGateway.resume`.
4. The PNE's acknowledgement (our D-003-4) is verified by the machine and
   ``delivered=True`` is stored. A duplicate or late Ack is harmless and ignored; an Ack
   that proves nothing (a refusal has no MAC) decides nothing (D-PAN-2).

A restart between any two steps therefore loses nothing: pending requests are resent at
start-up (and every ``retry_interval`` while the server is unreachable), pending
deliveries are offered again whenever the PNE (re)attaches.

Failures are typed and name the hop (DESIGN §5): the server's verdict is relayed
unchanged with hop ``server``; an unreachable server is ``UPSTREAM_UNAVAILABLE`` at
``gateway->server``; a wait that ends before the PNE proved receipt is ``TIMEOUT`` at
``device`` (a PNE's refusal is unauthenticated: reported as ignored). On the PAN link,
undecodable frames or unexpected messages get an :class:`ErrorMessage` and that link is
closed, with one bounded log line (D-PAN-4); nothing a peer sends can stop the daemon.

Logs carry Entity IDs, txids (hex) and status names, never keys, TKs or password keys.

Flows (docs/logging.md): each message sent or received is logged in one structured line
(:func:`cpns.flow.log_hop`) and carries the flow ID of the flow it belongs to. A PNE's
PNEHello brings the PNE's flow; an ``assign`` for an attached PNE continues that flow
(the PNE asked for a key), else the gateway starts one. The flow ID is stored with the
request and the key set, so a resend or a later delivery carries the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import logging
import os
import resource
import signal
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cpns import metrics
from cpns.errors import (
    AuthenticationFailed,
    ConfigurationError,
    DecodeError,
    ErrorCode,
    ProcedureRejected,
    StoreError,
    TransportError,
)
from cpns.flow import flow_bytes, flow_hex, log_hop, message_scope, new_flow, stamp
from cpns.gateway.config import OPERATOR_PORT_FILE, GatewayConfig
from cpns.gateway.upstream import HOP as UPSTREAM_HOP
from cpns.gateway.upstream import ServerClient, Upstream, UpstreamAuthFailed
from cpns.logs import current_flow, flow_scope
from cpns.messages.codec import decode, encode
from cpns.messages.constants import ID_PATTERN, TXID_LEN
from cpns.messages.model import (
    ErrorMessage,
    EUKeyAssignmentAck,
    EUKeyAssignmentRequest,
    EUKeyAssignmentResponse,
    Message,
    PNEHello,
    UserKeyAssignmentResponse,
)
from cpns.protocol._machine import Event, ProcedureFailed
from cpns.protocol.key_assignment import (
    EUKeyAssignmentGateway,
    EUKeyDelivered,
    EUKeySetReceived,
    GatewayState,
)
from cpns.protocol.user_key_assignment import EUKeyReceived, UserKeyAssignmentClient
from cpns.runtime import SystemRandom, wall_time
from cpns.store.keystore import LocalKeyStore
from cpns.store.masterkey import write_private_file
from cpns.transport.stream import peer_text, read_message, write_message
from cpns.types import EntityKind, Random

__all__ = [
    "PAN_ADDRESS",
    "STORE_NAME",
    "AssignResult",
    "GatewayDaemon",
    "enroll",
    "offline_status",
]

log = logging.getLogger("cpns.gateway")

#: Name of the gateway's key store in its data directory.
STORE_NAME: Final = "gateway"
#: Version of the store layout written by this module.
STORE_VERSION: Final = 1
#: Destination a PNE uses in PNEHello: "whichever PN GW answers this link".
PAN_ADDRESS: Final = "pan"
#: Seconds to let connection handlers finish at shutdown before cancelling them.
_SHUTDOWN_GRACE: Final = 2.0
#: Longest control request line, bytes.
_CONTROL_LIMIT: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class AssignResult:
    """Outcome of one ``assign``, as returned on the control socket."""

    #: Whether no party refused (the key may still await delivery: see ``stage``).
    ok: bool
    #: ErrorCode name: "OK", or the refusal (the server's verdict relayed unchanged).
    status: str
    #: Furthest step reached: "requested", "stored" (set stored) or "delivered" (acked).
    stage: str
    #: Who decided a failure: "server", "gateway", "gateway->server", "device"; None if ok.
    hop: str | None = None
    #: PNE Entity ID.
    pne_id: str = ""
    #: Transaction ID (hex): the correlation ID in every party's logs.
    txid: str = ""
    #: Acks for this delivery that proved nothing (refusals without a MAC, proofs that
    #: did not verify), ignored (D-PAN-2); reported with a TIMEOUT.
    unverified_acks: int = 0
    #: The status the last of those claimed (e.g. "AUTHENTICATION_FAILED"), or "".
    unverified_status: str = ""
    #: Flow ID (16 hex digits) of the assignment, for ``cpns trace``; "" if none.
    flow: str = ""

    def to_json(self) -> dict[str, object]:
        """The control-socket reply."""
        return {
            "ok": self.ok,
            "status": self.status,
            "stage": self.stage,
            "hop": self.hop,
            "pne_id": self.pne_id,
            "txid": self.txid,
            "unverified_acks": self.unverified_acks,
            "unverified_status": self.unverified_status,
            "flow": self.flow,
        }


def _nothing_pending() -> float:
    return 0.0


def _code_name(code: ErrorCode | int) -> str:
    return code.name if isinstance(code, ErrorCode) else str(code)


def _stage_of(record: dict[str, Any]) -> str:
    """Furthest step of a PNE record: requested (a request is outstanding), stored,
    delivered, or none (only a refusal on record)."""
    if "request" in record:
        return "requested"
    key_set = record.get("set")
    if key_set is None:
        return "none"
    return "delivered" if key_set["delivered"] else "stored"


def _status_view(data: dict[str, Any], *, attached: Collection[str]) -> dict[str, object]:
    """IDs, indexes and flags from a gateway store map; never key material."""
    pnes = []
    for pne_id, record in sorted(data.get("pnes", {}).items()):
        key_set = record.get("set")
        pnes.append(
            {
                "pne_id": pne_id,
                "stage": _stage_of(record),
                "user_id": (key_set or record.get("request") or {}).get("user_id"),
                "key_index": key_set["key_index"] if key_set else 0,
                "delivered": bool(key_set and key_set["delivered"]),
                "txid": key_set["txid"].hex() if key_set else None,
                "connected": pne_id in attached,
                "last_status": record.get("last_status"),
            }
        )
    return {
        "ok": True,
        "status": "OK",
        "entity_id": data.get("entity_id"),
        "user_id": data.get("user_id"),
        "enrolled": isinstance(data.get("eukey"), bytes),
        "attached": sorted(attached),
        "pnes": pnes,
    }


def _load_pne_records(store: LocalKeyStore, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The PNE records of a locked store. Records kept inside the main map by an earlier
    release (``pnes``) are moved out to their own files first, then dropped from the map.

    Raises StoreError."""
    legacy: dict[str, dict[str, Any]] = data.get("pnes", {})
    records = store.load_records()
    if legacy:
        for pne_id, record in legacy.items():
            if pne_id not in records:
                store.save_record(pne_id, record)
                records[pne_id] = record
        del data["pnes"]
        store.save(data)
    return records


def offline_status(data_dir: Path | str) -> dict[str, object]:
    """The gateway's state read from its store while the daemon is not running.

    Raises:
        StoreError: the store cannot be read.
    """
    data_dir = Path(data_dir)
    data: dict[str, Any] = {}
    if (data_dir / f"{STORE_NAME}.key").exists():  # a status query creates nothing
        store = LocalKeyStore.open_or_create(data_dir, STORE_NAME)
        data = store.load()
        data["pnes"] = {**data.get("pnes", {}), **store.load_records()}
    view = _status_view(data, attached=())
    view["running"] = False
    return view


# -- enrolment (004 §5.x.1) -----------------------------------------------------------------


async def enroll(
    config: GatewayConfig,
    user_id: str,
    password_key: bytes,
    *,
    upstream: Upstream | None = None,
    rng: Random | None = None,
    clock: Callable[[], int] = wall_time,
) -> None:
    """Obtain the gateway's own EUKey from the server and store it (004 §5.x.1).

    Runs :class:`UserKeyAssignmentClient` (no Digest: the password proof is inside the
    request). The store keeps any PNE records it already had; re-enrolling replaces the
    EUKey only.

    Raises:
        ProcedureRejected: the server refused (its status), or its answer did not verify.
        TransportError: the server is unreachable.
        StoreError: the key store is in use by a running daemon, or cannot be written.
        ConfigurationError: the data directory belongs to another Entity ID.
    """
    with flow_scope(new_flow()):  # the PN GW starts its own enrolment flow
        await _enroll(config, user_id, password_key, upstream=upstream, rng=rng, clock=clock)


async def _enroll(
    config: GatewayConfig,
    user_id: str,
    password_key: bytes,
    *,
    upstream: Upstream | None,
    rng: Random | None,
    clock: Callable[[], int],
) -> None:
    rng = rng if rng is not None else SystemRandom()
    store = LocalKeyStore.open_or_create(config.data_dir, STORE_NAME)
    with store.lock():
        data = store.load()
        if data.get("entity_id") not in (None, config.entity_id):
            raise ConfigurationError(
                f"{config.data_dir} belongs to gateway {data['entity_id']!r}, "
                f"not {config.entity_id!r}"
            )
        machine = UserKeyAssignmentClient(
            entity_id=config.entity_id,
            entity_kind=EntityKind.PN_GW,
            server_id=config.server_id,
            rng=rng,
        )
        machine.start(user_id=user_id, password_key=password_key, now=clock())
        (request,) = machine.messages_to_send()
        request = stamp(request)
        log.info(
            "enrolling %s for user %s (txid %s)", config.entity_id, user_id, request.txid.hex()
        )
        owned = upstream is None
        client: Upstream = (
            upstream
            if upstream is not None
            else ServerClient(
                server_url=config.server_url,
                ca_file=config.ca_file,
                entity_id=config.entity_id,
                eukey=None,
                per_try_timeout=config.per_try_timeout,
                retries=config.retries,
            )
        )
        try:
            reply = await client.exchange(request)
        finally:
            if owned:
                assert isinstance(client, ServerClient)
                await client.aclose()
        hop = "gateway"
        if isinstance(reply, ErrorMessage):
            events = machine.fail(reply.status, "server answered with an ErrorMessage")
            hop = "server"
        else:
            if isinstance(reply, UserKeyAssignmentResponse) and reply.status is not ErrorCode.OK:
                hop = "server"  # the server's verdict; anything else we decided
            events = machine.receive(reply)
        for event in events:
            if isinstance(event, EUKeyReceived):
                data.update(
                    version=STORE_VERSION,
                    entity_id=config.entity_id,
                    user_id=user_id,
                    eukey=event.eukey,
                    server_id=config.server_id,
                    enrolled_at=clock(),
                )
                store.save(data)
                log.info("enrolled %s (txid %s)", config.entity_id, request.txid.hex())
                return
            if isinstance(event, ProcedureFailed):
                log.warning(
                    "enrolment of %s refused: %s at %s (%s)",
                    config.entity_id,
                    _code_name(event.code),
                    hop,
                    event.reason,
                )
                raise ProcedureRejected(event.code, event.reason, hop=hop)
        raise ProcedureRejected(ErrorCode.INTERNAL_ERROR, "no outcome", hop="gateway")


# -- the daemon -----------------------------------------------------------------------------


#: File descriptors kept free of PAN links: control connections, the server link's lanes,
#: the store's files, logs.
_FD_RESERVE: Final = 64
#: The fewest PAN links a daemon accepts, whatever its descriptor limit.
_MIN_LINKS: Final = 16


def _link_cap(configured: int) -> int:
    """``configured``, lowered so that PAN links can never use up the descriptors the
    control socket and the server link need (200 idle links once left the control socket
    unable to accept: issue 5 item 11)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - every Unix has it
        return configured
    if soft == resource.RLIM_INFINITY:
        return configured
    cap = max(_MIN_LINKS, int(soft) - _FD_RESERVE)
    if cap < configured:
        log.warning(
            "pan_max_links lowered from %d to %d: the descriptor limit is %d", configured, cap, soft
        )
        return cap
    return configured


class _LogBudget:
    """A token bucket for log lines caused by peers: up to ``burst`` lines at once, then
    ``rate`` lines per second; it counts the lines it refused so the next allowed line can
    say how many were left out."""

    def __init__(self, *, rate: float = 1.0, burst: int = 20) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last: float | None = None
        self._dropped = 0

    def take(self, now: float) -> tuple[bool, int]:
        """(whether a line may be written now, how many were refused since the last one)."""
        if self._last is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
            self._dropped += 1
            return False, 0
        self._tokens -= 1.0
        dropped, self._dropped = self._dropped, 0
        return True, dropped


class _Link:
    """One PAN connection; ``pne_id`` is set by its PNEHello."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        write_timeout: float | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.pne_id: str | None = None
        self._write_timeout = write_timeout
        peer = writer.get_extra_info("peername")
        #: The peer's address (host only), for logs and the per-source cap.
        self.peer: str = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        self._send_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<PAN link {self.name}>"

    @property
    def name(self) -> str:
        """The PNE ID it announced (already checked by the codec), or ``?``."""
        return self.pne_id or "?"

    async def send(self, message: Message, *, level: int = logging.INFO) -> bool:
        """Write one message; False if the peer is gone, or does not read it within the
        write timeout (the link is then closed: a peer that stops reading must not hold
        our buffers). It carries the current flow ID unless it has one, and is logged
        (at ``level``: refusals of a peer's frames at DEBUG, D-PAN-4)."""
        message = stamp(message)
        log_hop(log, "sent", message, "pne", level=level)
        async with self._send_lock:
            try:
                await asyncio.wait_for(write_message(self.writer, message), self._write_timeout)
            except TimeoutError:
                self.writer.transport.abort()
                return False
            except (OSError, RuntimeError):
                return False
        return True

    def close(self) -> None:
        self.writer.close()


class GatewayDaemon:
    """The PN GW daemon over one data directory.

    Use :meth:`run` from the CLI (signals, then a graceful stop), or :meth:`start` /
    :meth:`stop` from tests. ``upstream`` replaces the HTTPS :class:`ServerClient` (the
    caller then owns and closes it); ``rng`` and ``clock`` are the machines' randomness and
    wall clock.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        upstream: Upstream | None = None,
        rng: Random | None = None,
        clock: Callable[[], int] = wall_time,
    ) -> None:
        self._config = config
        self._store = LocalKeyStore.open_or_create(config.data_dir, STORE_NAME)
        self._upstream = upstream
        self._owns_upstream = upstream is None
        self._rng: Random = rng if rng is not None else SystemRandom()
        self._clock = clock
        self._data: dict[str, Any] = {}
        #: Per-PNE records (request, key set, last status), one sealed file each.
        self._pne_records: dict[str, dict[str, Any]] = {}
        self._eukey = b""
        self._pan: asyncio.Server | None = None
        self._control: asyncio.Server | None = None
        #: The operator listener (/metrics, /healthz, /readyz), if operator_port is set.
        self._operator: metrics.OperatorServer | None = None
        #: PNE ID -> its live PAN links, oldest first (several: a PNEHello proves nothing,
        #: so a new one never ends an existing link; bounded by pan_links_per_pne).
        self._routes: dict[str, list[_Link]] = {}
        #: PNE ID -> (txid, Acks for it that proved nothing): refusals without a MAC and
        #: proofs that did not verify, ignored but counted for the user (D-PAN-2).
        self._unverified: dict[str, tuple[bytes, int, str]] = {}
        self._deliveries: dict[str, EUKeyAssignmentGateway] = {}
        #: PNE ID -> flow ID (hex) of its latest PNEHello, while it is attached: an
        #: ``assign`` for it continues that flow.
        self._hello_flows: dict[str, str] = {}
        self._waiters: dict[str, list[tuple[bytes, asyncio.Future[AssignResult]]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: One lock per PNE record file: its writes never overlap (see _save).
        self._write_locks: dict[str, asyncio.Lock] = {}
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        #: Budget of log lines caused by PAN peers' faults.
        self._fault_log = _LogBudget()
        #: Open PAN links per source address, and their total (the caps, issue 5 item 11).
        self._per_source: dict[str, int] = {}
        self._open_links = 0
        #: ``pan_max_links`` lowered to what the descriptor limit allows (set by start).
        self._max_links = config.pan_max_links
        self._stop_requested = asyncio.Event()
        self._started = False

    def __repr__(self) -> str:
        return f"<GatewayDaemon {self._config.entity_id} {str(self._config.data_dir)!r}>"

    # -- lifecycle --------------------------------------------------------------------

    @property
    def config(self) -> GatewayConfig:
        """The configuration in use."""
        return self._config

    @property
    def pan_port(self) -> int:
        """The bound PAN TCP port (after :meth:`start`)."""
        if self._pan is None:
            raise RuntimeError("the daemon is not started")
        return int(self._pan.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Lock the store, bind the PAN and control listeners, resend pending requests.

        Raises:
            StoreError: another daemon holds the store, or it cannot be read.
            ConfigurationError: the gateway is not enrolled, or enrolled as another entity,
                a listener cannot be bound, or the server certificate file cannot be loaded.
        """
        if self._started:
            raise RuntimeError("already started")
        self._store.lock()
        self._started = True
        try:
            self._data = self._store.load()
            eukey = self._data.get("eukey")
            if not isinstance(eukey, bytes):
                raise ConfigurationError(
                    f"gateway in {self._config.data_dir} is not enrolled (cpns gateway enroll)"
                )
            if self._data.get("entity_id") != self._config.entity_id:
                raise ConfigurationError(
                    f"key store belongs to {self._data.get('entity_id')!r}, "
                    f"configuration says {self._config.entity_id!r}"
                )
            self._eukey = eukey
            self._pne_records = _load_pne_records(self._store, self._data)
            if self._upstream is None:
                self._upstream = ServerClient(
                    server_url=self._config.server_url,
                    ca_file=self._config.ca_file,
                    entity_id=self._config.entity_id,
                    eukey=eukey,
                    per_try_timeout=self._config.per_try_timeout,
                    retries=self._config.retries,
                    rng=self._rng,
                )
            self._max_links = _link_cap(self._config.pan_max_links)
            self._pan = await self._bind_pan()
            write_private_file(
                self._config.port_file, f"{self.pan_port}\n".encode(), overwrite=True
            )
            sock = self._config.control_socket
            # We hold the store lock, so no other daemon uses this socket: a leftover
            # file is from a crashed run.
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            try:
                self._control = await asyncio.start_unix_server(
                    self._handle_control, path=str(sock), limit=_CONTROL_LIMIT
                )
            except OSError as exc:  # e.g. a data directory path too long for AF_UNIX
                raise ConfigurationError(f"cannot create control socket {sock}: {exc}") from None
            os.chmod(sock, 0o600)  # the password key travels here: owner only
            await self._start_operator()
        except BaseException:
            await self.stop()
            raise
        self._spawn(self._retry_loop())
        if metrics.multiprocess_dir() is None:  # computed at scrape: single process only
            metrics.GATEWAY_PENDING_REQUESTS.set_function(self._pending_requests)
            metrics.GATEWAY_PENDING_DELIVERIES.set_function(self._pending_deliveries)
        log.info(
            "PN GW %s listening on PAN %s:%d, control %s",
            self._config.entity_id,
            self._config.pan_host,
            self.pan_port,
            self._config.control_socket,
        )

    async def _start_operator(self) -> None:
        """Start the operator listener if ``operator_port`` is set (ConfigurationError if
        it cannot be bound); its port goes to ``operator.port``."""
        host, port = self._config.operator_host, self._config.operator_port
        if port == 0:
            return
        try:
            self._operator = await metrics.serve_operator(
                host, port, ready=self._readiness, multiprocess_dir=metrics.multiprocess_dir()
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on operator {host}:{port}: {exc.strerror or exc}"
            ) from None
        write_private_file(
            self._config.data_dir / OPERATOR_PORT_FILE,
            f"{self._operator.port}\n".encode(),
            overwrite=True,
        )
        log.info("operator listener on http://%s:%d", host, self._operator.port)

    async def _readiness(self) -> tuple[bool, str]:
        """Ready while the PAN listener runs and no stop was asked for."""
        if not self._started or self._pan is None:
            return False, "not started"
        if self._stop_requested.is_set():
            return False, "stopping"
        return True, ""

    def _pending_requests(self) -> float:
        """Stored requests the server has not answered yet (a metric)."""
        return float(sum(1 for r in list(self._pne_records.values()) if "request" in r))

    def _pending_deliveries(self) -> float:
        """Stored key sets not yet proven delivered (a metric)."""
        return float(
            sum(
                1
                for r in list(self._pne_records.values())
                if r.get("set") is not None and not r["set"].get("delivered")
            )
        )

    def _remembered_pan_port(self) -> int:
        """The port picked by an earlier start with ``pan_port = 0``; 0 if none (or bad)."""
        try:
            text = self._config.pan_port_memo.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return 0
        return int(text) if text.isdigit() and 1 <= int(text) <= 65535 else 0

    async def _bind_pan(self) -> asyncio.Server:
        """Bind the PAN listener on the configured port, or for ``pan_port = 0`` on the
        port remembered from the first start (a free one then, remembered from now on), so
        that PNEs find a restarted gateway where they found it before.

        Raises ConfigurationError (the configured port cannot be bound)."""
        host, port = self._config.pan_host, self._config.pan_port
        if port == 0:
            remembered = self._remembered_pan_port()
            if remembered:
                try:
                    return await self._start_pan_server(host, remembered)
                except OSError as exc:
                    log.warning(
                        "PAN port %d (remembered) is not free (%s); picking another one: "
                        "PNEs configured with the old port must be told the new one",
                        remembered,
                        exc.strerror,
                    )
        try:
            server = await self._start_pan_server(host, port)
        except OSError as exc:
            raise ConfigurationError(f"cannot listen on PAN {host}:{port}: {exc}") from None
        if port == 0:
            bound = int(server.sockets[0].getsockname()[1])
            try:
                write_private_file(
                    self._config.pan_port_memo, f"{bound}\n".encode(), overwrite=True
                )
            except OSError as exc:
                log.warning("cannot remember PAN port %d: %s", bound, exc.strerror)
        return server

    async def _start_pan_server(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._handle_pan, host, port)

    def request_shutdown(self) -> None:
        """Ask :meth:`run` to stop (signal handlers and the ``shutdown`` op call this)."""
        self._stop_requested.set()

    async def wait_stopped(self) -> None:
        """Wait until a shutdown is requested."""
        await self._stop_requested.wait()

    async def stop(self) -> None:
        """Close the listeners and connections, cancel background work, release the lock."""
        if not self._started:
            return
        self._started = False
        for server in (self._pan, self._control):
            if server is not None:
                server.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        # Callers waiting for a delivery get the stage reached so far, now.
        for waiters in self._waiters.values():
            for _, fut in waiters:
                fut.cancel()
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            _, pending = await asyncio.wait(self._handlers, timeout=_SHUTDOWN_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for server in (self._pan, self._control):
            if server is not None:
                await server.wait_closed()
        self._pan = self._control = None
        if self._operator is not None:
            await self._operator.close()
            self._operator = None
        if metrics.multiprocess_dir() is None:  # a stopped daemon's records are not pending
            metrics.GATEWAY_PENDING_REQUESTS.set_function(_nothing_pending)
            metrics.GATEWAY_PENDING_DELIVERIES.set_function(_nothing_pending)
        if self._owns_upstream and isinstance(self._upstream, ServerClient):
            await self._upstream.aclose()
            self._upstream = None
        for path in (self._config.control_socket, self._config.port_file):
            with contextlib.suppress(OSError):
                path.unlink()
        self._store.unlock()
        log.info("PN GW %s stopped", self._config.entity_id)

    async def run(self, *, handle_signals: bool = True) -> None:
        """Start, serve until SIGTERM/SIGINT or a ``shutdown`` op, then stop gracefully."""
        loop = asyncio.get_running_loop()
        await self.start()
        installed: list[signal.Signals] = []
        try:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                        loop.add_signal_handler(sig, self.request_shutdown)
                        installed.append(sig)
            await self._stop_requested.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- store ------------------------------------------------------------------------

    def _pnes(self) -> dict[str, dict[str, Any]]:
        return self._pne_records

    async def _save(self, pne_id: str) -> None:
        """Persist one PNE's record (atomic, fsynced; O(1) in the number of PNEs).

        The record is copied on the event loop, so nothing changes under the writer; the
        write and its fsyncs run in a worker thread, so the loop serves other PNEs
        meanwhile. Writes of one PNE are serialised and each copies the record only once
        it is its turn, so the file always ends with the newest state, whatever order
        concurrent callers (an assignment, an Ack) come in.

        Raises StoreError."""
        async with self._write_locks.setdefault(pne_id, asyncio.Lock()):
            snapshot = copy.deepcopy(self._pne_records[pne_id])
            await asyncio.to_thread(self._store.save_record, pne_id, snapshot)

    def _lock_for(self, pne_id: str) -> asyncio.Lock:
        return self._locks.setdefault(pne_id, asyncio.Lock())

    def _new_machine(self) -> EUKeyAssignmentGateway:
        return EUKeyAssignmentGateway(
            gateway_id=self._config.entity_id,
            gateway_eukey=self._eukey,
            server_id=self._config.server_id,
            rng=self._rng,
        )

    # -- 003 PN GW role: request / response ---------------------------------------------

    async def assign(
        self,
        pne_id: str,
        user_id: str,
        password_key: bytes,
        *,
        claim_key: bytes,
        wait: float = 0.0,
    ) -> AssignResult:
        """Run the 003 PN GW role for ``pne_id``; wait up to ``wait`` s for delivery.

        ``claim_key`` stands for the claim code the user read from the PNE's label
        (:func:`cpns.protocol.key_assignment.claim_key`, deviations D-003-10).

        Never raises for protocol, transport or store failures: they come back as a
        refused :class:`AssignResult` naming the status and the hop.

        The assignment continues the flow of the PNE's PNEHello when the PNE is attached
        (it asked for a key), else starts a new flow; the result names it.
        """
        flow = self._hello_flows.get(pne_id) if pne_id in self._routes else None
        with flow_scope(flow or new_flow()):
            result = await self._assign(pne_id, user_id, password_key, claim_key, wait)
            return dataclasses.replace(result, flow=current_flow() or "")

    async def _assign(
        self, pne_id: str, user_id: str, password_key: bytes, claim_key: bytes, wait: float
    ) -> AssignResult:
        for value in (pne_id, user_id):
            if ID_PATTERN.fullmatch(value) is None:
                return AssignResult(
                    ok=False,
                    status="MALFORMED_MESSAGE",
                    stage="requested",
                    hop="gateway",
                    pne_id=pne_id,
                )
        if len(password_key) != 32 or len(claim_key) != 32:
            return AssignResult(
                ok=False,
                status="MALFORMED_MESSAGE",
                stage="requested",
                hop="gateway",
                pne_id=pne_id,
            )
        async with self._lock_for(pne_id):
            machine = self._new_machine()
            machine.start(
                pne_id=pne_id,
                user_id=user_id,
                password_key=password_key,
                claim_key=claim_key,
                now=self._clock(),
            )
            assert machine.request is not None
            request = stamp(machine.request)  # the stored bytes carry the flow ID
            record = self._pnes().setdefault(pne_id, {})
            previous = record.get("request")
            # Persist the request BEFORE sending it: a restart resends the same bytes.
            record["request"] = {
                "txid": request.txid,
                "encoded": encode(request),
                "user_id": user_id,
                "created_at": self._clock(),
            }
            try:
                await self._save(pne_id)
            except StoreError as exc:
                if previous is None:
                    record.pop("request", None)
                else:
                    record["request"] = previous
                log.error("cannot persist the request for %s: %s", pne_id, exc)
                return AssignResult(
                    ok=False,
                    status="INTERNAL_ERROR",
                    stage="requested",
                    hop="gateway",
                    pne_id=pne_id,
                    txid=request.txid.hex(),
                )
            log.info(
                "EUKey assignment for PNE %s (user %s) requested, txid %s",
                pne_id,
                user_id,
                request.txid.hex(),
            )
            waiter: asyncio.Future[AssignResult] | None = None
            if wait > 0:
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.setdefault(pne_id, []).append((request.txid, waiter))
            result = await self._complete_request(pne_id, machine)
        if waiter is None:
            return result
        try:
            if not result.ok or result.stage != "stored":
                return result
            await asyncio.wait({waiter}, timeout=wait)
            if waiter.done() and not waiter.cancelled():
                return waiter.result()
            if waiter.done():  # cancelled: the daemon stops; the stage reached so far
                return result
            return self._not_proven(result)
        finally:
            self._drop_waiter(pne_id, waiter)

    def _not_proven(self, stored: AssignResult) -> AssignResult:
        """D-PAN-2: ``--wait`` ran out before any PNE proved receipt with a MAC. The key is
        stored and offered again on every attach; what unauthenticated Acks claimed is
        reported as such, never as the outcome."""
        txid, count, claimed = self._unverified.get(stored.pne_id, (b"", 0, ""))
        if txid.hex() != stored.txid:
            count, claimed = 0, ""
        return dataclasses.replace(
            stored,
            ok=False,
            status="TIMEOUT",
            hop="device",
            unverified_acks=count,
            unverified_status=claimed,
        )

    def _drop_waiter(self, pne_id: str, waiter: asyncio.Future[AssignResult]) -> None:
        waiters = self._waiters.get(pne_id, [])
        self._waiters[pne_id] = [(t, f) for t, f in waiters if f is not waiter]
        if not self._waiters[pne_id]:
            del self._waiters[pne_id]
        if not waiter.done():
            waiter.cancel()

    def _resolve(self, pne_id: str, txid: bytes, result: AssignResult) -> None:
        for wanted, fut in self._waiters.get(pne_id, []):
            if wanted == txid and not fut.done():
                fut.set_result(result)

    async def _complete_request(self, pne_id: str, machine: EUKeyAssignmentGateway) -> AssignResult:
        """Send the machine's (persisted) request, feed the answer, store, notify; the
        outcome is counted in ``cpns_gateway_assignments``."""
        result = await self._exchange_request(pne_id, machine)
        metrics.GATEWAY_ASSIGNMENTS.labels(result.status, result.hop or "none").inc()
        return result

    async def _exchange_request(self, pne_id: str, machine: EUKeyAssignmentGateway) -> AssignResult:
        (request,) = machine.messages_to_send()
        assert isinstance(request, EUKeyAssignmentRequest)
        request = stamp(request)  # the same bytes as stored: the flow is the same
        txid = request.txid.hex()
        assert self._upstream is not None
        try:
            reply = await self._upstream.exchange(request)
        except TransportError as exc:
            # The request stays stored: it is resent at start-up and by the retry loop.
            log.warning("txid %s for PNE %s: %s", txid, pne_id, exc)
            return AssignResult(
                ok=False,
                status="UPSTREAM_UNAVAILABLE",
                stage="requested",
                hop=UPSTREAM_HOP,
                pne_id=pne_id,
                txid=txid,
            )
        except AuthenticationFailed as exc:
            hop = exc.hop if isinstance(exc, UpstreamAuthFailed) else "server"
            log.warning(
                "txid %s for PNE %s: Digest failed at %s: %s", txid, pne_id, hop, exc.reason
            )
            return await self._refused(pne_id, request, ErrorCode.AUTHENTICATION_FAILED, hop)
        events: list[Event]
        hop = "gateway"
        if isinstance(reply, ErrorMessage):
            events = machine.fail(reply.status, "server answered with an ErrorMessage")
            hop = "server"
        else:
            if isinstance(reply, EUKeyAssignmentResponse) and reply.status is not ErrorCode.OK:
                hop = "server"  # DESIGN §5: the server's verdict, relayed unchanged
            events = machine.receive(reply)
        for event in events:
            if isinstance(event, ProcedureFailed):
                log.warning(
                    "txid %s for PNE %s refused: %s at %s (%s)",
                    txid,
                    pne_id,
                    _code_name(event.code),
                    hop,
                    event.reason,
                )
                return await self._refused(pne_id, request, event.code, hop)
            if isinstance(event, EUKeySetReceived):
                return await self._store_set(pne_id, request, event, machine)
        return await self._refused(pne_id, request, ErrorCode.INTERNAL_ERROR, "gateway")

    async def _refused(
        self, pne_id: str, request: EUKeyAssignmentRequest, code: ErrorCode | int, hop: str
    ) -> AssignResult:
        """A definitive refusal: forget the request (keep any earlier key set)."""
        record = self._pnes().setdefault(pne_id, {})
        if record.get("request", {}).get("txid") == request.txid:
            del record["request"]
        record["last_status"] = _code_name(code)
        with contextlib.suppress(StoreError):
            await self._save(pne_id)  # if this fails the request is resent later and refused again
        return AssignResult(
            ok=False,
            status=_code_name(code),
            stage="requested",
            hop=hop,
            pne_id=pne_id,
            txid=request.txid.hex(),
        )

    async def _store_set(
        self,
        pne_id: str,
        request: EUKeyAssignmentRequest,
        event: EUKeySetReceived,
        machine: EUKeyAssignmentGateway,
    ) -> AssignResult:
        """003 §7.4.2.1.1.3 step 1: store TK and [EUKeyPNE] BEFORE notifying the PNE."""
        txid = request.txid.hex()
        record = self._pnes().setdefault(pne_id, {})
        before = dict(record)
        record.pop("request", None)
        record["set"] = {
            "txid": request.txid,
            "user_id": event.user_id,
            "tk": event.tk,
            "eukeys": list(event.eukeys),
            "key_index": event.key_index,
            "epoch": event.epoch,
            "delivered": False,
            "stored_at": self._clock(),
            "flow": flow_bytes(current_flow()),
        }
        record["last_status"] = "OK"
        try:
            await self._save(pne_id)
        except StoreError as exc:
            record.clear()
            record.update(before)
            machine.messages_to_send()  # never send what is not stored
            log.error("txid %s: cannot store the key set of %s: %s", txid, pne_id, exc)
            return AssignResult(
                ok=False,
                status="INTERNAL_ERROR",
                stage="requested",
                hop="gateway",
                pne_id=pne_id,
                txid=txid,
            )
        log.info("txid %s: EUKey set for PNE %s stored (index %d)", txid, pne_id, event.key_index)
        self._deliveries[pne_id] = machine
        self._unverified.pop(pne_id, None)
        notification = machine.messages_to_send()
        # D-PAN-1: to every link announcing this PNE; it is sealed under the TK, so only
        # the real PNE can open it (and only its MAC-proved Ack counts).
        links = list(self._routes.get(pne_id, ()))
        for link in links:
            for message in notification:
                if await link.send(message):
                    log.info("txid %s: Notification sent to PNE %s (%s)", txid, pne_id, link.peer)
        if not links:
            log.info("txid %s: PNE %s not attached; delivery pending", txid, pne_id)
        return AssignResult(ok=True, status="OK", stage="stored", pne_id=pne_id, txid=txid)

    async def _retry_loop(self) -> None:
        """Resend stored requests now (start-up) and then every ``retry_interval``."""
        while True:
            for pne_id, record in list(self._pnes().items()):
                stored: dict[str, Any] | None = record.get("request")
                lock = self._lock_for(pne_id)
                if stored is None or lock.locked():
                    continue
                encoded: bytes = stored["encoded"]
                async with lock:
                    if record.get("request") is not stored:
                        continue
                    try:
                        request = decode(encoded)
                        if not isinstance(request, EUKeyAssignmentRequest):
                            raise DecodeError("not an EUKeyAssignmentRequest")
                    except DecodeError:
                        log.error("stored request for %s is unreadable; dropped", pne_id)
                        del record["request"]
                        with contextlib.suppress(StoreError):
                            await self._save(pne_id)
                        continue
                    machine = self._new_machine()
                    machine.resend(request)
                    with message_scope(request):
                        log.info("resending txid %s for PNE %s", request.txid.hex(), pne_id)
                        try:
                            await self._complete_request(pne_id, machine)
                        except Exception:
                            log.exception("resend for %s failed", pne_id)
            await asyncio.sleep(self._config.retry_interval)

    # -- 003 PN GW role: PAN side ----------------------------------------------------

    def _pending_set(self, pne_id: str) -> dict[str, Any] | None:
        key_set: dict[str, Any] | None = self._pnes().get(pne_id, {}).get("set")
        if key_set is None or key_set["delivered"]:
            return None
        return key_set

    def _delivery_machine(self, pne_id: str, key_set: dict[str, Any]) -> EUKeyAssignmentGateway:
        """The live machine awaiting this PNE's Ack, rebuilt from the store if needed."""
        machine = self._deliveries.get(pne_id)
        if machine is not None and machine.state is GatewayState.EXPECT_ACK:
            machine.renotify()
            return machine
        machine = self._new_machine()
        machine.resume(
            EUKeySetReceived(
                pne_id=pne_id,
                user_id=key_set["user_id"],
                tk=key_set["tk"],
                eukeys=tuple(key_set["eukeys"]),
                key_index=key_set["key_index"],
                epoch=key_set.get("epoch", 1),
            ),
            txid=key_set["txid"],
        )
        self._deliveries[pne_id] = machine
        return machine

    async def _offer_delivery(self, link: _Link, pne_id: str) -> None:
        key_set = self._pending_set(pne_id)
        if key_set is None:
            return
        machine = self._delivery_machine(pne_id, key_set)
        # The delivery belongs to the assignment's flow, not to the hello's.
        with flow_scope(flow_hex(key_set.get("flow")) or current_flow()):
            for message in machine.messages_to_send():
                if await link.send(message):
                    log.info(
                        "txid %s: Notification (re)sent to PNE %s", key_set["txid"].hex(), pne_id
                    )

    async def _refuse(self, link: _Link, code: ErrorCode, txid: bytes = bytes(TXID_LEN)) -> None:
        await link.send(
            ErrorMessage(
                txid=txid, src=self._config.entity_id, dst=link.pne_id or PAN_ADDRESS, status=code
            ),
            level=logging.DEBUG,
        )

    def _peer_fault(self, link: _Link, what: str, detail: str = "") -> None:
        """Log one bounded line about what a PAN peer did wrong (issue 5 items 10, 12).

        Peer-supplied text is cut and escaped (:func:`peer_text`), and these lines share a
        budget (:class:`_LogBudget`): a peer flooding bad frames costs a few log lines,
        then one summary of how many were left out. Every fault is counted in
        ``cpns_gateway_pan_peer_faults``, the ones left out of the log too."""
        metrics.GATEWAY_PAN_FAULTS.inc()
        allowed, dropped = self._fault_log.take(asyncio.get_running_loop().time())
        if not allowed:
            return
        log.warning(
            "PAN %s (%s): %s%s%s",
            link.name,
            link.peer,
            what,
            f": {peer_text(detail)}" if detail else "",
            f" ({dropped} more PAN fault lines left out)" if dropped else "",
        )

    async def _handle_pan(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        link = _Link(reader, writer, write_timeout=self._config.pan_frame_timeout)
        if not self._admit(link):
            writer.transport.abort()  # refused cheaply: no read, no reply, no wait
            return
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            while True:
                try:
                    message = await read_message(
                        reader,
                        idle_timeout=(
                            self._config.pan_hello_timeout
                            if link.pne_id is None
                            else self._config.pan_idle_timeout
                        ),
                        frame_timeout=self._config.pan_frame_timeout,
                    )
                except TimeoutError:
                    if link.pne_id is None:
                        self._peer_fault(link, "no PNEHello in time (pan_hello_timeout)")
                    else:  # the keep-alive ran out: the agent reconnects
                        log.info("PAN %s (%s): idle link closed", link.name, link.peer)
                    break
                except DecodeError as exc:
                    # Refused, logged in one bounded line; only this link ends.
                    self._peer_fault(link, "undecodable frame", exc.reason)
                    await self._refuse(link, exc.code)
                    break
                if message is None:
                    break
                try:
                    with message_scope(message):
                        keep = await self._on_pan_message(link, message)
                except Exception as exc:  # one frame never takes the daemon down
                    self._peer_fault(
                        link, f"{message.TYPE.name} not handled ({type(exc).__name__})"
                    )
                    log.debug("PAN %s: handler error", link.name, exc_info=True)
                    await self._refuse(link, ErrorCode.INTERNAL_ERROR, message.txid)
                    break
                if not keep:
                    break
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.info("PAN %s (%s): connection lost: %s", link.name, link.peer, exc)
        except Exception as exc:  # never let one connection take the daemon down
            self._peer_fault(link, f"link failed ({type(exc).__name__})")
            log.debug("PAN %s: link error", link.name, exc_info=True)
        finally:
            if link.pne_id is not None:
                self._detach(link)
            self._release(link)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
            self._handlers.discard(task)

    def _admit(self, link: _Link) -> bool:
        """Count a new PAN link against the caps; False (logged within the fault budget)
        when the total or its source address is at its cap (issue 5 item 11)."""
        if self._open_links >= self._max_links:
            metrics.GATEWAY_PAN_REFUSED.labels("pan_max_links").inc()
            self._peer_fault(link, f"refused: {self._max_links} PAN links open (pan_max_links)")
            return False
        if self._per_source.get(link.peer, 0) >= self._config.pan_max_links_per_source:
            metrics.GATEWAY_PAN_REFUSED.labels("pan_max_links_per_source").inc()
            self._peer_fault(link, "refused: too many links from this address")
            return False
        metrics.GATEWAY_PAN_CONNECTIONS.inc()
        self._open_links += 1
        self._per_source[link.peer] = self._per_source.get(link.peer, 0) + 1
        return True

    def _release(self, link: _Link) -> None:
        metrics.GATEWAY_PAN_CONNECTIONS.dec()
        self._open_links -= 1
        left = self._per_source.get(link.peer, 1) - 1
        if left > 0:
            self._per_source[link.peer] = left
        else:
            self._per_source.pop(link.peer, None)

    async def _on_pan_message(self, link: _Link, message: Message) -> bool:
        """Handle one message from a PAN link; False closes the link.

        The message's hop line (docs/logging.md) is written at INFO for what the gateway
        acts on (an accepted PNEHello, an Ack with a proof for an outstanding delivery),
        at DEBUG for what it refuses or ignores: those already cost a budgeted fault line,
        and no PAN peer may make the daemon write a line per frame (D-PAN-4)."""
        accepted = (
            link.pne_id is None
            and isinstance(message, PNEHello)
            and message.dst in (PAN_ADDRESS, self._config.entity_id)
            and len(self._routes.get(message.src, ())) < self._config.pan_links_per_pne
        )
        if not isinstance(message, EUKeyAssignmentAck) or link.pne_id is None:
            level = logging.INFO if accepted else logging.DEBUG
            log_hop(log, "received", message, "pne", level=level)
        if link.pne_id is None:
            if not isinstance(message, PNEHello):
                self._peer_fault(link, f"{message.TYPE.name} before PNEHello")
                await self._refuse(link, ErrorCode.UNEXPECTED_MESSAGE, message.txid)
                return False
            if message.dst not in (PAN_ADDRESS, self._config.entity_id):
                self._peer_fault(link, "PNEHello for another gateway", message.dst)
                await self._refuse(link, ErrorCode.WRONG_DESTINATION, message.txid)
                return False
            links = self._routes.setdefault(message.src, [])
            if len(links) >= self._config.pan_links_per_pne:
                # D-PAN-1: a PNEHello proves nothing, so it never ends a live link; the
                # newcomer is refused instead (stale links go at the keep-alive).
                self._peer_fault(
                    link, f"PNEHello refused: {len(links)} links already announce", message.src
                )
                await self._refuse(link, ErrorCode.NOT_AUTHORIZED, message.txid)
                return False
            link.pne_id = message.src
            if not links:
                metrics.GATEWAY_ATTACHED_PNES.inc()
            links.append(link)
            if message.flow is not None:
                self._hello_flows[message.src] = message.flow.hex()
            log.info(
                "PNE %s attached (holds key index %d; %d link(s))",
                message.src,
                message.key_index,
                len(links),
            )
            await self._offer_delivery(link, message.src)
            return True
        if isinstance(message, EUKeyAssignmentAck):
            return await self._on_ack(link, message)
        self._peer_fault(link, f"unexpected {message.TYPE.name}")
        await self._refuse(link, ErrorCode.UNEXPECTED_MESSAGE, message.txid)
        return False

    def _detach(self, link: _Link) -> None:
        pne_id = link.pne_id
        assert pne_id is not None
        links = self._routes.get(pne_id, [])
        if link in links:
            links.remove(link)
            log.info("PNE %s detached (%d link(s) left)", pne_id, len(links))
        if not links:
            self._hello_flows.pop(pne_id, None)
            if self._routes.pop(pne_id, None) is not None:
                metrics.GATEWAY_ATTACHED_PNES.dec()

    def _note_unverified(self, link: _Link, ack: EUKeyAssignmentAck, why: str) -> None:
        """D-PAN-2: an Ack that proves nothing is logged (within the fault budget),
        counted for the waiting user, and otherwise ignored."""
        pne_id = link.pne_id
        assert pne_id is not None
        txid, count, _ = self._unverified.get(pne_id, (ack.txid, 0, ""))
        if txid == ack.txid:
            self._unverified[pne_id] = (txid, count + 1, ack.status.name)
        self._peer_fault(link, f"Ack for txid {ack.txid.hex()} ignored: {why}")

    async def _on_ack(self, link: _Link, ack: EUKeyAssignmentAck) -> bool:
        """Only an Ack whose MAC verifies decides delivery (D-PAN-2). A refusal carries no
        MAC, so anyone on the PAN could have sent it: it is logged, counted and ignored,
        and the key stays pending (offered again on every attach)."""
        pne_id = link.pne_id
        assert pne_id is not None
        outstanding = self._pnes().get(pne_id, {}).get("set")
        acted_on = (
            ack.src == pne_id
            and outstanding is not None
            and outstanding["txid"] == ack.txid
            and not outstanding["delivered"]
            and ack.status is ErrorCode.OK
            and ack.proof is not None
        )
        log_hop(log, "received", ack, "pne", level=logging.INFO if acted_on else logging.DEBUG)
        if ack.src != pne_id:
            self._peer_fault(link, "Ack claims to come from another PNE", ack.src)
            await self._refuse(link, ErrorCode.NOT_AUTHORIZED, ack.txid)
            return False
        key_set = self._pnes().get(pne_id, {}).get("set")
        if key_set is None or key_set["txid"] != ack.txid or key_set["delivered"]:
            # A duplicate or late Ack (a lost message retried) is harmless.
            allowed, _ = self._fault_log.take(asyncio.get_running_loop().time())
            if allowed:
                log.info(
                    "PNE %s: Ack for txid %s ignored (nothing outstanding)",
                    pne_id,
                    ack.txid.hex(),
                )
            return True
        if ack.status is not ErrorCode.OK or ack.proof is None:
            self._note_unverified(link, ack, f"unauthenticated refusal {ack.status.name}")
            return True
        machine = self._deliveries.get(pne_id)
        if machine is None or machine.state is not GatewayState.EXPECT_ACK:
            machine = self._delivery_machine(pne_id, key_set)
            machine.messages_to_send()  # the Ack answers an earlier Notification
        txid = ack.txid.hex()
        for event in machine.receive(ack):
            if isinstance(event, EUKeyDelivered):
                key_set["delivered"] = True
                key_set["delivered_at"] = self._clock()
                self._deliveries.pop(pne_id, None)
                try:
                    await self._save(pne_id)
                except StoreError as exc:
                    # Not stored: the Notification is offered again next time; the PNE
                    # answers it again (it already holds that key).
                    key_set["delivered"] = False
                    log.error("txid %s: cannot store delivery to %s: %s", txid, pne_id, exc)
                    return True
                log.info("txid %s: EUKey %d delivered to PNE %s", txid, event.key_index, pne_id)
                metrics.GATEWAY_DELIVERIES.inc()
                self._unverified.pop(pne_id, None)
                self._resolve(
                    pne_id,
                    ack.txid,
                    AssignResult(ok=True, status="OK", stage="delivered", pne_id=pne_id, txid=txid),
                )
            elif isinstance(event, ProcedureFailed):
                # The proof does not verify: this link's own bytes, so this link ends;
                # the delivery stays pending and the machine is rebuilt for the next Ack.
                self._deliveries.pop(pne_id, None)
                self._note_unverified(link, ack, f"proof does not verify ({event.reason})")
                await self._refuse(link, ErrorCode.AUTHENTICATION_FAILED, ack.txid)
                return False
        return True

    # -- control socket ------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """The daemon's state for ``status``: IDs, indexes and flags, never key material."""
        view = _status_view({**self._data, "pnes": self._pne_records}, attached=self._routes)
        view.update(
            running=True,
            entity_id=self._config.entity_id,
            server_url=self._config.server_url,
            pan={
                "host": self._config.pan_host,
                "port": self.pan_port if self._pan is not None else None,
            },
        )
        return view

    async def _handle_control(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                reply = await self._control_op(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _control_op(self, line: bytes) -> dict[str, object]:
        def bad(why: str) -> dict[str, object]:
            return {
                "ok": False,
                "status": "MALFORMED_MESSAGE",
                "stage": None,
                "hop": "gateway",
                "error": why,
            }

        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return bad("not JSON")
        if not isinstance(request, dict):
            return bad("not a JSON object")
        op = request.get("op")
        try:
            if op == "status":
                return self.status()
            if op == "shutdown":
                log.info("shutdown requested on the control socket")
                self.request_shutdown()
                return {"ok": True, "status": "OK"}
            if op == "assign":
                pne_id, user_id = request.get("pne_id"), request.get("user_id")
                key_hex, wait = request.get("password_key"), request.get("wait", 0)
                claim_hex = request.get("claim_key")
                if not (
                    isinstance(pne_id, str)
                    and isinstance(user_id, str)
                    and isinstance(key_hex, str)
                    and isinstance(claim_hex, str)
                ):
                    return bad("assign needs pne_id, user_id, password_key and claim_key (hex)")
                if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0:
                    return bad("wait must be a non-negative number of seconds")
                try:
                    password_key = bytes.fromhex(key_hex)
                    claim = bytes.fromhex(claim_hex)
                except ValueError:
                    return bad("password_key and claim_key must be hex")
                result = await self.assign(
                    pne_id, user_id, password_key, claim_key=claim, wait=float(wait)
                )
                return result.to_json()
        except Exception:  # a control client must never take the daemon down
            log.exception("control op %r failed", op)
            return {"ok": False, "status": "INTERNAL_ERROR", "stage": None, "hop": "gateway"}
        return bad(f"unknown op {op!r}")
