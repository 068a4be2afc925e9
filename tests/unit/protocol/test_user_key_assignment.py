"""EUKey assignment for an entity with UI (004 §5.x.1, D-004-1, D-004-2): client and server.

"CPNS Server assigns EUKey to PNE and PN GW after authenticating PNE and PN GW based on
User ID and password of CPNS User who owns PNE and PN GW. Assigned EUKey is stored in
CPNS Server together with Entity ID and User ID."
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tests.helpers import (
    FIXED_NOW,
    PASSWORDS,
    SERVER_ID,
    Directory,
    Exchange,
    FailedWith,
    FixedRandom,
    ref_hkdf,
    ref_parts,
    ref_seal_ad,
    ref_seal_key,
)

from cpns.crypto.keywrap import seal
from cpns.errors import ErrorCode, LocalProtocolError
from cpns.messages.model import (
    EUKeyAssignmentRequest,
    Message,
    UserKeyAssignmentRequest,
    UserKeyAssignmentResponse,
)
from cpns.protocol._machine import NonceConsumed
from cpns.protocol.key_assignment import AssignmentPolicy
from cpns.protocol.user_key_assignment import (
    ClientState,
    EUKeyAssigned,
    EUKeyReceived,
    ServerState,
    UserKeyAssignmentClient,
    UserKeyAssignmentServer,
)
from cpns.types import EntityKind

ENTITY, USER = "gw-new", "alice"
TXID = bytes(range(16))
RAND = b"\x42" * 32

type KeyOf = Callable[[str, str], bytes]


def ref_auth_data(password_key: bytes, request: UserKeyAssignmentRequest) -> bytes:
    """docs/crypto.md: HMAC(password_key, label, rand, time, user, entity, kind, server)."""
    msg = ref_parts(
        "cpns/v1/004/auth-data",
        request.rand,
        request.time,
        request.user_id,
        request.src,
        int(request.entity_kind),
        request.dst,
    )
    return hmac.new(password_key, msg, hashlib.sha256).digest()


def ref_reply_key(
    password_key: bytes, request: UserKeyAssignmentRequest, rand_server: bytes
) -> bytes:
    """docs/crypto.md: HKDF(password_key, salt = rand || rand_server, info = label, entity,
    user, txid)."""
    info = ref_parts("cpns/v1/004/reply-key", request.src, request.user_id, request.txid)
    return ref_hkdf(password_key, salt=request.rand + rand_server, info=info, length=32)


def make_request(
    key_of: KeyOf,
    *,
    password: str = PASSWORDS[USER],
    user: str = USER,
    entity: str = ENTITY,
    kind: EntityKind = EntityKind.PN_GW,
    dst: str = SERVER_ID,
    time: int = FIXED_NOW,
    rand: bytes = RAND,
) -> UserKeyAssignmentRequest:
    """A request whose auth_data is computed independently."""
    draft = UserKeyAssignmentRequest(
        txid=TXID,
        src=entity,
        dst=dst,
        user_id=user,
        entity_kind=kind,
        time=time,
        rand=rand,
        auth_data=bytes(32),
    )
    return dataclasses.replace(draft, auth_data=ref_auth_data(key_of(user, password), draft))


def new_server(
    world: Directory, *, now: int = FIXED_NOW, policy: AssignmentPolicy | None = None, seed: int = 2
) -> UserKeyAssignmentServer:
    return UserKeyAssignmentServer(
        policy=policy or AssignmentPolicy(), lookups=world.lookups(), rng=FixedRandom(seed), now=now
    )


def new_client(
    kind: EntityKind = EntityKind.PN_GW, *, entity: str = ENTITY, seed: int = 1
) -> UserKeyAssignmentClient:
    return UserKeyAssignmentClient(
        entity_id=entity, entity_kind=kind, server_id=SERVER_ID, rng=FixedRandom(seed)
    )


# -- happy paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "entity"),
    [(EntityKind.PN_GW, "gw-new"), (EntityKind.PNE, "pne-with-ui")],
    ids=["pn-gw", "pne-with-ui"],
)
def test_with_ui_flow(world: Directory, password_key: KeyOf, kind: EntityKind, entity: str) -> None:
    """004 §5.x.1: the entity (a PN GW or a PNE with UI) proves its user's password, the
    server assigns a fresh EUKey and reports it to store with the Entity ID and User ID,
    and the entity receives the same key; both DONE."""
    client, server = new_client(kind, entity=entity), new_server(world)
    client.start(user_id=USER, password_key=password_key(USER, PASSWORDS[USER]), now=FIXED_NOW)
    exchange = Exchange({SERVER_ID: server, entity: client})
    events = exchange.run()

    [(_, request)] = exchange.transcript[:1]
    assert isinstance(request, UserKeyAssignmentRequest)
    eukey = FixedRandom(2).token_bytes(32)  # the server's first draw
    assert events == [
        (SERVER_ID, NonceConsumed(nonce=request.rand, expires_at=FIXED_NOW + 300)),
        (SERVER_ID, EUKeyAssigned(entity_id=entity, kind=kind, user_id=USER, eukey=eukey)),
        (entity, EUKeyReceived(eukey=eukey)),
    ]
    assert exchange.states() == {SERVER_ID: "DONE", entity: "DONE"}
    assert [type(m) for _, m in exchange.transcript] == [
        UserKeyAssignmentRequest,
        UserKeyAssignmentResponse,
    ]


def test_request_contents(password_key: KeyOf) -> None:
    """D-004-1: the request carries User ID, kind, Time, a fresh rand and auth_data =
    HMAC(password key, rand, time, user, entity, kind, server), computed here by hand."""
    client = new_client(seed=5)
    key = password_key(USER, PASSWORDS[USER])
    client.start(user_id=USER, password_key=key, now=FIXED_NOW)
    [request] = client.messages_to_send()
    assert isinstance(request, UserKeyAssignmentRequest)
    twin = FixedRandom(5)
    txid, rand = twin.token_bytes(16), twin.token_bytes(32)
    assert (request.txid, request.rand, request.time) == (txid, rand, FIXED_NOW)
    assert (request.src, request.dst, request.user_id, request.entity_kind) == (
        ENTITY,
        SERVER_ID,
        USER,
        EntityKind.PN_GW,
    )
    assert request.auth_data == ref_auth_data(key, request)
    assert client.state is ClientState.EXPECT_RESPONSE
    with pytest.raises(LocalProtocolError):
        client.start(user_id=USER, password_key=key, now=FIXED_NOW)


def test_sealed_eukey_opens_independently(world: Directory, password_key: KeyOf) -> None:
    """D-004-1 / docs/crypto.md: sealed_eukey is AES-256-GCM under HKDF of the password key
    salted with both rands, bound to (server, entity, txid); checked with the raw primitives."""
    key = password_key(USER, PASSWORDS[USER])
    request = make_request(password_key)
    server = new_server(world)
    server.receive(request)
    [response] = server.messages_to_send()
    assert isinstance(response, UserKeyAssignmentResponse)
    assert response.status is ErrorCode.OK
    assert response.rand_server is not None
    assert response.sealed_eukey is not None
    reply_key = ref_reply_key(key, request, response.rand_server)
    blob = response.sealed_eukey
    assert blob[0] == 1
    aead = AESGCM(ref_seal_key(reply_key, "004/eukey"))
    ad = ref_seal_ad("004/eukey", SERVER_ID, ENTITY, TXID)
    twin = FixedRandom(2)
    eukey, rand_server = twin.token_bytes(32), twin.token_bytes(32)
    assert response.rand_server == rand_server
    assert aead.decrypt(blob[1:13], blob[13:], ad) == eukey
    assert eukey not in blob


@pytest.mark.parametrize("offset", [-300, 300])
def test_time_window_edges_accepted(world: Directory, password_key: KeyOf, offset: int) -> None:
    """D-003-5 (same rule at enrolment): Time exactly +-300 s from the server's clock passes."""
    server = new_server(world)
    server.receive(make_request(password_key, time=FIXED_NOW + offset))
    assert server.state is ServerState.DONE


