"""A test-side PN GW and its PNEs that drive a CPNS Server's two PN Establishment halves.

:class:`PNGateway` plays one PN GW and any number of PNEs with the project's own role
machines (cpns.protocol.pn_establishment): the originating PNE's SETUP Request, the
invitations, the PN GW's SETUP Request to the server (``pn-establishment-setup``), the
per-PNE AUTHENTICATE Requests and Responses, the aggregated AUTHENTICATE Response
(``pn-establishment-complete``), and each PNE's check of the server's answer. The PAN is
in memory (every message still crosses it as bytes); the two messages to the server go
through ``exchange``, an async callable that returns the server's reply:

* unit tests: ``lambda m: service.handle(m, authenticated=GW)`` decoded (see
  :func:`service_exchange`);
* integration tests and benchmarks: a real ``cpns server`` over HTTPS + Digest,
  ``ServerClient(...).exchange``.

One implementation for the tests (``tests/pn_client.py`` re-exports it) and the load
generator of ``benchmarks/server_load.py``, which plays many PN GWs with it. The
benchmark passes ``wire=False``: PAN messages then go between the in-memory machines as
objects (the upstream messages still cross HTTPS as bytes), sparing the load generator's
one core the PAN encoding, which is no part of the server's work.

Each party applies its machine's events as its I/O layer would (the PN GW's TK states and
LocalEUKeys, each PNE's TK state and LocalEUKey), so a second establishment continues
from the first. Hooks: ``tamper`` sees every message (PAN and upstream) and may change or
drop it; ``before_upstream`` runs before each message to the server (restart the server
between the halves, keep a copy to replay). Deterministic for a seeded ``rng``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cpns.errors import ErrorCode
from cpns.messages.codec import decode, encode
from cpns.messages.model import (
    AuthenticateRequest,
    AuthenticateResponse,
    Message,
    PNEstablishRequest,
    PNEstablishResponse,
)
from cpns.protocol import tk_auth
from cpns.protocol._machine import Event, Machine, ProcedureFailed
from cpns.protocol.pn_establishment import (
    EstablishmentFinished,
    GatewayEstablishment,
    GatewayTKHolding,
    GatewayTKUpdated,
    InvitedPNE,
    LocalEUKeyStored,
    OriginatingPNE,
    PNEJoined,
    PNETKUpdated,
    ReassignmentRequested,
)
from cpns.types import Random

#: Sends one message to the server and returns its reply.
type Exchange = Callable[[Message], Awaitable[Message]]
#: The message as sent -> the message delivered, or None to drop it.
type Tamper = Callable[[Message], Message | None]


@dataclass
class PNEDevice:
    """What one PNE holds: an EUKey enrolled with UI (rand/hash flow) or a TK-flow state
    (a 003 chain), and the LocalEUKey of its last establishment."""

    pne_id: str
    eukey: bytes | None = field(default=None, repr=False)
    tk_state: tk_auth.PNETKState | None = field(default=None, repr=False)
    local_eukey: bytes | None = field(default=None, repr=False)


@dataclass
class Run:
    """What every party saw in one establishment."""

    #: Every exchange with the server: (request as sent, reply).
    upstream: list[tuple[Message, Message]] = field(default_factory=list)
    #: The PN GW machine's events.
    gateway: list[Event] = field(default_factory=list)
    #: Each PNE machine's events.
    pnes: dict[str, list[Event]] = field(default_factory=dict)

    def reply(self, kind: type[Message]) -> Message | None:
        """The server's reply to the request of type ``kind`` (the last one), or None."""
        found = [r for q, r in self.upstream if isinstance(q, kind)]
        return found[-1] if found else None

    @property
    def authenticate_request(self) -> AuthenticateRequest | None:
        """The server's AUTHENTICATE Request (first half's reply)."""
        reply = self.reply(PNEstablishRequest)
        return reply if isinstance(reply, AuthenticateRequest) else None

    @property
    def establish_response(self) -> PNEstablishResponse | None:
        """The server's SETUP Response (second half's reply)."""
        reply = self.reply(AuthenticateResponse)
        return reply if isinstance(reply, PNEstablishResponse) else None

    def server_status(self) -> dict[str, ErrorCode | int]:
        """Each PNE's result in the server's SETUP Response (or its refusal in the
        AUTHENTICATE Request if the second half never ran)."""
        response = self.establish_response
        if response is not None:
            return {r.pne_id: r.status for r in response.entries}
        request = self.authenticate_request
        return {c.pne_id: c.status for c in request.entries} if request is not None else {}

    def joined(self, pne_id: str) -> PNEJoined | None:
        """The PNE's PNEJoined event (it authenticated the server and joined), or None."""
        found = [e for e in self.pnes.get(pne_id, []) if isinstance(e, PNEJoined)]
        return found[0] if found else None

    def pne_failure(self, pne_id: str) -> ProcedureFailed | None:
        """The PNE machine's failure, or None."""
        found = [e for e in self.pnes.get(pne_id, []) if isinstance(e, ProcedureFailed)]
        return found[0] if found else None

    def finished(self) -> EstablishmentFinished | None:
        """The PN GW's end-of-establishment event, or None."""
        found = [e for e in self.gateway if isinstance(e, EstablishmentFinished)]
        return found[0] if found else None

    def reassign(self) -> dict[str, ErrorCode]:
        """The PNEs the server asked to re-assign (003) and why."""
        return {e.pne_id: e.reason for e in self.gateway if isinstance(e, ReassignmentRequested)}


