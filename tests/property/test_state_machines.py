"""Every role x every reachable state x every message type (STYLE §5 and §8, after h2's
test_state_machines).

Each machine is first driven to the state under test with real messages (recorded once
from a complete, deterministic exchange), then fed one message: a legal next message,
that message with one field altered, or an arbitrary valid message of any type, with
headers often naming the real parties and transaction. The invariant:

* a terminal machine raises LocalProtocolError and stays as it is;
* otherwise receive() never raises; a pair outside the table gives exactly one
  ProcedureFailed(UNEXPECTED_MESSAGE) and FAILED; a pair in the table gives either its
  next state with no ProcedureFailed, or exactly one ProcedureFailed and FAILED;
* whatever is queued is a valid message that round-trips through the codec, and a
  failure reply carries the failure's code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from tests.helpers import (
    FIXED_NOW,
    GATEWAY_KEYS,
    IDS,
    PASSWORDS,
    SERVER_ID,
    TKS,
    Directory,
    Exchange,
    FixedRandom,
    cached_password_key,
    claim_key_for,
    field_strategy,
    record_strategy,
    standard_directory,
)

from cpns.errors import ErrorCode, LocalProtocolError
from cpns.messages.codec import decode, encode
from cpns.messages.constants import TXID_LEN
from cpns.messages.model import MESSAGE_CLASSES, Message, Record, specs
from cpns.protocol._machine import Machine, ProcedureFailed
from cpns.protocol.key_assignment import (
    AssignmentPolicy,
    EUKeyAssignmentDevice,
    EUKeyAssignmentGateway,
    EUKeyAssignmentServer,
)
from cpns.protocol.user_key_assignment import UserKeyAssignmentClient, UserKeyAssignmentServer
from cpns.types import EntityKind

GW, PNE, USER, NEW = "gw-alice", "pne-1", "alice", "gw-new"
PARTY_IDS = [GW, PNE, USER, NEW, SERVER_ID, "gw-bob", "pne-2"]


# -- the parties, always built the same way so recorded messages stay valid -------------------


def world() -> Directory:
    return standard_directory(cached_password_key)


def server_003(directory: Directory) -> EUKeyAssignmentServer:
    return EUKeyAssignmentServer(
        policy=AssignmentPolicy(),
        lookups=directory.lookups(),
        requester=GW,
        rng=FixedRandom(2),
        now=FIXED_NOW,
    )


def gateway_003() -> EUKeyAssignmentGateway:
    return EUKeyAssignmentGateway(
        gateway_id=GW, gateway_eukey=GATEWAY_KEYS[GW], server_id=SERVER_ID, rng=FixedRandom(1)
    )


def device_003() -> EUKeyAssignmentDevice:
    return EUKeyAssignmentDevice(entity_id=PNE, tk=TKS[PNE], rng=FixedRandom(3))


def start_gateway(gateway: EUKeyAssignmentGateway) -> None:
    gateway.start(
        pne_id=PNE,
        user_id=USER,
        password_key=cached_password_key(USER, PASSWORDS[USER]),
        claim_key=claim_key_for(PNE),
        now=FIXED_NOW,
    )


def server_004(directory: Directory) -> UserKeyAssignmentServer:
    return UserKeyAssignmentServer(
        policy=AssignmentPolicy(), lookups=directory.lookups(), rng=FixedRandom(4), now=FIXED_NOW
    )


def client_004() -> UserKeyAssignmentClient:
    return UserKeyAssignmentClient(
        entity_id=NEW, entity_kind=EntityKind.PN_GW, server_id=SERVER_ID, rng=FixedRandom(5)
    )


def start_client(client: UserKeyAssignmentClient) -> None:
    client.start(
        user_id=USER, password_key=cached_password_key(USER, PASSWORDS[USER]), now=FIXED_NOW
    )


@functools.cache
def recorded() -> dict[str, Message]:
    """One complete exchange of each procedure, by message type name."""
    gateway = gateway_003()
    start_gateway(gateway)
    exchange = Exchange({SERVER_ID: server_003(world()), GW: gateway, PNE: device_003()})
    exchange.run()
    client = client_004()
    start_client(client)
    exchange_004 = Exchange({SERVER_ID: server_004(world()), NEW: client})
    exchange_004.run()
    messages = {type(m).__name__: m for _, m in exchange.transcript + exchange_004.transcript}
    assert len(messages) == 6, messages
    assert all(m.terminal for m in (*exchange.parties.values(), *exchange_004.parties.values()))
    return messages


def broken(message: Message) -> Message:
    """The message with its txid changed: refused by whoever receives it."""
    return dataclasses.replace(message, txid=bytes(TXID_LEN))


@dataclass
class Driven:
    """A machine in the state under test, and the messages legal for it next."""

    machine: Machine[Any]
    legal: list[Message]


def drive(role: str, state: str) -> Driven:
    """Build ``role``'s machine and bring it to ``state`` with recorded messages."""
    rec = recorded()
    request, response = rec["EUKeyAssignmentRequest"], rec["EUKeyAssignmentResponse"]
    notification, ack = rec["EUKeyAssignmentNotification"], rec["EUKeyAssignmentAck"]
    user_request = rec["UserKeyAssignmentRequest"]
    user_response = rec["UserKeyAssignmentResponse"]
    machine: Machine[Any]
    legal: list[Message] = []
    match role:
        case "EUKeyAssignmentServer":
            machine = server_003(world())
            feed = {
                "EXPECT_REQUEST": [],
                "DONE": [request],
                "FAILED": [dataclasses.replace(request, auth_data=bytes(32))],
            }
            legal = [request]
        case "EUKeyAssignmentGateway":
            machine = gateway_003()
            if state != "START":
                start_gateway(machine)
            feed = {
                "START": [],
                "EXPECT_RESPONSE": [],
                "EXPECT_ACK": [response],
                "DONE": [response, ack],
                "FAILED": [broken(response)],
            }
            legal = {"EXPECT_RESPONSE": [response], "EXPECT_ACK": [ack]}.get(state, [])
        case "EUKeyAssignmentDevice":
            machine = device_003()
            feed = {
                "EXPECT_NOTIFICATION": [],
                "DONE": [notification],
                "FAILED": [broken(notification)],
            }
            legal = [notification]
        case "UserKeyAssignmentServer":
            machine = server_004(world())
            feed = {
                "EXPECT_REQUEST": [],
                "DONE": [user_request],
                "FAILED": [dataclasses.replace(user_request, auth_data=bytes(32))],
            }
            legal = [user_request]
        case "UserKeyAssignmentClient":
            machine = client_004()
            if state != "START":
                start_client(machine)
            feed = {
                "START": [],
                "EXPECT_RESPONSE": [],
                "DONE": [user_response],
                "FAILED": [broken(user_response)],
            }
            legal = [user_response] if state == "EXPECT_RESPONSE" else []
        case _:  # pragma: no cover
            raise AssertionError(role)
    for message in feed[state]:
        machine.receive(message)
    machine.messages_to_send()
    assert machine.state.name == state, (role, state, machine.state)
    return Driven(machine, legal)