def test_re_enrolment_of_an_owned_entity(world: Directory, password_key: KeyOf) -> None:
    """004 §5.x.1: an entity already registered to the same user with the same kind gets a
    new EUKey (e.g. after a factory reset)."""
    world.add_entity(ENTITY, EntityKind.PN_GW, USER, eukeys=(b"\x01" * 32,), key_index=1)
    server = new_server(world)
    events = server.receive(make_request(password_key))
    assert server.state is ServerState.DONE
    assert events[1] == EUKeyAssigned(
        entity_id=ENTITY, kind=EntityKind.PN_GW, user_id=USER, eukey=FixedRandom(2).token_bytes(32)
    )


# -- server refusals -----------------------------------------------------------------------------

SERVER_FAILURES: list[Any] = [
    ("wrong-password", None, {"password": "not the password"}, {}, ErrorCode.AUTHENTICATION_FAILED),
    ("unknown-user", None, {"user": "carol"}, {}, ErrorCode.AUTHENTICATION_FAILED),
    # D-SRV-1: too many failed proofs lately: refused before the password is tried, and
    # the same for a User ID that does not exist (no enumeration through the guard).
    (
        "too-many-attempts",
        lambda w: w.auth_failures.update(alice=10),
        {},
        {},
        ErrorCode.TOO_MANY_ATTEMPTS,
    ),
    (
        "too-many-attempts-unknown-user",
        lambda w: w.auth_failures.update(carol=10),
        {"user": "carol"},
        {},
        ErrorCode.TOO_MANY_ATTEMPTS,
    ),
    (
        "owned-by-other-user",
        lambda w: w.add_entity(ENTITY, EntityKind.PN_GW, "bob"),
        {},
        {},
        ErrorCode.OWNED_BY_OTHER_USER,
    ),
    (
        "registered-with-other-kind",
        lambda w: w.add_entity(ENTITY, EntityKind.PN_GW, USER),
        {"kind": EntityKind.PNE},
        {},
        ErrorCode.WRONG_ENTITY_KIND,
    ),
    (
        "pne-claiming-gateway",
        lambda w: w.add_entity(ENTITY, EntityKind.PNE, USER),
        {},
        {},
        ErrorCode.WRONG_ENTITY_KIND,
    ),
    ("server-kind", None, {"kind": EntityKind.SERVER}, {}, ErrorCode.WRONG_ENTITY_KIND),
    (
        "revoked-entity",
        lambda w: w.add_entity(ENTITY, EntityKind.PN_GW, USER, revoked=True),
        {},
        {},
        ErrorCode.ENTITY_REVOKED,
    ),
    (
        "disabled-user",
        lambda w: w.users.update(alice=dataclasses.replace(w.users["alice"], disabled=True)),
        {},
        {},
        ErrorCode.NOT_AUTHORIZED,
    ),
    ("replayed-rand", lambda w: w.used_nonces.update({RAND: FIXED_NOW}), {}, {}, ErrorCode.REPLAY),
    ("stale-time-past", None, {"time": FIXED_NOW - 301}, {}, ErrorCode.STALE_TIME),
    ("stale-time-future", None, {"time": FIXED_NOW + 301}, {}, ErrorCode.STALE_TIME),
    ("wrong-destination", None, {"dst": "other-server"}, {}, ErrorCode.WRONG_DESTINATION),
    # Authentication first: an unauthenticated sender learns nothing about entities or nonces.
    (
        "wrong-password-entity-of-other-user",
        lambda w: w.add_entity(ENTITY, EntityKind.PN_GW, "bob"),
        {"password": "x"},
        {},
        ErrorCode.AUTHENTICATION_FAILED,
    ),
    (
        "unknown-user-and-replay",
        lambda w: w.used_nonces.update({RAND: FIXED_NOW}),
        {"user": "carol"},
        {},
        ErrorCode.AUTHENTICATION_FAILED,
    ),
]


