"""The PN GW daemon (cpns.gateway): 003 PN GW role, PAN side, control socket, server link.

The PAN side runs over real loopback sockets. The server is an in-memory ``Upstream`` that
runs the server's real service layer (CPNSService over MemoryStore), which keeps each
transaction's reply, so resent requests get the stored answer (DESIGN §5); only HTTPS and
Digest are left out. The HTTPS + Digest client is tested separately (test_upstream.py, over
real loopback TLS with the real DigestServer).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import struct
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import (
    FIXED_NOW,
    PASSWORDS,
    SERVER_ID,
    TKS,
    Directory,
    FixedRandom,
    cached_password_key,
    claim_key_for,
)
from tests.metrics import free_port, get, sample, scrape, value

from cpns.device.agent import DeviceAgent, device_status, init_device
from cpns.errors import (
    ConfigurationError,
    ErrorCode,
    ProcedureRejected,
    StoreError,
    TransportError,
)
from cpns.gateway.config import GatewayConfig, load_config, write_config
from cpns.gateway.daemon import GatewayDaemon, enroll, offline_status
from cpns.gateway.procedures.eukey_assignment import EUKeyAssignmentCoordinator
from cpns.logs import ContextFilter, JSONFormatter, TextFormatter
from cpns.messages.codec import decode, encode
from cpns.messages.model import (
    ErrorMessage,
    EUKeyAssignmentAck,
    EUKeyAssignmentNotification,
    EUKeyAssignmentRequest,
    Message,
    PNEHello,
    UserKeyAssignmentRequest,
)
from cpns.protocol.key_assignment import (
    AssignmentPolicy,
    EUKeyAssignmentDevice,
)
from cpns.server.service import CPNSService
from cpns.store.base import WriteTx
from cpns.store.keystore import LocalKeyStore, RecordChanges
from cpns.store.memory import MemoryStore
from cpns.transport.framing import encode_frame
from cpns.transport.stream import read_message, write_message
from cpns.types import EntityKind

#: Upper bound of every wait in these tests, seconds.
WAIT = 10.0


# -- doubles and helpers ---------------------------------------------------------------------


class FakeServer:
    """An ``Upstream`` running the server's real service layer (:class:`CPNSService` over a
    :class:`MemoryStore` seeded from a Directory) in memory: no HTTPS and no Digest, the
    request's source is taken as the authenticated entity. Faults are injected around it."""

    def __init__(self, directory: Directory, *, now: int = FIXED_NOW) -> None:
        self.store = MemoryStore()

        def seed(tx: WriteTx) -> None:
            for user in directory.users.values():
                tx.add_user(user)
            for entity in directory.entities.values():
                tx.put_entity(entity)
            tx.put_tks(list(directory.tks.values()))

        self.store.write(seed)
        self.service = CPNSService(
            store=self.store,
            policy=AssignmentPolicy(server_id=SERVER_ID),
            rng=FixedRandom(99),
            clock=lambda: now,
        )
        #: Every request as received (encoded), in order.
        self.received: list[bytes] = []
        #: While True, every exchange fails as if the server were unreachable.
        self.down = False
        #: Process the next N requests but lose their replies on the way back.
        self.lose_replies = 0
        #: Called with each request before it is processed.
        self.on_request: Callable[[Message], None] | None = None

    @property
    def chains_assigned(self) -> int:
        """How many PNE chains the server assigned."""
        return sum(1 for e in self.store.list_entities() if e.assigned_via)

    def eukeys(self, entity_id: str) -> tuple[bytes, ...]:
        """The EUKeys the server stored for an entity."""
        entity = self.store.get_entity(entity_id)
        assert entity is not None, entity_id
        return entity.eukeys

    async def exchange(self, message: Message) -> Message:
        """Answer as the server does (stored replies, idempotent retries included)."""
        await asyncio.sleep(0)
        self.received.append(encode(message))
        if self.on_request is not None:
            self.on_request(message)
        if self.down:
            raise TransportError("gateway->server: fake server down")
        authenticated: str | None = message.src
        if isinstance(message, UserKeyAssignmentRequest):
            # The gateway's own enrolment goes without Digest; a PNE's, relayed by the
            # gateway, goes with the gateway's (docs/procedures/pne-enrolment.md).
            authenticated = None if message.entity_kind is EntityKind.PN_GW else "gw-alice"
        reply = await self.service.handle(message, authenticated=authenticated)
        if self.lose_replies:
            self.lose_replies -= 1
            raise TransportError("gateway->server: reply lost")
        return decode(reply.body)


def run[T](coro: Coroutine[Any, Any, T]) -> T:
    """Run one scenario on a fresh loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, 3 * WAIT))


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` until it holds (bounded by WAIT)."""

    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), WAIT)


def gateway_store(config: GatewayConfig) -> dict[str, Any]:
    """The gateway's key store as on disk (read without the daemon's lock): the main map,
    with the per-PNE records under ``pnes``."""
    store = LocalKeyStore.open_or_create(config.data_dir, "gateway")
    data = store.load()
    assert "pnes" not in data, "PNE records belong in their own files"
    data["pnes"] = store.load_records()
    return data


@contextlib.asynccontextmanager
async def running_gateway(
    config: GatewayConfig, server: FakeServer
) -> AsyncIterator[GatewayDaemon]:
    """A started daemon, stopped afterwards (listeners closed, lock released)."""
    daemon = GatewayDaemon(config, upstream=server, clock=lambda: FIXED_NOW)
    await asyncio.wait_for(daemon.start(), WAIT)
    try:
        yield daemon
    finally:
        await asyncio.wait_for(daemon.stop(), WAIT)


async def control(config: GatewayConfig, request: dict[str, Any]) -> dict[str, Any]:
    """One JSON-lines request on the control socket."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(str(config.control_socket)), WAIT
    )
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), WAIT + float(request.get("wait", 0)))
    finally:
        writer.close()
        await writer.wait_closed()
    reply: dict[str, Any] = json.loads(line)
    return reply


@contextlib.asynccontextmanager
async def pan_client(
    daemon: GatewayDaemon,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw PAN connection (the test plays the PNE by hand)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", daemon.pan_port), WAIT
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def hello(pne_id: str = "pne-1", dst: str = "pan") -> PNEHello:
    return PNEHello(txid=bytes(16), src=pne_id, dst=dst, has_ui=False, key_index=0)


async def receive(reader: asyncio.StreamReader) -> Message | None:
    return await asyncio.wait_for(read_message(reader), WAIT)


def make_device(tmp_path: Path, pne_id: str = "pne-1") -> Path:
    data_dir = tmp_path / pne_id
    init_device(data_dir, pne_id, TKS[pne_id])
    return data_dir


def assign_op(pne_id: str, key: bytes, *, wait: float = 0.0, user: str = "alice") -> dict[str, Any]:
    return {
        "op": "assign",
        "pne_id": pne_id,
        "user_id": user,
        "password_key": key.hex(),
        "claim_key": claim_key_for(pne_id).hex(),
        "wait": wait,
    }


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def server(world: Directory) -> FakeServer:
    """A fake server over the standard world (alice, gw-alice, TKs of pne-1, pne-2)."""
    return FakeServer(world)


@pytest.fixture
def gw_config(tmp_path: Path) -> GatewayConfig:
    """gw-alice in ``tmp_path/gw``, PAN on a free loopback port (remembered)."""
    return GatewayConfig(
        data_dir=tmp_path / "gw",
        entity_id="gw-alice",
        server_url="https://cpns.invalid:8443",
        ca_file=tmp_path / "unused-ca.pem",
        server_id=SERVER_ID,
        pan_port=0,
    )


@pytest.fixture
def alice_key(password_key: Callable[[str, str], bytes]) -> bytes:
    """alice's password key."""
    return password_key("alice", PASSWORDS["alice"])