ROLES: dict[str, list[str]] = {
    "EUKeyAssignmentServer": ["EXPECT_REQUEST", "DONE", "FAILED"],
    "EUKeyAssignmentGateway": ["START", "EXPECT_RESPONSE", "EXPECT_ACK", "DONE", "FAILED"],
    "EUKeyAssignmentDevice": ["EXPECT_NOTIFICATION", "DONE", "FAILED"],
    "UserKeyAssignmentServer": ["EXPECT_REQUEST", "DONE", "FAILED"],
    "UserKeyAssignmentClient": ["START", "EXPECT_RESPONSE", "DONE", "FAILED"],
}
ROLE_CLASSES: dict[str, type[Machine[Any]]] = {
    cls.__name__: cls
    for cls in (
        EUKeyAssignmentServer,
        EUKeyAssignmentGateway,
        EUKeyAssignmentDevice,
        UserKeyAssignmentServer,
        UserKeyAssignmentClient,
    )
}
PAIRS = [
    pytest.param(role, state, id=f"{role}-{state}")
    for role, states in ROLES.items()
    for state in states
]


def test_every_state_of_every_role_is_covered() -> None:
    """STYLE §8: the table above lists every state of every role class (states are an Enum
    per role); a new state cannot be left out of the property below."""
    for name, states in ROLES.items():
        cls = ROLE_CLASSES[name]
        state_enum = type(next(iter(cls.TRANSITIONS))[0])
        assert sorted(states) == sorted(s.name for s in state_enum), name


# -- messages to feed -----------------------------------------------------------------------------


def known_or_any_id() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(PARTY_IDS), IDS)


def arbitrary_message(
    known_txids: list[bytes], classes: list[type[Message]] | None = None
) -> st.SearchStrategy[Message]:
    """Any valid message of the given types (default: all); headers and ids often those of
    the real exchange."""
    txids = st.one_of(st.sampled_from(known_txids), st.binary(min_size=16, max_size=16))
    strategies = []
    for cls in classes or MESSAGE_CLASSES.values():
        fixed: dict[str, Any] = {"txid": txids, "src": known_or_any_id(), "dst": known_or_any_id()}
        for name, spec in specs(cls):
            if spec.kind == "id":
                fixed[name] = known_or_any_id()
        strategies.append(record_strategy(cls, **fixed))
    return st.one_of(strategies)


