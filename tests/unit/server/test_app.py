"""The protocol endpoint's HTTP edge (cpns.server.app), driven as an ASGI application.

Each test calls the real :class:`CPNSApp` (real service layer over the in-memory store,
real Digest verifier) with ASGI events, the way uvicorn does: no sockets here; the
listener and real-TLS behaviour are covered in tests/integration/test_server_limits.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import cbor2
import pytest
from tests.helpers import (
    FIXED_NOW,
    GATEWAY_KEYS,
    PASSWORDS,
    SERVER_ID,
    TKS,
    FixedRandom,
    cached_password_key,
)
from tests.metrics import sample

import cpns.protocol.digest as digest_module
from cpns.errors import AuthenticationFailed, ErrorCode, StoreError
from cpns.messages.codec import decode
from cpns.messages.constants import MessageType
from cpns.messages.model import ErrorMessage, EUKeyAssignmentResponse
from cpns.protocol import key_assignment as ka
from cpns.protocol.digest import DigestClient, DigestServer
from cpns.protocol.key_assignment import AssignmentPolicy
from cpns.records import EntityRecord, TKRecord, UserRecord
from cpns.server.app import CPNSApp, digest_failure_class
from cpns.server.service import CPNSService
from cpns.store.base import ServerStore, WriteTx
from cpns.store.memory import MemoryStore
from cpns.types import EntityKind

GW = "gw-alice"
NONCE_KEY = bytes(range(32))
TXID = bytes(range(16))


@pytest.fixture
def store() -> MemoryStore:
    """alice with her enrolled PN GW gw-alice, and the TK records of pne-1 and pne-2."""
    s = MemoryStore()

    def setup(tx: WriteTx) -> None:
        for user_id, password in PASSWORDS.items():
            key = cached_password_key(user_id, password)
            tx.add_user(UserRecord(user_id=user_id, password_key=key, created_at=1))
        tx.put_entity(
            EntityRecord(
                entity_id=GW,
                kind=EntityKind.PN_GW,
                owner="alice",
                eukeys=(GATEWAY_KEYS[GW],),
                key_index=1,
            )
        )
        tx.put_tks([TKRecord(entity_id=e, tk=tk) for e, tk in TKS.items()])

    s.write(setup)
    return s


def make_app(store: ServerStore, *, offload_reads: bool = False, **digest: Any) -> CPNSApp:
    rng = FixedRandom(5)
    service = CPNSService(
        store=store,
        policy=AssignmentPolicy(server_id=SERVER_ID),
        rng=rng,
        clock=lambda: FIXED_NOW,
        offload_reads=offload_reads,
    )
    verifier = DigestServer(realm="cpns", nonce_key=NONCE_KEY, **digest)
    return CPNSApp(
        service=service,
        store=store,
        digest=verifier,
        rng=rng,
        clock=lambda: FIXED_NOW,
        offload_reads=offload_reads,
    )


class Response:
    """What the app sent for one request."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, list[bytes]] = {}
        self.body = b""

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name)
        return values[0] if values else None


def call(
    app: CPNSApp,
    *,
    method: str = "POST",
    path: str = "/cpns/v1/messages",
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    client: tuple[str, int] = ("127.0.0.1", 40000),
    on_receive: Callable[[], None] | None = None,
) -> Response:
    """One request through the ASGI app; the body arrives in one event."""
    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers or [],
        "client": client,
    }
    events = [{"type": "http.request", "body": body, "more_body": False}]
    out = Response()

    async def receive() -> MutableMapping[str, Any]:
        if on_receive is not None:
            on_receive()
        if events:
            return events.pop(0)
        await asyncio.sleep(3600)  # pragma: no cover - the app never reads past the body
        return {"type": "http.disconnect"}

    async def send(event: MutableMapping[str, Any]) -> None:
        if event["type"] == "http.response.start":
            out.status = event["status"]
            for name, value in event["headers"]:
                out.headers.setdefault(name, []).append(value)
        else:
            out.body += event.get("body", b"")

    asyncio.run(app(scope, receive, send))
    return out


# -- issue 5 item 10 ---------------------------------------------------------------------

