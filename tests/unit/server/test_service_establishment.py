"""PN Establishment in the server's service layer (002 §7.5.4.3, 000 §7.5.3): the real
CPNSService over a real store, driven by a test-side PN GW and its PNEs playing the
project's own machines (tests/pn_client.py). Both halves, restart between them (a new
service over the same SQLite file), racing and replayed copies of the second half, and
the per-PNE refusals and failures that leave the other PNEs alone."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import FIXED_NOW, GATEWAY_KEYS, SERVER_ID, FixedRandom
from tests.metrics import sample
from tests.pn_client import PNGateway, Run, service_exchange

from cpns.crypto.hashchain import build_chain
from cpns.errors import ErrorCode
from cpns.messages.codec import decode, encode
from cpns.messages.model import (
    AuthenticateResponse,
    Message,
    PNEAuthenticateRequest,
    PNEstablishRequest,
    PNEstablishResponse,
)
from cpns.protocol.key_assignment import AssignmentPolicy
from cpns.records import MEMBER, EntityRecord, TKRecord, UserRecord
from cpns.server.service import CPNSService
from cpns.store import MasterKey, SQLStore
from cpns.store.base import ServerStore, WriteTx
from cpns.store.memory import MemoryStore
from cpns.types import EntityKind

GW = "gw-alice"
PN = "pn-alice-home"
SETUP = "pn-establishment-setup"
COMPLETE = "pn-establishment-complete"
#: Four PNEs enrolled with UI (rand/hash) and four with a 003 chain (TK flow).
RAND_HASH = ("rh-1", "rh-2", "rh-3", "rh-4")
TK_PNES = ("tk-1", "tk-2", "tk-3", "tk-4")
CHAIN_LENGTH = 4


def _key(label: str) -> bytes:
    return (label.encode() * 32)[:32]


def _tk(pne_id: str) -> bytes:
    return _key("tk:" + pne_id)


def _chain(pne_id: str, n: int = CHAIN_LENGTH) -> tuple[bytes, ...]:
    return tuple(build_chain(_key("seed:" + pne_id), n))


def _populate(store: ServerStore, *, exhausted: str | None = None) -> None:
    """alice (gw-alice, 4 + 4 PNEs, a revoked one), bob (gw-bob, bob-1).

    ``exhausted``: a TK PNE whose chain of 2 is at its last key."""

    def setup(tx: WriteTx) -> None:
        for user in ("alice", "bob"):
            tx.add_user(UserRecord(user_id=user, password_key=_key(user), created_at=1))
        for gw, key in GATEWAY_KEYS.items():
            owner = gw.removeprefix("gw-")
            tx.put_entity(
                EntityRecord(
                    entity_id=gw, kind=EntityKind.PN_GW, owner=owner, eukeys=(key,), key_index=1
                )
            )
        for pne_id, owner, revoked in (
            *((p, "alice", False) for p in RAND_HASH),
            ("bob-1", "bob", False),
            ("revoked-1", "alice", True),
        ):
            tx.put_entity(
                EntityRecord(
                    entity_id=pne_id,
                    kind=EntityKind.PNE,
                    owner=owner,
                    eukeys=(_key(pne_id),),
                    key_index=1,
                    revoked=revoked,
                )
            )
        for pne_id in TK_PNES:
            chain = _chain(pne_id, 2 if pne_id == exhausted else CHAIN_LENGTH)
            tx.put_entity(
                EntityRecord(
                    entity_id=pne_id,
                    kind=EntityKind.PNE,
                    owner="alice",
                    eukeys=chain,
                    key_index=2 if pne_id == exhausted else 1,
                    assigned_via=GW,
                    epoch=1,
                )
            )
        tx.put_tks([TKRecord(entity_id=p, tk=_tk(p)) for p in TK_PNES])

    store.write(setup)


@pytest.fixture
def store() -> MemoryStore:
    """The facts of :func:`_populate` in the in-memory store."""
    s = MemoryStore()
    _populate(s)
    return s


def _service(store: ServerStore, *, seed: int = 7, clock: Callable[[], int] | None = None) -> Any:
    return CPNSService(
        store=store,
        policy=AssignmentPolicy(server_id=SERVER_ID),
        rng=FixedRandom(seed),
        clock=clock or (lambda: FIXED_NOW),
    )


def _gateway(
    exchange: Callable[[Message], Awaitable[Message]],
    *,
    exhausted: str | None = None,
    seed: int = 3,
) -> PNGateway:
    """gw-alice with every PNE of the store's facts (and a ghost the server never saw)."""
    client = PNGateway(
        gw_id=GW,
        gw_eukey=GATEWAY_KEYS[GW],
        server_id=SERVER_ID,
        exchange=exchange,
        rng=FixedRandom(seed),
    )
    for pne_id in (*RAND_HASH, "bob-1", "revoked-1", "ghost-1"):
        client.add_rand_hash_pne(pne_id, _key(pne_id))
    for pne_id in TK_PNES:
        if pne_id == exhausted:
            client.add_tk_pne(pne_id, tk=_tk(pne_id), chain=_chain(pne_id, 2), key_index=2)
        else:
            client.add_tk_pne(pne_id, tk=_tk(pne_id), chain=_chain(pne_id))
    return client


