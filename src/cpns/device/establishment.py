"""The PNE's part of PN Establishment (002 §7.5.4.1, 000 §7.5.1) and of the LocalEUKey
authentication with its PN GW (the "7.5.5" 002 §7.5.4 refers to), inside the agent.

Theory of operation
-------------------
:class:`PNEParticipant` lives in the :class:`~cpns.device.agent.DeviceAgent` and answers,
on the agent's PAN link, with the machines of :mod:`cpns.protocol.pn_establishment`:

* an invitation (:class:`PNInvite`) with an :class:`InvitedPNE` (its SETUP Response:
  rand_PNE, whether it needs a LocalEUKey);
* an AUTHENTICATE Request with the machine of that PN. The credential decides the flow:
  a PNE enrolled with UI (credential ``ui``) computes SK and hash_PNE from its own EUKey
  (rand/hash, 002 §7.5.4); a PNE whose chain came from a 003 assignment (credential
  ``tk``) checks AN, seals its current EUKey under the TK, opens and checks the next
  EUKey against the chain (000 §7.5.1). Its new TK state (pending key included) is
  **stored before** the answer goes out, so a crash can never leave it behind the server
  (the resync rule keeps the old key until the new one is proven);
* the final SETUP Response (originator) or PNEstablishmentNotify (invited): hash_server
  (rand/hash) or the key confirmation (TK) is verified before the PNE counts itself a
  member; then it stores the membership with the session key, and for a TK PNE the
  confirmed TK state (:func:`~cpns.protocol.tk_auth.pne_confirmed`).

The originating PNE's SETUP Request starts from the agent's control socket
(``cpns device establish``, :meth:`PNEParticipant.establish`): the agent must be attached
to its PN GW; the reply lists every member's outcome.

LocalEUKey: a PNE that asked for one stores its copy (opened with its EUKey) with the
membership; when its PAN is not a Secure PAN (the agent's ``secure_pan`` is off, the
default: the PAN link is plain TCP) it runs the LocalEUKey authentication with its PN GW
right after the establishment (:class:`~cpns.protocol.local_auth.LocalAuthPNE`) and stores
the session key with the membership (``cpns device status`` shows that it holds one).

Everything stored goes into the device's sealed key store under ``tk_auth`` (the TK-flow
state) and ``pns`` (PN ID -> membership); nothing here logs a key, TK, rand or hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from cpns.device.tk_state import encode_tk_state, tk_state_of
from cpns.errors import ConfigurationError, ErrorCode
from cpns.flow import new_flow
from cpns.logs import flow_scope
from cpns.messages.constants import AuthFlow
from cpns.messages.model import (
    LocalAuthResponse,
    MemberStatus,
    Message,
    PNEAuthenticateRequest,
    PNEstablishmentNotify,
    PNInvite,
    PNSetupResponse,
)
from cpns.protocol import tk_auth
from cpns.protocol._machine import Event, ProcedureFailed
from cpns.protocol.local_auth import LocalAuthPNE, LocalSessionEstablished
from cpns.protocol.pn_establishment import (
    InvitedPNE,
    LocalEUKeyStored,
    OriginatingPNE,
    PNEJoined,
    PNETKUpdated,
    flow_name,
)
from cpns.types import Random

__all__ = [
    "AGENT_SOCKET",
    "DEFAULT_SERVER_ID",
    "EstablishResult",
    "PNEParticipant",
    "pns_view",
    "tk_state_of",
]

log = logging.getLogger("cpns.device")

#: The agent's control socket (JSON lines), inside the device's data directory.
AGENT_SOCKET: Final = "agent.sock"
#: The CPNS Server's Entity ID unless the store or the agent's options say otherwise.
DEFAULT_SERVER_ID: Final = "cpns-server"
#: Longest control request line, bytes.
_CONTROL_LIMIT: Final = 16 * 1024
#: Messages this module takes from the PAN link.
HANDLED: Final = (
    PNInvite,
    PNEAuthenticateRequest,
    PNSetupResponse,
    PNEstablishmentNotify,
    LocalAuthResponse,
)


class Holder(Protocol):
    """The device store as the agent holds it (locked)."""

    @property
    def data(self) -> dict[str, Any]:
        """The store's map (a copy is changed and saved)."""
        ...

    def save(self, data: dict[str, Any]) -> None:
        """Persist ``data`` (atomic); raises StoreError."""
        ...