HUGE_STATUS_ACK = cbor2.dumps(
    {
        0: 1,
        1: int(MessageType.EUKEY_ASSIGNMENT_ACK),
        2: TXID,
        3: GW,
        4: SERVER_ID,
        6: {1: 10**4400},
    },
    canonical=True,
)


def test_a_huge_integer_is_a_400_error_message_not_a_500(
    store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 5 item 10: a message with a ~4,400-digit integer (it made the codec raise
    ValueError: HTTP 500 and a traceback) is answered 400 with an ErrorMessage, and
    logged in one bounded line."""
    caplog.set_level(logging.DEBUG, logger="cpns")
    reply = call(make_app(store), body=HUGE_STATUS_ACK)
    assert reply.status == 400
    error = decode(reply.body)
    assert isinstance(error, ErrorMessage)
    assert error.status == ErrorCode.MALFORMED_MESSAGE
    assert all(len(r.getMessage()) < 400 for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)


class UnreachableStore(MemoryStore):
    """A store whose database is gone (PostgreSQL restarting): every write fails."""

    def write_async[T](self, fn: Callable[[WriteTx], T]) -> asyncio.Future[T]:
        raise StoreError("cannot write store postgresql://cpns:***@db/cpns: connection lost")


def test_an_unreachable_store_is_a_503_with_retry_after_and_budgeted_lines(
    store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 7 item 7 (PostgreSQL restarted mid-load: the server refuses cleanly): a
    request whose facts cannot be stored is answered 503 with Retry-After (the PN GW
    retries), never 200 and never a 500; an outage under load writes at most a burst of
    warning lines, not one per request."""
    down = UnreachableStore()
    for user in store.list_users():
        down.write(lambda tx, u=user: tx.add_user(u))
    down.write(lambda tx: tx.put_entity(store.get_entity(GW)))  # type: ignore[arg-type]
    down.write(lambda tx: tx.put_tks([TKRecord(entity_id=e, tk=tk) for e, tk in TKS.items()]))
    app = make_app(down)
    caplog.set_level(logging.DEBUG, logger="cpns")
    replies = [call(app, body=_enrolment(seed=s)) for s in range(40)]
    assert {r.status for r in replies} == {503}
    assert replies[0].body == b"store unavailable\n"
    assert replies[0].header(b"retry-after") == b"1"
    warnings = [r for r in caplog.records if "store unavailable" in r.getMessage()]
    assert 1 <= len(warnings) <= 20
    assert not any(r.exc_info for r in caplog.records)


def test_an_unexpected_exception_is_a_clean_500_and_the_app_keeps_serving(
    store: MemoryStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 5 item 10: a bug of ours on one request (any exception in the app) is a clean
    500 and one bounded log line without a traceback; the next request is served."""
    app = make_app(store)

    def broken(_: bytes) -> Any:
        raise RuntimeError("peer bytes \x1b[2J" + "A" * 60_000)

    monkeypatch.setattr(app._service, "parse", broken)
    caplog.set_level(logging.DEBUG, logger="cpns")
    enrol = _enrolment()
    reply = call(app, body=enrol)
    assert reply.status == 500
    assert reply.body == b"internal error\n"
    lines = [r.getMessage() for r in caplog.records]
    assert any("RuntimeError" in line for line in lines)
    assert all(len(line) < 400 and "\x1b" not in line for line in lines)
    assert not any(r.exc_info for r in caplog.records)
    monkeypatch.undo()
    assert call(app, method="GET", path="/healthz").status == 200


def _enrolment(*, user: str = "alice", password: str | None = None, seed: int = 3) -> bytes:
    """A UserKeyAssignmentRequest (the open type) as a real PN GW builds it."""
    from cpns.messages.codec import encode
    from cpns.protocol.user_key_assignment import UserKeyAssignmentClient

    client = UserKeyAssignmentClient(
        entity_id="gw-new",
        entity_kind=EntityKind.PN_GW,
        server_id=SERVER_ID,
        rng=FixedRandom(seed),
    )
    key = cached_password_key(user, password or PASSWORDS.get(user, "x"))
    client.start(user_id=user, password_key=key, now=FIXED_NOW)
    [message] = client.messages_to_send()
    return encode(message)


# -- issue 5 item 12 ---------------------------------------------------------------------

_BIG = 60_000
UNDECODABLE_60K = {
    "garbage": b"\xff" * _BIG,
    "unknown-field-key": cbor2.dumps(
        {0: 1, 1: 10, 2: TXID, 3: "a", 4: "b", 6: {"k" * _BIG: 1}}, canonical=True
    ),
    "version-text": cbor2.dumps({0: "v" * _BIG, 1: 10, 6: {}}, canonical=True),
    "bad-source": cbor2.dumps(
        {0: 1, 1: 10, 2: TXID, 3: "\u2028\n" * (_BIG // 4), 4: "b", 6: {}}, canonical=True
    ),
    "bad-user-id": cbor2.dumps(
        {
            0: 1,
            1: 10,
            2: TXID,
            3: "gw-1",
            4: SERVER_ID,
            6: {1: "\x1b[2J" * (_BIG // 4), 2: 2, 3: FIXED_NOW, 4: bytes(32), 5: bytes(32)},
        },
        canonical=True,
    ),
}


@pytest.mark.parametrize("body", list(UNDECODABLE_60K.values()), ids=list(UNDECODABLE_60K))
def test_an_undecodable_60_kb_body_writes_a_few_hundred_bytes_of_log(
    store: MemoryStore, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    """Issue 5 item 12: an undecodable ~60 KB body wrote ~240 KB of log; now every log
    line carries at most a bounded, escaped cut of peer input: the whole request writes
    at most a few hundred bytes of log, with no raw control character."""
    assert len(body) > 50_000
    caplog.set_level(logging.DEBUG)
    reply = call(make_app(store), body=body)
    assert reply.status in (400, 401)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert len(logged.encode()) <= 400, logged[:500]
    assert "\x1b" not in logged
    assert "\u2028" not in logged


def test_a_long_digest_header_writes_a_bounded_log_line(
    store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 5 item 12: an Authorization header quoting 4 KB of peer text in a failure
    reason (unknown algorithm) is logged as a bounded line."""
    caplog.set_level(logging.DEBUG)
    header = (
        'Digest username="gw-alice", realm="cpns", nonce="n", uri="/cpns/v1/whoami", '
        'response="00", qop=auth, nc=00000001, cnonce="c", algorithm="' + "A" * 3600 + '"'
    )
    reply = call(
        make_app(store),
        method="GET",
        path="/cpns/v1/whoami",
        headers=[(b"authorization", header.encode())],
    )
    assert reply.status == 401
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert len(logged.encode()) <= 400, logged[:500]


# -- issue 5 item 15 ---------------------------------------------------------------------


def _header_map(**changes: Any) -> dict[int, Any]:
    top: dict[int, Any] = {
        0: 1,
        1: int(MessageType.USER_KEY_ASSIGNMENT_REQUEST),
        2: TXID,
        3: "gw-new",
        4: SERVER_ID,
        6: {1: "alice", 2: 2, 3: FIXED_NOW, 4: bytes(32), 5: bytes(32)},
    }
    for key, value in changes.items():
        top[int(key.removeprefix("k"))] = value
    return top


@pytest.mark.parametrize(
    ("top", "code", "reason"),
    [
        (_header_map(k0=7), ErrorCode.UNSUPPORTED_VERSION, "unsupported version 7"),
        (_header_map(k1=99), ErrorCode.MALFORMED_MESSAGE, "unknown message type 99"),
        (_header_map(k6={1: "alice", 9: 1}), ErrorCode.MALFORMED_MESSAGE, "unknown field key"),
    ],
    ids=["version", "type", "field"],
)
def test_a_malformed_request_gets_its_code_reason_txid_and_source(
    store: MemoryStore, top: dict[int, Any], code: ErrorCode, reason: str
) -> None:
    """Issue 5 item 15: the refusal of a malformed request carries the decoder's specific
    code, a short reason (CPNS-Reason header) and, when they can be read, the request's
    txid and its source as destination (was: code 100, a zero txid, "unknown")."""
    reply = call(make_app(store), body=cbor2.dumps(top, canonical=True))
    assert reply.status == 400
    error = decode(reply.body)
    assert isinstance(error, ErrorMessage)
    assert error.status == code
    assert error.txid == TXID
    assert error.dst == "gw-new"
    assert error.src == SERVER_ID
    header = reply.header(b"cpns-reason")
    assert header is not None
    assert reason in header.decode()
    assert len(header) <= 160


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\x00",
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps(_header_map(k2=b"short", k3="\n bad id")),
        cbor2.dumps(_header_map(k2=None, k3="x" * 500), canonical=True) + b"trailing",
    ],
    ids=["not-cbor", "not-a-map", "bad-txid-and-source", "trailing-bytes"],
)
def test_unreadable_header_fields_fall_back_to_zero_txid_and_unknown(
    store: MemoryStore, body: bytes
) -> None:
    """Issue 5 item 15: when the txid or source cannot be read (not CBOR, not a map,
    wrong size, not an Entity ID), the refusal uses a zero txid and "unknown"."""
    reply = call(make_app(store), body=body)
    assert reply.status == 400
    error = decode(reply.body)
    assert isinstance(error, ErrorMessage)
    assert error.status == ErrorCode.MALFORMED_MESSAGE
    assert error.txid == bytes(16)
    assert error.dst == "unknown"
    assert reply.header(b"cpns-reason")


