"""An in-memory world for PN Establishment tests: one CPNS Server's facts, one PN GW and
its PNEs, the role machines of cpns.protocol.pn_establishment wired by a message queue.

Each party keeps its own facts and applies its machine's events the way its I/O layer
would (the server: pending establishments, TK state, key index, PN inventory; the PN GW:
TK states and LocalEUKeys; a PNE: its TK state and LocalEUKey). A ``tamper`` hook sees
every message on the way and may change or drop it; dropped answers end in the PN GW's
timeouts. Deterministic: the RNG is seeded, nothing reads a clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cpns.crypto.hashchain import build_chain
from cpns.errors import ErrorCode
from cpns.messages.codec import decode, encode
from cpns.messages.model import (
    AuthenticateResponse,
    Message,
    PNEstablishRequest,
)
from cpns.protocol import tk_auth
from cpns.protocol._machine import Event, Machine, ProcedureFailed
from cpns.protocol.pn_establishment import (
    EstablishmentFinished,
    EstablishmentLookups,
    EstablishmentPending,
    GatewayEstablishment,
    GatewayTKHolding,
    GatewayTKUpdated,
    InvitedPNE,
    LocalEUKeyStored,
    OriginatingPNE,
    PNEJoined,
    PNEstablished,
    PNETKUpdated,
    ServerCompletion,
    ServerSetup,
    TKAdvanced,
)
from cpns.records import EntityRecord, PendingEstablishment, PNMember
from cpns.types import EntityKind
from tests.helpers import FIXED_NOW, FixedRandom

SERVER_ID = "cpns-server"
GW_ID = "gw-alice"
OWNER = "alice"
PN_ID = "pn-alice-home"

#: A tamper hook: the message as sent -> the message delivered, None to drop it, or a
#: list of messages to deliver instead (a duplicate, an injected message).
type Tamper = Callable[[Message], Message | list[Message] | None]


@dataclass
class PNEHolder:
    """What one PNE holds."""

    pne_id: str
    eukey: bytes | None = None
    tk_state: tk_auth.PNETKState | None = None
    local_eukey: bytes | None = None


@dataclass
class Outcome:
    """What every party reported in one establishment."""

    server: list[Event] = field(default_factory=list)
    gateway: list[Event] = field(default_factory=list)
    pnes: dict[str, list[Event]] = field(default_factory=dict)
    #: Every message delivered, in order (after tampering).
    delivered: list[Message] = field(default_factory=list)

    def established(self) -> PNEstablished:
        """The server's inventory event."""
        (event,) = [e for e in self.server if isinstance(e, PNEstablished)]
        return event

    def server_status(self) -> dict[str, ErrorCode]:
        """Every PNE's result at the server."""
        return {r.pne_id: r.status for r in self.established().results}

    def joined(self, pne_id: str) -> PNEJoined | None:
        """The PNE's PNEJoined event, or None."""
        found = [e for e in self.pnes.get(pne_id, []) if isinstance(e, PNEJoined)]
        return found[0] if found else None

    def pne_failure(self, pne_id: str) -> ProcedureFailed | None:
        """The PNE's ProcedureFailed event, or None."""
        found = [e for e in self.pnes.get(pne_id, []) if isinstance(e, ProcedureFailed)]
        return found[0] if found else None

    def finished(self) -> EstablishmentFinished | None:
        """The PN GW's end-of-establishment event, or None."""
        found = [e for e in self.gateway if isinstance(e, EstablishmentFinished)]
        return found[0] if found else None


def _from_store(record: PendingEstablishment | None) -> EstablishmentPending | None:
    return EstablishmentPending.from_record(record) if record is not None else None


def _tampered(message: Message, tamper: Tamper | None) -> list[Message]:
    if tamper is None:
        return [message]
    changed = tamper(message)
    if changed is None:
        return []
    return changed if isinstance(changed, list) else [changed]