@pytest.mark.parametrize(
    ("alter", "request_kw", "server_kw", "code"),
    [pytest.param(*row[1:], id=row[0]) for row in SERVER_FAILURES],
)
def test_server_refusal(
    world: Directory,
    password_key: KeyOf,
    alter: Callable[[Directory], object] | None,
    request_kw: dict[str, Any],
    server_kw: dict[str, Any],
    code: ErrorCode,
) -> None:
    """004 §5.x.1 / §5.x.3, D-004-2: each refusal is one ProcedureFailed with its exact code,
    FAILED, and a Response with the same status and neither rand_server nor key."""
    if alter is not None:
        alter(world)
    request = make_request(password_key, **request_kw)
    server = new_server(world, **server_kw)
    assert server.receive(request) == [FailedWith(code, "server")]
    assert server.state is ServerState.FAILED
    assert server.messages_to_send() == [
        UserKeyAssignmentResponse(txid=TXID, src=SERVER_ID, dst=request.src, status=code)
    ]
    with pytest.raises(LocalProtocolError):
        server.receive(request)


def test_unknown_user_and_wrong_password_look_alike(world: Directory, password_key: KeyOf) -> None:
    """D-004-2: an unknown user and a wrong password give byte-identical Responses (no user
    enumeration); only the internal reason differs."""
    replies, reasons = [], []
    for kw in ({"user": "carol"}, {"password": "wrong"}):
        server = new_server(world)
        [event] = server.receive(make_request(password_key, **kw))
        reasons.append(event.reason)  # type: ignore[attr-defined]
        replies.append(server.messages_to_send())
    assert replies[0] == replies[1]
    assert reasons[0] != reasons[1]