# -- issue 5 item 14: the challenge comes before the body is decoded -----------------------


def _eukey_request(seed: int = 11, pne: str = "pne-1") -> bytes:
    """An EUKey Assignment Request (needs Digest) as gw-alice's machine builds it."""
    from cpns.messages.codec import encode

    gateway = ka.EUKeyAssignmentGateway(
        gateway_id=GW, gateway_eukey=GATEWAY_KEYS[GW], server_id=SERVER_ID, rng=FixedRandom(seed)
    )
    gateway.start(
        pne_id=pne,
        user_id="alice",
        password_key=cached_password_key("alice", PASSWORDS["alice"]),
        claim_key=ka.claim_key(ka.claim_code(TKS[pne], pne)),  # the code on the PNE's label
        now=FIXED_NOW,
    )
    [message] = gateway.messages_to_send()
    return encode(message)


def _challenges(reply: Response) -> list[str]:
    return [v.decode() for v in reply.headers.get(b"www-authenticate", [])]


def test_an_empty_body_without_credentials_is_challenged(store: MemoryStore) -> None:
    """Issue 5 item 14: curl --digest sends its first POST with an empty body; it gets
    the 401 challenge (was 400: the body was decoded before authentication)."""
    reply = call(make_app(store), body=b"")
    assert reply.status == 401
    assert _challenges(reply)
    assert _challenges(reply)[0].startswith("Digest ")


