"""In-memory doubles for the I/O parts of PN Establishment: the PN GW's coordinator and the
PNE agents' participants, wired by a fake PAN and a fake server link.

The server double runs the real server machines (ServerSetup, ServerCompletion) over its
own facts and answers a known txid from the reply it stored, as the real server does.
The PN GW runs the real :class:`PNEstablishmentCoordinator` over a real
:class:`PNELedger` (a key store in a temporary directory); each PNE runs the real
:class:`PNEParticipant` over an in-memory holder. Links deliver by creating tasks, so the
parties run concurrently as over sockets; nothing reads a clock in the machines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cpns.crypto.hashchain import build_chain
from cpns.device.establishment import PNEParticipant
from cpns.errors import TransportError
from cpns.gateway.ledger import STORE_NAME, PNELedger
from cpns.gateway.procedures.pn_establishment import PNEstablishmentCoordinator
from cpns.gateway.records import KeySet, PNERecord
from cpns.messages.codec import decode, encode
from cpns.messages.model import (
    AuthenticateResponse,
    LocalAuthRequest,
    Message,
    PNEstablishRequest,
    PNSetupRequest,
)
from cpns.protocol._machine import Event
from cpns.protocol.pn_establishment import (
    EstablishmentLookups,
    EstablishmentPending,
    PNEstablished,
    ServerCompletion,
    ServerSetup,
    TKAdvanced,
)
from cpns.records import EntityRecord
from cpns.store.keystore import LocalKeyStore
from cpns.types import EntityKind
from tests.helpers import FIXED_NOW, FixedRandom

SERVER_ID = "cpns-server"
GW_ID = "gw-alice"
OWNER = "alice"


class ServerDouble:
    """The CPNS Server's facts and its two PN Establishment exchanges."""

    def __init__(self, rng: FixedRandom, gw_eukey: bytes) -> None:
        self.rng = rng
        self.entities: dict[str, EntityRecord] = {
            GW_ID: EntityRecord(
                entity_id=GW_ID, kind=EntityKind.PN_GW, owner=OWNER, eukeys=(gw_eukey,), key_index=1
            )
        }
        self.tk: dict[str, tuple[bytes, int]] = {}
        self.pending: dict[bytes, EstablishmentPending] = {}
        self.replies: dict[bytes, Message] = {}
        self.inventory: dict[str, dict[str, str]] = {}
        #: Every request body received (retries included).
        self.received: list[bytes] = []
        #: Fail this many exchanges after processing them (the reply is lost).
        self.lose_replies = 0
        #: Fail every exchange before it reaches the server.
        self.unreachable = False
        #: Answer with a reply to another transaction (a forged or misrouted reply).
        self.wrong_txid = False

    async def exchange(self, message: Message) -> Message:
        if self.unreachable:
            raise TransportError("connection refused")
        self.received.append(encode(message))
        reply = self.replies.get(message.txid)
        if reply is None:
            reply = self._serve(decode(encode(message)))
            self.replies[message.txid] = reply
        await asyncio.sleep(0)
        if self.lose_replies:
            self.lose_replies -= 1
            raise TransportError("reply lost")
        if self.wrong_txid:
            reply = replace(reply, txid=bytes(16))
        return decode(encode(reply))

    def _lookups(self) -> EstablishmentLookups:
        return EstablishmentLookups(get_entity=self.entities.get, get_tk_state=self.tk.get)

    def _serve(self, message: Message) -> Message:
        machine: ServerSetup | ServerCompletion
        if isinstance(message, PNEstablishRequest):
            machine = ServerSetup(
                server_id=SERVER_ID,
                requester=message.src,
                lookups=self._lookups(),
                rng=self.rng,
                now=FIXED_NOW,
            )
        else:
            assert isinstance(message, AuthenticateResponse)
            machine = ServerCompletion(
                server_id=SERVER_ID,
                requester=message.src,
                pending=self.pending.get(message.est_id),
                lookups=self._lookups(),
                now=FIXED_NOW,
            )
        self._apply(machine.receive(message))
        (reply,) = machine.messages_to_send()
        return reply

    def _apply(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, EstablishmentPending):
                self.pending[event.est_id] = event
            elif isinstance(event, TKAdvanced):
                self.tk[event.pne_id] = (event.tk, event.tk_step)
                entity = self.entities[event.pne_id]
                self.entities[event.pne_id] = replace(entity, key_index=event.key_index)
            elif isinstance(event, PNEstablished):
                self.pending.pop(event.est_id, None)
                self.inventory.setdefault(event.pn_id, {}).update(
                    {r.pne_id: r.status.name for r in event.results}
                )


@dataclass
class Holder:
    """A PNE's device store in memory; ``log`` records saves and sends in order."""

    data: dict[str, Any]
    log: list[str] = field(default_factory=list)

    def save(self, data: dict[str, Any]) -> None:
        self.data = data
        self.log.append("save")


@dataclass
class Link:
    """A PAN link from the PN GW to one PNE's participant."""

    pne_id: str | None
    world: GatewayWorld
    peer: str = "127.0.0.1"
    sent: list[Message] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.pne_id or "?"

    async def send(self, message: Message, *, level: int = logging.INFO) -> bool:
        assert self.pne_id is not None
        if self.pne_id in self.world.silent:
            return True  # taken, never answered
        self.sent.append(message)
        self.world.spawn(self.world.participants[self.pne_id].handle(decode(encode(message))))
        return True


