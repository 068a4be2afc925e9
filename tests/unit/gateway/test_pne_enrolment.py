"""The PN GW's relay of a PNE's with-UI enrolment (cpns.gateway.procedures.pne_enrolment).

The coordinator runs against a PAN link and a server that are small in-memory doubles
of the interfaces it uses (:class:`~cpns.gateway.procedures.Link`, ``PAN`` and
``Upstream``); the server double runs the real :class:`UserKeyAssignmentServer` machine
(relayed), so what the relay sees is exactly what the server sends. The real daemon,
server and PNE processes are exercised in tests/integration/test_pne_enrolment_end_to_end.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
from tests.helpers import FIXED_NOW, PASSWORDS, SERVER_ID, Directory, FixedRandom

from cpns.errors import ErrorCode, TransportError
from cpns.gateway.procedures.pne_enrolment import PNEEnrolmentCoordinator
from cpns.gateway.upstream import UpstreamAuthFailed
from cpns.messages.codec import encode
from cpns.messages.model import (
    ErrorMessage,
    Message,
    UserKeyAssignmentRequest,
    UserKeyAssignmentResponse,
)
from cpns.protocol.key_assignment import AssignmentPolicy
from cpns.protocol.user_key_assignment import (
    EUKeyReceived,
    UserKeyAssignmentClient,
    UserKeyAssignmentServer,
)
from cpns.types import EntityKind

GW = "gw-alice"
PNE = "pne-ui"


def run[T](coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


@dataclass
class FakeLink:
    """One PAN link: what was sent on it; ``gone`` makes every send fail."""

    pne_id: str | None = PNE
    peer: str = "127.0.0.1"
    gone: bool = False
    sent: list[Message] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.pne_id or "?"

    async def send(self, message: Message, *, level: int = logging.INFO) -> bool:
        if self.gone:
            return False
        self.sent.append(message)
        return True


@dataclass
class FakePAN:
    """The PAN side as a procedure sees it; records refusals and faults."""

    refused: list[tuple[ErrorCode, bytes]] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)

    def links(self, pne_id: str) -> list[FakeLink]:
        return []

    def hello_flow(self, pne_id: str) -> str | None:
        return None

    def log_allowed(self) -> bool:
        return True

    async def refuse(self, link: Any, code: ErrorCode, txid: bytes = bytes(16)) -> None:
        self.refused.append((code, txid))

    def peer_fault(self, link: Any, what: str, detail: str = "") -> None:
        self.faults.append(what)


@dataclass
class FakeServer:
    """The upstream link to a server running the real relayed machine (or failing)."""

    world: Directory
    fail: Exception | None = None
    #: Requests received, in order.
    seen: list[Message] = field(default_factory=list)
    #: Replies by txid: a retried transaction is answered from it, as the server does.
    replies: dict[bytes, Message] = field(default_factory=dict)
    #: Set while an exchange is in flight (to check one relay per PNE at a time).
    busy: int = 0
    most_busy: int = 0
    gate: asyncio.Event | None = None

    async def exchange(self, message: Message) -> Message:
        self.seen.append(message)
        self.busy += 1
        self.most_busy = max(self.most_busy, self.busy)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            if self.fail is not None:
                raise self.fail
            if message.txid in self.replies:
                return self.replies[message.txid]
            server = UserKeyAssignmentServer(
                policy=AssignmentPolicy(),
                lookups=self.world.lookups(),
                rng=FixedRandom(9),
                now=FIXED_NOW,
                relay=GW,
            )
            events = server.receive(message)
            self.world.apply(events)
            [reply] = server.messages_to_send()
            self.replies[message.txid] = reply
            return reply
        finally:
            self.busy -= 1


def _client(seed: int = 1) -> UserKeyAssignmentClient:
    return UserKeyAssignmentClient(
        entity_id=PNE, entity_kind=EntityKind.PNE, server_id=SERVER_ID, rng=FixedRandom(seed)
    )


def _request(
    client: UserKeyAssignmentClient, key_of: Callable[[str, str], bytes], password: str
) -> UserKeyAssignmentRequest:
    client.start(user_id="alice", password_key=key_of("alice", password), now=FIXED_NOW)
    [request] = client.messages_to_send()
    assert isinstance(request, UserKeyAssignmentRequest)
    return request


def _coordinator(server: FakeServer) -> tuple[PNEEnrolmentCoordinator, FakePAN]:
    pan = FakePAN()
    coordinator = PNEEnrolmentCoordinator(gateway_id=GW, server_id=SERVER_ID, pan=pan)
    coordinator.bind(server)
    return coordinator, pan


def test_the_request_and_the_answer_are_relayed_unchanged(
    world: Directory, password_key: Callable[[str, str], bytes]
) -> None:
    """004 §5.x.1 through the PN GW: the PNE's request reaches the server unchanged, and
    the server's answer reaches the PNE unchanged; the PNE opens its EUKey from it. The
    EUKey appears in nothing the gateway handled (it is sealed under a key derived from
    the password key, which the gateway never has)."""
    server = FakeServer(world)
    coordinator, _ = _coordinator(server)
    client = _client()
    request = _request(client, password_key, PASSWORDS["alice"])
    link = FakeLink()
    assert run(coordinator.on_request(link, request)) is True
    assert [encode(m) for m in server.seen] == [encode(request)]
    [reply] = link.sent
    assert isinstance(reply, UserKeyAssignmentResponse)
    assert encode(reply) == encode(server.replies[request.txid])
    [event] = client.receive(reply)
    assert isinstance(event, EUKeyReceived)
    assert world.entities[PNE].owner == "alice"
    assert world.entities[PNE].eukeys == (event.eukey,)
    handled = encode(request) + encode(reply)
    assert event.eukey not in handled


def test_the_servers_refusal_is_relayed_unchanged(
    world: Directory, password_key: Callable[[str, str], bytes]
) -> None:
    """004 §5.x.1: a wrong password is refused by the server (WRONG_PASSWORD, its own
    Response, src = the server) and relayed as it came."""
    server = FakeServer(world)
    coordinator, _ = _coordinator(server)
    request = _request(_client(), password_key, "not the password")
    link = FakeLink()
    run(coordinator.on_request(link, request))
    [reply] = link.sent
    assert isinstance(reply, UserKeyAssignmentResponse)
    assert (reply.status, reply.src) == (ErrorCode.WRONG_PASSWORD, SERVER_ID)
    assert PNE not in world.entities


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (TransportError("gateway->server: unreachable"), ErrorCode.UPSTREAM_UNAVAILABLE),
        (UpstreamAuthFailed("refused", hop="server"), ErrorCode.AUTHENTICATION_FAILED),
    ],
    ids=["unreachable", "digest-refused"],
)
def test_upstream_failures_are_the_gateways_own_refusal(
    world: Directory,
    password_key: Callable[[str, str], bytes],
    failure: Exception,
    code: ErrorCode,
) -> None:
    """Our rule (errors name the hop): when the server cannot be reached or Digest fails
    on the upstream link, the PNE gets an ErrorMessage from the gateway (src = the PN GW,
    same txid and flow) and the link stays up for a retry."""
    server = FakeServer(world, fail=failure)
    coordinator, _ = _coordinator(server)
    request = _request(_client(), password_key, PASSWORDS["alice"])
    link = FakeLink()
    assert run(coordinator.on_request(link, request)) is True
    assert link.sent == [
        ErrorMessage(txid=request.txid, src=GW, dst=PNE, flow=request.flow, status=code)
    ]


@pytest.mark.parametrize(
    ("field_changes", "code"),
    [
        ({"entity_kind": EntityKind.PN_GW}, ErrorCode.WRONG_ENTITY_KIND),
        ({"dst": "other-server"}, ErrorCode.WRONG_DESTINATION),
    ],
    ids=["not-a-pne", "other-server"],
)
def test_what_the_gateway_refuses_without_relaying(
    world: Directory,
    password_key: Callable[[str, str], bytes],
    field_changes: dict[str, Any],
    code: ErrorCode,
) -> None:
    """Our rule (docs/procedures/pne-enrolment.md): a request that is not a PNE's, or not
    for our server, is refused by the gateway itself and never sent upstream."""
    import dataclasses

    request = dataclasses.replace(
        _request(_client(), password_key, PASSWORDS["alice"]), **field_changes
    )
    server = FakeServer(world)
    coordinator, _ = _coordinator(server)
    link = FakeLink()
    assert run(coordinator.on_request(link, request)) is True
    assert server.seen == []
    assert link.sent == [
        ErrorMessage(txid=request.txid, src=GW, dst=PNE, flow=request.flow, status=code)
    ]


def test_a_request_for_another_pne_ends_the_link(
    world: Directory, password_key: Callable[[str, str], bytes]
) -> None:
    """D-PAN-1 applied to enrolment: a link that announced one PNE cannot send another
    PNE's request: NOT_AUTHORIZED, a counted peer fault, the link ends, nothing relayed."""
    server = FakeServer(world)
    coordinator, pan = _coordinator(server)
    request = _request(_client(), password_key, PASSWORDS["alice"])
    link = FakeLink(pne_id="pne-other")
    assert run(coordinator.on_request(link, request)) is False
    assert server.seen == []
    assert pan.refused == [(ErrorCode.NOT_AUTHORIZED, request.txid)]
    assert pan.faults