def test_a_protected_type_without_credentials_is_challenged(store: MemoryStore) -> None:
    """Issue 5 item 14 / 004 §5.x.2: an EUKey Assignment Request without Authorization is
    answered with the challenge and not acted on."""
    reply = call(make_app(store), body=_eukey_request())
    assert reply.status == 401
    assert _challenges(reply)


def test_the_open_type_is_served_without_credentials(store: MemoryStore) -> None:
    """Issue 5 item 14: the with-UI enrolment (UserKeyAssignmentRequest) carries its own
    password proof and is served without Digest."""
    reply = call(make_app(store), body=_enrolment())
    assert reply.status == 200
    assert decode(reply.body).TYPE is MessageType.USER_KEY_ASSIGNMENT_RESPONSE


def _pne_enrolment(*, user: str = "alice", password: str | None = None) -> bytes:
    """A PNE's UserKeyAssignmentRequest, as ``cpns device enroll`` builds it."""
    from cpns.messages.codec import encode
    from cpns.protocol.user_key_assignment import UserKeyAssignmentClient

    client = UserKeyAssignmentClient(
        entity_id="pne-ui", entity_kind=EntityKind.PNE, server_id=SERVER_ID, rng=FixedRandom(8)
    )
    key = cached_password_key(user, password or PASSWORDS.get(user, "x"))
    client.start(user_id=user, password_key=key, now=FIXED_NOW)
    [message] = client.messages_to_send()
    return encode(message)


def _relayed(app: CPNSApp, body: bytes) -> Response:
    """``body`` sent with gw-alice's Digest credentials, as its relay does."""
    first = call(app, body=b"")
    assert first.status == 401
    client = DigestClient(GW, GATEWAY_KEYS[GW].hex())
    header = client.authorization(
        challenges=_challenges(first), method="POST", uri="/cpns/v1/messages", rng=FixedRandom(1)
    )
    return call(app, body=body, headers=[(b"authorization", header.encode())])


