"""The PN GW daemon: wires the PAN side, the server link, the control socket and the
procedures' coordinators over the gateway's key store.

Theory of operation
-------------------
The daemon is a thin asyncio shell (STYLE §7) made of parts that each own one concern:

* the **key store** (:class:`~cpns.store.keystore.LocalKeyStore` ``gateway``): its own
  EUKey in the main map, and per PNE (one sealed record file each, so a write costs the
  same with 2 PNEs or 2,000) a typed :class:`~cpns.gateway.records.PNERecord` (the
  outstanding request, the received TK + EUKey set and its delivery state), held by the
  :class:`~cpns.gateway.ledger.PNELedger`. It is the only state that matters: everything
  in memory can be rebuilt from it;
* the **PAN side** (:mod:`cpns.gateway.pan`): the TCP listener, its links, their caps and
  timeouts, and the PNEs attached to them;
* the **upstream side** (:mod:`cpns.gateway.upstream`): the HTTPS + Digest link to the
  CPNS Server;
* the **control socket** (:mod:`cpns.gateway.control`): JSON lines on a Unix socket, used
  by ``cpns gateway assign`` / ``status`` / ``stop``;
* one **coordinator per procedure** (:mod:`cpns.gateway.procedures`): the gateway's own
  enrolment (004 §5.x.1, :func:`enroll`, run before the daemon), the EUKey assignment
  for a PNE without UI with its delivery (003,
  :class:`~cpns.gateway.procedures.eukey_assignment.EUKeyAssignmentCoordinator`) and the
  relay of a PNE's own enrolment with UI (004 §5.x.1 over the PAN,
  :class:`~cpns.gateway.procedures.pne_enrolment.PNEEnrolmentCoordinator`), and PN
  Establishment with the LocalEUKey authentication (002 §7.5.4, 000,
  :class:`~cpns.gateway.procedures.pn_establishment.PNEstablishmentCoordinator`). A
  coordinator drives the sans-I/O machines of :mod:`cpns.protocol` and reaches the PAN
  side, the server and the records through small interfaces only.

What is persisted before what depends on it, the hops failures name, and how a restart
loses nothing are described with each procedure. Logs carry Entity IDs, txids (hex) and
status names, never keys, TKs or password keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from cpns import metrics
from cpns.errors import ConfigurationError
from cpns.gateway.config import OPERATOR_PORT_FILE, GatewayConfig
from cpns.gateway.connections import Connections
from cpns.gateway.control import ControlServer
from cpns.gateway.ledger import STORE_NAME, PNELedger, decode_all
from cpns.gateway.pan import PAN_ADDRESS, PANSide
from cpns.gateway.procedures.enrolment import enroll
from cpns.gateway.procedures.eukey_assignment import AssignResult, EUKeyAssignmentCoordinator
from cpns.gateway.procedures.pn_establishment import PNEstablishmentCoordinator
from cpns.gateway.procedures.pne_enrolment import PNEEnrolmentCoordinator
from cpns.gateway.records import Enrolment, status_view
from cpns.gateway.upstream import ServerClient, Upstream
from cpns.messages.model import (
    EUKeyAssignmentAck,
    LocalAuthRequest,
    PNEAuthenticateResponse,
    PNInviteResponse,
    PNSetupRequest,
    UserKeyAssignmentRequest,
)
from cpns.protocol.pn_establishment import flow_name
from cpns.runtime import SystemRandom, wall_time
from cpns.store.keystore import LocalKeyStore
from cpns.store.masterkey import write_private_file
from cpns.types import Random

__all__ = [
    "PAN_ADDRESS",
    "STORE_NAME",
    "AssignResult",
    "GatewayDaemon",
    "enroll",
    "offline_status",
]

log = logging.getLogger("cpns.gateway")

#: Seconds to let connection handlers finish at shutdown before cancelling them.
_SHUTDOWN_GRACE: Final = 2.0


def _nothing_pending() -> float:
    return 0.0


def offline_status(data_dir: Path | str) -> dict[str, object]:
    """The gateway's state read from its store while the daemon is not running.

    Raises:
        StoreError: the store cannot be read, or holds a malformed PNE record.
    """
    data_dir = Path(data_dir)
    enrolment = None
    records = {}
    if (data_dir / f"{STORE_NAME}.key").exists():  # a status query creates nothing
        store = LocalKeyStore.open_or_create(data_dir, STORE_NAME)
        data = store.load()
        enrolment = Enrolment.decode(data)
        records = decode_all({**data.get("pnes", {}), **store.load_records()})
    view = status_view(enrolment, records, attached=())
    view["running"] = False
    return view


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
        #: The gateway's own enrolment (the store's main map), read by start.
        self._enrolment: Enrolment | None = None
        #: Every PNE's record.
        self.ledger = PNELedger(self._store)
        self._connections = Connections()
        self._background: set[asyncio.Task[None]] = set()
        #: The operator listener (/metrics, /healthz, /readyz), if operator_port is set.
        self._operator: metrics.OperatorServer | None = None
        self._stop_requested = asyncio.Event()
        self._started = False
        #: The PAN side: listener, links, attached PNEs.
        self.pan = PANSide(config, self._connections)
        # One coordinator per procedure; each registers with the PAN side the messages
        # it handles there, and whether it wants to hear of every attach.
        #: The 003 EUKey assignment for PNEs without UI, and its delivery.
        self.assignments = EUKeyAssignmentCoordinator(
            gateway_id=config.entity_id,
            server_id=config.server_id,
            ledger=self.ledger,
            pan=self.pan,
            rng=self._rng,
            clock=clock,
            retry_interval=config.retry_interval,
        )
        self.pan.subscribe(
            on_attach=self.assignments.offer_delivery,
            handlers={EUKeyAssignmentAck: self.assignments.on_ack},
        )
        #: The relay of a PNE's own enrolment with UI (004 §5.x.1 over the PAN).
        self.enrolments = PNEEnrolmentCoordinator(
            gateway_id=config.entity_id, server_id=config.server_id, pan=self.pan
        )
        self.pan.subscribe(handlers={UserKeyAssignmentRequest: self.enrolments.on_request})
        #: PN Establishment (002 §7.5.4.2, 000 §7.5.2) and the LocalEUKey authentication.
        self.establishments = PNEstablishmentCoordinator(
            gateway_id=config.entity_id,
            server_id=config.server_id,
            ledger=self.ledger,
            pan=self.pan,
            rng=self._rng,
            clock=clock,
            answer_timeout=config.pan_answer_timeout,
        )
        self.pan.subscribe(
            handlers={
                PNSetupRequest: self.establishments.on_setup,
                PNInviteResponse: self.establishments.on_pne_message,
                PNEAuthenticateResponse: self.establishments.on_pne_message,
                LocalAuthRequest: self.establishments.on_local_request,
            }
        )
        self._control = ControlServer(self, self._connections)

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
        return self.pan.port

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
            data = self._store.load()
            enrolment = Enrolment.decode(data)
            if enrolment is None:
                raise ConfigurationError(
                    f"gateway in {self._config.data_dir} is not enrolled (cpns gateway enroll)"
                )
            if enrolment.entity_id != self._config.entity_id:
                raise ConfigurationError(
                    f"key store belongs to {enrolment.entity_id!r}, "
                    f"configuration says {self._config.entity_id!r}"
                )
            self._enrolment = enrolment
            eukey = enrolment.eukey
            self.ledger.load(data)
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
            self.assignments.bind(eukey, self._upstream)
            self.enrolments.bind(self._upstream)
            self.establishments.bind(eukey, self._upstream)
            await self.pan.start()
            write_private_file(
                self._config.port_file, f"{self.pan_port}\n".encode(), overwrite=True
            )
            await self._control.start(self._config.control_socket)
            await self._start_operator()
        except BaseException:
            await self.stop()
            raise
        self._spawn(self.assignments.retry_loop())
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
        if not self._started or not self.pan.listening:
            return False, "not started"
        if self._stop_requested.is_set():
            return False, "stopping"
        return True, ""

    def _pending_requests(self) -> float:
        """Stored requests the server has not answered yet (a metric)."""
        return float(self.ledger.pending_requests())

    def _pending_deliveries(self) -> float:
        """Stored key sets not yet proven delivered (a metric)."""
        return float(self.ledger.pending_deliveries())

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
        self.pan.close()
        self._control.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        await self.establishments.close()
        # Callers waiting for a delivery get the stage reached so far, now.
        self.assignments.cancel_waiters()
        await self._connections.close_all(_SHUTDOWN_GRACE)
        await self.pan.wait_closed()
        await self._control.wait_closed()
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
        await self.ledger.drain()  # a write or compaction in flight ends before the unlock
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

    # -- what the control socket drives ---------------------------------------------------

    async def assign(
        self,
        pne_id: str,
        user_id: str,
        password_key: bytes,
        *,
        claim_key: bytes,
        wait: float = 0.0,
    ) -> AssignResult:
        """Run the 003 PN GW role for ``pne_id``; wait up to ``wait`` s for delivery (see
        :meth:`EUKeyAssignmentCoordinator.assign`)."""
        return await self.assignments.assign(
            pne_id, user_id, password_key, claim_key=claim_key, wait=wait
        )

    def status(self) -> dict[str, object]:
        """The daemon's state for ``status``: IDs, indexes and flags, never key material."""
        view = status_view(self._enrolment, self.ledger.records, attached=self.pan.routes)
        view.update(
            running=True,
            entity_id=self._config.entity_id,
            server_url=self._config.server_url,
            pan={
                "host": self._config.pan_host,
                "port": self.pan_port if self.pan.listening else None,
            },
            running_establishments=[
                {"pn_id": pn_id, "originator": pne_id}
                for pn_id, pne_id in self.establishments.running()
            ],
            establishments=[
                {
                    "pn_id": o.pn_id,
                    "originator": o.originator,
                    "est_id": o.est_id,
                    "failure": o.failure,
                    "members": [
                        {"pne_id": m.pne_id, "status": m.status.name, "flow": flow_name(m.flow)}
                        for m in o.members
                    ],
                }
                for o in self.establishments.outcomes
            ],
        )
        return view