@dataclass
class PANDouble:
    """The PAN side: attached links, refusals and faults recorded."""

    world: GatewayWorld
    refused: list[tuple[str, str]] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)

    def links(self, pne_id: str) -> list[Link]:
        link = self.world.links.get(pne_id)
        return [link] if link is not None and pne_id in self.world.attached else []

    def hello_flow(self, pne_id: str) -> str | None:
        return None

    def log_allowed(self) -> bool:
        return True

    async def refuse(self, link: Any, code: Any, txid: bytes = b"") -> None:
        self.refused.append((link.name, code.name))

    def peer_fault(self, link: Any, what: str, detail: str = "") -> None:
        self.faults.append(what)


class GatewayWorld:
    """One server double, one PN GW coordinator, and PNE participants."""

    def __init__(self, tmp_path: Path, *, seed: int = 0, answer_timeout: float = 5.0) -> None:
        self.rng = FixedRandom(seed)
        self.gw_eukey = self.rng.token_bytes(32)
        self.server = ServerDouble(self.rng, self.gw_eukey)
        store = LocalKeyStore.open_or_create(tmp_path, STORE_NAME)
        store.lock()
        self.store = store
        self.ledger = PNELedger(store)
        self.ledger.load(store.load())
        self.pan = PANDouble(self)
        self.gateway = PNEstablishmentCoordinator(
            gateway_id=GW_ID,
            server_id=SERVER_ID,
            ledger=self.ledger,
            pan=self.pan,
            rng=self.rng,
            clock=lambda: FIXED_NOW,
            answer_timeout=answer_timeout,
        )
        self.gateway.bind(self.gw_eukey, self.server)
        self.participants: dict[str, PNEParticipant] = {}
        self.holders: dict[str, Holder] = {}
        self.links: dict[str, Link] = {}
        self.attached: set[str] = set()
        #: PNEs whose links take messages that never reach them.
        self.silent: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _participant(self, pne_id: str, data: dict[str, Any], **kw: Any) -> PNEParticipant:
        holder = Holder(data=data)
        participant = PNEParticipant(holder, rng=self.rng, clock=lambda: FIXED_NOW, **kw)
        link = Link(pne_id=pne_id, world=self)
        self.links[pne_id] = link
        self.holders[pne_id] = holder
        self.participants[pne_id] = participant
        self.attached.add(pne_id)

        async def to_gateway(message: Message) -> None:
            message = decode(encode(message))
            holder.log.append(f"send {message.TYPE.name}")
            handler: Callable[[Any, Message], Any]
            if isinstance(message, PNSetupRequest):
                handler = self.gateway.on_setup
            elif isinstance(message, LocalAuthRequest):
                handler = self.gateway.on_local_request
            else:
                handler = self.gateway.on_pne_message
            self.spawn(handler(link, message))

        participant.attach(to_gateway)
        return participant

    def add_ui_pne(self, pne_id: str, *, owner: str = OWNER, **kw: Any) -> PNEParticipant:
        """A PNE enrolled with UI (credential "ui": rand/hash flow)."""
        eukey = self.rng.token_bytes(32)
        self.server.entities[pne_id] = EntityRecord(
            entity_id=pne_id, kind=EntityKind.PNE, owner=owner, eukeys=(eukey,), key_index=1
        )
        data = {
            "entity_id": pne_id,
            "has_ui": True,
            "credential": "ui",
            "eukey": eukey,
            "key_index": 1,
            "server_id": SERVER_ID,
        }
        return self._participant(pne_id, data, gateway_id=GW_ID, **kw)

    def add_tk_pne(self, pne_id: str, *, chain_length: int = 4, **kw: Any) -> PNEParticipant:
        """A PNE with a 003 chain delivered through this PN GW (credential "tk")."""
        tk = self.rng.token_bytes(32)
        txid = self.rng.token_bytes(16)
        chain = tuple(build_chain(self.rng.token_bytes(32), chain_length))
        self.server.entities[pne_id] = EntityRecord(
            entity_id=pne_id,
            kind=EntityKind.PNE,
            owner=OWNER,
            eukeys=chain,
            key_index=1,
            assigned_via=GW_ID,
        )
        self.server.tk[pne_id] = (tk, 0)
        key_set = KeySet(txid=txid, user_id=OWNER, tk=tk, eukeys=chain, key_index=1, delivered=True)
        self.ledger.put(pne_id, PNERecord(key_set=key_set, last_status="OK"))
        data = {
            "entity_id": pne_id,
            "credential": "tk",
            "tk": tk,
            "eukey": chain[0],
            "key_index": 1,
            "txid": txid,
            "gateway_id": GW_ID,
            "epoch": 1,
        }
        return self._participant(pne_id, data, **kw)

    async def settle(self) -> None:
        """Wait until every delivery and run has finished."""
        for _ in range(1000):
            await self.gateway.wait_idle()
            pending = [t for t in self.tasks if not t.done()]
            if not pending:
                return
            await asyncio.gather(*pending, return_exceptions=True)
        raise AssertionError("the world did not settle")