def test_server_refuses_other_messages(world: Directory, password_key: KeyOf) -> None:
    """STYLE §5: a 003 request sent to the with-UI server machine is UNEXPECTED_MESSAGE and
    gets no Response."""
    server = new_server(world)
    other = EUKeyAssignmentRequest(
        txid=TXID,
        src=ENTITY,
        dst=SERVER_ID,
        pne_id="pne-1",
        user_id=USER,
        time=FIXED_NOW,
        rand_pngw=RAND,
        auth_data=bytes(32),
        claim_proof=bytes(32),
    )
    assert server.receive(other) == [FailedWith(ErrorCode.UNEXPECTED_MESSAGE, "server")]
    assert server.messages_to_send() == []


# -- client refusals -----------------------------------------------------------------------------


def client_and_response(
    world: Directory, password_key: KeyOf
) -> tuple[UserKeyAssignmentClient, UserKeyAssignmentResponse]:
    client = new_client()
    client.start(user_id=USER, password_key=password_key(USER, PASSWORDS[USER]), now=FIXED_NOW)
    [request] = client.messages_to_send()
    server = new_server(world)
    server.receive(request)
    [response] = server.messages_to_send()
    assert isinstance(response, UserKeyAssignmentResponse)
    return client, response


def _flip(value: bytes | None) -> bytes:
    assert value is not None
    return value[:-1] + bytes([value[-1] ^ 1])


def _forged_short_key(
    response: UserKeyAssignmentResponse, request: Message, key: bytes
) -> UserKeyAssignmentResponse:
    assert isinstance(request, UserKeyAssignmentRequest)
    assert response.rand_server is not None
    reply_key = ref_reply_key(key, request, response.rand_server)
    blob = seal(
        reply_key,
        b"\x01" * 16,
        purpose="004/eukey",
        context=(SERVER_ID, ENTITY, request.txid),
        nonce=bytes(12),
    )
    return dataclasses.replace(response, sealed_eukey=blob)


