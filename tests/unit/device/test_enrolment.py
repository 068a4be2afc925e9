"""A PNE with UI enrolling through the PN GW (cpns.device.enrolment), over a real socket.

The fake PN GW listens on loopback and answers with the real
:class:`UserKeyAssignmentServer` machine (as relayed), keeping its replies by txid as
the server does, so every answer the PNE sees goes through the real 004 crypto. It can
drop an answer, answer for the gateway itself, or forge one, on cue.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import FIXED_NOW, PASSWORDS, SERVER_ID, Directory, FixedRandom

from cpns.device.agent import (
    CREDENTIAL_UI,
    EXIT_REFUSED,
    DeviceAgent,
    device_status,
    init_device,
)
from cpns.device.enrolment import enroll_device
from cpns.errors import ConfigurationError, ErrorCode, ProcedureRejected, TransportError
from cpns.messages.model import (
    ErrorMessage,
    Message,
    PNEHello,
    UserKeyAssignmentRequest,
    UserKeyAssignmentResponse,
)
from cpns.protocol.key_assignment import AssignmentPolicy
from cpns.protocol.user_key_assignment import UserKeyAssignmentServer
from cpns.store.keystore import LocalKeyStore
from cpns.transport.stream import read_message, write_message

PNE = "pne-ui"
GW = "gw-alice"

type KeyOf = Callable[[str, str], bytes]


def run[T](coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


@dataclass
class FakeGateway:
    """The PN GW's PAN port, relaying to a server machine; ``plan`` says, per link, what
    to do: "relay", "drop" (read the request, close without answering), "upstream-down"
    (the gateway's own UPSTREAM_UNAVAILABLE), "forge" (an OK Response the gateway made)."""

    world: Directory
    plan: list[str]
    hellos: list[PNEHello] = field(default_factory=list)
    requests: list[UserKeyAssignmentRequest] = field(default_factory=list)
    replies: dict[bytes, Message] = field(default_factory=dict)

    def server_answer(self, request: UserKeyAssignmentRequest) -> Message:
        if request.txid in self.replies:  # the server's stored reply
            return self.replies[request.txid]
        server = UserKeyAssignmentServer(
            policy=AssignmentPolicy(),
            lookups=self.world.lookups(),
            rng=FixedRandom(9),
            now=FIXED_NOW,
            relay=GW,
        )
        self.world.apply(server.receive(request))
        [reply] = server.messages_to_send()
        self.replies[request.txid] = reply
        return reply

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await read_message(reader)
            assert isinstance(hello, PNEHello)
            self.hellos.append(hello)
            request = await read_message(reader)
            assert isinstance(request, UserKeyAssignmentRequest)
            self.requests.append(request)
            step = self.plan.pop(0) if self.plan else "relay"
            reply: Message
            if step == "drop":
                return
            if step == "upstream-down":
                reply = ErrorMessage(
                    txid=request.txid,
                    src=GW,
                    dst=request.src,
                    status=ErrorCode.UPSTREAM_UNAVAILABLE,
                )
            elif step == "forge":
                reply = UserKeyAssignmentResponse(
                    txid=request.txid,
                    src=SERVER_ID,
                    dst=request.src,
                    status=ErrorCode.OK,
                    rand_server=bytes(32),
                    sealed_eukey=bytes(60),
                )
            else:
                reply = self.server_answer(request)
            await write_message(writer, reply)
            await reader.read()  # until the PNE closes
        finally:
            writer.close()


async def _with_gateway[T](
    gateway: FakeGateway, body: Callable[[int], Coroutine[Any, Any, T]]
) -> T:
    server = await asyncio.start_server(gateway.handle, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    try:
        return await body(port)
    finally:
        server.close()
        await server.wait_closed()


def _enroll(
    gateway: FakeGateway,
    device_dir: Path,
    key_of: KeyOf,
    *,
    password: str = PASSWORDS["alice"],
    entity_id: str | None = PNE,
    **kw: Any,
) -> Any:
    async def body(port: int) -> Any:
        return await enroll_device(
            device_dir,
            "127.0.0.1",
            port,
            user_id="alice",
            password_key=key_of("alice", password),
            entity_id=entity_id,
            rng=FixedRandom(4),
            clock=lambda: FIXED_NOW,
            per_try_timeout=kw.pop("per_try_timeout", 5.0),
            backoff=0,
            **kw,
        )

    return run(_with_gateway(gateway, body))


def test_a_pne_with_ui_gets_and_stores_its_own_eukey(
    world: Directory, password_key: KeyOf, tmp_path: Path
) -> None:
    """004 §5.x.1 through the PN GW: the PNE announces itself with has_ui, sends the
    password proof, opens the server's answer and stores the EUKey as credential kind
    "ui" (the one the server recorded with the PNE's owner); status shows the kind."""
    gateway = FakeGateway(world, plan=["relay"])
    result = _enroll(gateway, tmp_path, password_key)
    assert (result.entity_id, result.user_id, result.tries) == (PNE, "alice", 1)
    assert gateway.hellos[0].has_ui is True
    assert gateway.requests[0].entity_kind.name == "PNE"
    stored = LocalKeyStore.open_or_create(tmp_path, "device").load()
    assert stored["credential"] == CREDENTIAL_UI
    assert stored["eukey"] == world.entities[PNE].eukeys[0]
    assert world.entities[PNE].owner == "alice"
    status = device_status(tmp_path)
    assert (status["credential"], status["has_key"], status["has_tk"]) == ("ui", True, False)
    assert status["user_id"] == "alice"
    assert result.txid == gateway.requests[0].txid.hex()
    assert "eukey" not in json.dumps(status)


def test_a_lost_answer_is_retried_with_the_same_request(
    world: Directory, password_key: KeyOf, tmp_path: Path
) -> None:
    """Our rule (idempotent retries): the first link closes without an answer; the PNE
    sends the very same request (same txid, same bytes) on a new link and gets it."""
    gateway = FakeGateway(world, plan=["drop", "relay"])
    result = _enroll(gateway, tmp_path, password_key)
    assert result.tries == 2
    first, second = gateway.requests
    assert first == second
    assert device_status(tmp_path)["credential"] == "ui"


def test_upstream_unavailable_is_retried_with_the_same_request(
    world: Directory, password_key: KeyOf, tmp_path: Path
) -> None:
    """Our rule (idempotent retries): the PN GW could not reach the server (its answer may
    be lost beyond the PN GW); the PNE sends the same request again and is enrolled."""
    gateway = FakeGateway(world, plan=["upstream-down", "relay"])
    result = _enroll(gateway, tmp_path, password_key)
    assert result.tries == 2
    assert gateway.requests[0] == gateway.requests[1]


def test_the_servers_refusal_names_the_server(
    world: Directory, password_key: KeyOf, tmp_path: Path
) -> None:
    """004 §5.x.1: a wrong password is the server's WRONG_PASSWORD, reported with hop
    "server"; the device exists but holds no key."""
    gateway = FakeGateway(world, plan=["relay"])
    with pytest.raises(ProcedureRejected) as caught:
        _enroll(gateway, tmp_path, password_key, password="not the password")
    assert (caught.value.code, caught.value.hop) == (ErrorCode.WRONG_PASSWORD, "server")
    status = device_status(tmp_path)
    assert (status["has_key"], status["credential"]) == (False, None)


def test_the_gateways_own_refusal_names_its_hop(
    world: Directory, password_key: KeyOf, tmp_path: Path
) -> None:
    """Our rule (errors name the hop): the PN GW could not reach the server on any try:
    its own ErrorMessage, hop "gateway->server"."""
    gateway = FakeGateway(world, plan=["upstream-down"] * 2)
    with pytest.raises(ProcedureRejected) as caught:
        _enroll(gateway, tmp_path, password_key, tries=2)
    assert (caught.value.code, caught.value.hop) == (
        ErrorCode.UPSTREAM_UNAVAILABLE,
        "gateway->server",
    )


def test_an_answer_the_gateway_forged_is_refused(
    world: Directory, password_key: KeyOf, tmp_path: Path
) -> None:
    """004 §5.x.1 (the sealed EUKey authenticates the server): an OK answer that does
    not open under the key derived from the password key is refused by the PNE (hop
    "device"); nothing is stored."""
    gateway = FakeGateway(world, plan=["forge"])
    with pytest.raises(ProcedureRejected) as caught:
        _enroll(gateway, tmp_path, password_key)
    assert (caught.value.code, caught.value.hop) == (ErrorCode.AUTHENTICATION_FAILED, "device")
    assert device_status(tmp_path)["has_key"] is False


def test_no_answer_at_all_is_unreachable(
    world: Directory, password_key: KeyOf, tmp_path: Path
) -> None:
    """Our rule (bounded retries): every try loses its answer: TransportError after the
    tries, each with the same request."""
    gateway = FakeGateway(world, plan=["drop", "drop"])
    with pytest.raises(TransportError, match="after 2 tries"):
        _enroll(gateway, tmp_path, password_key, tries=2)
    assert len({r.txid for r in gateway.requests}) == 1


def test_the_store_must_be_this_pnes(world: Directory, password_key: KeyOf, tmp_path: Path) -> None:
    """Our rule: ``--entity-id`` creates the store of a PNE with UI; an existing store of
    another PNE, or no store and no Entity ID, is a configuration error."""
    gateway = FakeGateway(world, plan=[])
    with pytest.raises(ConfigurationError):
        _enroll(gateway, tmp_path / "none", password_key, entity_id=None)
    init_device(tmp_path / "other", "pne-other", bytes(32))
    with pytest.raises(ConfigurationError):
        _enroll(gateway, tmp_path / "other", password_key)
    assert gateway.requests == []


def test_a_pne_with_a_ui_key_ignores_003_notifications(
    world: Directory, password_key: KeyOf, tmp_path: Path
) -> None:
    """Our rule (docs/procedures/pne-enrolment.md, credential kinds): a PNE holding its
    own with-UI EUKey is never rolled over by a 003 Notification (it has no TK to open
    it, and no epoch to compare): the agent ignores it and keeps its key."""
    _enroll(FakeGateway(world, plan=["relay"]), tmp_path, password_key)
    before = LocalKeyStore.open_or_create(tmp_path, "device").load()["eukey"]

    from cpns.messages.model import EUKeyAssignmentNotification

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await read_message(reader)
        assert isinstance(hello, PNEHello)
        assert hello.has_ui is True
        await write_message(
            writer,
            EUKeyAssignmentNotification(
                txid=bytes(16),
                src=GW,
                dst=PNE,
                status=ErrorCode.OK,
                key_index=1,
                sealed_eukey=bytes(60),
                epoch=7,
            ),
        )
        await reader.read()
        writer.close()

    async def go() -> int:
        server = await asyncio.start_server(gateway, "127.0.0.1", 0)
        port = int(server.sockets[0].getsockname()[1])
        try:
            agent = DeviceAgent(tmp_path, "127.0.0.1", port, rng=FixedRandom(5))
            return await agent.run(once=True, timeout=1.0)
        finally:
            server.close()
            await server.wait_closed()

    assert run(go()) == EXIT_REFUSED
    assert LocalKeyStore.open_or_create(tmp_path, "device").load()["eukey"] == before