@pytest.fixture
def enrolled(gw_config: GatewayConfig, server: FakeServer, alice_key: bytes) -> GatewayConfig:
    """gw-alice enrolled through the real 004 client against the fake server."""
    run(enroll(gw_config, "alice", alice_key, upstream=server, clock=lambda: FIXED_NOW))
    return gw_config


# -- enrolment ---------------------------------------------------------------------------------


def test_enroll_stores_the_gateway_eukey(enrolled: GatewayConfig, server: FakeServer) -> None:
    """004 §5.x.1: the PN GW receives its EUKey and stores it with its Entity ID and User."""
    stored = gateway_store(enrolled)
    assert stored["entity_id"] == "gw-alice"
    assert stored["user_id"] == "alice"
    assert stored["eukey"] == server.eukeys("gw-alice")[0]
    assert stored["pnes"] == {}


def test_enroll_with_wrong_password_is_refused_by_the_server(
    gw_config: GatewayConfig, server: FakeServer
) -> None:
    """004 §5.x.1: a wrong password is refused at the server; nothing is stored."""
    with pytest.raises(ProcedureRejected) as info:
        run(enroll(gw_config, "alice", bytes(32), upstream=server, clock=lambda: FIXED_NOW))
    assert info.value.hop == "server"
    assert info.value.code is ErrorCode.AUTHENTICATION_FAILED  # D-004-2: one opaque code
    assert "eukey" not in gateway_store(gw_config)


def test_start_refuses_a_gateway_that_is_not_enrolled(
    gw_config: GatewayConfig, server: FakeServer
) -> None:
    """The daemon needs its EUKey (Digest secret) before it can serve."""

    async def scenario() -> None:
        async with running_gateway(gw_config, server):
            pass  # pragma: no cover

    with pytest.raises(ConfigurationError, match="not enrolled"):
        run(scenario())


def test_config_round_trip_and_environment_override(gw_config: GatewayConfig) -> None:
    """gateway.toml written by enroll is read back; CPNS_GATEWAY_* overrides it."""
    write_config(gw_config)
    assert load_config(gw_config.data_dir, environ={}) == gw_config
    env = {"CPNS_GATEWAY_PAN_PORT": "7001", "CPNS_GATEWAY_SERVER_URL": "https://other:1"}
    loaded = load_config(gw_config.data_dir, environ=env)
    assert (loaded.pan_port, loaded.server_url) == (7001, "https://other:1")
    with pytest.raises(ConfigurationError):
        load_config(gw_config.data_dir, environ={"CPNS_GATEWAY_PAN_PORT": "many"})


# -- 003 end to end ----------------------------------------------------------------------------


def test_gateway_and_device_complete_an_assignment(
    enrolled: GatewayConfig, server: FakeServer, alice_key: bytes, tmp_path: Path
) -> None:
    """003 §7.4.2.2: the PN GW obtains [EUKeyPNE] and the TK, delivers EUKey_1 sealed
    under the TK, and the PNE stores it; the control reply says 'delivered'."""
    device_dir = make_device(tmp_path)

    async def scenario() -> tuple[dict[str, Any], int, dict[str, Any]]:
        async with running_gateway(enrolled, server) as gw:
            agent = DeviceAgent(device_dir, "127.0.0.1", gw.pan_port, backoff=0.02)
            device = asyncio.create_task(agent.run(once=True, timeout=WAIT))
            await wait_until(lambda: gw.status()["attached"] == ["pne-1"])
            reply = await control(enrolled, assign_op("pne-1", alice_key, wait=WAIT))
            code = await asyncio.wait_for(device, WAIT)
            status = await control(enrolled, {"op": "status"})
        return reply, code, status

    reply, code, status = run(scenario())
    assert reply["ok"] is True
    assert (reply["status"], reply["stage"], reply["hop"]) == ("OK", "delivered", None)
    assert code == 0
    chain = server.eukeys("pne-1")
    device = LocalKeyStore.open_or_create(device_dir, "device").load()
    assert (device["eukey"], device["key_index"]) == (chain[0], 1)
    assert device_status(device_dir)["key_index"] == 1
    pne = gateway_store(enrolled)["pnes"]["pne-1"]["set"]
    assert pne["delivered"] is True
    assert pne["tk"] == TKS["pne-1"]
    assert tuple(pne["eukeys"]) == chain
    assert [p["stage"] for p in status["pnes"]] == ["delivered"]
    text = json.dumps(status)
    for secret in (TKS["pne-1"], *chain, gateway_store(enrolled)["eukey"], alice_key):
        assert secret.hex() not in text


def test_request_is_persisted_before_it_is_sent(
    enrolled: GatewayConfig, server: FakeServer, alice_key: bytes
) -> None:
    """DESIGN §6: the encoded EUKey Assignment Request is in the store when it reaches the
    server, so a restart can resend the very same bytes."""
    seen: list[bool] = []

    def check(message: Message) -> None:
        stored = gateway_store(enrolled)["pnes"]["pne-1"].get("request")
        seen.append(stored is not None and stored["encoded"] == encode(message))

    server.on_request = check

    async def scenario() -> dict[str, Any]:
        async with running_gateway(enrolled, server):
            return await control(enrolled, assign_op("pne-1", alice_key))

    reply = run(scenario())
    assert (reply["ok"], reply["stage"]) == (True, "stored")
    assert seen == [True]
    assert "request" not in gateway_store(enrolled)["pnes"]["pne-1"]