# -- the TK-flow state and memberships in the device store -----------------------------------


def pns_view(data: dict[str, Any]) -> list[dict[str, object]]:
    """The PNs the PNE took part in, for ``status``: IDs, flows and flags, no keys."""
    pns = data.get("pns")
    if not isinstance(pns, dict):
        return []
    view = []
    for pn_id, m in sorted(pns.items()):
        if not isinstance(m, dict):
            continue
        view.append(
            {
                "pn_id": pn_id,
                "status": m.get("status"),
                "gateway_id": m.get("gw_id"),
                "est_id": m.get("est_id"),
                "flow": m.get("flow"),
                "at": m.get("at"),
                "session_key": isinstance(m.get("sk"), bytes),
                "local_eukey": isinstance(m.get("local_eukey"), bytes),
                "local_session": isinstance(m.get("local_sk"), bytes),
            }
        )
    return view


@dataclass(frozen=True, slots=True)
class EstablishResult:
    """What ``cpns device establish`` prints: every member's outcome."""

    #: ErrorCode name of this PNE's own outcome ("OK": a member).
    status: str
    #: PN ID.
    pn_id: str
    #: The establishment's ID (hex), if the server named it.
    est_id: str | None
    #: The flow this PNE used.
    flow: str
    #: Every PNE's outcome (pne_id, status name, flow).
    members: tuple[tuple[str, str, str], ...]
    #: The LocalEUKey authentication's outcome, if one ran ("OK" or a status name).
    local: str | None
    #: Who decided a failure ("device", "gateway", ...), if any.
    hop: str | None = None
    #: Why (internal reason), if failed.
    reason: str | None = None
    #: The flow ID (hex) this PNE started for the establishment (``cpns trace``).
    flow_id: str | None = None

    def to_json(self) -> dict[str, object]:
        """The control socket's and ``--json``'s form."""
        return {
            "ok": self.status == "OK",
            "status": self.status,
            "pn_id": self.pn_id,
            "est_id": self.est_id,
            "flow": self.flow,
            "members": [{"pne_id": p, "status": s, "flow": f} for p, s, f in self.members],
            "local": self.local,
            "hop": self.hop,
            "reason": self.reason,
            "flow_id": self.flow_id,
        }


def _members(members: Sequence[MemberStatus]) -> tuple[tuple[str, str, str], ...]:
    return tuple(
        (
            m.pne_id,
            m.status.name if isinstance(m.status, ErrorCode) else str(m.status),
            flow_name(m.flow),
        )
        for m in members
    )


def _code(code: ErrorCode | int) -> str:
    return code.name if isinstance(code, ErrorCode) else str(code)


type _Role = InvitedPNE | OriginatingPNE