EIGHT = (*RAND_HASH, *TK_PNES)


def _establish(client: PNGateway, invited: tuple[str, ...] = EIGHT[1:], **kw: Any) -> Run:
    return asyncio.run(client.establish(EIGHT[0], invited, pn_id=PN, **kw))


def _flows(store: ServerStore) -> dict[str, tuple[str, str]]:
    pn = store.get_pn(PN)
    assert pn is not None
    return {m.pne_id: (m.flow, m.status) for m in pn.members}


def test_eight_pnes_of_both_kinds_join_through_both_halves(store: MemoryStore) -> None:
    """002 §7.5.4.3 and 000 §7.5.3: the SETUP Request gets one AUTHENTICATE Request with
    rand_server and a challenge per PNE, flow chosen from the server's credentials (TK for
    a 003 chain with its TK record, rand/hash for an EUKey enrolled with UI); the
    AUTHENTICATE Response gets every PNE verified and the SETUP Response; every PNE checks
    the server and joins. In the same transaction: the PN inventory, each TK PNE's ratchet
    and key index advanced, the pending establishment deleted, per-PNE audit rows."""
    before = sample("cpns_server_pne_outcomes_total", procedure=COMPLETE, flow="tk", outcome="OK")
    svc = _service(store)
    client = _gateway(service_exchange(svc, GW))
    run = _establish(client)

    request = run.authenticate_request
    assert request is not None
    assert request.status is ErrorCode.OK
    assert {c.pne_id: c.flow.name for c in request.entries if c.flow} == {
        **dict.fromkeys(RAND_HASH, "RAND_HASH"),
        **dict.fromkeys(TK_PNES, "TK"),
    }
    response = run.establish_response
    assert response is not None
    assert response.status is ErrorCode.OK
    assert run.server_status() == dict.fromkeys(EIGHT, ErrorCode.OK)
    for pne_id in EIGHT:
        assert run.joined(pne_id) is not None, pne_id

    assert _flows(store) == {
        **{p: ("rand-hash", MEMBER) for p in RAND_HASH},
        **{p: ("tk", MEMBER) for p in TK_PNES},
    }
    for pne_id in TK_PNES:
        tk, entity = store.get_tk(pne_id), store.get_entity(pne_id)
        assert tk is not None
        assert entity is not None
        assert (tk.tk_step, entity.key_index) == (1, 2)
    assert response.est_id is not None
    assert store.get_establishment(GW, response.est_id) is None
    rows = [(e.procedure, e.entity_id, e.outcome) for e in store.audit_events(limit=100)]
    for pne_id in EIGHT:
        assert (SETUP, pne_id, "OK") in rows
        assert (COMPLETE, pne_id, "OK") in rows
    assert (COMPLETE, GW, "OK") in rows
    after = sample("cpns_server_pne_outcomes_total", procedure=COMPLETE, flow="tk", outcome="OK")
    assert after - before == len(TK_PNES)


def test_a_restarted_server_takes_the_second_half_from_the_store(tmp_path: Path) -> None:
    """Issue 6 item 2: the pending establishment lives in the store, so a server restarted
    between the AUTHENTICATE Request and the AUTHENTICATE Response (a new service and a
    new store over the same SQLite file) finishes it; nothing is lost."""
    key = MasterKey(bytes(range(32)))
    path = tmp_path / "server.db"
    first = SQLStore.open(path, master_key=key)
    _populate(first)
    current: dict[str, Any] = {"store": first, "service": _service(first, seed=11)}

    async def exchange(message: Message) -> Message:
        reply = await current["service"].handle(message, authenticated=GW)
        return decode(reply.body)

    async def restart(message: Message) -> None:
        if isinstance(message, AuthenticateResponse):
            current["store"].close()
            second = SQLStore.open(path, master_key=key)
            current.update(store=second, service=_service(second, seed=12))

    try:
        run = _establish(_gateway(exchange), before_upstream=restart)
        assert current["store"] is not first
        assert run.server_status() == dict.fromkeys(EIGHT, ErrorCode.OK)
        assert all(run.joined(p) is not None for p in EIGHT)
        assert {status for _, status in _flows(current["store"]).values()} == {MEMBER}
    finally:
        current["store"].close()