CLIENT_FAILURES: list[Any] = [
    pytest.param(
        lambda r: dataclasses.replace(r, sealed_eukey=_flip(r.sealed_eukey)),
        ErrorCode.AUTHENTICATION_FAILED,
        id="tampered-sealed-eukey",
    ),
    pytest.param(
        lambda r: dataclasses.replace(r, rand_server=_flip(r.rand_server)),
        ErrorCode.AUTHENTICATION_FAILED,
        id="tampered-rand-server",
    ),
    pytest.param(
        lambda r: dataclasses.replace(r, txid=bytes(16)),
        ErrorCode.UNEXPECTED_MESSAGE,
        id="response-for-another-txid",
    ),
    pytest.param(
        lambda r: dataclasses.replace(r, src="cpns-2"),
        ErrorCode.UNEXPECTED_MESSAGE,
        id="response-from-another-server",
    ),
    pytest.param(
        lambda r: dataclasses.replace(r, sealed_eukey=None),
        ErrorCode.MALFORMED_MESSAGE,
        id="ok-without-key",
    ),
    pytest.param(
        lambda r: dataclasses.replace(r, rand_server=None),
        ErrorCode.MALFORMED_MESSAGE,
        id="ok-without-rand-server",
    ),
    pytest.param(
        lambda r: UserKeyAssignmentResponse(
            txid=r.txid, src=r.src, dst=r.dst, status=ErrorCode.OWNED_BY_OTHER_USER
        ),
        ErrorCode.OWNED_BY_OTHER_USER,
        id="relayed-refusal",
    ),
]


@pytest.mark.parametrize(("alter", "code"), CLIENT_FAILURES)
def test_client_refuses_response(
    world: Directory,
    password_key: KeyOf,
    alter: Callable[[UserKeyAssignmentResponse], UserKeyAssignmentResponse],
    code: ErrorCode,
) -> None:
    """D-004-1: opening the seal authenticates the server; a Response that does not open, does
    not answer our request, or refuses, ends the client FAILED with the exact code and no key."""
    client, response = client_and_response(world, password_key)
    assert client.receive(alter(response)) == [FailedWith(code, "entity")]
    assert client.state is ClientState.FAILED
    assert client.messages_to_send() == []
    with pytest.raises(LocalProtocolError):
        client.receive(response)


def test_client_refuses_key_of_wrong_length(world: Directory, password_key: KeyOf) -> None:
    """user_key_assignment: even a correctly sealed value must be a 32-byte EUKey."""
    client = new_client()
    key = password_key(USER, PASSWORDS[USER])
    client.start(user_id=USER, password_key=key, now=FIXED_NOW)
    [request] = client.messages_to_send()
    server = new_server(world)
    server.receive(request)
    [response] = server.messages_to_send()
    assert isinstance(response, UserKeyAssignmentResponse)
    forged = _forged_short_key(response, request, key)
    assert client.receive(forged) == [FailedWith(ErrorCode.AUTHENTICATION_FAILED, "entity")]


def test_wrong_password_end_to_end(world: Directory, password_key: KeyOf) -> None:
    """D-004-2 via the Exchange: the server refuses with AUTHENTICATION_FAILED and the
    entity's machine ends with the same code."""
    client = new_client()
    client.start(user_id=USER, password_key=password_key(USER, "typo"), now=FIXED_NOW)
    exchange = Exchange({SERVER_ID: new_server(world), ENTITY: client})
    assert exchange.run() == [
        (SERVER_ID, FailedWith(ErrorCode.AUTHENTICATION_FAILED, "server")),
        (ENTITY, FailedWith(ErrorCode.AUTHENTICATION_FAILED, "entity")),
    ]
    assert exchange.states() == {SERVER_ID: "FAILED", ENTITY: "FAILED"}


def test_client_unexpected_message_before_start() -> None:
    """STYLE §5: a Response before start() is UNEXPECTED_MESSAGE (the START state takes none)."""
    client = new_client()
    response = UserKeyAssignmentResponse(txid=TXID, src=SERVER_ID, dst=ENTITY, status=ErrorCode.OK)
    assert client.receive(response) == [FailedWith(ErrorCode.UNEXPECTED_MESSAGE, "entity")]
    assert client.state is ClientState.FAILED
    with pytest.raises(LocalProtocolError):
        client.start(user_id=USER, password_key=b"k" * 32, now=FIXED_NOW)