@pytest.mark.parametrize(
    ("user", "password", "status"),
    [
        ("alice", None, ErrorCode.OK),
        ("alice", "wrong password", ErrorCode.WRONG_PASSWORD),
        ("bob", None, ErrorCode.NOT_AUTHORIZED),
    ],
)
def test_an_open_type_with_credentials_is_relayed_by_that_entity(
    store: MemoryStore, user: str, password: str | None, status: ErrorCode
) -> None:
    """D-004-5 (docs/procedures/pne-enrolment.md): a with-UI request that carries Digest
    is a PNE's enrolment relayed by the authenticated PN GW: the relay rules apply (only
    the PN GW's own user; precise codes), the answer carries rspauth, and the audit
    record names the PN GW as the actor and the PNE as the entity."""
    reply = _relayed(make_app(store), _pne_enrolment(user=user, password=password))
    assert reply.status == 200
    assert reply.header(b"authentication-info") is not None
    answer = decode(reply.body)
    assert getattr(answer, "status", None) is status
    if status is ErrorCode.OK:
        [event] = store.audit_events(limit=1)
        assert (event.actor, event.entity_id, event.outcome) == (GW, "pne-ui", "OK")
        entity = store.get_entity("pne-ui")
        assert entity is not None
        assert (entity.owner, entity.kind, entity.assigned_via) == ("alice", EntityKind.PNE, None)


def test_wrong_credentials_are_challenged_before_the_body_is_read(store: MemoryStore) -> None:
    """Issue 5 item 14: an Authorization header is verified from the request line and the
    header alone; a wrong one is challenged without reading or decoding the body."""
    app = make_app(store)
    first = call(app, body=b"")
    client = DigestClient(GW, ("ff" * 32))
    header = client.authorization(
        challenges=_challenges(first), method="POST", uri="/cpns/v1/messages", rng=FixedRandom(1)
    )
    read: list[bool] = []
    reply = call(
        app,
        body=b"\xff not even CBOR",
        headers=[(b"authorization", header.encode())],
        on_receive=lambda: read.append(True),
    )
    assert reply.status == 401
    assert read == []


def test_curl_style_two_legs_complete_an_exchange(store: MemoryStore) -> None:
    """Issue 5 item 14: empty first leg -> 401; the second leg with Digest credentials and
    a real EUKey Assignment Request gets 200, a response with a status, and rspauth."""
    app = make_app(store)
    first = call(app, body=b"")
    client = DigestClient(GW, GATEWAY_KEYS[GW].hex())
    header = client.authorization(
        challenges=_challenges(first), method="POST", uri="/cpns/v1/messages", rng=FixedRandom(1)
    )
    reply = call(app, body=_eukey_request(), headers=[(b"authorization", header.encode())])
    assert reply.status == 200
    info = reply.header(b"authentication-info")
    assert info is not None
    client.verify_response(info.decode())
    answer = decode(reply.body)
    assert isinstance(answer, EUKeyAssignmentResponse)
    assert answer.status == ErrorCode.OK


def test_undecodable_bytes_without_credentials_are_a_400(store: MemoryStore) -> None:
    """Issue 5 items 14/15: a non-empty body that is not a CPNS message gets the 400
    ErrorMessage (a challenge cannot help it), with or without credentials."""
    assert call(make_app(store), body=b"\xff\xff").status == 400


def test_counters_arriving_out_of_order_are_accepted_once(store: MemoryStore) -> None:
    """Issue 5 item 14 / RFC 7616 §5.4: concurrent requests on one nonce may arrive with
    nc 3, 1, 2: each is accepted once (no spurious 401); a replayed nc is refused."""
    app = make_app(store, nc_window=64)
    first = call(app, method="GET", path="/cpns/v1/whoami")
    client = DigestClient(GW, GATEWAY_KEYS[GW].hex())
    rng = FixedRandom(2)
    headers = [
        client.authorization(
            challenges=_challenges(first) if i == 0 else None,
            method="GET",
            uri="/cpns/v1/whoami",
            rng=rng,
        )
        for i in range(3)
    ]
    for index in (2, 0, 1):
        reply = call(
            app,
            method="GET",
            path="/cpns/v1/whoami",
            headers=[(b"authorization", headers[index].encode())],
        )
        assert reply.status == 200, index
    again = call(
        app, method="GET", path="/cpns/v1/whoami", headers=[(b"authorization", headers[0].encode())]
    )
    assert again.status == 401


