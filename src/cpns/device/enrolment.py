"""A PNE with UI gets its own EUKey through the PN GW (004 §5.x.1 over the PAN).

Theory of operation
-------------------
The PNE has a UI but no WAN access. Its user types the User ID and password; the CLI
turns the password into the password key (scrypt, :func:`cpns.crypto.password_key`) in
this process, and :func:`enroll_device` runs the same client machine a PN GW uses for its
own enrolment (:class:`~cpns.protocol.user_key_assignment.UserKeyAssignmentClient`,
``entity_kind`` PNE):

1. it builds the :class:`UserKeyAssignmentRequest` (fresh ``rand``, ``time``,
   ``auth_data`` = HMAC under the password key) once, with its transaction ID;
2. it connects to the PN GW's PAN port, sends :class:`PNEHello` (``has_ui``) and the
   request; the PN GW relays it unchanged to the server over its HTTPS + Digest link and
   relays the server's answer back (:mod:`cpns.gateway.procedures.pne_enrolment`);
3. a lost answer (the link drops, nothing arrives within ``per_try_timeout``, or the PN
   GW reports ``UPSTREAM_UNAVAILABLE``: the server's answer may have been lost beyond it)
   is retried on a new link with the *same* request: the server answers a known
   transaction from the reply it stored, so a retry can never assign a second key;
4. the answer is fed to the machine: opening the sealed EUKey (a key derived from the
   password key and both rands) authenticates the server; the PN GW, which never sees
   the password key, cannot open it, nor forge one;
5. the EUKey is stored in the device's sealed key store as credential kind
   :data:`~cpns.device.agent.CREDENTIAL_UI`, with the User ID and the server's ID.

Refusals name the hop: a refusal sent by the server (its
:class:`UserKeyAssignmentResponse` status, or its :class:`ErrorMessage`) is ``server``;
the PN GW's own :class:`ErrorMessage` is ``gateway`` (``gateway->server`` when it could
not reach or authenticate to the server); an answer the PNE's machine refuses (a seal
that does not open) is ``device``. PAN refusals are not authenticated: they end this
attempt and are reported, nothing is stored on their strength.

Nothing here logs the password key, ``auth_data`` or the EUKey: only IDs, the txid and
statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cpns.device.agent import (
    CREDENTIAL_UI,
    PAN_ADDRESS,
    STORE_NAME,
    STORE_VERSION,
    send_to_gateway,
)
from cpns.errors import (
    ConfigurationError,
    DecodeError,
    ErrorCode,
    ProcedureRejected,
    TransportError,
)
from cpns.flow import log_hop, message_scope, new_flow, stamp
from cpns.logs import flow_scope
from cpns.messages.constants import ID_PATTERN, TXID_LEN
from cpns.messages.model import (
    ErrorMessage,
    Message,
    PNEHello,
    UserKeyAssignmentRequest,
    UserKeyAssignmentResponse,
)
from cpns.protocol._machine import Event, ProcedureFailed
from cpns.protocol.user_key_assignment import EUKeyReceived, UserKeyAssignmentClient
from cpns.runtime import SystemRandom, wall_time
from cpns.store.keystore import LocalKeyStore
from cpns.transport.stream import peer_text, read_message
from cpns.types import EntityKind, Random

__all__ = ["DEFAULT_SERVER_ID", "EnrolResult", "enroll_device"]

log = logging.getLogger("cpns.device")

#: The CPNS Server's Entity ID unless told otherwise (the server's default).
DEFAULT_SERVER_ID: Final = "cpns-server"
#: Gateway refusals that mean the hop beyond it failed (unreachable, Digest refused).
_UPSTREAM_CODES: Final = frozenset(
    {ErrorCode.UPSTREAM_UNAVAILABLE, ErrorCode.AUTHENTICATION_FAILED}
)


@dataclass(frozen=True, slots=True)
class EnrolResult:
    """A successful enrolment."""

    #: The PNE's Entity ID.
    entity_id: str
    #: The CPNS User who owns it now.
    user_id: str
    #: Transaction ID (hex): the correlation ID in every party's logs.
    txid: str
    #: Flow ID (hex), for ``cpns trace``.
    flow: str
    #: How many PAN links the request went on (1 unless an answer was lost).
    tries: int


class _Lost(Exception):
    """This try got no answer (link refused, dropped, or silent): try again."""


def _open_store(data_dir: Path, entity_id: str | None) -> tuple[LocalKeyStore, dict[str, Any]]:
    """The device store, locked, and its content; a new one for ``entity_id`` if none.

    Raises:
        ConfigurationError: no store and no ``entity_id``; a bad Entity ID; the store
            belongs to another Entity ID.
        StoreError: the store is in use (an agent runs) or unreadable.
    """
    if entity_id is not None and ID_PATTERN.fullmatch(entity_id) is None:
        raise ConfigurationError(f"not a valid Entity ID: {entity_id!r}")
    exists = (data_dir / f"{STORE_NAME}.key").exists()
    if not exists and entity_id is None:
        raise ConfigurationError(f"{data_dir} holds no device: give --entity-id to create one")
    store = LocalKeyStore.open_or_create(data_dir, STORE_NAME)
    store.lock()
    try:
        data = store.load()
        held = data.get("entity_id")
        if isinstance(held, str):
            if entity_id is not None and held != entity_id:
                raise ConfigurationError(f"{data_dir} belongs to PNE {held!r}, not {entity_id!r}")
        elif entity_id is None:
            raise ConfigurationError(f"{data_dir} holds no device: give --entity-id")
        else:
            data = {
                "version": STORE_VERSION,
                "entity_id": entity_id,
                "tk": None,
                "eukey": None,
                "key_index": 0,
                "txid": None,
                "gateway_id": None,
                "epoch": 0,
                "installed_at": 0,
                "has_ui": True,
            }
            store.save(data)  # the PNE exists from now on, with no key yet
    except BaseException:
        store.unlock()
        raise
    return store, data


async def enroll_device(
    data_dir: Path | str,
    gateway_host: str,
    gateway_port: int,
    *,
    user_id: str,
    password_key: bytes,
    entity_id: str | None = None,
    server_id: str = DEFAULT_SERVER_ID,
    rng: Random | None = None,
    clock: Callable[[], int] = wall_time,
    per_try_timeout: float = 30.0,
    tries: int = 3,
    backoff: float = 0.2,
) -> EnrolResult:
    """Obtain this PNE's own EUKey through the PN GW at ``gateway_host:gateway_port``.

    ``password_key`` is :func:`cpns.crypto.password_key`'s output (the password itself
    never reaches this function). ``entity_id`` creates the device store if there is
    none (a PNE with UI needs no factory TK); with an existing store it must match.

    Raises:
        ProcedureRejected: a party refused (``.code``, ``.hop``), or the answer did not
            verify (hop ``device``).
        TransportError: no answer from the PN GW after ``tries`` links.
        ConfigurationError: see :func:`_open_store`.
        StoreError: the store is in use or cannot be written.
    """
    if tries < 1 or per_try_timeout <= 0 or backoff < 0:
        raise ValueError("tries >= 1, per_try_timeout > 0, backoff >= 0")
    if ID_PATTERN.fullmatch(user_id) is None:
        raise ConfigurationError(f"not a valid User ID: {user_id!r}")
    rng = rng if rng is not None else SystemRandom()
    store, data = _open_store(Path(data_dir), entity_id)
    try:
        with flow_scope(new_flow(rng)):  # the PNE starts its enrolment flow
            return await _enroll(
                store,
                data,
                (gateway_host, gateway_port),
                user_id=user_id,
                password_key=password_key,
                server_id=server_id,
                rng=rng,
                clock=clock,
                per_try_timeout=per_try_timeout,
                tries=tries,
                backoff=backoff,
            )
    finally:
        store.unlock()


async def _enroll(
    store: LocalKeyStore,
    data: dict[str, Any],
    gateway: tuple[str, int],
    *,
    user_id: str,
    password_key: bytes,
    server_id: str,
    rng: Random,
    clock: Callable[[], int],
    per_try_timeout: float,
    tries: int,
    backoff: float,
) -> EnrolResult:
    entity_id: str = data["entity_id"]
    machine = UserKeyAssignmentClient(
        entity_id=entity_id, entity_kind=EntityKind.PNE, server_id=server_id, rng=rng
    )
    machine.start(user_id=user_id, password_key=password_key, now=clock())
    (request,) = machine.messages_to_send()
    assert isinstance(request, UserKeyAssignmentRequest)
    request = stamp(request)  # every try sends these very bytes
    txid = request.txid.hex()
    log.info(
        "enrolling PNE %s for user %s through the PN GW at %s:%d (txid %s)",
        entity_id,
        user_id,
        *gateway,
        txid,
    )
    delay = backoff
    last = "no attempt"
    for attempt in range(1, tries + 1):
        if attempt > 1:
            await asyncio.sleep(delay)
            delay *= 2
            log.info("retrying txid %s (try %d of %d): %s", txid, attempt, tries, last)
        hello = PNEHello(
            txid=rng.token_bytes(TXID_LEN),
            src=entity_id,
            dst=PAN_ADDRESS,
            has_ui=True,
            key_index=int(data.get("key_index", 0)),
        )
        try:
            async with asyncio.timeout(per_try_timeout):
                reply = await _try(gateway, hello, request)
        except TimeoutError:
            last = f"no answer within {per_try_timeout:g}s"
            continue
        except _Lost as exc:
            last = str(exc)
            continue
        if (
            isinstance(reply, ErrorMessage)
            and reply.src != server_id
            and reply.status is ErrorCode.UPSTREAM_UNAVAILABLE
            and attempt < tries
        ):
            # The PN GW could not reach the server (or lost its answer): the same request
            # again; the server answers a transaction it already served from its stored reply.
            last = "the PN GW could not reach the server (UPSTREAM_UNAVAILABLE)"
            continue
        with message_scope(reply):
            events, hop = _feed(machine, reply, hello, server_id)
        for event in events:
            if isinstance(event, EUKeyReceived):
                _persist(store, data, event, request, user_id, server_id, clock())
                log.info("PNE %s enrolled: EUKey stored (credential ui, txid %s)", entity_id, txid)
                return EnrolResult(
                    entity_id=entity_id,
                    user_id=user_id,
                    txid=txid,
                    flow=request.flow.hex() if request.flow else "",
                    tries=attempt,
                )
            if isinstance(event, ProcedureFailed):
                name = event.code.name if isinstance(event.code, ErrorCode) else str(event.code)
                log.warning(
                    "enrolment of PNE %s refused: %s at %s (txid %s)", entity_id, name, hop, txid
                )
                raise ProcedureRejected(event.code, f"txid {txid}", hop=hop)
        raise ProcedureRejected(ErrorCode.INTERNAL_ERROR, "no outcome", hop="device")
    raise TransportError(f"PN GW at {gateway[0]}:{gateway[1]}: {last} after {tries} tries")


async def _try(
    gateway: tuple[str, int], hello: PNEHello, request: UserKeyAssignmentRequest
) -> Message:
    """One PAN link: hello, request, and the first answer to either; :class:`_Lost` if
    there is none."""
    try:
        reader, writer = await asyncio.open_connection(*gateway)
    except OSError as exc:
        raise _Lost(f"PN GW unreachable ({exc.strerror or exc})") from None
    try:
        await send_to_gateway(writer, hello)
        await send_to_gateway(writer, request)
        while True:
            try:
                message = await read_message(reader)
            except DecodeError as exc:
                why = peer_text(exc.reason)
                raise _Lost(f"undecodable frame from the gateway: {why}") from None
            if message is None:
                raise _Lost("the gateway closed the PAN link before answering")
            if message.txid in (request.txid, hello.txid) and isinstance(
                message, UserKeyAssignmentResponse | ErrorMessage
            ):
                with message_scope(message):
                    log_hop(log, "received", message, "gateway")
                return message
            # Not ours (a 003 Notification offered on attach, a stray frame): ignored.
            log.debug("ignoring %s (txid %s)", message.TYPE.name, message.txid.hex())
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise _Lost(f"PAN link lost: {exc}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _feed(
    machine: UserKeyAssignmentClient, reply: Message, hello: PNEHello, server_id: str
) -> tuple[list[Event], str]:
    """Feed the answer; return the events and the hop a failure is named after."""
    if isinstance(reply, ErrorMessage):
        if reply.src == server_id:
            hop = "server"  # the server's ErrorMessage, relayed unchanged
        elif reply.txid == hello.txid:
            hop = "gateway"  # the PN GW refused the attach itself
        else:
            hop = "gateway->server" if reply.status in _UPSTREAM_CODES else "gateway"
        return machine.fail(reply.status, f"{reply.src} answered with an ErrorMessage"), hop
    assert isinstance(reply, UserKeyAssignmentResponse)
    # The server's verdict if it sent a refusal; anything else this PNE decided.
    hop = "server" if reply.status is not ErrorCode.OK and reply.src == server_id else "device"
    return machine.receive(reply), hop


def _persist(
    store: LocalKeyStore,
    data: dict[str, Any],
    event: EUKeyReceived,
    request: UserKeyAssignmentRequest,
    user_id: str,
    server_id: str,
    now: int,
) -> None:
    """Store the EUKey as credential kind "ui" (a TK the PNE holds stays, unused)."""
    data = dict(data)
    data.pop("seen_txids", None)
    data.update(
        has_ui=True,
        credential=CREDENTIAL_UI,
        eukey=event.eukey,
        key_index=1,
        txid=request.txid,
        gateway_id=None,
        epoch=0,
        user_id=user_id,
        server_id=server_id,
        installed_at=now,
    )
    store.save(data)