def _status(body: bytes) -> int:
    reply = decode(body)
    assert isinstance(reply, PNEstablishResponse)
    return int(reply.status)


class _Gate:
    """A store whose writes wait until ``arm`` copies reached their write: two requests
    handled concurrently both read the pending state before either commits."""

    def __init__(self, inner: MemoryStore) -> None:
        self._inner = inner
        self._armed = 0
        self._waiting = 0
        self._open = asyncio.Event()

    def arm(self, copies: int) -> None:
        self._armed, self._waiting = copies, 0
        self._open = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def write_async(self, fn: Any, *, durable: bool = True) -> Any:
        if self._armed:
            self._waiting += 1
            if self._waiting >= self._armed:
                self._armed = 0
                self._open.set()
            await self._open.wait()
        return await self._inner.write_async(fn, durable=durable)


@pytest.mark.parametrize("same_txid", [True, False])
def test_racing_copies_of_the_second_half_commit_once(store: MemoryStore, same_txid: bool) -> None:
    """Our rule (docs/procedures/pn-establishment.md, server): two copies of the
    AUTHENTICATE Response handled at once (a retry, or two processes) both read the
    pending state, one commits (delete_establishment and the TK ratchet are compare and
    set), the other runs again from the store: the same txid gets the winner's stored
    reply, another txid UNKNOWN_ESTABLISHMENT. The TK state advanced exactly once."""
    gate = _Gate(store)
    svc, rival = _service(gate), _service(gate, seed=8)  # type: ignore[arg-type]
    replies: list[bytes] = []

    async def exchange(message: Message) -> Message:
        if not isinstance(message, AuthenticateResponse):
            return decode((await svc.handle(message, authenticated=GW)).body)
        copy = message if same_txid else dataclasses.replace(message, txid=bytes(16))
        gate.arm(2)
        first, second = await asyncio.gather(
            svc.handle(message, authenticated=GW), rival.handle(copy, authenticated=GW)
        )
        replies.extend(sorted((first.body, second.body), key=lambda b: _status(b) != 0))
        return decode(replies[0])  # the winner's reply goes to the PN GW

    run = _establish(_gateway(exchange))
    assert run.server_status() == dict.fromkeys(EIGHT, ErrorCode.OK)
    winner, loser = (decode(r) for r in replies)
    assert isinstance(winner, PNEstablishResponse)
    assert isinstance(loser, PNEstablishResponse)
    if same_txid:
        assert replies[0] == replies[1]
    else:
        assert winner.status is ErrorCode.OK
        assert loser.status is ErrorCode.UNKNOWN_ESTABLISHMENT
    for pne_id in TK_PNES:
        tk, entity = store.get_tk(pne_id), store.get_entity(pne_id)
        assert tk is not None
        assert entity is not None
        assert (tk.tk_step, entity.key_index) == (1, 2)
    assert len(
        [e for e in store.audit_events() if e.procedure == COMPLETE and e.entity_id == GW]
    ) == (1 if same_txid else 2)


class _LateReply:
    """A store whose first stored-reply lookup answers None: the request's first check ran
    just before a concurrent copy committed, and its reads just after."""

    def __init__(self, inner: MemoryStore) -> None:
        self._inner = inner
        self._misses = 1

    def get_reply(self, requester: str, txid: bytes) -> Any:
        if self._misses:
            self._misses -= 1
            return None
        return self._inner.get_reply(requester, txid)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_copy_that_finds_the_establishment_finished_answers_the_stored_reply(
    store: MemoryStore,
) -> None:
    """Our rule (docs/procedures/pn-establishment.md, server; the racing copies seen with
    two processes over PostgreSQL): a copy of the AUTHENTICATE Response whose stored-reply
    check ran before its twin committed, and whose read of the pending state after, gets
    the twin's stored reply byte for byte, not UNKNOWN_ESTABLISHMENT."""
    svc = _service(store)
    late = _service(_LateReply(store), seed=8)  # type: ignore[arg-type]
    bodies: list[bytes] = []

    async def exchange(message: Message) -> Message:
        reply = await svc.handle(message, authenticated=GW)
        if isinstance(message, AuthenticateResponse):
            bodies.extend([reply.body, (await late.handle(message, authenticated=GW)).body])
        return decode(reply.body)

    run = _establish(_gateway(exchange))
    assert run.server_status() == dict.fromkeys(EIGHT, ErrorCode.OK)
    assert len(bodies) == 2
    assert bodies[0] == bodies[1]