@st.composite
def altered(draw: st.DrawFn, message: Message) -> Message:
    """``message`` with one header or body field replaced by another valid value."""
    names = ["txid", "src", "dst", "pn_id", *(name for name, _ in specs(type(message)))]
    name = draw(st.sampled_from(names))
    if name == "txid":
        value: Any = draw(st.binary(min_size=16, max_size=16))
    elif name in ("src", "dst"):
        value = draw(known_or_any_id())
    elif name == "pn_id":
        value = draw(st.one_of(st.none(), IDS))
    else:
        value = draw(field_strategy(dict(specs(type(message)))[name]))
    return dataclasses.replace(message, **{name: value})


def candidates(legal: list[Message]) -> st.SearchStrategy[Message]:
    known_txids = [m.txid for m in recorded().values()]
    options = [arbitrary_message(known_txids)]
    if legal:
        options += [
            st.sampled_from(legal),
            st.sampled_from(legal).flatmap(altered),
            arbitrary_message(known_txids, [type(m) for m in legal]),
        ]
    return st.one_of(options)


# -- the invariant --------------------------------------------------------------------------------


def check_move(driven: Driven, message: Message, *, note: Callable[[str], None] = event) -> None:
    machine = driven.machine
    cls = type(machine)
    before = machine.state
    if machine.terminal:
        with pytest.raises(LocalProtocolError):
            machine.receive(message)
        assert machine.state is before
        assert machine.messages_to_send() == []
        note("terminal")
        return
    entry = cls.TRANSITIONS.get((before, type(message)))
    events = machine.receive(message)  # anything raised here fails the test
    failures = [e for e in events if isinstance(e, ProcedureFailed)]
    queued = machine.messages_to_send()
    for reply in queued:
        assert decode(encode(reply)) == reply
    note("unexpected" if entry is None else "refused" if failures else "legal")
    if entry is None:
        assert len(events) == 1
        assert events[0].code is ErrorCode.UNEXPECTED_MESSAGE  # type: ignore[attr-defined]
        assert machine.state.name == "FAILED"
    elif failures:
        assert events == failures
        assert len(failures) == 1
        assert failures[0].hop == cls.HOP
        assert machine.state.name == "FAILED"
        for reply in queued:  # the failure reply tells the peer the same code
            assert getattr(reply, "status", failures[0].code) == failures[0].code
    else:
        assert machine.state is entry[1]
    assert machine.terminal == (machine.state.name in ("DONE", "FAILED"))
    if machine.terminal:
        with pytest.raises(LocalProtocolError):
            machine.receive(message)


@pytest.mark.parametrize(("role", "state"), PAIRS)
@settings(max_examples=50)
@given(data=st.data())
def test_state_x_message(role: str, state: str, data: st.DataObject) -> None:
    """STYLE §5/§8: for every role, every reachable state and every message type, receive()
    is either a legal transition or exactly one ProcedureFailed with FAILED; it never
    raises anything else, and a terminal machine raises LocalProtocolError."""
    driven = drive(role, state)
    message = data.draw(candidates(driven.legal), label="message")
    check_move(driven, message)


@pytest.mark.parametrize(("role", "state"), PAIRS)
@pytest.mark.parametrize("cls", list(MESSAGE_CLASSES.values()), ids=lambda c: c.__name__)
def test_every_message_type_in_every_state(role: str, state: str, cls: type[Message]) -> None:
    """STYLE §8 exhaustive pairs: one fixed instance of each message type in each state
    satisfies the invariant (the Hypothesis test above varies the contents)."""
    message = recorded().get(cls.__name__) or _fixed_instance(cls)
    check_move(drive(role, state), message, note=lambda _: None)


def _fixed_instance(cls: type[Message]) -> Message:
    values: dict[str, Any] = {"txid": bytes(16), "src": GW, "dst": PNE}
    if cls.PN_ID_REQUIRED:
        values["pn_id"] = USER
    for name, spec in specs(cls):
        values[name] = _minimal(spec)
    return cls(**values)


def _minimal_record(cls: type[Record]) -> Record:
    return cls(**{name: _minimal(spec) for name, spec in specs(cls)})


def _minimal(spec: Any) -> Any:
    if spec.optional:
        return None
    lookup: dict[str, Callable[[], Any]] = {
        "bytes": lambda: bytes(spec.lo),
        "id": lambda: USER,
        "int": lambda: spec.lo,
        "enum": lambda: next(iter(spec.enum)),
        "bool": lambda: False,
        "bytes_list": lambda: (bytes(32),) * spec.lo,
        "id_list": lambda: (USER,) * spec.lo,
        "records": lambda: (_minimal_record(spec.record),) * spec.lo,
    }
    return lookup[spec.kind]()