def test_unknown_user_with_a_proof_under_the_dummy_key(world: Directory) -> None:
    """D-004-2: for an unknown user the server still computes a MAC (under a fixed dummy key)
    so both refusals cost the same; a proof made under that dummy key (all zeros) must not
    let an unknown user in."""
    draft = make_request(lambda user, password: bytes(32), user="carol")
    request = dataclasses.replace(draft, auth_data=ref_auth_data(bytes(32), draft))
    server = new_server(world)
    assert server.receive(request) == [FailedWith(ErrorCode.AUTHENTICATION_FAILED, "server")]
    assert server.messages_to_send() == [
        UserKeyAssignmentResponse(
            txid=TXID, src=SERVER_ID, dst=ENTITY, status=ErrorCode.AUTHENTICATION_FAILED
        )
    ]


# -- Entity ID syntax (issue 5 item 9, D-SRV-3) --------------------------------------------------


@pytest.mark.parametrize(
    "entity",
    [
        SERVER_ID,  # the server's own Entity ID
        SERVER_ID.upper(),  # ... in any case
        "127.0.0.1",  # an IPv4 literal
        "10.1.2.3",
        "127.1",  # written like an address
        "pan",  # the PN GW's PAN address
        "unknown",  # the destination of a reply to an unreadable request
        "localhost",
        "gw.localhost",
        "admin",
        "GW-Alice",  # a case variant of the enrolled gw-alice
        "Gw-New",  # not canonical (uppercase)
    ],
)
def test_enrolment_refuses_reserved_and_non_canonical_entity_ids(
    world: Directory, password_key: KeyOf, entity: str
) -> None:
    """Issue 5 item 9, D-SRV-3 ("Entity ID syntax"): enrolment refuses the server's own ID,
    reserved names, address-like names and non-lowercase IDs (so no two registered IDs
    differ by case) with INVALID_ENTITY_ID, even with the right password, and assigns
    nothing."""
    server = new_server(world, policy=AssignmentPolicy(server_id=SERVER_ID))
    request = make_request(password_key, entity=entity, dst=SERVER_ID)
    assert server.receive(request) == [FailedWith(ErrorCode.INVALID_ENTITY_ID, "server")]
    [reply] = server.messages_to_send()
    assert isinstance(reply, UserKeyAssignmentResponse)
    assert (reply.status, reply.sealed_eukey) == (ErrorCode.INVALID_ENTITY_ID, None)


@pytest.mark.parametrize("entity", ["gw-new", "pne.42", "alice+gw@home", "gw_1", "1-gw", "1.2.3.x"])
def test_enrolment_accepts_canonical_entity_ids(
    world: Directory, password_key: KeyOf, entity: str
) -> None:
    """D-SRV-3: canonical, unreserved Entity IDs enrol (digits and dots with a letter are not
    address-like)."""
    server = new_server(world)
    server.receive(make_request(password_key, entity=entity))
    assert server.state is ServerState.DONE


@pytest.mark.parametrize(
    "text", ["host:8443", "::1", "[::1]:80", "fe80::1", "a b", "", "-x", "x" * 129]
)
def test_host_port_and_ipv6_literals_are_not_entity_ids(text: str) -> None:
    """D-SRV-3: ':' (and so host:port, IPv6 literals) is outside the Entity ID syntax: no
    message can carry such an ID."""
    from cpns.messages.constants import ID_PATTERN, entity_id_problem

    assert ID_PATTERN.fullmatch(text) is None
    assert entity_id_problem(text) == "not a valid Entity ID"
    with pytest.raises(ValueError, match="src"):
        make_request(lambda u, p: bytes(32), entity=text)


# -- relayed by a PN GW (docs/procedures/pne-enrolment.md, D-004-5) ------------------------------