def test_a_replayed_authenticate_response_gets_the_stored_reply_another_is_unknown(
    store: MemoryStore,
) -> None:
    """DESIGN §5 and our rule: the same AUTHENTICATE Response again (same txid, same
    bytes) gets the stored SETUP Response byte for byte, its txid with other content is a
    REPLAY; a different one for the finished
    establishment (another txid), one for an est_id never issued, and one after the
    pending state expired get UNKNOWN_ESTABLISHMENT and change nothing."""
    now = [FIXED_NOW]
    svc = _service(store, clock=lambda: now[0])
    exchange = service_exchange(svc, GW)
    kept: list[AuthenticateResponse] = []

    async def keep(message: Message) -> None:
        if isinstance(message, AuthenticateResponse):
            kept.append(message)

    run = _establish(_gateway(exchange), before_upstream=keep)
    [sent] = kept
    first = asyncio.run(svc.handle(sent, authenticated=GW))
    response = run.establish_response
    assert response is not None
    assert first.body == encode(response)

    def status(message: AuthenticateResponse) -> ErrorCode | int:
        reply = decode(asyncio.run(svc.handle(message, authenticated=GW)).body)
        assert isinstance(reply, PNEstablishResponse)
        return reply.status

    assert status(dataclasses.replace(sent, txid=bytes(16))) is ErrorCode.UNKNOWN_ESTABLISHMENT
    assert status(dataclasses.replace(sent, entries=sent.entries[:1])) is ErrorCode.REPLAY
    assert (
        status(dataclasses.replace(sent, txid=bytes([1]) * 16, est_id=bytes(16)))
        is ErrorCode.UNKNOWN_ESTABLISHMENT
    )
    tk = store.get_tk("tk-1")
    assert tk is not None
    assert tk.tk_step == 1

    # A second establishment whose AUTHENTICATE Response comes after the pending state
    # expired (300 s).
    kept.clear()

    async def late(message: Message) -> None:
        if isinstance(message, AuthenticateResponse):
            now[0] += 301

    second = _establish(_gateway(exchange, seed=4), before_upstream=late)
    late_response = second.establish_response
    assert late_response is not None
    assert late_response.status is ErrorCode.UNKNOWN_ESTABLISHMENT


def test_refusals_and_a_wrong_hash_pne_fail_alone(store: MemoryStore) -> None:
    """002 §7.5.4.3 and our policy: a PNE of another user (POLICY_DENIED), a revoked one
    (ENTITY_REVOKED), one the server does not know (UNKNOWN_ENTITY), one listed twice
    (DUPLICATE_PNE, the first entry stays) and one whose hash_PNE does not verify
    (AUTHENTICATION_FAILED) each fail alone; the others join. The PN inventory records the
    failures, never as members."""

    def tamper(message: Message) -> Message | None:
        if isinstance(message, PNEstablishRequest):
            [first] = [e for e in message.entries if e.pne_id == "rh-2"]
            return dataclasses.replace(message, entries=(*message.entries, first))
        if isinstance(message, AuthenticateResponse):
            entries = tuple(
                dataclasses.replace(e, hash_pne=bytes(32)) if e.pne_id == "rh-3" else e
                for e in message.entries
            )
            return dataclasses.replace(message, entries=entries)
        return message

    svc = _service(store)
    client = _gateway(service_exchange(svc, GW))
    invited = ("rh-2", "rh-3", "tk-1", "bob-1", "revoked-1", "ghost-1")
    run = _establish(client, invited, tamper=tamper)

    request = run.authenticate_request
    assert request is not None
    assert [(c.pne_id, c.status) for c in request.entries] == [
        ("rh-1", ErrorCode.OK),
        ("rh-2", ErrorCode.OK),
        ("rh-3", ErrorCode.OK),
        ("tk-1", ErrorCode.OK),
        ("bob-1", ErrorCode.POLICY_DENIED),
        ("revoked-1", ErrorCode.ENTITY_REVOKED),
        ("ghost-1", ErrorCode.UNKNOWN_ENTITY),
        ("rh-2", ErrorCode.DUPLICATE_PNE),
    ]
    assert run.server_status() == {
        "rh-1": ErrorCode.OK,
        "rh-2": ErrorCode.OK,
        "rh-3": ErrorCode.AUTHENTICATION_FAILED,
        "tk-1": ErrorCode.OK,
        "bob-1": ErrorCode.POLICY_DENIED,
        "revoked-1": ErrorCode.ENTITY_REVOKED,
        "ghost-1": ErrorCode.UNKNOWN_ENTITY,
    }
    for pne_id in ("rh-1", "rh-2", "tk-1"):
        assert run.joined(pne_id) is not None
    assert run.joined("rh-3") is None
    assert _flows(store) == {
        "rh-1": ("rand-hash", MEMBER),
        "rh-2": ("rand-hash", MEMBER),
        "rh-3": ("rand-hash", "AUTHENTICATION_FAILED"),
        "tk-1": ("tk", MEMBER),
        "bob-1": ("", "POLICY_DENIED"),
        "revoked-1": ("", "ENTITY_REVOKED"),
        "ghost-1": ("", "UNKNOWN_ENTITY"),
    }
    rows = {(e.procedure, e.entity_id, e.outcome) for e in store.audit_events(limit=100)}
    assert {(SETUP, "bob-1", "POLICY_DENIED"), (SETUP, "rh-2", "DUPLICATE_PNE")} <= rows
    assert (COMPLETE, "rh-3", "AUTHENTICATION_FAILED") in rows