class World:
    """One server's facts, one PN GW (owned by ``alice``) and its PNEs."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = FixedRandom(seed)
        self.now = FIXED_NOW
        self.gw_eukey = self.rng.token_bytes(32)
        self.entities: dict[str, EntityRecord] = {
            GW_ID: EntityRecord(
                entity_id=GW_ID,
                kind=EntityKind.PN_GW,
                owner=OWNER,
                eukeys=(self.gw_eukey,),
                key_index=1,
            )
        }
        #: The server's TK states: pne_id -> (TK_s, s).
        self.server_tk: dict[str, tuple[bytes, int]] = {}
        #: Pending establishments by (gw_id, est_id), as the store's records.
        self.pending: dict[tuple[str, bytes], PendingEstablishment] = {}
        #: The PN inventory: pn_id -> {pne_id: status}.
        self.inventory: dict[str, dict[str, ErrorCode]] = {}
        #: The same, as the store's PNMember records.
        self.members: dict[str, dict[str, PNMember]] = {}
        self.gw_tk: dict[str, GatewayTKHolding] = {}
        self.gw_local: dict[tuple[str, str], bytes] = {}
        self.pnes: dict[str, PNEHolder] = {}

    # -- set-up ---------------------------------------------------------------------------

    def add_rand_hash_pne(self, pne_id: str, *, owner: str = OWNER, **kw: Any) -> PNEHolder:
        """A PNE enrolled with UI (004): one EUKey the PN GW does not hold."""
        eukey = self.rng.token_bytes(32)
        self.entities[pne_id] = EntityRecord(
            entity_id=pne_id, kind=EntityKind.PNE, owner=owner, eukeys=(eukey,), key_index=1, **kw
        )
        holder = PNEHolder(pne_id=pne_id, eukey=eukey)
        self.pnes[pne_id] = holder
        return holder

    def add_tk_pne(self, pne_id: str, *, chain_length: int = 4, owner: str = OWNER) -> PNEHolder:
        """A PNE without UI with a 003 chain assigned through this PN GW and its TK."""
        tk = self.rng.token_bytes(32)
        chain = tuple(build_chain(self.rng.token_bytes(32), chain_length))
        self.entities[pne_id] = EntityRecord(
            entity_id=pne_id,
            kind=EntityKind.PNE,
            owner=owner,
            eukeys=chain,
            key_index=1,
            assigned_via=GW_ID,
        )
        self.server_tk[pne_id] = (tk, 0)
        self.gw_tk[pne_id] = GatewayTKHolding(
            state=tk_auth.GatewayTKState(tk=tk, tk_step=0), eukeys=chain
        )
        holder = PNEHolder(
            pne_id=pne_id,
            tk_state=tk_auth.PNETKState(tk=tk, tk_step=0, eukey=chain[0], key_index=1),
        )
        self.pnes[pne_id] = holder
        return holder

    def lookups(self) -> EstablishmentLookups:
        """The server's injected reads."""
        return EstablishmentLookups(get_entity=self.entities.get, get_tk_state=self.server_tk.get)

    # -- the parties' I/O layers ------------------------------------------------------------

    def _apply_server(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, EstablishmentPending):
                self.pending[(event.gw_id, event.est_id)] = event.to_record()
            elif isinstance(event, TKAdvanced):
                _, step = self.server_tk[event.pne_id]
                entity = self.entities[event.pne_id]
                assert step == event.expected_step  # compare and set
                assert entity.key_index == event.expected_index
                self.server_tk[event.pne_id] = (event.tk, event.tk_step)
                self.entities[event.pne_id] = replace(entity, key_index=event.key_index)
            elif isinstance(event, PNEstablished):
                del self.pending[(event.gw_id, event.est_id)]
                pn = self.inventory.setdefault(event.pn_id, {})
                pn.update({r.pne_id: r.status for r in event.results})
                self.members.setdefault(event.pn_id, {}).update(
                    {m.pne_id: m for m in event.members()}
                )

    def _apply_gateway(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, GatewayTKUpdated):
                held = self.gw_tk[event.pne_id]
                self.gw_tk[event.pne_id] = GatewayTKHolding(state=event.state, eukeys=held.eukeys)
            elif isinstance(event, LocalEUKeyStored):
                self.gw_local[(event.pne_id, event.pn_id)] = event.local_eukey

    def _apply_pne(self, pne_id: str, events: Iterable[Event]) -> None:
        holder = self.pnes[pne_id]
        for event in events:
            if isinstance(event, PNETKUpdated):
                holder.tk_state = event.state
            elif isinstance(event, LocalEUKeyStored):
                holder.local_eukey = event.local_eukey

    def pne_machine(self, pne_id: str, *, invited: bool, local: bool = False) -> Machine[Any]:
        """A PNE's machine built from what it holds now."""
        holder = self.pnes[pne_id]
        common = {
            "pne_id": pne_id,
            "gw_id": GW_ID,
            "server_id": SERVER_ID,
            "eukey": holder.eukey,
            "tk_state": holder.tk_state,
            "rng": self.rng,
        }
        if invited:
            return InvitedPNE(local_eukey=local, **common)
        return OriginatingPNE(**common)

    # -- one establishment --------------------------------------------------------------------

    def establish(
        self,
        originator: str,
        invited: Sequence[str] = (),
        *,
        local: Iterable[str] = (),
        tamper: Tamper | None = None,
        setup_tamper: Callable[[PNEstablishRequest], PNEstablishRequest] | None = None,
        pn_id: str = PN_ID,
    ) -> Outcome:
        """Run one establishment to its end; return every party's events."""
        wants_local = set(local)
        outcome = Outcome()
        gateway = GatewayEstablishment(
            gw_id=GW_ID,
            gw_eukey=self.gw_eukey,
            server_id=SERVER_ID,
            rng=self.rng,
            tk_lookup=self.gw_tk.get,
        )
        machines: dict[str, Machine[Any]] = {}
        origin = self.pne_machine(originator, invited=False)
        assert isinstance(origin, OriginatingPNE)
        machines[originator] = origin
        for pne_id in invited:
            if pne_id in self.pnes:
                machines[pne_id] = self.pne_machine(
                    pne_id, invited=True, local=pne_id in wants_local
                )
        origin.start(pn_id=pn_id, invite=tuple(invited), local_eukey=originator in wants_local)
        queue: deque[Message] = deque(origin.messages_to_send())

        def deliver(message: Message) -> None:
            # Every message crosses the wire as bytes.
            message = decode(encode(message))
            outcome.delivered.append(message)
            if message.dst == GW_ID:
                if gateway.terminal:
                    return
                events = gateway.receive(message)
                self._apply_gateway(events)
                outcome.gateway += events
                queue.extend(gateway.messages_to_send())
            elif message.dst == SERVER_ID:
                queue.extend(self._serve(message, outcome, setup_tamper))
            elif message.dst in machines:
                machine = machines[message.dst]
                if machine.terminal:
                    return
                events = machine.receive(message)
                self._apply_pne(message.dst, events)
                outcome.pnes.setdefault(message.dst, []).extend(events)
                queue.extend(machine.messages_to_send())

        for _ in range(10_000):
            while queue:
                for message in _tampered(queue.popleft(), tamper):
                    deliver(message)
            if gateway.terminal:
                break
            waiting = gateway.awaiting()
            if not waiting:
                outcome.gateway += gateway.fail(
                    ErrorCode.UPSTREAM_UNAVAILABLE, "no answer from the server"
                )
                queue.extend(gateway.messages_to_send())
                continue
            for pne_id in waiting:
                events = gateway.timeout(pne_id)
                self._apply_gateway(events)
                outcome.gateway += events
            queue.extend(gateway.messages_to_send())
        else:  # pragma: no cover - a livelock would be a bug
            raise AssertionError("the establishment did not end")
        while queue:  # the PN GW's last messages
            for message in _tampered(queue.popleft(), tamper):
                deliver(message)
        return outcome

    def _serve(
        self,
        message: Message,
        outcome: Outcome,
        setup_tamper: Callable[[PNEstablishRequest], PNEstablishRequest] | None,
    ) -> list[Message]:
        """One HTTP exchange: a fresh server machine each time, built from stored facts."""
        machine: ServerSetup | ServerCompletion
        if not isinstance(message, PNEstablishRequest | AuthenticateResponse):
            return []  # the HTTP layer answers other types with an ErrorMessage: dropped here
        if isinstance(message, PNEstablishRequest):
            if setup_tamper is not None:
                message = setup_tamper(message)
            machine = ServerSetup(
                server_id=SERVER_ID,
                requester=GW_ID,
                lookups=self.lookups(),
                rng=self.rng,
                now=self.now,
            )
        else:
            machine = ServerCompletion(
                server_id=SERVER_ID,
                requester=GW_ID,
                pending=_from_store(self.pending.get((message.src, message.est_id))),
                lookups=self.lookups(),
                now=self.now,
            )
        events = machine.receive(message)
        self._apply_server(events)
        outcome.server += events
        return machine.messages_to_send()
