"""The PNE agent (cpns.device.agent) against a PN GW played over a real loopback socket.

The fake PN GW runs the real :class:`EUKeyAssignmentGateway` machine, rebuilt with
``resume`` from a known EUKey set (as the daemon does after a restart), so every
Notification the agent sees and every Ack it sends go through the real 003 crypto.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import SERVER_ID, TKS, FixedRandom

from cpns.cli.device_cmd import parse_hostport
from cpns.crypto.hashchain import build_chain
from cpns.device.agent import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    DeviceAgent,
    device_status,
    init_device,
)
from cpns.device.tk_state import encode_tk_state, tk_state_of
from cpns.errors import ConfigurationError, ErrorCode, StoreError
from cpns.messages.codec import encode
from cpns.messages.model import (
    ErrorMessage,
    EUKeyAssignmentAck,
    PNEHello,
)
from cpns.protocol._machine import Event
from cpns.protocol.key_assignment import (
    EUKeyAssignmentGateway,
    EUKeyDelivered,
    EUKeySetReceived,
)
from cpns.protocol.tk_auth import PNETKState, ratchet
from cpns.store.keystore import LocalKeyStore
from cpns.transport.stream import read_message, write_message

WAIT = 10.0
PNE = "pne-1"


def run[T](coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 3 * WAIT))


def key_set(
    seed: int, *, tk: bytes = TKS[PNE], epoch: int = 1, tk_step: int = 0
) -> EUKeySetReceived:
    """A stored set as the PN GW holds it after the server's response (assignment
    ``epoch`` as the server numbered it)."""
    return EUKeySetReceived(
        pne_id=PNE,
        user_id="alice",
        tk=tk,
        eukeys=tuple(build_chain(bytes([seed]) * 32, 4)),
        key_index=1,
        epoch=epoch,
        tk_step=tk_step,
    )


@dataclass
class Session:
    """What the fake PN GW does on one PAN connection."""

    #: The set and transaction to deliver; None sends nothing after the hello.
    deliver: tuple[EUKeySetReceived, bytes] | None
    #: Read the Ack but drop it (as if lost), instead of feeding the machine.
    lose_ack: bool = False
    #: Send an ErrorMessage before the Notification.
    error_first: bool = False


@dataclass
class FakeGateway:
    """A PAN listener playing the PN GW role, one :class:`Session` per connection."""

    sessions: list[Session]
    hellos: list[PNEHello] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    acks: list[EUKeyAssignmentAck] = field(default_factory=list)
    #: The device store content at the moment each Ack arrived.
    stores_at_ack: list[dict[str, Any]] = field(default_factory=list)
    device_dir: Path | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await read_message(reader)
            assert isinstance(hello, PNEHello)
            assert hello.dst == "pan"
            self.hellos.append(hello)
            session = self.sessions.pop(0) if self.sessions else Session(deliver=None)
            if session.deliver is None:
                return
            if session.error_first:
                await write_message(
                    writer,
                    ErrorMessage(
                        txid=bytes(16), src="gw-alice", dst=PNE, status=ErrorCode.INTERNAL_ERROR
                    ),
                )
            stored, txid = session.deliver
            machine = EUKeyAssignmentGateway(
                gateway_id="gw-alice",
                gateway_eukey=bytes(32),
                server_id=SERVER_ID,
                rng=FixedRandom(len(self.hellos)),
            )
            machine.resume(stored, txid=txid)
            for message in machine.messages_to_send():
                await write_message(writer, message)
            ack = await read_message(reader)
            assert isinstance(ack, EUKeyAssignmentAck)
            if self.device_dir is not None:
                self.stores_at_ack.append(
                    LocalKeyStore.open_or_create(self.device_dir, "device").load()
                )
            if not session.lose_ack:
                self.acks.append(ack)
                self.events += machine.receive(ack)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def serving(gateway: FakeGateway, port: int = 0) -> AsyncIterator[int]:
    server = await asyncio.start_server(gateway.handle, "127.0.0.1", port)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def device_dir(tmp_path: Path) -> Path:
    """pne-1 provisioned with its factory TK."""
    path = tmp_path / PNE
    init_device(path, PNE, TKS[PNE])
    return path


def stored(device_dir: Path) -> dict[str, Any]:
    return LocalKeyStore.open_or_create(device_dir, "device").load()


def delivered(gateway: FakeGateway) -> list[EUKeyDelivered]:
    return [e for e in gateway.events if isinstance(e, EUKeyDelivered)]


# -- provisioning ------------------------------------------------------------------------


def test_init_device_and_status(device_dir: Path) -> None:
    """The factory state: Entity ID and TK, no EUKey; status shows no secret."""
    status = device_status(device_dir)
    assert status["entity_id"] == PNE
    assert (status["has_key"], status["key_index"]) == (False, 0)
    assert TKS[PNE].hex() not in json.dumps(status)
    assert stored(device_dir)["tk"] == TKS[PNE]


@pytest.mark.parametrize(
    ("entity_id", "tk"),
    [("pne 1", TKS[PNE]), (PNE, b"short"), (PNE, bytes(65))],
    ids=["bad-id", "tk-too-short", "tk-too-long"],
)
def test_init_device_refuses_bad_input(tmp_path: Path, entity_id: str, tk: bytes) -> None:
    """003 §7.4.2.2: a TK is a manufacturer secret of 16..64 bytes; IDs follow ID_PATTERN."""
    with pytest.raises(ConfigurationError):
        init_device(tmp_path / "d", entity_id, tk)


def test_init_device_does_not_overwrite_without_force(device_dir: Path) -> None:
    """Re-provisioning would drop the EUKey: it needs an explicit force."""
    with pytest.raises(ConfigurationError, match="already"):
        init_device(device_dir, PNE, TKS["pne-2"])
    init_device(device_dir, PNE, TKS["pne-2"], force=True)
    assert stored(device_dir)["tk"] == TKS["pne-2"]


def test_status_of_an_uninitialised_device_is_an_error(tmp_path: Path) -> None:
    """A device that was never provisioned says so."""
    with pytest.raises(ConfigurationError, match="no device"):
        device_status(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()  # a status query creates nothing


# -- 003 on the PNE side -------------------------------------------------------------------


def test_device_installs_the_key_and_acknowledges(device_dir: Path) -> None:
    """003 §7.4.2.1.1.3 (PNE step 1): the PNE decrypts EUKey_1 with its TK, stores it
    before acknowledging, and the PN GW verifies the Ack."""
    the_set, txid = key_set(1), b"\x11" * 16
    gateway = FakeGateway([Session(deliver=(the_set, txid))], device_dir=device_dir)

    async def scenario() -> int:
        async with serving(gateway) as port:
            return await DeviceAgent(device_dir, "127.0.0.1", port).run(once=True, timeout=WAIT)

    assert run(scenario()) == EXIT_OK
    assert delivered(gateway) == [EUKeyDelivered(pne_id=PNE, key_index=1)]
    assert gateway.hellos[0].key_index == 0
    state = stored(device_dir)
    assert (state["eukey"], state["key_index"], state["txid"]) == (the_set.eukeys[0], 1, txid)
    assert state["epoch"] == 1
    # DESIGN §6: the key was on disk when the Ack reached the gateway.
    assert gateway.stores_at_ack[0]["eukey"] == the_set.eukeys[0]
    assert device_status(device_dir)["key_index"] == 1


def test_device_restarted_before_its_ack_arrived_acknowledges_again(device_dir: Path) -> None:
    """DESIGN §5: the Ack was lost (the PNE restarted); on reconnection the PN GW re-sends
    the Notification and the PNE, already holding that key, acknowledges it again."""
    the_set, txid = key_set(1), b"\x11" * 16
    gateway = FakeGateway(
        [Session(deliver=(the_set, txid), lose_ack=True), Session(deliver=(the_set, txid))]
    )

    async def scenario() -> tuple[int, int]:
        async with serving(gateway) as port:
            first = await DeviceAgent(device_dir, "127.0.0.1", port).run(once=True, timeout=WAIT)
            again = await DeviceAgent(device_dir, "127.0.0.1", port).run(once=True, timeout=WAIT)
        return first, again

    assert run(scenario()) == (EXIT_OK, EXIT_OK)
    assert [h.key_index for h in gateway.hellos] == [0, 1]
    assert delivered(gateway) == [EUKeyDelivered(pne_id=PNE, key_index=1)]
    assert (stored(device_dir)["txid"], stored(device_dir)["epoch"]) == (txid, 1)


def test_replayed_notification_of_an_older_key_is_refused(device_dir: Path) -> None:
    """Issue 5 item 3 / D-003-11: a recorded Notification of a superseded assignment
    (epoch 1, after the PNE installed epoch 2) cannot roll the PNE back to an older key:
    the Ack says REPLAY and the PNE keeps its key."""
    old, new = (key_set(1, epoch=1), b"\x01" * 16), (key_set(2, epoch=2), b"\x02" * 16)
    gateway = FakeGateway([Session(deliver=old), Session(deliver=new), Session(deliver=old)])

    async def scenario() -> list[int]:
        async with serving(gateway) as port:
            codes = []
            for timeout in (WAIT, WAIT, 0.5):
                agent = DeviceAgent(device_dir, "127.0.0.1", port)
                codes.append(await agent.run(once=True, timeout=timeout))
            return codes

    assert run(scenario()) == [EXIT_OK, EXIT_OK, EXIT_REFUSED]
    assert gateway.acks[-1].status is ErrorCode.REPLAY
    assert stored(device_dir)["eukey"] == new[0].eukeys[0]
    assert stored(device_dir)["txid"] == new[1]


def test_captured_never_delivered_notification_is_refused_after_reassignment(
    device_dir: Path,
) -> None:
    """Issue 5 item 3 / D-003-11: a Notification captured before it was ever delivered
    (its txid was never seen by the PNE), replayed after the user re-assigned and the PNE
    installed the newer key, is refused: the lower epoch gives it away."""
    captured, newer = (key_set(1, epoch=1), b"\x01" * 16), (key_set(2, epoch=2), b"\x02" * 16)
    gateway = FakeGateway([Session(deliver=newer), Session(deliver=captured)])

    async def scenario() -> list[int]:
        async with serving(gateway) as port:
            codes = []
            for timeout in (WAIT, 0.5):
                agent = DeviceAgent(device_dir, "127.0.0.1", port)
                codes.append(await agent.run(once=True, timeout=timeout))
            return codes

    assert run(scenario()) == [EXIT_OK, EXIT_REFUSED]
    assert gateway.acks[-1].status is ErrorCode.REPLAY
    assert stored(device_dir)["eukey"] == newer[0].eukeys[0]
    assert stored(device_dir)["epoch"] == 2


def test_notification_under_another_tk_is_refused(device_dir: Path) -> None:
    """003 §7.4.2.1.1.3: a Notification that does not open with the PNE's TK is refused
    opaquely and nothing is stored."""
    gateway = FakeGateway([Session(deliver=(key_set(1, tk=TKS["pne-2"]), b"\x11" * 16))])

    async def scenario() -> int:
        async with serving(gateway) as port:
            return await DeviceAgent(device_dir, "127.0.0.1", port).run(once=True, timeout=0.5)

    assert run(scenario()) == EXIT_REFUSED
    assert gateway.acks[0].status is ErrorCode.AUTHENTICATION_FAILED
    assert gateway.acks[0].proof is None
    assert stored(device_dir)["eukey"] is None


def _run_sessions(device_dir: Path, gateway: FakeGateway, count: int) -> list[int]:
    async def scenario() -> list[int]:
        async with serving(gateway) as port:
            codes = []
            for _ in range(count):
                agent = DeviceAgent(device_dir, "127.0.0.1", port)
                codes.append(await agent.run(once=True, timeout=WAIT))
            return codes

    return run(scenario())


def test_reassignment_at_a_tk_step_installs_the_key_with_its_tk_flow_state(
    device_dir: Path,
) -> None:
    """Rule 7 (docs/procedures/eukey-assignment.md, re-assignment after TK-based
    authentications): the PNE's stored TK-flow state is at step 3 (000 ratcheted it); the
    re-assignment at the server's step 5 opens with TK_5 computed forward from it, and
    the PNE stores EUKey_1 with the state (TK_5, 5, EUKey_1, 1) before its Ack; the
    manufacturer TK stays as it was."""
    first = (key_set(1, epoch=1), b"\x01" * 16)
    gateway = FakeGateway([Session(deliver=first)], device_dir=device_dir)
    assert _run_sessions(device_dir, gateway, 1) == [EXIT_OK]
    store = LocalKeyStore.open_or_create(device_dir, "device")
    data = store.load()
    ratcheted = PNETKState(
        tk=ratchet(TKS[PNE], 3), tk_step=3, eukey=first[0].eukeys[1], key_index=2
    )
    store.save(dict(data, tk_auth=encode_tk_state(ratcheted, first[1])))
    assert tk_state_of(stored(device_dir)) == ratcheted

    second = (key_set(2, tk=ratchet(TKS[PNE], 5), epoch=2, tk_step=5), b"\x02" * 16)
    gateway = FakeGateway([Session(deliver=second)], device_dir=device_dir)
    assert _run_sessions(device_dir, gateway, 1) == [EXIT_OK]
    assert delivered(gateway) == [EUKeyDelivered(pne_id=PNE, key_index=1)]
    after = stored(device_dir)
    assert tk_state_of(after) == PNETKState(
        tk=ratchet(TKS[PNE], 5), tk_step=5, eukey=second[0].eukeys[0], key_index=1
    )
    assert after["tk"] == TKS[PNE]
    assert gateway.stores_at_ack[0]["tk_auth"]["tk_step"] == 5  # stored before the Ack


def test_reassignment_behind_the_pnes_step_is_refused_and_changes_nothing(
    device_dir: Path,
) -> None:
    """Rule 7: a Notification at a step behind the PNE's stored step is refused with
    STALE_CREDENTIAL in the Ack; the key and the TK-flow state stay."""
    first = (key_set(1, epoch=1), b"\x01" * 16)
    gateway = FakeGateway([Session(deliver=first)], device_dir=device_dir)
    assert _run_sessions(device_dir, gateway, 1) == [EXIT_OK]
    store = LocalKeyStore.open_or_create(device_dir, "device")
    ahead = PNETKState(tk=ratchet(TKS[PNE], 6), tk_step=6, eukey=first[0].eukeys[1], key_index=2)
    store.save(dict(store.load(), tk_auth=encode_tk_state(ahead, first[1])))
    before = stored(device_dir)

    async def scenario() -> int:
        behind = (key_set(2, tk=ratchet(TKS[PNE], 4), epoch=2, tk_step=4), b"\x02" * 16)
        refusing = FakeGateway([Session(deliver=behind)])
        async with serving(refusing) as port:
            code = await DeviceAgent(device_dir, "127.0.0.1", port).run(once=True, timeout=0.5)
        assert refusing.acks[0].status is ErrorCode.STALE_CREDENTIAL
        return code

    assert run(scenario()) == EXIT_REFUSED
    assert stored(device_dir) == before


def test_a_store_without_tk_flow_state_reads_as_the_manufacturer_tk_at_step_zero(
    device_dir: Path,
) -> None:
    """Stores written before steps were kept: no "tk_auth" (or one of another assignment)
    reads as the manufacturer TK at step 0 with the key held; a re-assignment at step 2
    then opens from it."""
    first = (key_set(1, epoch=1), b"\x01" * 16)
    gateway = FakeGateway([Session(deliver=first)], device_dir=device_dir)
    assert _run_sessions(device_dir, gateway, 1) == [EXIT_OK]
    store = LocalKeyStore.open_or_create(device_dir, "device")
    data = store.load()
    data.pop("tk_auth")
    store.save(data)
    assert tk_state_of(stored(device_dir)) == PNETKState(
        tk=TKS[PNE], tk_step=0, eukey=first[0].eukeys[0], key_index=1
    )
    second = (key_set(2, tk=ratchet(TKS[PNE], 2), epoch=2, tk_step=2), b"\x02" * 16)
    gateway = FakeGateway([Session(deliver=second)])
    assert _run_sessions(device_dir, gateway, 1) == [EXIT_OK]
    state = tk_state_of(stored(device_dir))
    assert state is not None
    assert (state.tk_step, state.key_index) == (2, 1)


# -- the link ----------------------------------------------------------------------------


def test_device_reconnects_until_the_gateway_delivers(device_dir: Path) -> None:
    """The PNE retries with backoff while no gateway listens, survives a gateway that
    drops the link and one that reports an error, and ends with its key."""
    the_set = key_set(3)
    gateway = FakeGateway(
        [Session(deliver=None), Session(deliver=(the_set, b"\x33" * 16), error_first=True)]
    )
    port = free_port()

    async def scenario() -> int:
        agent = DeviceAgent(device_dir, "127.0.0.1", port, backoff=0.02, max_backoff=0.1)
        task = asyncio.create_task(agent.run(once=True, timeout=WAIT))
        await asyncio.sleep(0.2)  # nobody listens yet: the agent keeps retrying
        async with serving(gateway, port):
            return await asyncio.wait_for(task, WAIT)

    assert run(scenario()) == EXIT_OK
    assert len(gateway.hellos) == 2
    assert stored(device_dir)["eukey"] == the_set.eukeys[0]


def test_unreachable_gateway_gives_the_unreachable_exit_code(device_dir: Path) -> None:
    """--once with no gateway before --timeout: exit 4 (a peer could not be reached)."""
    agent = DeviceAgent(device_dir, "127.0.0.1", free_port(), backoff=0.02)
    assert run(agent.run(once=True, timeout=0.3)) == EXIT_UNREACHABLE


def test_request_stop_ends_a_long_running_agent(device_dir: Path) -> None:
    """SIGTERM handling: request_stop makes run() return and release the store lock."""
    gateway = FakeGateway([])

    async def scenario() -> int:
        async with serving(gateway) as port:
            agent = DeviceAgent(device_dir, "127.0.0.1", port)
            task = asyncio.create_task(agent.run())
            while not gateway.hellos:
                await asyncio.sleep(0.01)
            agent.request_stop()
            return await asyncio.wait_for(task, WAIT)

    assert run(scenario()) == EXIT_OK
    LocalKeyStore.open_or_create(device_dir, "device").lock().unlock()


def test_two_agents_cannot_share_a_device_store(device_dir: Path) -> None:
    """DESIGN §6: the device store is locked by the running agent."""
    store = LocalKeyStore.open_or_create(device_dir, "device").lock()
    try:
        with pytest.raises(StoreError, match="in use"):
            run(DeviceAgent(device_dir, "127.0.0.1", free_port()).run(once=True, timeout=0.1))
    finally:
        store.unlock()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7000", ("127.0.0.1", 7000)),
        ("[::1]:9", ("::1", 9)),
        ("gw.local:1", ("gw.local", 1)),
    ],
)
def test_gateway_address_parsing(text: str, expected: tuple[str, int]) -> None:
    """``cpns device run --gateway HOST:PORT`` accepts names, IPv4 and bracketed IPv6."""
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["nohost", ":80", "h:0", "h:99999", "h:x"])
def test_gateway_address_parsing_refuses_garbage(text: str) -> None:
    """A malformed --gateway is a usage error, not a connection attempt."""
    with pytest.raises(ConfigurationError):
        parse_hostport(text)


def _huge_integer_frame() -> bytes:
    """A CBOR map whose version is an integer of 5,000 digits (issue 5 item 10: a codec
    that puts the value in its error message raised ValueError on it)."""
    import cbor2

    from cpns.transport.framing import encode_frame

    return encode_frame(cbor2.dumps({0: 10**4999, 1: 1}))


def test_no_gateway_bytes_make_the_agent_exit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 5 item 10: whatever a gateway (or an impostor on the PAN) sends - a message
    of an unexpected type, the huge-integer frame, an oversized length prefix, garbage -
    the agent logs one bounded line without a traceback and keeps its link or reconnects;
    it never exits."""
    import struct

    from cpns.transport.framing import encode_frame

    caplog.set_level(logging.DEBUG, logger="cpns")
    data_dir = tmp_path / "dev"
    init_device(data_dir, PNE, TKS[PNE])
    unexpected = encode_frame(
        encode(PNEHello(txid=bytes(16), src="gw-x", dst=PNE, has_ui=False, key_index=0))
    )
    plans = [
        [unexpected, _huge_integer_frame()],
        [struct.pack(">I", 2**31)],
        [encode_frame(b"\xff" * 60_000)],
    ]
    hellos: list[int] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            assert isinstance(await read_message(reader), PNEHello)
            hellos.append(1)
            if not plans:
                done.set()
                await reader.read()  # keep the link until the agent leaves
                return
            for frame in plans.pop(0):
                writer.write(frame)
            await writer.drain()
            await reader.read()  # the agent closes the link
        finally:
            writer.close()

    async def scenario() -> int:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        agent = DeviceAgent(data_dir, "127.0.0.1", port, backoff=0.01, max_backoff=0.05)
        task = asyncio.create_task(agent.run(timeout=WAIT))
        await asyncio.wait_for(done.wait(), WAIT)
        agent.request_stop()
        try:
            return await task
        finally:
            server.close()
            await server.wait_closed()

    assert run(scenario()) == EXIT_OK
    assert len(hellos) == 4
    assert "ignoring unexpected PNE_HELLO" in caplog.text
    for record in caplog.records:
        assert record.exc_info is None or record.levelno < logging.INFO
        assert len(record.getMessage()) < 700


def test_an_exception_in_one_session_makes_the_agent_reconnect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 5 item 10: even an unexpected exception while handling the gateway's bytes
    ends only that connection; the agent reconnects and says hello again."""
    import cpns.device.agent as agent_module

    data_dir = tmp_path / "dev"
    init_device(data_dir, PNE, TKS[PNE])
    real_read = agent_module.read_message
    calls = {"n": 0}

    async def flaky_read(reader: asyncio.StreamReader) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug")
        return await real_read(reader)

    monkeypatch.setattr(agent_module, "read_message", flaky_read)
    gateway = FakeGateway(sessions=[])

    async def scenario() -> int:
        async with serving(gateway) as port:
            agent = DeviceAgent(data_dir, "127.0.0.1", port, backoff=0.01, max_backoff=0.05)
            task = asyncio.create_task(agent.run(timeout=WAIT))
            while len(gateway.hellos) < 2:
                await asyncio.sleep(0.01)
            agent.request_stop()
            return await task

    assert run(scenario()) == EXIT_OK
    assert len(gateway.hellos) >= 2