def test_the_establishment_belongs_to_the_authenticated_gateway(store: MemoryStore) -> None:
    """002 §7.5.4.3 (the server talks to the PN GW that sent the SETUP Request): the
    AUTHENTICATE Response of gw-alice's establishment, sent by another Digest-authenticated
    PN GW, is UNKNOWN_ESTABLISHMENT and leaves the establishment to gw-alice."""
    svc = _service(store)
    exchange = service_exchange(svc, GW)
    stolen: list[Message] = []

    async def steal(message: Message) -> None:
        if isinstance(message, AuthenticateResponse):
            other = dataclasses.replace(message, src="gw-bob", txid=bytes(16))
            reply = decode((await svc.handle(other, authenticated="gw-bob")).body)
            stolen.append(reply)

    run = _establish(_gateway(exchange), before_upstream=steal)
    [reply] = stolen
    assert isinstance(reply, PNEstablishResponse)
    assert reply.status is ErrorCode.UNKNOWN_ESTABLISHMENT
    assert run.server_status() == dict.fromkeys(EIGHT, ErrorCode.OK)


def test_a_pn_id_of_another_user_is_policy_denied(store: MemoryStore) -> None:
    """Issue 6 item 6 (a PN GW brings only its own user's PNEs into a PN): a PN ID already
    in the inventory for alice cannot be taken over by bob's PN GW (POLICY_DENIED for the
    whole SETUP Request), and alice's PN is unchanged."""
    svc = _service(store)
    _establish(_gateway(service_exchange(svc, GW)), ("rh-2",))

    bob = PNGateway(
        gw_id="gw-bob",
        gw_eukey=GATEWAY_KEYS["gw-bob"],
        server_id=SERVER_ID,
        exchange=service_exchange(svc, "gw-bob"),
        rng=FixedRandom(9),
    )
    bob.add_rand_hash_pne("bob-1", _key("bob-1"))
    run = asyncio.run(bob.establish("bob-1", pn_id=PN))
    request = run.authenticate_request
    assert request is not None
    assert request.status is ErrorCode.POLICY_DENIED
    pn = store.get_pn(PN)
    assert pn is not None
    assert (pn.owner, pn.gateway_id) == ("alice", GW)


def test_a_pne_restored_from_a_backup_is_stale_and_reassigned(store: MemoryStore) -> None:
    """000 with our resync rule N1: after tk-1 proved EUKey_1 (server at step 1, index 2),
    the PNE restored from a backup taken before still holds step 0 and EUKey_1: it fails
    alone with STALE_CREDENTIAL and reassign, the server's stored state does not move, and
    the others join."""
    svc = _service(store)
    client = _gateway(service_exchange(svc, GW))
    backup = dataclasses.replace(client.devices["tk-1"])
    _establish(client, ("tk-1",))
    client.devices["tk-1"] = backup
    run = _establish(client, ("tk-1", "tk-2"))
    assert run.server_status() == {
        "rh-1": ErrorCode.OK,
        "tk-1": ErrorCode.STALE_CREDENTIAL,
        "tk-2": ErrorCode.OK,
    }
    assert run.reassign() == {"tk-1": ErrorCode.STALE_CREDENTIAL}
    response = run.establish_response
    assert response is not None
    [result] = [r for r in response.entries if r.pne_id == "tk-1"]
    assert result.reassign
    tk, entity = store.get_tk("tk-1"), store.get_entity("tk-1")
    assert tk is not None
    assert entity is not None
    assert (tk.tk_step, entity.key_index) == (1, 2)