def test_a_retry_after_a_lost_reply_gets_the_same_answer(
    world: Directory, password_key: Callable[[str, str], bytes]
) -> None:
    """Our rule (idempotent retries): the answer is lost on the PAN (the link is gone);
    the PNE sends the same request on a new link; the gateway relays it again (it keeps
    nothing) and the server answers the known txid from its stored reply: same bytes."""
    server = FakeServer(world)
    coordinator, _ = _coordinator(server)
    request = _request(_client(), password_key, PASSWORDS["alice"])
    lost, retry = FakeLink(gone=True), FakeLink()
    outcome = run(coordinator.relay(lost, request))
    assert (outcome.status, outcome.hop, outcome.delivered) == ("OK", "server", False)
    run(coordinator.on_request(retry, request))
    assert [encode(m) for m in server.seen] == [encode(request)] * 2
    assert encode(retry.sent[0]) == encode(server.replies[request.txid])


def test_one_relay_per_pne_at_a_time(
    world: Directory, password_key: Callable[[str, str], bytes]
) -> None:
    """Our rule (bounded resources): a PNE's retries on other links while its first relay
    is in flight wait for it, so one PNE never has two upstream exchanges at once; every
    link gets the same answer, and no lock outlives the relays."""
    server = FakeServer(world)
    coordinator, _ = _coordinator(server)
    request = _request(_client(), password_key, PASSWORDS["alice"])
    links = [FakeLink() for _ in range(3)]

    async def all_of_them() -> None:
        server.gate = asyncio.Event()
        tasks = [asyncio.create_task(coordinator.on_request(link, request)) for link in links]
        await asyncio.sleep(0.01)
        server.gate.set()
        await asyncio.gather(*tasks)

    run(all_of_them())
    assert server.most_busy == 1
    assert len(server.seen) == 3
    assert len({encode(link.sent[0]) for link in links}) == 1
    assert coordinator._locks == {}  # nothing kept once no relay is in flight