def test_set_is_stored_before_the_pne_is_notified(
    enrolled: GatewayConfig,
    server: FakeServer,
    alice_key: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """003 §7.4.2.1.1.3 step 1: the PN GW stores TK and [EUKeyPNE] before notifying; if
    that store fails, the attached PNE gets no Notification and the request stays."""

    async def scenario() -> tuple[dict[str, Any], Message | None]:
        async with running_gateway(enrolled, server) as gw, pan_client(gw) as (reader, writer):
            await write_message(writer, hello())
            await wait_until(lambda: gw.status()["attached"] == ["pne-1"])
            original = LocalKeyStore.commit_records

            def failing_commit(store: LocalKeyStore, changes: RecordChanges) -> None:
                if any(data and "set" in data for data in changes.values()):  # the key set
                    raise StoreError("disk full")
                original(store, changes)

            monkeypatch.setattr(LocalKeyStore, "commit_records", failing_commit)
            reply = await control(enrolled, assign_op("pne-1", alice_key))
            monkeypatch.undo()
            try:
                got = await asyncio.wait_for(read_message(reader), 0.3)
            except TimeoutError:
                got = None
        return reply, got

    reply, got = run(scenario())
    assert (reply["ok"], reply["status"], reply["hop"]) == (False, "INTERNAL_ERROR", "gateway")
    assert got is None
    pne = gateway_store(enrolled)["pnes"]["pne-1"]
    assert "set" not in pne
    assert "request" in pne


def test_notification_waits_for_the_pne_to_attach(
    enrolled: GatewayConfig, server: FakeServer, alice_key: bytes, tmp_path: Path
) -> None:
    """003 §7.4.2.1.1.3: with no PNE attached the set is stored ('stored'), and the
    Notification goes out when the PNE attaches later."""
    device_dir = make_device(tmp_path)

    async def scenario() -> tuple[dict[str, Any], int]:
        async with running_gateway(enrolled, server) as gw:
            reply = await control(enrolled, assign_op("pne-1", alice_key, wait=0.2))
            agent = DeviceAgent(device_dir, "127.0.0.1", gw.pan_port)
            code = await agent.run(once=True, timeout=WAIT)
            await wait_until(lambda: gw.status()["pnes"][0]["delivered"])  # type: ignore[index]
        return reply, code

    reply, code = run(scenario())
    # D-PAN-2: the wait ran out before any PNE proved receipt; the key stays stored.
    assert (reply["ok"], reply["status"], reply["stage"]) == (False, "TIMEOUT", "stored")
    assert code == 0
    assert gateway_store(enrolled)["pnes"]["pne-1"]["set"]["delivered"] is True


# -- restarts lose nothing -----------------------------------------------------------------


def test_gateway_restarted_after_storing_the_set_still_delivers(
    enrolled: GatewayConfig, server: FakeServer, alice_key: bytes, tmp_path: Path
) -> None:
    """DESIGN §5-6: a PN GW stopped between storing the set and notifying delivers the
    key after a restart (machine rebuilt with EUKeyAssignmentGateway.resume)."""
    device_dir = make_device(tmp_path)

    async def scenario() -> int:
        async with running_gateway(enrolled, server):
            reply = await control(enrolled, assign_op("pne-1", alice_key))
            assert reply["stage"] == "stored"
        async with running_gateway(enrolled, server) as again:
            agent = DeviceAgent(device_dir, "127.0.0.1", again.pan_port)
            code = await agent.run(once=True, timeout=WAIT)
            await wait_until(lambda: gateway_store(enrolled)["pnes"]["pne-1"]["set"]["delivered"])
            return code

    assert run(scenario()) == 0
    assert server.chains_assigned == 1
    assert device_status(device_dir)["key_index"] == 1


def test_pending_request_is_resent_with_the_same_bytes_after_restart(
    enrolled: GatewayConfig, server: FakeServer, alice_key: bytes
) -> None:
    """DESIGN §5: with the server unreachable the user sees UPSTREAM_UNAVAILABLE at the
    gateway->server hop, the request is kept, and the restarted PN GW resends it
    unchanged."""
    server.down = True
    del server.received[:]  # forget the enrolment

    async def scenario() -> dict[str, Any]:
        async with running_gateway(enrolled, server):
            reply = await control(enrolled, assign_op("pne-1", alice_key))
        server.down = False
        async with running_gateway(enrolled, server):
            await wait_until(lambda: "set" in gateway_store(enrolled)["pnes"]["pne-1"])
        return reply

    reply = run(scenario())
    assert (reply["ok"], reply["status"]) == (False, "UPSTREAM_UNAVAILABLE")
    assert (reply["stage"], reply["hop"]) == ("requested", "gateway->server")
    assert len(server.received) == 2
    assert server.received[0] == server.received[1]
    assert server.chains_assigned == 1


def test_lost_response_is_recovered_from_the_servers_stored_reply(
    enrolled: GatewayConfig, server: FakeServer, alice_key: bytes
) -> None:
    """DESIGN §5: the server assigned the chain but the response was lost; the resent
    request gets the stored reply, so the PN GW holds the very chain the server holds."""
    server.lose_replies = 1

    async def scenario() -> None:
        async with running_gateway(enrolled, server):
            reply = await control(enrolled, assign_op("pne-1", alice_key))
            assert reply["status"] == "UPSTREAM_UNAVAILABLE"
        async with running_gateway(enrolled, server):
            await wait_until(lambda: "set" in gateway_store(enrolled)["pnes"]["pne-1"])

    run(scenario())
    assert server.chains_assigned == 1
    stored = gateway_store(enrolled)["pnes"]["pne-1"]["set"]
    assert tuple(stored["eukeys"]) == server.eukeys("pne-1")


@pytest.mark.parametrize(
    ("pne_id", "password_ok", "status"),
    [("pne-1", False, "WRONG_PASSWORD"), ("pne-unknown", True, "CLAIM_NOT_PROVEN")],
)
def test_server_refusal_is_relayed_unchanged(
    enrolled: GatewayConfig,
    server: FakeServer,
    alice_key: bytes,
    pne_id: str,
    password_ok: bool,
    status: str,
) -> None:
    """003 §7.4.2.1.1.2 step 2 / DESIGN §5: the server's fail status reaches the user
    unchanged, naming the server as the hop; the request is not kept for resending."""
    key = alice_key if password_ok else bytes(32)

    async def scenario() -> dict[str, Any]:
        async with running_gateway(enrolled, server):
            return await control(enrolled, assign_op(pne_id, key))

    reply = run(scenario())
    assert (reply["ok"], reply["status"], reply["hop"]) == (False, status, "server")
    record = gateway_store(enrolled)["pnes"][pne_id]
    assert "request" not in record
    assert record["last_status"] == status


# -- the PAN side --------------------------------------------------------------------------


def test_garbage_frame_gets_an_error_and_the_daemon_keeps_serving(
    enrolled: GatewayConfig, server: FakeServer
) -> None:
    """DESIGN §3: undecodable bytes on the PAN get one ErrorMessage (MALFORMED_MESSAGE)
    and the link is closed; other PNEs are still served."""
    bad_inputs = [encode_frame(b"\xff\x00not cbor"), struct.pack(">I", 2**31) + b"x"]

    async def scenario() -> list[tuple[Message | None, Message | None]]:
        out = []
        async with running_gateway(enrolled, server) as gw:
            for data in bad_inputs:
                async with pan_client(gw) as (reader, writer):
                    writer.write(data)
                    await writer.drain()
                    out.append((await receive(reader), await receive(reader)))
            async with pan_client(gw) as (_, writer):
                await write_message(writer, hello("pne-2"))
                await wait_until(lambda: gw.status()["attached"] == ["pne-2"])
        return out

    for error, after in run(scenario()):
        assert isinstance(error, ErrorMessage)
        assert error.status is ErrorCode.MALFORMED_MESSAGE
        assert error.src == "gw-alice"
        assert after is None  # then the link is closed


def huge_integer_frame() -> bytes:
    """A frame holding a CBOR map whose version is an integer of 5,000 digits: a codec that
    puts the value into its error message raises ValueError instead of DecodeError (the
    ~3,000-digit report of issue 5 item 10; 5,000 digits pass Python's str() limit)."""
    import cbor2

    return encode_frame(cbor2.dumps({0: 10**4999, 1: 1}))


@pytest.mark.parametrize(
    ("frames", "status"),
    [
        ([encode_frame(b"\xff\x00not cbor")], ErrorCode.MALFORMED_MESSAGE),
        ([struct.pack(">I", 2**31)], ErrorCode.MALFORMED_MESSAGE),
        ([huge_integer_frame()], ErrorCode.UNSUPPORTED_VERSION),
        ([encode_frame(encode(hello())), huge_integer_frame()], ErrorCode.UNSUPPORTED_VERSION),
        (
            [
                encode_frame(encode(hello())),
                encode_frame(
                    encode(
                        ErrorMessage(
                            txid=bytes(16), src="pne-1", dst="gw-alice", status=ErrorCode.OK
                        )
                    )
                ),
            ],
            ErrorCode.UNEXPECTED_MESSAGE,
        ),
        (
            [
                encode_frame(encode(hello())),
                encode_frame(b"\xff" * 60_000),
            ],
            ErrorCode.MALFORMED_MESSAGE,
        ),
    ],
    ids=[
        "garbage",
        "oversized-length",
        "huge-integer",
        "huge-integer-after-hello",
        "unexpected-type",
        "long-garbage",
    ],
)
def test_no_peer_bytes_take_the_gateway_down(
    enrolled: GatewayConfig,
    server: FakeServer,
    caplog: pytest.LogCaptureFixture,
    frames: list[bytes],
    status: ErrorCode,
) -> None:
    """Issue 5 item 10: an undecodable frame, an oversized length prefix, the huge-integer
    frame (whatever the codec raises for it) or a valid message of an unexpected type is
    refused with one ErrorMessage, logged in one bounded line without a traceback, and
    only that link ends: the daemon keeps serving its control socket and other PNEs."""
    caplog.set_level(logging.DEBUG, logger="cpns")

    async def scenario() -> tuple[Message | None, Message | None, dict[str, Any]]:
        async with running_gateway(enrolled, server) as gw:
            async with pan_client(gw) as (reader, writer):
                for frame in frames:
                    writer.write(frame)
                await writer.drain()
                error, after = await receive(reader), await receive(reader)
            async with pan_client(gw) as (_, writer):
                await write_message(writer, hello("pne-2"))
                await wait_until(lambda: gw.status()["attached"] == ["pne-2"])
                return error, after, await control(enrolled, {"op": "status"})

    error, after, view = run(scenario())
    assert isinstance(error, ErrorMessage)
    # The huge version is refused as a decode error: UNSUPPORTED_VERSION once the codec
    # reads it (MALFORMED_MESSAGE from a codec that failed on it is fine too).
    allowed = {status, ErrorCode.MALFORMED_MESSAGE}
    assert error.status in allowed
    assert after is None
    assert view["ok"] is True
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings
    for record in warnings:
        assert record.exc_info is None
        assert len(record.getMessage()) < 700
        assert "\n" not in record.getMessage()


def test_an_exception_while_handling_one_frame_ends_only_that_link(
    enrolled: GatewayConfig,
    server: FakeServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 5 item 10: even a bug in handling one frame (here any Ack raises) is answered
    with INTERNAL_ERROR on that link and one bounded log line; the daemon serves on."""
    caplog.set_level(logging.INFO, logger="cpns")

    async def broken(*args: object) -> bool:
        raise RuntimeError("x" * 100_000)

    monkeypatch.setattr(EUKeyAssignmentCoordinator, "on_ack", broken)
    ack = EUKeyAssignmentAck(
        txid=bytes(16),
        src="pne-1",
        dst="gw-alice",
        status=ErrorCode.OK,
        key_index=1,
        proof=bytes(32),
    )

    async def scenario() -> tuple[Message | None, Message | None, dict[str, Any]]:
        async with running_gateway(enrolled, server) as gw:
            async with pan_client(gw) as (reader, writer):
                await write_message(writer, hello())
                await write_message(writer, ack)
                error, after = await receive(reader), await receive(reader)
            return error, after, await control(enrolled, {"op": "status"})

    error, after, view = run(scenario())
    assert isinstance(error, ErrorMessage)
    assert error.status is ErrorCode.INTERNAL_ERROR
    assert after is None
    assert view["ok"] is True
    for record in caplog.records:
        if record.levelno >= logging.INFO:
            assert record.exc_info is None
            assert len(record.getMessage()) < 700


def test_peer_fault_lines_share_a_budget(
    enrolled: GatewayConfig, server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 5 items 10 and 12: a peer reconnecting to send bad frames over and over costs
    a bounded number of log lines (a burst, then about one a second), not one per frame."""
    caplog.set_level(logging.INFO, logger="cpns")

    async def scenario() -> None:
        async with running_gateway(enrolled, server) as gw:
            for _ in range(100):
                async with pan_client(gw) as (reader, writer):
                    writer.write(encode_frame(b"\xff"))
                    await writer.drain()
                    await receive(reader)

    run(scenario())
    faults = [r for r in caplog.records if "undecodable frame" in r.getMessage()]
    assert 1 <= len(faults) < 50


async def closed_by_gateway(reader: asyncio.StreamReader) -> bool:
    """Whether the gateway ends this link (EOF or reset) within WAIT."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


async def pan_from(
    daemon: GatewayDaemon, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw PAN connection from a given loopback address (127.0.0.0/8 sources)."""
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", daemon.pan_port, local_addr=(source, 0)), WAIT
    )


def test_links_without_hello_are_closed_while_attached_idle_ones_stay(
    enrolled: GatewayConfig, server: FakeServer
) -> None:
    """Issue 5 item 11: a link that completes no frame within pan_hello_timeout is closed;
    a link that said hello may stay idle much longer (up to pan_idle_timeout)."""
    config = dataclasses.replace(enrolled, pan_hello_timeout=0.2, pan_idle_timeout=60.0)

    async def scenario() -> tuple[bool, list[str]]:
        async with running_gateway(config, server) as gw:
            async with pan_client(gw) as (_, writer), pan_client(gw) as (silent, _):
                await write_message(writer, hello())
                await wait_until(lambda: gw.status()["attached"] == ["pne-1"])
                closed = await closed_by_gateway(silent)
                return closed, list(gw.status()["attached"])  # type: ignore[call-overload]

    closed, attached = run(scenario())
    assert closed
    assert attached == ["pne-1"]


def test_an_attached_link_idle_beyond_the_keep_alive_is_closed(
    enrolled: GatewayConfig, server: FakeServer
) -> None:
    """Issue 5 item 11: an attached link with no complete frame for pan_idle_timeout is
    closed (the PNE agent reconnects); a link stalled inside a frame is closed after
    pan_frame_timeout."""
    config = dataclasses.replace(enrolled, pan_idle_timeout=0.3, pan_frame_timeout=0.2)

    async def scenario() -> tuple[bool, bool, object]:
        async with running_gateway(config, server) as gw:
            async with pan_client(gw) as (reader, writer):
                await write_message(writer, hello())
                idle = await closed_by_gateway(reader)
            async with pan_client(gw) as (reader, writer):
                writer.write(encode_frame(encode(hello("pne-2")))[:10])
                await writer.drain()
                stalled = await closed_by_gateway(reader)
            return idle, stalled, gw.status()["attached"]

    idle, stalled, attached = run(scenario())
    assert idle
    assert stalled
    assert attached == []


def test_pan_connections_are_capped_per_source_and_in_total(
    enrolled: GatewayConfig, server: FakeServer
) -> None:
    """Issue 5 item 11: beyond pan_max_links_per_source links from one address, and
    beyond pan_max_links in all, a new connection is closed at once; other addresses
    (under the total) are still served, and a freed slot is usable again."""
    config = dataclasses.replace(enrolled, pan_max_links=4, pan_max_links_per_source=2)

    async def scenario() -> tuple[list[bool], bool, list[object]]:
        async with running_gateway(config, server) as gw:
            links = [await pan_from(gw, "127.0.0.2") for _ in range(2)]
            extra_same = await pan_from(gw, "127.0.0.2")
            links += [await pan_from(gw, "127.0.0.3") for _ in range(2)]
            extra_total = await pan_from(gw, "127.0.0.4")
            refused = [
                await closed_by_gateway(extra_same[0]),
                await closed_by_gateway(extra_total[0]),
            ]
            for i, (_, writer) in enumerate(links):
                await write_message(writer, hello(f"pne-{i}"))
            await wait_until(lambda: len(gw.status()["attached"]) == 4)  # type: ignore[arg-type]
            links[0][1].close()
            await wait_until(lambda: len(gw.status()["attached"]) == 3)  # type: ignore[arg-type]
            reader, writer = await pan_from(gw, "127.0.0.4")
            await write_message(writer, hello("pne-9"))
            await wait_until(lambda: "pne-9" in gw.status()["attached"])  # type: ignore[operator]
            for _, w in [*links, extra_same, extra_total, (reader, writer)]:
                w.close()
            return refused, True, list(gw.status()["attached"])  # type: ignore[call-overload]

    refused, _, attached = run(scenario())
    assert refused == [True, True]
    assert "pne-9" in attached


@pytest.mark.parametrize(
    ("first", "status"),
    [
        (
            EUKeyAssignmentAck(
                txid=bytes(16),
                src="pne-1",
                dst="gw-alice",
                status=ErrorCode.OK,
                key_index=1,
                proof=bytes(32),
            ),
            ErrorCode.UNEXPECTED_MESSAGE,
        ),
        (hello(dst="gw-other"), ErrorCode.WRONG_DESTINATION),
    ],
    ids=["ack-before-hello", "hello-to-another-gateway"],
)
def test_unexpected_first_message_gets_an_error(
    enrolled: GatewayConfig, server: FakeServer, first: Message, status: ErrorCode
) -> None:
    """A PAN link starts with a PNEHello to "pan" (or to this PN GW); anything else gets
    an ErrorMessage with the status and the link is closed."""

    async def scenario() -> tuple[Message | None, Message | None]:
        async with running_gateway(enrolled, server) as gw, pan_client(gw) as (reader, writer):
            await write_message(writer, first)
            return await receive(reader), await receive(reader)

    error, after = run(scenario())
    assert isinstance(error, ErrorMessage)
    assert error.status is status
    assert after is None


def _ack_for(notification: EUKeyAssignmentNotification) -> EUKeyAssignmentAck:
    device = EUKeyAssignmentDevice(entity_id="pne-1", tk=TKS["pne-1"], rng=FixedRandom(5))
    device.receive(notification)
    (ack,) = device.messages_to_send()
    assert isinstance(ack, EUKeyAssignmentAck)
    return ack


def test_duplicate_ack_is_harmless(
    enrolled: GatewayConfig, server: FakeServer, alice_key: bytes
) -> None:
    """DESIGN §5 (idempotent retries): a second identical Ack after delivery is ignored;
    the link stays open and nothing is sent back."""

    async def scenario() -> Message | None:
        async with running_gateway(enrolled, server) as gw, pan_client(gw) as (reader, writer):
            await write_message(writer, hello())
            await wait_until(lambda: gw.status()["attached"] == ["pne-1"])
            reply = await control(enrolled, assign_op("pne-1", alice_key))
            assert reply["stage"] == "stored"
            notification = await receive(reader)
            assert isinstance(notification, EUKeyAssignmentNotification)
            ack = _ack_for(notification)
            await write_message(writer, ack)
            await wait_until(lambda: gw.status()["pnes"][0]["delivered"])  # type: ignore[index]
            await write_message(writer, ack)
            try:
                return await asyncio.wait_for(read_message(reader), 0.3)
            except TimeoutError:
                return None
            finally:
                assert gw.status()["attached"] == ["pne-1"]

    assert run(scenario()) is None
    assert gateway_store(enrolled)["pnes"]["pne-1"]["set"]["delivered"] is True


def test_ack_with_a_bad_proof_is_refused_and_delivery_stays_pending(
    enrolled: GatewayConfig, server: FakeServer, alice_key: bytes
) -> None:
    """D-003-4 with D-PAN-2: an Ack whose proof does not verify gets AUTHENTICATION_FAILED
    and its link ends (its own bytes), but it decides nothing: the waiting user hears
    TIMEOUT (no PNE proved receipt, one answer ignored), and the key is offered again."""

    async def scenario() -> tuple[dict[str, Any], Message | None, Message | None]:
        async with running_gateway(enrolled, server) as gw:
            async with pan_client(gw) as (reader, writer):
                await write_message(writer, hello())
                await wait_until(lambda: gw.status()["attached"] == ["pne-1"])
                pending = asyncio.create_task(
                    control(enrolled, assign_op("pne-1", alice_key, wait=1.0))
                )
                notification = await receive(reader)
                assert isinstance(notification, EUKeyAssignmentNotification)
                good = _ack_for(notification)
                forged = dataclasses.replace(good, proof=bytes(32))
                await write_message(writer, forged)
                error = await receive(reader)
                reply = await pending
            async with pan_client(gw) as (reader, writer):
                await write_message(writer, hello())
                again = await receive(reader)
        return reply, error, again

    reply, error, again = run(scenario())
    assert (reply["ok"], reply["status"], reply["stage"]) == (False, "TIMEOUT", "stored")
    assert (reply["unverified_acks"], reply["unverified_status"]) == (1, "OK")
    assert isinstance(error, ErrorMessage)
    assert error.status is ErrorCode.AUTHENTICATION_FAILED
    assert isinstance(again, EUKeyAssignmentNotification)
    assert gateway_store(enrolled)["pnes"]["pne-1"]["set"]["delivered"] is False


def test_a_new_hello_never_detaches_a_live_link_of_that_pne(
    enrolled: GatewayConfig, server: FakeServer, alice_key: bytes
) -> None:
    """Issue 5 item 8 / D-PAN-1: a PNEHello proves nothing, so a second one with the same
    PNE ID does not end the first link: up to pan_links_per_pne links share the ID, a
    further hello is refused (NOT_AUTHORIZED) and only that newcomer is closed; the
    Notification goes to every link of the ID."""
    config = dataclasses.replace(enrolled, pan_links_per_pne=3)

    async def scenario() -> tuple[list[Message | None], Message | None, Message | None]:
        async with (
            running_gateway(config, server) as gw,
            pan_client(gw) as (first, first_w),
            pan_client(gw) as (second, second_w),
            pan_client(gw) as (third, third_w),
            pan_client(gw) as (extra, extra_w),
        ):
            for writer in (first_w, second_w, third_w):
                await write_message(writer, hello())
            await wait_until(lambda: len(gw.pan.links("pne-1")) == 3)
            await write_message(extra_w, hello())
            refused, closed = await receive(extra), await receive(extra)
            reply = await control(config, assign_op("pne-1", alice_key))
            assert reply["stage"] == "stored"
            notified = [await receive(r) for r in (first, second, third)]
            return notified, refused, closed

    notified, refused, closed = run(scenario())
    assert all(isinstance(n, EUKeyAssignmentNotification) for n in notified)
    assert len({n.txid for n in notified if n is not None}) == 1
    assert isinstance(refused, ErrorMessage)
    assert refused.status is ErrorCode.NOT_AUTHORIZED
    assert closed is None


def test_an_unauthenticated_refusal_does_not_decide_the_outcome(
    enrolled: GatewayConfig, server: FakeServer, alice_key: bytes, tmp_path: Path
) -> None:
    """Issue 5 item 8 / D-PAN-2: a failure Ack carries no MAC, so a fake PNE can send one:
    it is ignored (the fake's link even stays), the waiting user hears TIMEOUT with the
    ignored claim counted, never AUTHENTICATION_FAILED; the real PNE, attaching while the
    fake is still there, then gets its key and the next wait reports 'delivered'."""
    device_dir = make_device(tmp_path)

    async def scenario() -> tuple[dict[str, Any], int, list[str]]:
        async with running_gateway(enrolled, server) as gw:
            async with pan_client(gw) as (reader, writer):
                await write_message(writer, hello())
                await wait_until(lambda: gw.status()["attached"] == ["pne-1"])
                pending = asyncio.create_task(
                    control(enrolled, assign_op("pne-1", alice_key, wait=1.0))
                )
                notification = await receive(reader)
                assert isinstance(notification, EUKeyAssignmentNotification)
                await write_message(
                    writer,
                    EUKeyAssignmentAck(
                        txid=notification.txid,
                        src="pne-1",
                        dst="gw-alice",
                        status=ErrorCode.AUTHENTICATION_FAILED,
                        key_index=notification.key_index,
                    ),
                )
                reply = await pending
                agent = DeviceAgent(device_dir, "127.0.0.1", gw.pan_port, backoff=0.02)
                code = await agent.run(once=True, timeout=WAIT)
                await wait_until(lambda: gw.status()["pnes"][0]["delivered"])  # type: ignore[index]
                attached = list(gw.status()["attached"])  # type: ignore[call-overload]
        return reply, code, attached

    reply, code, attached = run(scenario())
    assert (reply["ok"], reply["status"], reply["stage"]) == (False, "TIMEOUT", "stored")
    assert reply["status"] != "AUTHENTICATION_FAILED"
    assert (reply["unverified_acks"], reply["unverified_status"]) == (1, "AUTHENTICATION_FAILED")
    assert code == 0
    assert attached == ["pne-1"]  # the fake's link was not closed by its refusal
    assert gateway_store(enrolled)["pnes"]["pne-1"]["set"]["delivered"] is True


# -- control socket, lifecycle, logs ---------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"not json\n",
        b"[1]\n",
        b'{"op": "fly"}\n',
        b'{"op": "assign", "pne_id": "pne-1", "user_id": "alice", "password_key": "zz"}\n',
        b'{"op": "assign", "pne_id": "pne 1", "user_id": "alice", "password_key": "00"}\n',
    ],
    ids=["not-json", "not-object", "unknown-op", "bad-hex", "bad-id"],
)
def test_control_socket_refuses_bad_requests(
    enrolled: GatewayConfig, server: FakeServer, line: bytes
) -> None:
    """A malformed control request gets ok=false and MALFORMED_MESSAGE; the daemon lives."""

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with running_gateway(enrolled, server):
            reader, writer = await asyncio.open_unix_connection(str(enrolled.control_socket))
            writer.write(line)
            reply = json.loads(await asyncio.wait_for(reader.readline(), WAIT))
            writer.close()
            await writer.wait_closed()
            return reply, await control(enrolled, {"op": "status"})

    reply, status = run(scenario())
    assert (reply["ok"], reply["status"]) == (False, "MALFORMED_MESSAGE")
    assert status["ok"] is True
    assert server.received == [server.received[0]]  # only the enrolment reached the server