def test_an_exhausted_chain_still_authenticates_and_asks_for_reassignment() -> None:
    """000 with our rule: a TK PNE at the last key of its chain authenticates with it and
    joins; the server sets reassign (the PN GW queues a 003 re-assignment), ratchets the
    TK and keeps the key index."""
    store = MemoryStore()
    _populate(store, exhausted="tk-1")
    svc = _service(store)
    run = _establish(_gateway(service_exchange(svc, GW), exhausted="tk-1"), ("tk-1",))
    assert run.server_status() == {"rh-1": ErrorCode.OK, "tk-1": ErrorCode.OK}
    assert run.joined("tk-1") is not None
    assert run.reassign() == {"tk-1": ErrorCode.CHAIN_EXHAUSTED}
    tk, entity = store.get_tk("tk-1"), store.get_entity("tk-1")
    assert tk is not None
    assert entity is not None
    assert (tk.tk_step, entity.key_index) == (1, 2)


def test_only_an_enrolled_pn_gw_may_start_an_establishment(store: MemoryStore) -> None:
    """002 §7.5.4.2 (the PN GW sends the SETUP Request): a Digest-authenticated PNE that
    sends one as if it were a PN GW is refused as a whole with NOT_AUTHORIZED; nothing is
    pending and no PN is recorded."""
    svc = _service(store)
    pretender = PNGateway(
        gw_id="rh-4",
        gw_eukey=_key("rh-4"),
        server_id=SERVER_ID,
        exchange=service_exchange(svc, "rh-4"),
        rng=FixedRandom(10),
    )
    pretender.add_rand_hash_pne("rh-1", _key("rh-1"))
    run = asyncio.run(pretender.establish("rh-1", pn_id=PN))
    request = run.authenticate_request
    assert request is not None
    assert request.status is ErrorCode.NOT_AUTHORIZED
    assert store.get_pn(PN) is None
    rows = [(e.procedure, e.actor, e.outcome) for e in store.audit_events()]
    assert (SETUP, "rh-4", "NOT_AUTHORIZED") in rows


def test_the_tk_state_moves_only_on_a_verified_proof(store: MemoryStore) -> None:
    """000 §7.5.3 with our rule N1: the server's TK step and EUKey index advance only for a
    TK PNE whose proof verified (tk-1); a tampered proof (tk-2, AUTHENTICATION_FAILED) and
    a PNE that never answered (tk-3, TIMEOUT from the PN GW) leave them where they were,
    so both can authenticate in the next establishment."""

    def tamper(message: Message) -> Message | None:
        if isinstance(message, AuthenticateResponse):
            entries = tuple(
                dataclasses.replace(e, sealed_eukey=bytes(61)) if e.pne_id == "tk-2" else e
                for e in message.entries
            )
            return dataclasses.replace(message, entries=entries)
        if isinstance(message, PNEAuthenticateRequest) and message.dst == "tk-3":
            return None
        return message

    svc = _service(store)
    client = _gateway(service_exchange(svc, GW))
    run = _establish(client, ("tk-1", "tk-2", "tk-3"), tamper=tamper)
    assert run.server_status() == {
        "rh-1": ErrorCode.OK,
        "tk-1": ErrorCode.OK,
        "tk-2": ErrorCode.AUTHENTICATION_FAILED,
        "tk-3": ErrorCode.TIMEOUT,
    }

    def state(pne_id: str) -> tuple[int, int]:
        tk, entity = store.get_tk(pne_id), store.get_entity(pne_id)
        assert tk is not None
        assert entity is not None
        return tk.tk_step, entity.key_index

    assert [state(p) for p in ("tk-1", "tk-2", "tk-3")] == [(1, 2), (0, 1), (0, 1)]
    again = _establish(client, ("tk-2", "tk-3"))
    assert again.server_status() == dict.fromkeys(("rh-1", "tk-2", "tk-3"), ErrorCode.OK)
    assert [state(p) for p in ("tk-2", "tk-3")] == [(1, 2), (1, 2)]