class PNEParticipant:
    """The PNE's establishment and LocalEUKey machines, fed from the agent's PAN link."""

    def __init__(
        self,
        holder: Holder,
        *,
        rng: Random,
        clock: Callable[[], int],
        gateway_id: str | None = None,
        server_id: str | None = None,
        secure_pan: bool = False,
        want_local_eukey: bool = False,
        answer_timeout: float = 30.0,
    ) -> None:
        self._holder = holder
        self._rng = rng
        self._clock = clock
        self._gateway_id = gateway_id
        self._server_id = server_id
        self._secure_pan = secure_pan
        self._want_local = want_local_eukey
        self._answer_timeout = answer_timeout
        self._send: Callable[[Message], Awaitable[None]] | None = None
        #: Live machines by the txid of the message that opened them (invite, setup).
        self._by_txid: dict[bytes, _Role] = {}
        #: PN ID -> the live establishment machine of that PN.
        self._by_pn: dict[str, _Role] = {}
        #: Setup txid -> the waiter of ``establish``.
        self._waiters: dict[bytes, asyncio.Future[EstablishResult]] = {}
        #: Local authentications by request txid, with their waiters.
        self._local: dict[bytes, tuple[LocalAuthPNE, asyncio.Future[str]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<PNEParticipant {len(self._by_pn)} PN(s) running>"

    # -- the agent's link ----------------------------------------------------------------

    def attach(self, send: Callable[[Message], Awaitable[None]]) -> None:
        """The agent's PAN link is up: messages go out with ``send``."""
        self._send = send

    def detach(self) -> None:
        """The PAN link is gone."""
        self._send = None

    @property
    def attached(self) -> bool:
        """Whether a PAN link is up."""
        return self._send is not None

    @property
    def _pne_id(self) -> str:
        return str(self._holder.data["entity_id"])

    def _gw(self) -> str | None:
        data = self._holder.data
        for candidate in (self._gateway_id, data.get("gateway_id"), data.get("pn_gateway_id")):
            if isinstance(candidate, str):
                return candidate
        return None

    def _server(self) -> str:
        stored = self._holder.data.get("server_id")
        if self._server_id is not None:
            return self._server_id
        return stored if isinstance(stored, str) else DEFAULT_SERVER_ID

    def _credentials(self) -> tuple[bytes | None, tk_auth.PNETKState | None]:
        data = self._holder.data
        if data.get("credential") == "ui" and isinstance(data.get("eukey"), bytes):
            return data["eukey"], None
        return None, tk_state_of(data)

    def _stored_tk_state(self) -> tk_auth.PNETKState | None:
        """The TK state as stored now: several establishments of this PNE may run at once
        (it is originator of one and invited to another), and each must answer and confirm
        from the latest stored state, never from the one it started with."""
        return self._credentials()[1]

    async def close(self) -> None:
        """Cancel background local authentications (agent stop)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- messages from the PN GW -----------------------------------------------------------

    async def handle(self, message: Message) -> None:
        """One establishment or LocalEUKey message from the PN GW."""
        if isinstance(message, PNInvite):
            await self._on_invite(message)
        elif isinstance(message, PNEAuthenticateRequest):
            if message.auth_flow is AuthFlow.LOCAL:
                await self._feed_local(message)
            else:
                machine = self._by_pn.get(message.pn_id or "")
                if machine is None or machine.terminal:
                    log.info(
                        "AUTHENTICATE Request for PN %s (txid %s): no establishment running",
                        message.pn_id,
                        message.txid.hex(),
                    )
                    return
                await self._feed(machine, message)
        elif isinstance(message, LocalAuthResponse):
            await self._feed_local(message)
        elif isinstance(message, PNSetupResponse | PNEstablishmentNotify):
            machine = self._by_txid.get(message.txid)
            if machine is None or machine.terminal:
                log.info(
                    "%s (txid %s) answers nothing running", message.TYPE.name, message.txid.hex()
                )
                return
            await self._feed(machine, message)

    async def _on_invite(self, message: PNInvite) -> None:
        known = self._by_txid.get(message.txid)
        if known is not None:
            if not known.terminal:
                await self._feed(known, message)  # our answer was lost: the same again
            return
        data = self._holder.data
        if self._gw() is None or data.get("pn_gateway_id") != message.src:
            # A PNE enrolled with UI learns its PN GW's ID from the first invitation.
            updated = dict(data, pn_gateway_id=message.src)
            self._holder.save(updated)
        eukey, tk_state = self._credentials()
        gw_id = self._gw() or message.src
        machine = InvitedPNE(
            pne_id=self._pne_id,
            gw_id=gw_id,
            server_id=self._server(),
            eukey=eukey,
            tk_state=tk_state,
            rng=self._rng,
            local_eukey=self._want_local,
            tk_lookup=self._stored_tk_state,
        )
        self._by_txid[message.txid] = machine
        if message.pn_id is not None:
            self._by_pn[message.pn_id] = machine
        log.info(
            "invited to PN %s by %s (originator %s)",
            message.pn_id,
            message.src,
            message.originator,
        )
        await self._feed(machine, message)

    async def _feed(self, machine: _Role, message: Message) -> None:
        """Receive, persist the events, then send what the machine queued."""
        events = machine.receive(message)
        self._persist(events)
        await self._flush(machine.messages_to_send())
        self._outcomes(machine, events)
        if machine.terminal:  # nothing more to route to it
            for txid in [t for t, m in self._by_txid.items() if m is machine]:
                del self._by_txid[txid]

    async def _flush(self, messages: list[Message]) -> None:
        send = self._send
        for out in messages:
            if send is None:
                log.info("%s (txid %s) not sent: no PAN link", out.TYPE.name, out.txid.hex())
                continue
            await send(out)

    def _persist(self, events: list[Event]) -> None:
        """Facts to store, before the answer that depends on them is sent."""
        data = self._holder.data
        changed = False
        pns: dict[str, Any] = dict(data.get("pns") or {})
        for event in events:
            if isinstance(event, PNETKUpdated):
                data = dict(data, tk_auth=encode_tk_state(event.state, data.get("txid")))
                changed = True
            elif isinstance(event, LocalEUKeyStored):
                entry = dict(pns.get(event.pn_id) or {})
                entry.update(
                    gw_id=event.gw_id,
                    est_id=event.est_id.hex(),
                    local_eukey=event.local_eukey,
                    local_sk=None,
                    status=entry.get("status", "pending"),
                )
                pns[event.pn_id] = entry
                changed = True
            elif isinstance(event, PNEJoined):
                entry = dict(pns.get(event.pn_id) or {})
                if entry.get("est_id") != event.est_id.hex():
                    entry.pop("local_eukey", None)  # a LocalEUKey of an older establishment
                    entry.pop("local_sk", None)
                entry.update(
                    status="member",
                    gw_id=event.gw_id,
                    est_id=event.est_id.hex(),
                    flow=flow_name(event.flow),
                    sk=event.sk,
                    at=self._clock(),
                )
                pns[event.pn_id] = entry
                changed = True
        if changed:
            self._holder.save(dict(data, pns=pns))

    def _outcomes(self, machine: _Role, events: list[Event]) -> None:
        """Log the outcome, wake ``establish``, start the LocalEUKey authentication."""
        for event in events:
            if isinstance(event, PNEJoined):
                log.info(
                    "joined PN %s (%s flow, establishment %s); session key stored",
                    event.pn_id,
                    flow_name(event.flow),
                    event.est_id.hex(),
                )
                self._by_pn.pop(event.pn_id, None)
                entry = self._holder.data.get("pns", {}).get(event.pn_id, {})
                wants_local = isinstance(entry.get("local_eukey"), bytes)
                if isinstance(machine, OriginatingPNE):
                    setup = machine.request
                    assert setup is not None
                    waiter = self._waiters.pop(setup.txid, None)
                    result = EstablishResult(
                        status="OK",
                        pn_id=event.pn_id,
                        est_id=event.est_id.hex(),
                        flow=flow_name(event.flow),
                        members=_members(event.members),
                        local=None,
                    )
                    if waiter is not None and not waiter.done():
                        self._spawn(self._finish_origin(waiter, result, wants_local))
                elif wants_local and not self._secure_pan:
                    self._spawn(self._local_background(event.pn_id))
            elif isinstance(event, ProcedureFailed):
                log.warning(
                    "PN establishment: %s at %s (%s)", _code(event.code), event.hop, event.reason
                )
                for pn_id, live in list(self._by_pn.items()):
                    if live is machine:
                        del self._by_pn[pn_id]
                if isinstance(machine, OriginatingPNE) and machine.request is not None:
                    setup = machine.request
                    waiter = self._waiters.pop(setup.txid, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(
                            EstablishResult(
                                status=_code(event.code),
                                pn_id=setup.pn_id or "",
                                est_id=None,
                                flow="",
                                members=(),
                                local=None,
                                hop=event.hop,
                                reason=event.reason,
                            )
                        )

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish_origin(
        self, waiter: asyncio.Future[EstablishResult], result: EstablishResult, local: bool
    ) -> None:
        if local and not self._secure_pan:
            result = dataclasses.replace(
                result, local=await self.authenticate_locally(result.pn_id)
            )
        if not waiter.done():
            waiter.set_result(result)

    async def _local_background(self, pn_id: str) -> None:
        await self.authenticate_locally(pn_id)

    # -- the originating PNE ---------------------------------------------------------------

    async def establish(
        self,
        pn_id: str,
        invite: Sequence[str] = (),
        *,
        local_eukey: bool = False,
        timeout: float = 60.0,
    ) -> EstablishResult:
        """Start a PN Establishment as the originating PNE; wait for its outcome.

        Raises ConfigurationError: no PAN link, no credential, or the PN GW's ID unknown.
        """
        gw_id = self._gw()
        if self._send is None:
            raise ConfigurationError("the agent is not attached to a PN GW")
        if gw_id is None:
            raise ConfigurationError(
                "the PN GW's Entity ID is unknown: run the agent with --gateway-id"
            )
        eukey, tk_state = self._credentials()
        if eukey is None and tk_state is None:
            raise ConfigurationError("this PNE holds no EUKey (enrol or assign first)")
        live = self._by_pn.get(pn_id)
        if live is not None and not live.terminal:
            raise ConfigurationError(f"an establishment of {pn_id} is already running")
        machine = OriginatingPNE(
            pne_id=self._pne_id,
            gw_id=gw_id,
            server_id=self._server(),
            eukey=eukey,
            tk_state=tk_state,
            rng=self._rng,
            tk_lookup=self._stored_tk_state,
        )
        # This PNE starts the procedure, so it starts its flow (docs/logging.md).
        flow_id = new_flow(self._rng)
        machine.start(
            pn_id=pn_id,
            invite=tuple(invite),
            local_eukey=local_eukey,
            flow=bytes.fromhex(flow_id),
        )
        setup = machine.request
        assert setup is not None
        waiter: asyncio.Future[EstablishResult] = asyncio.get_running_loop().create_future()
        self._waiters[setup.txid] = waiter
        self._by_txid[setup.txid] = machine
        self._by_pn[pn_id] = machine
        with flow_scope(flow_id):
            log.info("establishing PN %s with %d invited PNE(s)", pn_id, len(invite))
            await self._flush(machine.messages_to_send())
        try:
            result = await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            result = EstablishResult(
                status="TIMEOUT",
                pn_id=pn_id,
                est_id=None,
                flow="",
                members=(),
                local=None,
                hop="gateway",
                reason=f"no SETUP Response within {timeout:g}s",
            )
        finally:
            self._waiters.pop(setup.txid, None)
        return dataclasses.replace(result, flow_id=flow_id)

    # -- LocalEUKey authentication ("7.5.5") -----------------------------------------------

    async def authenticate_locally(self, pn_id: str) -> str:
        """Authenticate with the PN GW using the LocalEUKey of ``pn_id``; store the session
        key. Returns "OK" or the failure's status name."""
        entry = (self._holder.data.get("pns") or {}).get(pn_id) or {}
        key, gw_id = entry.get("local_eukey"), entry.get("gw_id")
        if not isinstance(key, bytes) or not isinstance(gw_id, str):
            return "UNKNOWN_ENTITY"
        if self._send is None:
            return "UPSTREAM_UNAVAILABLE"
        machine = LocalAuthPNE(
            pne_id=self._pne_id, gw_id=gw_id, pn_id=pn_id, local_eukey=key, rng=self._rng
        )
        machine.start()
        (request,) = machine.messages_to_send()
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._local[request.txid] = (machine, waiter)
        try:
            await self._flush([request])
            status = await asyncio.wait_for(waiter, self._answer_timeout)
        except TimeoutError:
            status = "TIMEOUT"
        finally:
            self._local.pop(request.txid, None)
        log.info("LocalEUKey authentication with %s for PN %s: %s", gw_id, pn_id, status)
        return status

    async def _feed_local(self, message: Message) -> None:
        found = self._local.get(message.txid)
        if found is None:
            log.info(
                "%s (txid %s): no local authentication running",
                message.TYPE.name,
                message.txid.hex(),
            )
            return
        machine, waiter = found
        if machine.terminal:
            return
        events = machine.receive(message)
        for event in events:
            if isinstance(event, LocalSessionEstablished):
                data = self._holder.data
                pns = dict(data.get("pns") or {})
                entry = dict(pns.get(event.pn_id) or {})
                entry.update(local_sk=event.sk, local_at=self._clock())
                pns[event.pn_id] = entry
                self._holder.save(dict(data, pns=pns))
                if not waiter.done():
                    waiter.set_result("OK")
            elif isinstance(event, ProcedureFailed) and not waiter.done():
                waiter.set_result(_code(event.code))
        await self._flush(machine.messages_to_send())


# -- the agent's control socket ---------------------------------------------------------------


class AgentControl:
    """JSON lines on ``agent.sock`` (owner only): ``{"op": "establish", "pn_id",
    "invite": [...], "local_eukey": bool, "timeout": s}`` -> the outcome, and
    ``{"op": "status"}`` -> whether the agent is attached."""

    def __init__(self, participant: PNEParticipant) -> None:
        self._participant = participant
        self._server: asyncio.Server | None = None

    async def start(self, path: Path) -> None:
        """Listen on ``path``; a failure is logged (the agent runs without it)."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, path=str(path), limit=_CONTROL_LIMIT
            )
            os.chmod(path, 0o600)
        except OSError as exc:
            log.warning("no control socket %s (%s): 'cpns device establish' unavailable", path, exc)

    async def close(self, path: Path) -> None:
        """Stop listening and remove the socket file."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(OSError):
            path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            reply = await self.op(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def op(self, line: bytes) -> dict[str, object]:
        """The reply to one request line."""

        def bad(why: str) -> dict[str, object]:
            return {"ok": False, "status": "MALFORMED_MESSAGE", "error": why}

        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return bad("not JSON")
        if not isinstance(request, dict):
            return bad("not a JSON object")
        op = request.get("op")
        if op == "status":
            return {"ok": True, "status": "OK", "attached": self._participant.attached}
        if op != "establish":
            return bad(f"unknown op {op!r}")
        pn_id, invite = request.get("pn_id"), request.get("invite", [])
        local, timeout = request.get("local_eukey", False), request.get("timeout", 60)
        if (
            not isinstance(pn_id, str)
            or not isinstance(invite, list)
            or not all(isinstance(p, str) for p in invite)
            or not isinstance(local, bool)
            or isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or timeout <= 0
        ):
            return bad("establish needs pn_id, invite (list), local_eukey (bool), timeout > 0")
        try:
            result = await self._participant.establish(
                pn_id, invite, local_eukey=local, timeout=float(timeout)
            )
        except ConfigurationError as exc:
            return {"ok": False, "status": "NOT_READY", "error": str(exc)}
        except Exception:  # a control client never takes the agent down
            log.exception("establish failed")
            return {"ok": False, "status": "INTERNAL_ERROR"}
        return result.to_json()