def relayed_server(world: Directory, relay: str = "gw-alice") -> UserKeyAssignmentServer:
    return UserKeyAssignmentServer(
        policy=AssignmentPolicy(),
        lookups=world.lookups(),
        rng=FixedRandom(2),
        now=FIXED_NOW,
        relay=relay,
    )


def test_relayed_pne_enrolment_succeeds(world: Directory, password_key: KeyOf) -> None:
    """004 §5.x.1 through the PN GW: a PNE's request relayed by its user's PN GW is
    assigned an EUKey stored with the PNE's Entity ID and User ID, sealed as for a direct
    request (the relay adds no key of its own to the reply)."""
    request = make_request(password_key, entity="pne-ui", kind=EntityKind.PNE)
    server = relayed_server(world)
    events = server.receive(request)
    eukey = FixedRandom(2).token_bytes(32)
    assert (
        EUKeyAssigned(entity_id="pne-ui", kind=EntityKind.PNE, user_id=USER, eukey=eukey) in events
    )
    [response] = server.messages_to_send()
    direct = new_server(world)
    direct.receive(request)
    assert direct.messages_to_send() == [response]


@pytest.mark.parametrize(
    ("change", "relay", "code"),
    [
        # The precise code: the relaying PN GW is authenticated and of this user.
        ({"password": "wrong password"}, "gw-alice", ErrorCode.WRONG_PASSWORD),
        # D-003-9 applied to the relay: another user, existing or not.
        ({"user": "bob", "password": PASSWORDS["bob"]}, "gw-alice", ErrorCode.NOT_AUTHORIZED),
        ({"user": "mallory"}, "gw-alice", ErrorCode.NOT_AUTHORIZED),
        # Only a PNE's request is relayed.
        ({"kind": EntityKind.PN_GW, "entity": "gw-new"}, "gw-alice", ErrorCode.WRONG_ENTITY_KIND),
        # Only a PN GW relays.
        ({}, "pne-1", ErrorCode.NOT_AUTHORIZED),
        ({}, "gw-unknown", ErrorCode.NOT_AUTHORIZED),
    ],
    ids=["wrong-password", "other-user", "unknown-user", "gw-kind", "relay-is-pne", "no-relay"],
)
def test_relayed_refusals(
    world: Directory, password_key: KeyOf, change: dict[str, Any], relay: str, code: ErrorCode
) -> None:
    """D-004-5: the rules of a relayed request, each with its wire code, answered with a
    UserKeyAssignmentResponse the PN GW relays unchanged; nothing is assigned."""
    world.add_entity("pne-1", EntityKind.PNE, USER, eukeys=(bytes(32),), key_index=1)
    fields: dict[str, Any] = {"entity": "pne-ui", "kind": EntityKind.PNE, **change}
    request = make_request(password_key, **fields)
    server = relayed_server(world, relay)
    events = server.receive(request)
    assert events == [FailedWith(code, "server")]
    [response] = server.messages_to_send()
    assert isinstance(response, UserKeyAssignmentResponse)
    assert (response.status, response.sealed_eukey) == (code, None)


def test_relayed_request_for_a_revoked_gateway(world: Directory, password_key: KeyOf) -> None:
    """D-004-5: a revoked PN GW relays nothing (NOT_AUTHORIZED)."""
    world.update_entity("gw-alice", revoked=True)
    request = make_request(password_key, entity="pne-ui", kind=EntityKind.PNE)
    assert relayed_server(world).receive(request) == [
        FailedWith(ErrorCode.NOT_AUTHORIZED, "server")
    ]


def test_relayed_request_when_the_owner_is_gone(world: Directory, password_key: KeyOf) -> None:
    """D-004-5: the relaying PN GW's owner no longer exists: UNKNOWN_USER (precise, the
    relay is authenticated)."""
    request = make_request(password_key, entity="pne-ui", kind=EntityKind.PNE)
    del world.users[USER]
    assert relayed_server(world).receive(request) == [FailedWith(ErrorCode.UNKNOWN_USER, "server")]