class PNGateway:
    """A PN GW (its Entity ID and EUKey) with its PNEs, driving a server via ``exchange``."""

    def __init__(
        self,
        *,
        gw_id: str,
        gw_eukey: bytes,
        server_id: str,
        exchange: Exchange,
        rng: Random,
        wire: bool = True,
    ) -> None:
        self.gw_id = gw_id
        self.gw_eukey = gw_eukey
        self.server_id = server_id
        self.exchange = exchange
        self.rng = rng
        #: Whether PAN messages cross the in-memory PAN as bytes (encoded and decoded).
        self.wire = wire
        #: The PNEs, by Entity ID.
        self.devices: dict[str, PNEDevice] = {}
        #: What the PN GW holds for each TK-flow PNE (TK state and EUKey set).
        self.tk: dict[str, GatewayTKHolding] = {}
        #: The PN GW's LocalEUKeys, by (PNE ID, PN ID).
        self.local: dict[tuple[str, str], bytes] = {}

    # -- the PNEs ---------------------------------------------------------------------------

    def add_rand_hash_pne(self, pne_id: str, eukey: bytes) -> PNEDevice:
        """A PNE enrolled with UI (004): its own EUKey, which the PN GW does not hold."""
        device = PNEDevice(pne_id=pne_id, eukey=eukey)
        self.devices[pne_id] = device
        return device

    def add_tk_pne(
        self,
        pne_id: str,
        *,
        tk: bytes,
        chain: Sequence[bytes],
        tk_step: int = 0,
        key_index: int = 1,
    ) -> PNEDevice:
        """A PNE without UI whose chain [EUKey_1..EUKey_n] came from 003 through this PN
        GW: the PN GW and the PNE both hold TK_{tk_step}; the PNE EUKey_{key_index}."""
        chain = tuple(chain)
        self.tk[pne_id] = GatewayTKHolding(
            state=tk_auth.GatewayTKState(tk=tk, tk_step=tk_step), eukeys=chain
        )
        device = PNEDevice(
            pne_id=pne_id,
            tk_state=tk_auth.PNETKState(
                tk=tk, tk_step=tk_step, eukey=chain[key_index - 1], key_index=key_index
            ),
        )
        self.devices[pne_id] = device
        return device

    def _pne_machine(self, pne_id: str, *, invited: bool, local: bool) -> Machine[Any]:
        device = self.devices[pne_id]
        common: dict[str, Any] = {
            "pne_id": pne_id,
            "gw_id": self.gw_id,
            "server_id": self.server_id,
            "eukey": device.eukey,
            "tk_state": device.tk_state,
            "rng": self.rng,
        }
        if invited:
            return InvitedPNE(local_eukey=local, **common)
        return OriginatingPNE(**common)

    # -- the parties' I/O ---------------------------------------------------------------------

    def _apply_gateway(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, GatewayTKUpdated):
                held = self.tk[event.pne_id]
                self.tk[event.pne_id] = GatewayTKHolding(state=event.state, eukeys=held.eukeys)
            elif isinstance(event, LocalEUKeyStored):
                self.local[(event.pne_id, event.pn_id)] = event.local_eukey

    def _apply_pne(self, pne_id: str, events: Iterable[Event]) -> None:
        device = self.devices[pne_id]
        for event in events:
            if isinstance(event, PNETKUpdated):
                device.tk_state = event.state
            elif isinstance(event, LocalEUKeyStored):
                device.local_eukey = event.local_eukey

    # -- one establishment ---------------------------------------------------------------------

    async def establish(
        self,
        originator: str,
        invited: Sequence[str] = (),
        *,
        pn_id: str,
        local: Iterable[str] = (),
        tamper: Tamper | None = None,
        before_upstream: Callable[[Message], Awaitable[None]] | None = None,
    ) -> Run:
        """Run one establishment to its end: ``originator`` invites ``invited`` (a PNE
        without a device here never answers: the PN GW reports it TIMEOUT); the PNEs in
        ``local`` ask for a LocalEUKey. Returns what every party saw."""
        wants_local = set(local)
        run = Run()
        gateway = GatewayEstablishment(
            gw_id=self.gw_id,
            gw_eukey=self.gw_eukey,
            server_id=self.server_id,
            rng=self.rng,
            tk_lookup=self.tk.get,
        )
        machines: dict[str, Machine[Any]] = {}
        origin = self._pne_machine(originator, invited=False, local=False)
        assert isinstance(origin, OriginatingPNE)
        machines[originator] = origin
        for pne_id in invited:
            if pne_id in self.devices:
                machines[pne_id] = self._pne_machine(
                    pne_id, invited=True, local=pne_id in wants_local
                )
        origin.start(pn_id=pn_id, invite=tuple(invited), local_eukey=originator in wants_local)
        queue: deque[Message] = deque(origin.messages_to_send())

        async def deliver(message: Message) -> None:
            if tamper is not None:
                changed = tamper(message)
                if changed is None:
                    return
                message = changed
            if self.wire:
                message = decode(encode(message))  # every message crosses a wire as bytes
            if message.dst == self.gw_id:
                if gateway.terminal:
                    return
                events = gateway.receive(message)
                self._apply_gateway(events)
                run.gateway += events
                queue.extend(gateway.messages_to_send())
            elif message.dst == self.server_id:
                if before_upstream is not None:
                    await before_upstream(message)
                reply = await self.exchange(message)
                run.upstream.append((message, reply))
                queue.append(reply)
            elif message.dst in machines:
                machine = machines[message.dst]
                if machine.terminal:
                    return
                events = machine.receive(message)
                self._apply_pne(message.dst, events)
                run.pnes.setdefault(message.dst, []).extend(events)
                queue.extend(machine.messages_to_send())

        for _ in range(10_000):
            while queue:
                await deliver(queue.popleft())
            if gateway.terminal:
                break
            waiting = gateway.awaiting()
            if not waiting:  # the server's answer was dropped
                run.gateway += gateway.fail(ErrorCode.UPSTREAM_UNAVAILABLE, "no server answer")
                queue.extend(gateway.messages_to_send())
                continue
            for pne_id in waiting:  # PNEs that did not answer: their timers fire
                events = gateway.timeout(pne_id)
                self._apply_gateway(events)
                run.gateway += events
            queue.extend(gateway.messages_to_send())
        else:  # pragma: no cover - a livelock would be a bug
            raise AssertionError("the establishment did not end")
        while queue:  # the PN GW's last messages to its PNEs
            await deliver(queue.popleft())
        return run


def service_exchange(service: Any, authenticated: str) -> Exchange:
    """An :data:`Exchange` into a :class:`cpns.server.service.CPNSService` in this process,
    as the Digest-authenticated ``authenticated``: the reply is decoded from its bytes."""

    async def exchange(message: Message) -> Message:
        reply = await service.handle(decode(encode(message)), authenticated=authenticated)
        return decode(reply.body)

    return exchange
