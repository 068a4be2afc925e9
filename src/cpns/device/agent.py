"""The PNE agent: attach to a PN GW over the PAN and take the EUKey it delivers (003).

Theory of operation
-------------------
A PNE without UI leaves the factory holding its Entity ID and its Temporary Key (TK);
:func:`init_device` writes both into the device's sealed key store
(:class:`~cpns.store.keystore.LocalKeyStore` ``device``). :class:`DeviceAgent` then:

1. connects to the PN GW's PAN port and announces itself with :class:`PNEHello`
   (``dst="pan"``: whichever gateway answers the link; ``key_index`` of the key it holds);
2. feeds each EUKey Assignment Notification to a fresh :class:`EUKeyAssignmentDevice`
   built from the store (the key it holds, with its txid and assignment epoch, and its
   TK-flow state), which opens the EUKey with the TK at the Notification's ratchet step,
   computed forward from the PNE's own (003 §7.4.2.1.1.3, PNE step 1; 000);
3. on :class:`EUKeyInstalled` **persists** the EUKey, its index, the txid, the epoch and
   the new TK-flow state (:mod:`cpns.device.tk_state`)
   **before** sending the Ack (DESIGN §6), so a crash after the Ack can never leave the
   gateway believing in a key the PNE lost;
4. reconnects with capped exponential backoff when the gateway goes away.

A Notification is installed only if its assignment epoch (sealed with the key by the
server's numbering, D-003-11) is higher than the one held; the same epoch is acknowledged
again only if it carries the key the PNE holds (the gateway lost our Ack). So a recorded
Notification of a superseded assignment cannot roll the PNE back: the machine enforces
that, the agent only supplies what it holds.

Nothing here logs a key or the TK; :func:`device_status` reports IDs and indexes only.

Flows (docs/logging.md): each ``run`` starts one flow: its flow ID is drawn at the start,
carried in every PNEHello of the run (the PN GW continues it when the user assigns a key
to this PNE), and every message sent or received is logged in one structured line. An
Ack echoes the flow ID of the Notification it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cpns.device.establishment import (
    AGENT_SOCKET,
    HANDLED,
    AgentControl,
    PNEParticipant,
    pns_view,
)
from cpns.device.tk_state import encode_tk_state, tk_state_of
from cpns.errors import ConfigurationError, DecodeError, ErrorCode, StoreError
from cpns.flow import log_hop, message_scope, new_flow, stamp
from cpns.logs import flow_scope
from cpns.messages.constants import ID_PATTERN, TXID_LEN
from cpns.messages.model import (
    ErrorMessage,
    EUKeyAssignmentAck,
    EUKeyAssignmentNotification,
    Message,
    PNEHello,
)
from cpns.protocol._machine import ProcedureFailed
from cpns.protocol.key_assignment import EUKeyAssignmentDevice, EUKeyInstalled, HeldKey
from cpns.runtime import SystemRandom, wall_time
from cpns.store.keystore import LocalKeyStore
from cpns.transport.stream import peer_text, read_message, write_message
from cpns.types import Random

__all__ = [
    "CREDENTIAL_TK",
    "CREDENTIAL_UI",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "PAN_ADDRESS",
    "STORE_NAME",
    "DeviceAgent",
    "credential_kind",
    "device_status",
    "init_device",
    "send_to_gateway",
]

log = logging.getLogger("cpns.device")

#: Name of the device's key store in its data directory.
STORE_NAME: Final = "device"
#: Version of the store layout written by this module.
STORE_VERSION: Final = 1
#: Destination of PNEHello: whichever PN GW answers this link.
PAN_ADDRESS: Final = "pan"
#: Credential kinds a PNE's store may hold (``cpns device status`` shows which).
#: "ui": its own EUKey from the with-UI enrolment (004 §5.x.1), which no PN GW holds;
CREDENTIAL_UI: Final = "ui"
#: "tk": EUKey_i of a chain the PN GW delivered under the PNE's TK (003).
CREDENTIAL_TK: Final = "tk"

#: ``run`` results (also the CLI exit codes).
EXIT_OK: Final = 0
#: The only Notification(s) received were refused (wrong TK, replay) and time ran out.
EXIT_REFUSED: Final = 3
#: The gateway could never be reached before the timeout.
EXIT_UNREACHABLE: Final = 4
#: Connected, but no key arrived before the timeout.
EXIT_TIMEOUT: Final = 5


def init_device(data_dir: Path | str, entity_id: str, tk: bytes, *, force: bool = False) -> None:
    """Create the device's key store with its Entity ID and factory TK.

    Raises:
        ConfigurationError: bad Entity ID or TK length, or the store already exists
            (``force`` replaces it, dropping any EUKey it held).
        StoreError: the store is in use (an agent runs) or cannot be written.
    """
    if ID_PATTERN.fullmatch(entity_id) is None:
        raise ConfigurationError(f"not a valid Entity ID: {entity_id!r}")
    if not 16 <= len(tk) <= 64:
        raise ConfigurationError("a Temporary Key is 16..64 bytes")
    store = LocalKeyStore.open_or_create(Path(data_dir), STORE_NAME)
    with store.lock():
        if store.load() and not force:
            raise ConfigurationError(f"{data_dir} already holds a device store (use --force)")
        store.save(
            {
                "version": STORE_VERSION,
                "entity_id": entity_id,
                "tk": bytes(tk),
                "eukey": None,
                "key_index": 0,
                "txid": None,
                "gateway_id": None,
                "epoch": 0,
                "installed_at": 0,
            }
        )
    log.info("device %s initialised in %s", entity_id, data_dir)


def _load(store: LocalKeyStore) -> dict[str, Any]:
    data = store.load()
    # A PNE with UI that enrolled with its user's password has no TK (cpns device enroll).
    if not isinstance(data.get("entity_id"), str) or not (
        isinstance(data.get("tk"), bytes) or data.get("has_ui") is True
    ):
        raise ConfigurationError(
            f"{store.path} is not initialised (cpns device init, or cpns device enroll)"
        )
    return data


def credential_kind(data: dict[str, Any]) -> str | None:
    """Which kind of EUKey the store holds: :data:`CREDENTIAL_UI` (its own, from the
    user's password, 004 §5.x.1), :data:`CREDENTIAL_TK` (EUKey_i of a chain delivered by
    a PN GW under the TK, 003), or None (no EUKey yet)."""
    if not isinstance(data.get("eukey"), bytes):
        return None
    return CREDENTIAL_UI if data.get("credential") == CREDENTIAL_UI else CREDENTIAL_TK


def device_status(data_dir: Path | str) -> dict[str, object]:
    """Entity ID, key index and whether a key is held; never key material.

    Raises:
        ConfigurationError: the device is not initialised.
        StoreError: the store cannot be read.
    """
    data_dir = Path(data_dir)
    if not (data_dir / f"{STORE_NAME}.key").exists():  # a status query creates nothing
        raise ConfigurationError(f"{data_dir} holds no device (cpns device init)")
    data = _load(LocalKeyStore.open_or_create(data_dir, STORE_NAME))
    txid = data.get("txid")
    view: dict[str, object] = {
        "entity_id": data["entity_id"],
        "has_key": isinstance(data.get("eukey"), bytes),
        "credential": credential_kind(data),
        "has_tk": isinstance(data.get("tk"), bytes),
        "key_index": data.get("key_index", 0),
        "gateway_id": data.get("gateway_id"),
        "txid": txid.hex() if isinstance(txid, bytes) else None,
        "installed_at": data.get("installed_at", 0),
    }
    if view["credential"] == CREDENTIAL_UI:
        view["user_id"] = data.get("user_id")
        view["server_id"] = data.get("server_id")
    tk_state = tk_state_of(data)
    if tk_state is not None:  # the TK flow's position (000): step and current index
        view["tk_step"] = tk_state.tk_step
        view["tk_key_index"] = tk_state.key_index
    view["pns"] = pns_view(data)
    return view


@dataclass(slots=True)
class _Progress:
    """What happened during one ``run`` (decides its result)."""

    connected: bool = False
    refused: bool = False
    acked: bool = False


@dataclass(slots=True)
class _Session:
    """What happened on one connection (decides whether the backoff resets)."""

    #: A Notification arrived (the peer speaks the protocol).
    useful: bool = False


class DeviceAgent:
    """The PNE agent over one data directory, attaching to one PN GW.

    ``backoff`` and ``max_backoff`` bound the reconnection delay (seconds, doubled after
    each failed attempt, reset after a successful connection).
    """

    def __init__(
        self,
        data_dir: Path | str,
        gateway_host: str,
        gateway_port: int,
        *,
        rng: Random | None = None,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        gateway_id: str | None = None,
        server_id: str | None = None,
        secure_pan: bool = False,
        want_local_eukey: bool = False,
    ) -> None:
        if backoff <= 0 or max_backoff < backoff:
            raise ValueError("0 < backoff <= max_backoff")
        self._data_dir = Path(data_dir)
        self._host = gateway_host
        self._port = gateway_port
        self._rng: Random = rng if rng is not None else SystemRandom()
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._store = LocalKeyStore.open_or_create(self._data_dir, STORE_NAME)
        self._data: dict[str, Any] = {}
        self._stop = asyncio.Event()
        #: Flow ID (hex) of the current run, carried in its PNEHellos.
        self._flow = new_flow()
        #: PN Establishment and the LocalEUKey authentication (002 §7.5.4, 000).
        self.participant = PNEParticipant(
            self,
            rng=self._rng,
            clock=wall_time,
            gateway_id=gateway_id,
            server_id=server_id,
            secure_pan=secure_pan,
            want_local_eukey=want_local_eukey,
        )
        self._control = AgentControl(self.participant)

    @property
    def data(self) -> dict[str, Any]:
        """The store's map as held (read-only use; :meth:`save` replaces it)."""
        return self._data

    def save(self, data: dict[str, Any]) -> None:
        """Persist the store's map (atomic) and hold it. Raises StoreError."""
        self._store.save(data)
        self._data = data

    def __repr__(self) -> str:
        return f"<DeviceAgent {str(self._data_dir)!r} -> {self._host}:{self._port}>"

    async def run(self, *, once: bool = False, timeout: float | None = None) -> int:
        """Attach and take keys until done; return an exit code.

        With ``once`` it returns :data:`EXIT_OK` as soon as a key is installed and
        acknowledged (or a held key acknowledged again). Otherwise it serves until
        ``timeout`` or :meth:`request_stop` (:data:`EXIT_OK`). When the timeout ends a ``once``
        run without a key: :data:`EXIT_UNREACHABLE` if the gateway was never reached,
        :data:`EXIT_REFUSED` if Notifications came but were refused, else
        :data:`EXIT_TIMEOUT`.

        Raises:
            ConfigurationError: the device is not initialised.
            StoreError: another agent holds the store, or it cannot be read or written.
        """
        progress = _Progress()
        self._stop.clear()
        self._flow = new_flow()  # this PNE starts a flow: one per run
        with self._store.lock(), flow_scope(self._flow):
            self._data = _load(self._store)
            sock = self._data_dir / AGENT_SOCKET
            await self._control.start(sock)
            serve = asyncio.ensure_future(self._serve(once, progress))
            stop = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait(
                    {serve, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for task in (serve, stop):
                    task.cancel()
                await asyncio.gather(serve, stop, return_exceptions=True)
                await self.participant.close()
                await self._control.close(sock)
            failure = None if serve.cancelled() else serve.exception()
            if failure is not None:
                raise failure
        if progress.acked or not once:
            return EXIT_OK
        if not progress.connected:
            return EXIT_UNREACHABLE
        return EXIT_REFUSED if progress.refused else EXIT_TIMEOUT

    def request_stop(self) -> None:
        """Make :meth:`run` return soon (signal handlers call this)."""
        self._stop.set()

    async def _serve(self, once: bool, progress: _Progress) -> None:
        """Connect, run a session, reconnect with backoff; never ends because of the
        gateway's bytes (issue 5 item 10): only a finished ``once`` run, a stop or a local
        store/configuration error ends it."""
        delay = self._backoff
        while True:
            try:
                reader, writer = await asyncio.open_connection(self._host, self._port)
            except OSError as exc:
                log.info(
                    "gateway %s:%d unreachable (%s); retry in %.1fs",
                    self._host,
                    self._port,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
                continue
            progress.connected = True
            loop = asyncio.get_running_loop()
            session = _Session()
            began = loop.time()
            try:
                if await self._session(reader, writer, once, progress, session):
                    return
            except (StoreError, ConfigurationError):
                raise  # our own store: nothing a reconnection can fix
            except Exception as exc:  # one frame never ends the agent
                log.warning(
                    "PAN link dropped: handling the gateway's message failed (%s)",
                    type(exc).__name__,
                )
                log.debug("session error", exc_info=True)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            # Only a session that got somewhere (a Notification, or a link that held for
            # a while) resets the backoff: a gateway (or an impostor) that answers with
            # garbage at once is retried ever more slowly.
            if session.useful or loop.time() - began >= self._max_backoff:
                delay = self._backoff
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_backoff)

    async def _session(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        once: bool,
        progress: _Progress,
        session: _Session | None = None,
    ) -> bool:
        """One connection: hello, then Notifications. True when a ``once`` run is done.

        Anything the gateway sends that cannot be used is logged in one bounded line:
        an undecodable frame ends the link (the stream is out of step; :meth:`_serve`
        reconnects), a message of an unexpected type is ignored."""
        session = session if session is not None else _Session()
        entity_id: str = self._data["entity_id"]
        hello = PNEHello(
            txid=self._rng.token_bytes(TXID_LEN),
            src=entity_id,
            dst=PAN_ADDRESS,
            has_ui=self._data.get("has_ui") is True,
            key_index=int(self._data.get("key_index", 0)),
            flow=bytes.fromhex(self._flow),
        )
        try:
            await send_to_gateway(writer, hello)
            log.info("PNE %s attached to %s:%d", entity_id, self._host, self._port)
            self.participant.attach(lambda out: send_to_gateway(writer, out))
            while True:
                try:
                    message = await read_message(reader)
                except DecodeError as exc:
                    log.warning("undecodable frame from the gateway: %s", peer_text(exc.reason))
                    return False
                if message is None:
                    log.info("gateway closed the PAN link")
                    return False
                with message_scope(message):
                    log_hop(log, "received", message, "gateway")
                    if isinstance(message, EUKeyAssignmentNotification):
                        session.useful = True
                        if await self._on_notification(writer, message, progress) and once:
                            return True
                    elif isinstance(message, HANDLED):
                        session.useful = True
                        await self.participant.handle(message)
                    elif isinstance(message, ErrorMessage):
                        log.warning(
                            "gateway reported %s (txid %s)",
                            message.status.name,
                            message.txid.hex(),
                        )
                    else:
                        log.warning("ignoring unexpected %s from the gateway", message.TYPE.name)
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.info("PAN link lost: %s", exc)
            return False
        finally:
            self.participant.detach()

    def _machine(self) -> EUKeyAssignmentDevice:
        data = self._data
        current: HeldKey | None = None
        if isinstance(data.get("eukey"), bytes) and isinstance(data.get("txid"), bytes):
            current = HeldKey(
                txid=data["txid"],
                key_index=int(data["key_index"]),
                eukey=data["eukey"],
                epoch=int(data.get("epoch", 0)),
            )
        return EUKeyAssignmentDevice(
            entity_id=data["entity_id"],
            tk=data["tk"],
            rng=self._rng,
            current=current,
            tk_state=tk_state_of(data),
        )

    async def _on_notification(
        self,
        writer: asyncio.StreamWriter,
        message: EUKeyAssignmentNotification,
        progress: _Progress,
    ) -> bool:
        """Handle one Notification; True if an OK Ack was sent."""
        txid = message.txid.hex()
        if credential_kind(self._data) == CREDENTIAL_UI or not isinstance(
            self._data.get("tk"), bytes
        ):
            # The PNE holds its own with-UI EUKey (or has no TK): a 003 delivery cannot
            # replace it (re-enrol with 'cpns device enroll', or 'init --force' for 003).
            progress.refused = True
            log.warning(
                "txid %s: Notification ignored: this PNE holds a with-UI EUKey or no TK", txid
            )
            return False
        machine = self._machine()
        events = machine.receive(message)
        installed = False
        for event in events:
            if isinstance(event, EUKeyInstalled):
                try:
                    self._persist(event)  # BEFORE the Ack (DESIGN §6)
                except StoreError as exc:
                    log.error("txid %s: cannot store the EUKey, not acknowledging: %s", txid, exc)
                    machine.messages_to_send()
                    return False
                installed = True
            elif isinstance(event, ProcedureFailed):
                progress.refused = True
                code = event.code
                name = code.name if isinstance(code, ErrorCode) else str(code)
                log.warning("txid %s: Notification refused: %s (%s)", txid, name, event.reason)
        acked = False
        for out in machine.messages_to_send():
            await send_to_gateway(writer, out)
            if isinstance(out, EUKeyAssignmentAck) and out.status is ErrorCode.OK:
                acked = True
        if acked:
            progress.acked = True
            if installed:
                log.info("txid %s: EUKey %d installed and acknowledged", txid, message.key_index)
            else:
                log.info(
                    "txid %s: EUKey %d already held; acknowledged again", txid, message.key_index
                )
        return acked

    def _persist(self, event: EUKeyInstalled) -> None:
        data = dict(self._data)
        data.pop("seen_txids", None)  # stores written before epochs kept a txid history
        data.update(
            credential=CREDENTIAL_TK,
            eukey=event.eukey,
            key_index=event.key_index,
            txid=event.txid,
            gateway_id=event.gateway_id,
            epoch=event.epoch,
            installed_at=wall_time(),
        )
        # The TK flow restarts from the Notification's TK step (000 ratchet).
        if event.tk_state is not None:
            data["tk_auth"] = encode_tk_state(event.tk_state, event.txid)
        else:
            data.pop("tk_auth", None)
        self._store.save(data)
        self._data = data


async def send_to_gateway(writer: asyncio.StreamWriter, message: Message) -> None:
    """Write one message to the gateway in the current flow, and log it."""
    message = stamp(message)
    log_hop(log, "sent", message, "gateway")
    await write_message(writer, message)