def test_shutdown_op_stops_run_and_releases_everything(
    enrolled: GatewayConfig, server: FakeServer
) -> None:
    """Graceful shutdown: the listeners close, the socket and port files go, the store
    lock is released so another daemon can start."""

    async def scenario() -> dict[str, Any]:
        daemon = GatewayDaemon(enrolled, upstream=server, clock=lambda: FIXED_NOW)
        task = asyncio.create_task(daemon.run(handle_signals=False))
        await wait_until(enrolled.port_file.exists)
        assert int(enrolled.port_file.read_text()) == daemon.pan_port
        reply = await control(enrolled, {"op": "shutdown"})
        await asyncio.wait_for(task, WAIT)
        return reply

    assert run(scenario())["ok"] is True
    assert not enrolled.control_socket.exists()
    assert not enrolled.port_file.exists()
    LocalKeyStore.open_or_create(enrolled.data_dir, "gateway").lock().unlock()


def test_a_free_pan_port_is_remembered_across_restarts(
    enrolled: GatewayConfig, server: FakeServer
) -> None:
    """Issue 5 item 13: with ``pan_port = 0`` the first start picks a free port and
    remembers it (gateway.pan-port, kept after a stop); every later start binds the same
    port, so PNEs find the gateway again. If that port is taken meanwhile, another one is
    picked (with a warning) and remembered instead of failing to start."""

    async def scenario() -> tuple[int, int, int, int]:
        async with running_gateway(enrolled, server) as gw:
            first = gw.pan_port
        assert enrolled.pan_port_memo.read_text().strip() == str(first)
        async with running_gateway(enrolled, server) as gw:
            second = gw.pan_port
        blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", first)
        try:
            async with running_gateway(enrolled, server) as gw:
                third = gw.pan_port
        finally:
            blocker.close()
            await blocker.wait_closed()
        async with running_gateway(enrolled, server) as gw:
            fourth = gw.pan_port
        return first, second, third, fourth

    first, second, third, fourth = run(scenario())
    assert second == first
    assert third != first
    assert fourth == third