@pytest.mark.parametrize("offload_reads", [False, True])
def test_processes_sharing_a_store_refuse_each_others_replays(
    store: MemoryStore, offload_reads: bool
) -> None:
    """Issue 7 item 2 / RFC 7616 §5.4: with the nc guard in the store (nc_in_memory=False),
    a challenge from one app (process) is answered at a second, and the same (nonce, nc)
    replayed at a third is refused; the next nc is accepted anywhere. The same with the
    store reads handed to a worker thread (offload_reads, as on PostgreSQL)."""
    apps = [make_app(store, nc_in_memory=False, offload_reads=offload_reads) for _ in range(3)]
    first = call(apps[0], method="GET", path="/cpns/v1/whoami")
    client = DigestClient(GW, GATEWAY_KEYS[GW].hex())
    rng = FixedRandom(2)
    header = client.authorization(
        challenges=_challenges(first), method="GET", uri="/cpns/v1/whoami", rng=rng
    )
    whoami = {"method": "GET", "path": "/cpns/v1/whoami"}
    ok = call(apps[1], **whoami, headers=[(b"authorization", header.encode())])
    assert ok.status == 200
    assert b"gw-alice" in ok.body
    for app in apps:
        replay = call(app, **whoami, headers=[(b"authorization", header.encode())])
        assert replay.status == 401
    after = client.authorization(method="GET", uri="/cpns/v1/whoami", rng=rng)
    assert call(apps[2], **whoami, headers=[(b"authorization", after.encode())]).status == 200


# -- issue 5 item 7 (Digest half): a 401 costs the same for any Entity ID ----------------


def test_a_digest_401_does_the_same_work_for_known_revoked_and_unknown_entities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 5 item 7: the 401 for a wrong Digest response took 60-100 us longer for an
    existing Entity ID (its sealed EUKey was opened; an unknown one cost a lookup only).
    Now the sequence of operations is identical for a known, a revoked and an unknown
    Entity ID: the same store query, one sealed-key opening, the same Digest hashes. Work
    is compared by counting operations on a real SQLite store; nothing is timed."""
    from cpns.store import sql
    from cpns.store.masterkey import MasterKey

    store = sql.SQLStore.open(tmp_path / "cpns.db", master_key=MasterKey(bytes(range(32))))

    def setup(tx: WriteTx) -> None:
        tx.add_user(UserRecord(user_id="alice", password_key=bytes(32), created_at=1))
        for entity_id, revoked in (("gw-known", False), ("gw-revok", True)):
            tx.put_entity(
                EntityRecord(
                    entity_id=entity_id,
                    kind=EntityKind.PN_GW,
                    owner="alice",
                    eukeys=(bytes([7]) * 32,),
                    key_index=1,
                    revoked=revoked,
                )
            )

    store.write(setup)
    app = make_app(store)
    trace: list[tuple[str, str]] = []
    real_open, real_query = sql._Sealer.open, sql.SQLStore._query
    real_hash = digest_module._hex_hash

    def traced_open(self: Any, label: str, *args: Any) -> Any:
        trace.append(("open", label))
        return real_open(self, label, *args)

    def traced_query(self: Any, statement: str, params: Any) -> Any:
        trace.append(("query", statement))
        return real_query(self, statement, params)

    def traced_hash(algorithm: Any, text: str) -> str:
        trace.append(("hash", str(algorithm)))
        return real_hash(algorithm, text)

    monkeypatch.setattr(sql._Sealer, "open", traced_open)
    monkeypatch.setattr(sql.SQLStore, "_query", traced_query)
    monkeypatch.setattr(digest_module, "_hex_hash", traced_hash)

    def attempt(entity_id: str) -> list[tuple[str, str]]:
        first = call(app, method="GET", path="/cpns/v1/whoami")
        client = DigestClient(entity_id, "ab" * 32)  # nobody's key: a wrong response
        header = client.authorization(
            challenges=_challenges(first),
            method="GET",
            uri="/cpns/v1/whoami",
            rng=FixedRandom(3),
        )
        trace.clear()
        reply = call(
            app, method="GET", path="/cpns/v1/whoami", headers=[(b"authorization", header.encode())]
        )
        assert reply.status == 401
        return list(trace)

    known = attempt("gw-known")
    assert ("open", "entities.eukeys") in known
    assert sum(1 for op, _ in known if op == "hash") == 3
    assert attempt("gw-unkno") == known
    assert attempt("gw-revok") == known
    store.close()


# -- operator metrics (docs/metrics.md) --------------------------------------------------


def test_http_responses_are_counted_by_route_and_status(store: MemoryStore) -> None:
    """docs/metrics.md: each response of the protocol port counts once in
    cpns_server_http_responses_total under its route and HTTP status; unknown paths share
    the route "other" (no label value comes from the request)."""
    name = "cpns_server_http_responses_total"
    before = {
        key: sample(name, route=key[0], code=key[1])
        for key in [("messages", "401"), ("messages", "200"), ("healthz", "200"), ("other", "404")]
    }
    app = make_app(store)
    call(app, body=b"")
    call(app, body=_enrolment())
    call(app, method="GET", path="/healthz")
    call(app, method="GET", path="/no/such/path/" + "x" * 50)
    call(app, method="GET", path="/another/unknown")
    for (route, code), value in before.items():
        expected = value + (2 if route == "other" else 1)
        assert sample(name, route=route, code=code) == expected, (route, code)


def _digest_failures() -> dict[str, float]:
    reasons = ["wrong_response", "replayed_nc", "malformed", "stale_nonce", "bad_parameters"]
    return {r: sample("cpns_server_digest_failures_total", reason=r) for r in reasons}


def test_digest_failures_are_counted_by_reason_class(store: MemoryStore) -> None:
    """docs/metrics.md: a failed Digest verification counts in
    cpns_server_digest_failures_total under its reason class: a wrong key and an unknown
    Entity ID are both "wrong_response" (not told apart), a replayed nc "replayed_nc", an
    unparsable header "malformed"; a success counts nothing."""
    app = make_app(store)
    first = call(app, method="GET", path="/cpns/v1/whoami")
    before = _digest_failures()

    def whoami(client: DigestClient, seed: int) -> tuple[int, str]:
        header = client.authorization(
            challenges=_challenges(first),
            method="GET",
            uri="/cpns/v1/whoami",
            rng=FixedRandom(seed),
        )
        reply = call(
            app, method="GET", path="/cpns/v1/whoami", headers=[(b"authorization", header.encode())]
        )
        return reply.status, header

    assert whoami(DigestClient(GW, "ff" * 32), 1)[0] == 401
    assert whoami(DigestClient("gw-nobody", GATEWAY_KEYS[GW].hex()), 2)[0] == 401
    status, header = whoami(DigestClient(GW, GATEWAY_KEYS[GW].hex()), 3)
    assert status == 200
    replay = call(
        app, method="GET", path="/cpns/v1/whoami", headers=[(b"authorization", header.encode())]
    )
    assert replay.status == 401
    garbage = call(
        app, method="GET", path="/cpns/v1/whoami", headers=[(b"authorization", b"Digest ,,,=")]
    )
    assert garbage.status == 401
    after = _digest_failures()
    assert {r: after[r] - before[r] for r in after} == {
        "wrong_response": 2,
        "replayed_nc": 1,
        "malformed": 1,
        "stale_nonce": 0,
        "bad_parameters": 0,
    }


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (digest_module.DigestStale("nonce expired"), "stale_nonce"),
        (AuthenticationFailed("nonce is not one of ours"), "foreign_nonce"),
        (AuthenticationFailed("algorithm MD5 is not enabled"), "unsupported"),
        (AuthenticationFailed("realm mismatch"), "bad_parameters"),
    ],
)
def test_digest_failure_classes_are_a_fixed_set(error: AuthenticationFailed, expected: str) -> None:
    """docs/metrics.md: the reason label is one of a fixed set of classes chosen from the
    verifier's reason, whatever the peer sent."""
    assert digest_failure_class(error) == expected