def test_second_daemon_on_the_same_store_is_refused(
    enrolled: GatewayConfig, server: FakeServer
) -> None:
    """DESIGN §6: two daemons must not share one key store."""

    async def scenario() -> None:
        async with running_gateway(enrolled, server):
            with pytest.raises(StoreError, match="in use"):
                await GatewayDaemon(enrolled, upstream=server).start()
            assert (await control(enrolled, {"op": "status"}))["ok"] is True

    run(scenario())


def test_logs_never_carry_keys(
    enrolled: GatewayConfig,
    server: FakeServer,
    alice_key: bytes,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """STYLE §4 / DESIGN §5: logs carry Entity IDs, txids and statuses, never the TK, an
    EUKey or the password key."""
    caplog.set_level(logging.DEBUG, logger="cpns")
    device_dir = make_device(tmp_path)

    async def scenario() -> None:
        async with running_gateway(enrolled, server) as gw:
            agent = DeviceAgent(device_dir, "127.0.0.1", gw.pan_port, backoff=0.02)
            device = asyncio.create_task(agent.run(once=True, timeout=WAIT))
            await wait_until(lambda: gw.status()["attached"] == ["pne-1"])
            await control(enrolled, assign_op("pne-1", alice_key, wait=WAIT))
            assert await asyncio.wait_for(device, WAIT) == 0

    run(scenario())
    assert "delivered" in caplog.text
    # The same records as the programs write them: JSON lines (every structured field) and
    # text lines with their key=value tail (docs/logging.md).
    context = ContextFilter("gateway")
    formatted = []
    for record in caplog.records:
        context.filter(record)
        formatted += [JSONFormatter().format(record), TextFormatter().format(record)]
    written = "\n".join([caplog.text, *formatted])
    assert '"event": "message"' in written
    chain = server.eukeys("pne-1")
    for secret in (TKS["pne-1"], *chain, gateway_store(enrolled)["eukey"], alice_key):
        assert secret.hex()[:16] not in written
        assert repr(secret)[2:18] not in written


def test_offline_status_reads_the_store_and_creates_nothing(
    enrolled: GatewayConfig, tmp_path: Path
) -> None:
    """``cpns gateway status`` without a daemon: the store's view, never key material;
    asking about an empty directory leaves it untouched."""
    view = offline_status(enrolled.data_dir)
    assert (view["running"], view["enrolled"], view["entity_id"]) == (False, True, "gw-alice")
    assert gateway_store(enrolled)["eukey"].hex() not in json.dumps(view)
    empty = offline_status(tmp_path / "nothing-here")
    assert (empty["enrolled"], empty["pnes"]) == (False, [])
    assert not (tmp_path / "nothing-here").exists()


def test_records_kept_in_the_main_map_by_an_earlier_release_are_moved_out(
    enrolled: GatewayConfig, server: FakeServer
) -> None:
    """DESIGN §5 (nothing lost): a store written when PNE records lived inside the main map
    (``pnes``) is read at start-up, each record moved to its own file, and the map saved
    without them."""
    store = LocalKeyStore.open_or_create(enrolled.data_dir, "gateway")
    data = store.load()
    data["pnes"] = {"pne-1": {"last_status": "WRONG_PASSWORD"}}
    store.save(data)

    async def scenario() -> dict[str, object]:
        async with running_gateway(enrolled, server) as gw:
            return gw.status()

    status = run(scenario())
    assert [(p["pne_id"], p["last_status"]) for p in status["pnes"]] == [  # type: ignore[attr-defined]
        ("pne-1", "WRONG_PASSWORD")
    ]
    assert gateway_store(enrolled)["pnes"] == {"pne-1": {"last_status": "WRONG_PASSWORD"}}


def test_writes_of_one_pne_record_never_overlap(
    enrolled: GatewayConfig,
    server: FakeServer,
    alice_key: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DESIGN §6 (a crash never leaves half a key, and no write is lost): record writes run
    in a worker thread, one at a time (group commit); a save made while a slow write is in
    flight goes in the next write, which starts only once the first is done, so the slow
    first write cannot land after, and undo, the second: the newest record is on disk."""
    spans: list[str] = []
    original = LocalKeyStore.commit_records

    def slow_commit(store: LocalKeyStore, changes: RecordChanges) -> None:
        spans.append(f"start {sorted(changes)}")
        if len(spans) == 1:
            time.sleep(0.05)  # the first write is slow (a loaded disk)
        original(store, changes)
        spans.append(f"end {sorted(changes)}")

    async def scenario() -> None:
        async with running_gateway(enrolled, server) as gw:
            await control(enrolled, assign_op("pne-1", alice_key))
            spans.clear()
            monkeypatch.setattr(LocalKeyStore, "commit_records", slow_commit)
            first = asyncio.create_task(gw.ledger.save("pne-1"))
            await wait_until(lambda: len(spans) == 1)  # the first write is in flight
            gw.ledger.put("pne-1", dataclasses.replace(gw.ledger.get("pne-1"), last_status="X"))
            await asyncio.gather(first, gw.ledger.save("pne-1"))
            monkeypatch.undo()

    run(scenario())
    assert spans == ["start ['pne-1']", "end ['pne-1']", "start ['pne-1']", "end ['pne-1']"]
    assert gateway_store(enrolled)["pnes"]["pne-1"]["last_status"] == "X"


# -- flows (docs/logging.md) -----------------------------------------------------------------


def test_an_assignment_continues_the_flow_the_pne_started(
    enrolled: GatewayConfig,
    server: FakeServer,
    alice_key: bytes,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The PNE starts the flow (its PNEHello carries a flow ID); an assign for the attached
    PNE continues it: the request the server receives, the Notification and the Ack all
    carry the same ID, the control reply names it, and the gateway's hop lines carry it."""
    caplog.set_level(logging.INFO, logger="cpns")
    device_dir = make_device(tmp_path)

    async def scenario() -> dict[str, Any]:
        async with running_gateway(enrolled, server) as gw:
            agent = DeviceAgent(device_dir, "127.0.0.1", gw.pan_port, backoff=0.02)
            device = asyncio.create_task(agent.run(once=True, timeout=WAIT))
            await wait_until(lambda: gw.status()["attached"] == ["pne-1"])
            reply = await control(enrolled, assign_op("pne-1", alice_key, wait=WAIT))
            assert await asyncio.wait_for(device, WAIT) == 0
            return reply

    reply = run(scenario())
    hello = [
        r
        for r in caplog.records
        if getattr(r, "type", None) == "PNE_HELLO" and getattr(r, "dir", None) == "sent"
    ]
    flow = hello[0].flow  # type: ignore[attr-defined]
    assert reply["flow"] == flow
    request = decode(server.received[-1])
    assert isinstance(request, EUKeyAssignmentRequest)
    assert request.flow == bytes.fromhex(flow)
    hops = {
        (r.name, r.dir, r.type): r.flow  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "event", None) == "message"
    }
    for end in ("cpns.gateway", "cpns.device"):
        for direction in ("sent", "received"):
            for mtype in ("EUKEY_ASSIGNMENT_NOTIFICATION", "EUKEY_ASSIGNMENT_ACK"):
                if (end, direction, mtype) in hops:
                    assert hops[(end, direction, mtype)] == flow
    assert hops[("cpns.gateway", "received", "EUKEY_ASSIGNMENT_ACK")] == flow
    assert hops[("cpns.device", "received", "EUKEY_ASSIGNMENT_NOTIFICATION")] == flow


def test_an_assignment_for_an_absent_pne_starts_its_own_flow(
    enrolled: GatewayConfig, server: FakeServer, alice_key: bytes
) -> None:
    """No PNE attached: the gateway starts the flow; the stored request (resent as is)
    and the one the server gets carry it, and the control reply names it."""

    async def scenario() -> dict[str, Any]:
        async with running_gateway(enrolled, server):
            return await control(enrolled, assign_op("pne-1", alice_key))

    reply = run(scenario())
    assert re.fullmatch(r"[0-9a-f]{16}", reply["flow"])
    request = decode(server.received[-1])
    assert isinstance(request, EUKeyAssignmentRequest)
    assert request.flow == bytes.fromhex(reply["flow"])
    stored = gateway_store(enrolled)["pnes"]["pne-1"]["set"]
    assert stored["flow"] == request.flow


def test_the_gateway_enrolment_is_a_flow_of_its_own(
    enrolled: GatewayConfig, server: FakeServer
) -> None:
    """The PN GW starts the flow of its own enrolment (004): its request carries a flow ID
    and the server's audit record of the enrolment stores it."""
    enrolment = decode(server.received[0])
    assert isinstance(enrolment, UserKeyAssignmentRequest)
    assert enrolment.flow is not None
    [audit] = [e for e in server.store.audit_events() if e.procedure == "eukey-assignment-ui-004"]
    assert audit.flow_id == enrolment.flow.hex()


# -- operator metrics and listener (docs/metrics.md) -------------------------------------


def password_key_of(user_id: str, password: str) -> bytes:
    return cached_password_key(user_id, password)


def test_gateway_metrics_follow_links_assignments_and_deliveries(
    enrolled: GatewayConfig, server: FakeServer, alice_key: bytes, tmp_path: Path
) -> None:
    """docs/metrics.md: the gateway's gauges follow its state (a stored set is a pending
    delivery until the PNE proves receipt; an attached PNE is one attached PNE and one
    PAN connection), its counters count assignments by status and hop and proven
    deliveries; the operator listener serves the same values over HTTP, with /healthz and
    /readyz 200 while the daemon runs, and closes with the daemon."""
    device_dir = make_device(tmp_path)
    config = dataclasses.replace(enrolled, operator_port=free_port())
    metrics_url = f"http://127.0.0.1:{config.operator_port}"
    ok_before = sample("cpns_gateway_assignments_total", status="OK", hop="none")
    delivered_before = sample("cpns_gateway_deliveries_total")
    links_before = sample("cpns_gateway_pan_connections")
    attached_before = sample("cpns_gateway_attached_pnes")

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with running_gateway(config, server) as gw:
            seen["port_file"] = (config.data_dir / "operator.port").read_text().strip()
            await control(config, assign_op("pne-1", alice_key, wait=0))
            seen["pending"] = (
                sample("cpns_gateway_pending_requests"),
                sample("cpns_gateway_pending_deliveries"),
            )
            async with pan_client(gw) as (_, writer):
                await write_message(writer, hello("pne-2"))
                await wait_until(lambda: gw.status()["attached"] == ["pne-2"])
                seen["attached"] = (
                    sample("cpns_gateway_pan_connections"),
                    sample("cpns_gateway_attached_pnes"),
                )
                seen["scraped"] = await asyncio.to_thread(scrape, metrics_url + "/metrics")
            await wait_until(lambda: gw.status()["attached"] == [])
            agent = DeviceAgent(device_dir, "127.0.0.1", gw.pan_port)
            assert await agent.run(once=True, timeout=WAIT) == 0
            # Counted once the delivery is stored (the status shows it a moment earlier).
            await wait_until(
                lambda: sample("cpns_gateway_deliveries_total") == delivered_before + 1
            )
            seen["after"] = (
                sample("cpns_gateway_pending_deliveries"),
                sample("cpns_gateway_deliveries_total"),
            )
            seen["health"] = await asyncio.to_thread(get, metrics_url + "/healthz")
            seen["ready"] = await asyncio.to_thread(get, metrics_url + "/readyz")
        await wait_until(lambda: sample("cpns_gateway_pan_connections") == links_before)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", config.operator_port)
        return seen

    seen = run(scenario())
    assert seen["port_file"] == str(config.operator_port)
    assert seen["pending"] == (0, 1)
    assert seen["attached"] == (links_before + 1, attached_before + 1)
    assert value(seen["scraped"], "cpns_gateway_attached_pnes") == attached_before + 1
    assert value(seen["scraped"], "cpns_gateway_pending_deliveries") == 1
    assert seen["after"] == (0, delivered_before + 1)
    assert sample("cpns_gateway_assignments_total", status="OK", hop="none") == ok_before + 1
    assert sample("cpns_gateway_attached_pnes") == attached_before
    assert seen["health"] == (200, "ok\n")
    assert seen["ready"] == (200, "ready\n")


def test_server_refusals_are_counted_with_their_hop(
    enrolled: GatewayConfig, server: FakeServer
) -> None:
    """docs/metrics.md: a refused assignment counts under the relayed status and the hop
    that decided (here the server: a wrong password)."""
    before = sample("cpns_gateway_assignments_total", status="WRONG_PASSWORD", hop="server")
    wrong = password_key_of("alice", "not alice's password")

    async def scenario() -> dict[str, Any]:
        async with running_gateway(enrolled, server):
            return await control(enrolled, assign_op("pne-1", wrong))

    assert run(scenario())["status"] == "WRONG_PASSWORD"
    after = sample("cpns_gateway_assignments_total", status="WRONG_PASSWORD", hop="server")
    assert after == before + 1


def test_operator_port_in_use_is_a_configuration_error(
    enrolled: GatewayConfig, server: FakeServer
) -> None:
    """A taken operator port stops the start with a clear ConfigurationError (and the
    daemon releases what it took)."""

    async def scenario() -> None:
        blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = int(blocker.sockets[0].getsockname()[1])
        try:
            daemon = GatewayDaemon(
                dataclasses.replace(enrolled, operator_port=port), upstream=server
            )
            with pytest.raises(ConfigurationError, match="operator"):
                await daemon.start()
        finally:
            blocker.close()
            await blocker.wait_closed()
        async with running_gateway(enrolled, server):
            pass  # the store lock was released

    run(scenario())


def test_refused_pan_frames_write_no_info_hop_lines(
    enrolled: GatewayConfig, server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    """D-PAN-4 with docs/logging.md: the hop lines of frames the gateway refuses (here an
    Ack before any PNEHello, over and over) are DEBUG; at INFO a flood costs only the
    budgeted fault lines, not a line per frame."""
    caplog.set_level(logging.INFO, logger="cpns")
    early_ack = EUKeyAssignmentAck(
        txid=bytes(16), src="pne-1", dst="gw-alice", status=ErrorCode.OK, key_index=1
    )

    async def scenario() -> None:
        async with running_gateway(enrolled, server) as gw:
            for _ in range(100):
                async with pan_client(gw) as (reader, writer):
                    await write_message(writer, early_ack)
                    await receive(reader)

    run(scenario())
    assert not [r for r in caplog.records if getattr(r, "event", None) == "message"]
    assert len(caplog.records) < 50


# -- a PNE with UI enrols through the daemon (004 §5.x.1 over the PAN) -----------------------


def test_a_pne_with_ui_enrols_through_the_daemon(
    enrolled: GatewayConfig, server: FakeServer, alice_key: bytes, tmp_path: Path
) -> None:
    """004 §5.x.1 through the PN GW: the real PNE side (enroll_device) against the real
    daemon's PAN port; the server's answer to the relayed request is lost once on the
    way back to the gateway (UPSTREAM_UNAVAILABLE to the PNE), the PNE sends the same
    request again and gets the stored answer: one assignment, the EUKey held by the PNE
    and the server, not in the gateway's key store."""
    from cpns.device.enrolment import enroll_device

    async def go() -> Any:
        async with running_gateway(enrolled, server) as daemon:
            server.lose_replies = 1
            return await enroll_device(
                tmp_path / "pne",
                "127.0.0.1",
                daemon.pan_port,
                user_id="alice",
                password_key=alice_key,
                entity_id="pne-ui",
                rng=FixedRandom(6),
                clock=lambda: FIXED_NOW,
                per_try_timeout=WAIT,
                backoff=0,
            )

    result = run(go())
    assert result.tries == 2
    first, second = (decode(r) for r in server.received[-2:])
    assert first == second
    assert isinstance(first, UserKeyAssignmentRequest)
    eukey = server.eukeys("pne-ui")[0]
    assert device_status(tmp_path / "pne")["credential"] == "ui"
    assert LocalKeyStore.open_or_create(tmp_path / "pne", "device").load()["eukey"] == eukey
    assert eukey.hex() not in json.dumps(gateway_store(enrolled), default=lambda b: b.hex())
    [event] = [e for e in server.store.audit_events(limit=10) if e.entity_id == "pne-ui"]
    assert (event.actor, event.outcome) == ("gw-alice", "OK")
