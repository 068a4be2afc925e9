"""The server's service layer (STYLE §7, DESIGN §5-6): the real CPNSService over the
in-memory store, fed with requests made by the real PN GW machine. Checks idempotent
retries, replayed transaction IDs, refusals that store nothing, undecodable input, and
that facts are written before the reply exists."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
from tests.helpers import (
    FIXED_NOW,
    GATEWAY_KEYS,
    PASSWORDS,
    SERVER_ID,
    TKS,
    FixedRandom,
    cached_password_key,
    claim_key_for,
)
from tests.metrics import sample

from cpns.crypto.keywrap import open_sealed
from cpns.errors import ErrorCode, StoreError
from cpns.logs import ContextFilter
from cpns.messages.codec import decode, decode_record, encode
from cpns.messages.model import (
    ErrorMessage,
    EUKeyAssignmentAck,
    EUKeyAssignmentRequest,
    EUKeyAssignmentResponse,
    KeyBundle,
    UserKeyAssignmentRequest,
    UserKeyAssignmentResponse,
)
from cpns.protocol.key_assignment import (
    RESPONSE_PURPOSE,
    AssignmentPolicy,
    EUKeyAssignmentGateway,
)
from cpns.protocol.tk_auth import ratchet
from cpns.protocol.user_key_assignment import UserKeyAssignmentClient
from cpns.records import EntityRecord, TKRecord, UserRecord
from cpns.server.guard import AttemptGuard, GuardLimits
from cpns.server.service import CPNSService, Reply
from cpns.store.base import WriteTx
from cpns.store.memory import MemoryStore
from cpns.types import EntityKind

GW = "gw-alice"


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


def service(store: MemoryStore, seed: int = 7, **policy: Any) -> CPNSService:
    return CPNSService(
        store=store,
        policy=AssignmentPolicy(server_id=SERVER_ID, **policy),
        rng=FixedRandom(seed),
        clock=lambda: FIXED_NOW,
    )


def request(*, pne: str = "pne-1", password: str = PASSWORDS["alice"], seed: int = 1) -> Any:
    """An EUKey Assignment Request as the real PN GW machine builds it (003 §7.4.2.1.1.1)."""
    gateway = EUKeyAssignmentGateway(
        gateway_id=GW, gateway_eukey=GATEWAY_KEYS[GW], server_id=SERVER_ID, rng=FixedRandom(seed)
    )
    key = cached_password_key("alice", password)
    gateway.start(
        pne_id=pne, user_id="alice", password_key=key, claim_key=claim_key_for(pne), now=FIXED_NOW
    )
    [message] = gateway.messages_to_send()
    assert isinstance(message, EUKeyAssignmentRequest)
    return message


def handle(svc: CPNSService, message: Any, authenticated: str | None = GW) -> Reply:
    return asyncio.run(svc.handle(message, authenticated=authenticated))


def status_of(reply: Reply) -> ErrorCode | int:
    message = decode(reply.body)
    assert isinstance(message, EUKeyAssignmentResponse | UserKeyAssignmentResponse | ErrorMessage)
    return message.status


def test_success_persists_every_fact_with_the_reply(store: MemoryStore) -> None:
    """003 §7.4.2.1.1.2 steps 3-5 and DESIGN §6: when the OK reply is returned, the chain is
    stored with the Entity ID and User ID, RANDPNGW is marked used, the reply is kept for
    retries and the assignment is audited."""
    message = request()
    reply = handle(service(store), message)
    assert (reply.http_status, reply.status, status_of(reply)) == (200, ErrorCode.OK, 0)
    entity = store.get_entity("pne-1")
    assert entity is not None
    assert (entity.owner, entity.kind, entity.assigned_via) == ("alice", EntityKind.PNE, GW)
    assert len(entity.eukeys) == 16
    assert entity.key_index == 1
    assert store.nonce_used(message.rand_pngw)
    stored = store.get_reply(GW, message.txid)
    assert stored is not None
    assert stored.reply == reply.body
    [audit] = [e for e in store.audit_events() if e.procedure == "eukey-assignment-tk-003"]
    assert (audit.outcome, audit.entity_id, audit.actor) == ("OK", "pne-1", GW)


def test_offloaded_reads_run_off_the_event_loop_with_the_same_outcome(
    store: MemoryStore,
) -> None:
    """Issue 7 item 1: with offload_reads (PostgreSQL), every store read of a request runs
    in a worker thread, never on the event loop's thread, and the request is served as
    without it (OK, facts stored); its retry is answered from the stored reply."""
    loop_threads: set[int] = set()
    read_threads: set[int] = set()
    original = store.get_entity

    def get_entity(entity_id: str) -> Any:
        read_threads.add(threading.get_ident())
        return original(entity_id)

    store.get_entity = get_entity  # type: ignore[method-assign]
    svc = CPNSService(
        store=store,
        policy=AssignmentPolicy(server_id=SERVER_ID),
        rng=FixedRandom(7),
        clock=lambda: FIXED_NOW,
        offload_reads=True,
    )
    message = request()

    async def main() -> tuple[Reply, Reply]:
        loop_threads.add(threading.get_ident())
        return (
            await svc.handle(message, authenticated=GW),
            await svc.handle(message, authenticated=GW),
        )

    first, again = asyncio.run(main())
    assert status_of(first) == ErrorCode.OK
    assert again == first
    assert read_threads
    assert not read_threads & loop_threads
    assert store.get_entity("pne-1") is not None


def test_a_retry_gets_the_same_reply_and_assigns_nothing_new(store: MemoryStore) -> None:
    """DESIGN §5: retries are idempotent. The same request again (same bytes, same txid)
    is answered with the stored reply byte for byte; the chain is not regenerated, even by
    a server process with another RNG."""
    message = request()
    first = handle(service(store, seed=7), message)
    chain = store.get_entity("pne-1").eukeys  # type: ignore[union-attr]
    again = handle(service(store, seed=8), message)
    assert again == first
    assert store.get_entity("pne-1").eukeys == chain  # type: ignore[union-attr]


def test_a_reused_txid_with_other_content_is_a_replay(store: MemoryStore) -> None:
    """DESIGN §5: a transaction ID names one exchange; the same txid with other content is
    refused as REPLAY and changes nothing."""
    message = request()
    handle(service(store), message)
    chain = store.get_entity("pne-1").eukeys  # type: ignore[union-attr]
    other = dataclasses.replace(request(pne="pne-2", seed=2), txid=message.txid)
    reply = handle(service(store), other)
    assert status_of(reply) == ErrorCode.REPLAY
    assert store.get_entity("pne-2") is None
    assert store.get_entity("pne-1").eukeys == chain  # type: ignore[union-attr]


def test_a_replayed_randpngw_under_a_new_txid_is_refused(store: MemoryStore) -> None:
    """003 §7.4.2.1.1.2 with DESIGN §5: a captured request re-sent under a fresh txid is
    caught by its RANDPNGW (REPLAY)."""
    message = request()
    handle(service(store), message)
    replayed = dataclasses.replace(message, txid=b"\x99" * 16)
    assert status_of(handle(service(store), replayed)) == ErrorCode.REPLAY


class LateCopyStore(MemoryStore):
    """The interleaving of two server processes racing on one request: this process's
    first stored-reply read comes just before the other's commit, every later read after
    it."""

    def __init__(self, winner: MemoryStore) -> None:
        super().__init__()
        self._winner = winner
        self._reads = 0

    def get_reply(self, requester: str, txid: bytes) -> Any:
        self._reads += 1
        return None if self._reads == 1 else self._winner.get_reply(requester, txid)

    def nonce_used(self, nonce: bytes) -> bool:
        return self._winner.nonce_used(nonce)

    def get_user(self, user_id: str) -> Any:
        return self._winner.get_user(user_id)

    def get_entity(self, entity_id: str) -> Any:
        return self._winner.get_entity(entity_id)

    def get_tk(self, entity_id: str) -> Any:
        return self._winner.get_tk(entity_id)


def test_a_copy_committed_after_the_reply_check_is_answered_as_it_was(
    store: MemoryStore,
) -> None:
    """Issue 7 item 2, DESIGN §5 (idempotent retries across processes): when a concurrent
    copy of the same request commits between this process's stored-reply check and its
    procedure's nonce lookup, the procedure sees its RANDPNGW used; the answer is the
    copy's stored reply byte for byte, not REPLAY."""
    message = request()
    first = handle(service(store), message)
    assert first.status == ErrorCode.OK
    late = handle(service(LateCopyStore(store), seed=9), message)
    assert late.body == first.body


def test_a_refusal_stores_nothing_but_the_audit_record(store: MemoryStore) -> None:
    """003 §7.4.2.1.1.2 step 2: a wrong password gets a Response with a fail status; no
    chain, no used nonce, no stored reply (the user may retry with the right password);
    the refusal is in the audit trail with its reason."""
    message = request(password="not the password")
    reply = handle(service(store), message)
    assert (reply.http_status, status_of(reply)) == (200, ErrorCode.WRONG_PASSWORD)
    assert store.get_entity("pne-1") is None
    assert not store.nonce_used(message.rand_pngw)
    assert store.get_reply(GW, message.txid) is None
    [audit] = [e for e in store.audit_events() if e.procedure == "eukey-assignment-tk-003"]
    assert audit.outcome == "WRONG_PASSWORD"
    assert audit.detail == "AuthData does not verify"


def test_a_message_no_procedure_starts_with_is_unexpected(store: MemoryStore) -> None:
    """STYLE §5: a well-formed message that starts no server procedure (a PAN Ack) is
    answered with UNEXPECTED_MESSAGE."""
    ack = EUKeyAssignmentAck(
        txid=b"\x01" * 16, src=GW, dst=SERVER_ID, status=ErrorCode.OK, key_index=1
    )
    reply = handle(service(store), ack)
    assert (reply.http_status, status_of(reply)) == (200, ErrorCode.UNEXPECTED_MESSAGE)


@pytest.mark.parametrize("body", [b"", b"\xff", b"not cbor at all", encode(request())[:-1]])
def test_undecodable_input_is_a_400_with_a_decode_status(store: MemoryStore, body: bytes) -> None:
    """DESIGN §3: undecodable bytes give HTTP 400 and an ErrorMessage with the decode
    error's code; nothing reaches a procedure."""
    parsed = service(store).parse(body)
    assert isinstance(parsed, Reply)
    assert parsed.http_status == 400
    assert status_of(parsed) == ErrorCode.MALFORMED_MESSAGE
    assert store.audit_events() == []


def test_only_enrolment_is_open_to_unauthenticated_senders() -> None:
    """004 §5.x.2: every request is Digest-authenticated except the with-UI enrolment,
    whose proof (the password) is inside the message."""
    assert not CPNSService.requires_authentication(
        UserKeyAssignmentRequest.__new__(UserKeyAssignmentRequest)
    )
    assert CPNSService.requires_authentication(request())


class FailingStore(MemoryStore):
    """A store whose durable writes fail (disk full, database gone)."""

    def write_async[T](self, fn: Callable[[WriteTx], T]) -> asyncio.Future[T]:
        raise StoreError("disk full")


def test_no_reply_when_the_facts_cannot_be_stored(store: MemoryStore) -> None:
    """DESIGN §6: facts are persisted before the reply that depends on them is sent: when
    the write fails the service raises (the HTTP layer answers 500) and hands out no
    EUKey chain the database does not hold."""
    # The same facts as `store`, in a store whose durable (async) writes fail.
    failing = FailingStore()
    users = store.list_users()
    gw = store.get_entity(GW)
    assert gw is not None

    def copy(tx: WriteTx) -> None:
        for user in users:
            tx.add_user(user)
        tx.put_entity(gw)
        tx.put_tks([TKRecord(entity_id="pne-1", tk=TKS["pne-1"])])

    failing.write(copy)
    with pytest.raises(StoreError):
        handle(service(failing), request())
    assert failing.get_entity("pne-1") is None
    assert failing.get_reply(GW, request().txid) is None


# -- online guessing guard (deviations D-SRV-1) ----------------------------------------------


def enrolment(password: str, seed: int) -> UserKeyAssignmentRequest:
    """A with-UI enrolment request of a new PN GW for alice (004 §5.x.1)."""
    client = UserKeyAssignmentClient(
        entity_id="gw-new", entity_kind=EntityKind.PN_GW, server_id=SERVER_ID, rng=FixedRandom(seed)
    )
    client.start(
        user_id="alice", password_key=cached_password_key("alice", password), now=FIXED_NOW
    )
    [message] = client.messages_to_send()
    assert isinstance(message, UserKeyAssignmentRequest)
    return message


def test_failed_proofs_lock_the_user_out_for_a_while(store: MemoryStore) -> None:
    """D-SRV-1: after max_auth_failures wrong passwords for a User ID, even the right one
    is refused with TOO_MANY_ATTEMPTS, without being tried, until the window passes."""
    svc = service(store, max_auth_failures=3, auth_failure_window=60)
    for seed in (11, 12, 13):
        reply = handle(svc, request(password="guess " + str(seed), seed=seed))
        assert status_of(reply) == ErrorCode.WRONG_PASSWORD
    assert status_of(handle(svc, request(seed=14))) == ErrorCode.TOO_MANY_ATTEMPTS
    assert store.get_entity("pne-1") is None
    outcomes = [e.outcome for e in store.audit_events() if e.procedure.endswith("003")]
    assert outcomes.count("TOO_MANY_ATTEMPTS") == 1
    later = CPNSService(
        store=store,
        policy=AssignmentPolicy(server_id=SERVER_ID, max_auth_failures=3, auth_failure_window=60),
        rng=FixedRandom(7),
        clock=lambda: FIXED_NOW + 60,
    )
    # Once the window has passed, a request made then (its Time is in the proof) goes in.
    gateway = EUKeyAssignmentGateway(
        gateway_id=GW, gateway_eukey=GATEWAY_KEYS[GW], server_id=SERVER_ID, rng=FixedRandom(16)
    )
    gateway.start(
        pne_id="pne-1",
        user_id="alice",
        password_key=cached_password_key("alice", PASSWORDS["alice"]),
        claim_key=claim_key_for("pne-1"),
        now=FIXED_NOW + 60,
    )
    [fresh] = gateway.messages_to_send()
    assert status_of(handle(later, fresh)) == ErrorCode.OK


def test_a_success_clears_the_count(store: MemoryStore) -> None:
    """D-SRV-1: a user who mistypes now and then is never locked out: a successful proof
    resets the count of its source (here the enrolled PN GW)."""
    svc = CPNSService(
        store=store,
        policy=AssignmentPolicy(server_id=SERVER_ID),
        rng=FixedRandom(7),
        clock=lambda: FIXED_NOW,
        guard=AttemptGuard(store, GuardLimits(per_user_source=3)),
    )
    wrong = ErrorCode.WRONG_PASSWORD
    assert status_of(handle(svc, request(password="typo one", seed=21))) == wrong
    assert status_of(handle(svc, request(password="typo two", seed=22))) == wrong
    assert status_of(handle(svc, request(seed=23))) == ErrorCode.OK
    for seed in (24, 25):
        assert status_of(handle(svc, request(password="typo", seed=seed))) == wrong
    assert status_of(handle(svc, request(pne="pne-2", seed=26))) == ErrorCode.OK


def test_failed_enrolments_do_not_lock_out_the_users_gateway(store: MemoryStore) -> None:
    """D-SRV-1: the counters are per procedure: anyone can send bad enrolment proofs
    (unauthenticated), but that must not stop alice's enrolled PN GW from assigning keys."""
    svc = service(store, max_auth_failures=3)
    for seed in (31, 32, 33):
        reply = asyncio.run(svc.handle(enrolment("guess", seed), authenticated=None))
        assert status_of(reply) == ErrorCode.AUTHENTICATION_FAILED
    locked = asyncio.run(svc.handle(enrolment(PASSWORDS["alice"], 34), authenticated=None))
    assert status_of(locked) == ErrorCode.TOO_MANY_ATTEMPTS
    assert status_of(handle(svc, request(seed=35))) == ErrorCode.OK


FLOW = bytes.fromhex("0123456789abcdef")


def test_the_reply_echoes_the_flow_and_every_line_and_the_audit_carry_it(
    store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/logging.md: a request carrying a flow ID is handled in that flow: the reply
    echoes the ID, every log line written while handling it carries it (the received and
    sent lines among them), and the audit record stores it."""
    caplog.set_level(logging.DEBUG, logger="cpns")
    caplog.handler.addFilter(ContextFilter("server"))
    message = dataclasses.replace(request(), flow=FLOW)
    reply = handle(service(store), message)
    assert decode(reply.body).flow == FLOW
    lines = [r for r in caplog.records if r.name.startswith("cpns.server")]
    assert lines
    assert {getattr(r, "flow", None) for r in lines} == {FLOW.hex()}
    hops = [(r.dir, r.type) for r in lines if getattr(r, "event", None) == "message"]  # type: ignore[attr-defined]
    assert hops == [
        ("received", "EUKEY_ASSIGNMENT_REQUEST"),
        ("sent", "EUKEY_ASSIGNMENT_RESPONSE"),
    ]
    [audit] = [e for e in store.audit_events() if e.procedure == "eukey-assignment-tk-003"]
    assert audit.flow_id == FLOW.hex()


def test_a_refusal_echoes_the_flow_and_its_audit_stores_it(store: MemoryStore) -> None:
    """A refused request (wrong password) is answered in its flow and audited with it; a
    request without a flow ID gets a reply without one and an audit row without one."""
    wrong = dataclasses.replace(request(password="not alice's"), flow=FLOW)
    reply = handle(service(store), wrong)
    assert status_of(reply) == ErrorCode.WRONG_PASSWORD
    assert decode(reply.body).flow == FLOW
    [audit] = store.audit_events()
    assert audit.flow_id == FLOW.hex()
    plain = handle(service(store), request(pne="pne-2", seed=3))
    assert decode(plain.body).flow is None
    assert store.audit_events()[0].flow_id is None


def test_the_flow_id_does_not_tell_a_retry_from_a_replay(store: MemoryStore) -> None:
    """docs/wire.md 2.3: the flow ID is not a security input. The same request under
    another flow ID is still a retry (the stored reply, nothing assigned again), never a
    REPLAY."""
    message = dataclasses.replace(request(), flow=FLOW)
    first = handle(service(store), message)
    again = handle(service(store), dataclasses.replace(message, flow=b"\x99" * 8))
    assert again.body == first.body
    assert status_of(again) == ErrorCode.OK


# -- operator metrics (docs/metrics.md) --------------------------------------------------

TK003 = "eukey-assignment-tk-003"


def test_metrics_count_each_request_by_procedure_and_status(store: MemoryStore) -> None:
    """docs/metrics.md: every answered message counts once in cpns_server_requests_total
    under its procedure and reply status, and once in the latency histogram; a wrong
    password also counts as a password-proof failure, a retry as a retry answered."""
    ok_before = sample("cpns_server_requests_total", procedure=TK003, status="OK")
    wrong_before = sample("cpns_server_requests_total", procedure=TK003, status="WRONG_PASSWORD")
    proofs_before = sample("cpns_server_password_proof_failures_total", procedure=TK003)
    timed_before = sample("cpns_server_request_duration_seconds_count", procedure=TK003)
    retries_before = sample("cpns_server_retries_answered_total", procedure=TK003)
    svc = service(store)
    handle(svc, request(password="not the password", seed=3))
    message = request()
    handle(svc, message)
    handle(svc, message)  # the retry: answered from the stored reply, OK again
    assert sample("cpns_server_requests_total", procedure=TK003, status="OK") == ok_before + 2
    assert (
        sample("cpns_server_requests_total", procedure=TK003, status="WRONG_PASSWORD")
        == wrong_before + 1
    )
    assert sample("cpns_server_password_proof_failures_total", procedure=TK003) == (
        proofs_before + 1
    )
    assert sample("cpns_server_request_duration_seconds_count", procedure=TK003) == (
        timed_before + 3
    )
    assert sample("cpns_server_retries_answered_total", procedure=TK003) == retries_before + 1


def test_metrics_count_undecodable_and_unexpected_messages(store: MemoryStore) -> None:
    """docs/metrics.md: undecodable input counts under procedure "undecodable" with its
    decode status, a message no procedure starts with under "unexpected"."""
    bad_before = sample(
        "cpns_server_requests_total", procedure="undecodable", status="MALFORMED_MESSAGE"
    )
    odd_before = sample(
        "cpns_server_requests_total", procedure="unexpected", status="UNEXPECTED_MESSAGE"
    )
    svc = service(store)
    svc.parse(b"not cbor at all")
    ack = EUKeyAssignmentAck(
        txid=b"\x01" * 16, src=GW, dst=SERVER_ID, status=ErrorCode.OK, key_index=1
    )
    handle(svc, ack)
    assert sample(
        "cpns_server_requests_total", procedure="undecodable", status="MALFORMED_MESSAGE"
    ) == (bad_before + 1)
    assert sample(
        "cpns_server_requests_total", procedure="unexpected", status="UNEXPECTED_MESSAGE"
    ) == (odd_before + 1)


class HeldStore(MemoryStore):
    """A MemoryStore whose durable writes wait until the test lets them through."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()

    def write_async[T](self, fn: Callable[[WriteTx], T]) -> asyncio.Future[T]:
        async def held() -> T:
            self.waiting.set()
            await self.release.wait()
            return await super(HeldStore, self).write_async(fn)

        return asyncio.ensure_future(held())


def test_pending_procedures_gauge_counts_steps_in_progress(store: MemoryStore) -> None:
    """docs/metrics.md: cpns_server_pending_procedures is 1 higher while a step waits for
    its commit, and back where it was once the reply is ready."""
    held = HeldStore()
    users, gw = store.list_users(), store.get_entity(GW)
    assert gw is not None

    def copy(tx: WriteTx) -> None:
        for user in users:
            tx.add_user(user)
        tx.put_entity(gw)
        tx.put_tks([TKRecord(entity_id="pne-1", tk=TKS["pne-1"])])

    held.write(copy)

    async def scenario() -> tuple[float, float, float]:
        before = sample("cpns_server_pending_procedures")
        task = asyncio.create_task(service(held).handle(request(), authenticated=GW))
        await held.waiting.wait()
        during = sample("cpns_server_pending_procedures")
        held.release.set()
        reply = await task
        assert reply.status == ErrorCode.OK
        return before, during, sample("cpns_server_pending_procedures")

    before, during, after = asyncio.run(scenario())
    assert (during, after) == (before + 1, before)


def test_a_refused_unauthenticated_request_writes_no_info_line(
    store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    """D-SRV-2 with docs/logging.md: an enrolment nobody authenticated that is refused
    writes its hop lines at DEBUG only (a flood costs no log line per request); one that
    succeeds writes both at INFO, received before sent."""
    caplog.set_level(logging.INFO, logger="cpns")
    refused = handle(service(store), enrolment("wrong password", seed=5), authenticated=None)
    assert status_of(refused) == ErrorCode.AUTHENTICATION_FAILED
    assert not caplog.records
    ok = handle(service(store), enrolment(PASSWORDS["alice"], seed=6), authenticated=None)
    assert status_of(ok) == ErrorCode.OK
    hops = [r.dir for r in caplog.records if getattr(r, "event", None) == "message"]  # type: ignore[attr-defined]
    assert hops == ["received", "sent"]


def test_a_reassignment_after_tk_ratchets_keeps_the_servers_tk_step(store: MemoryStore) -> None:
    """003 after 000 (docs/procedures/eukey-assignment.md, re-assignment after TK-based
    authentications; D-003-13): with the TK record ratcheted to step 3 and the chain at
    index 2, a re-assignment commits a new chain at index 1 and the next epoch, leaves the
    TK record (TK_3, step 3) as it was, and seals TK_3 with step 3 for the PN GW."""
    assert status_of(handle(service(store), request(seed=1))) == ErrorCode.OK
    tk_3 = ratchet(TKS["pne-1"], 3)

    def ratchet_as_000_would(tx: WriteTx) -> None:
        tx.set_tk_state("pne-1", tk_3, 3, expected_step=0)
        tx.set_key_index("pne-1", 2, expected_index=1)

    store.write(ratchet_as_000_would)
    before = store.get_entity("pne-1")
    assert before is not None
    reply = handle(service(store, seed=8), request(seed=2))
    message = decode(reply.body)
    assert isinstance(message, EUKeyAssignmentResponse)
    assert message.status is ErrorCode.OK
    assert message.sealed_bundle is not None
    after = store.get_entity("pne-1")
    assert after is not None
    assert (after.key_index, after.epoch) == (1, before.epoch + 1)
    assert after.eukeys != before.eukeys
    record = store.get_tk("pne-1")
    assert record is not None
    assert (record.tk, record.tk_step) == (tk_3, 3)
    bundle = decode_record(
        KeyBundle,
        open_sealed(
            GATEWAY_KEYS[GW],
            message.sealed_bundle,
            purpose=RESPONSE_PURPOSE,
            context=(SERVER_ID, GW, "pne-1", message.txid),
        ),
    )
    assert (bundle.tk, bundle.tk_step, bundle.eukeys) == (tk_3, 3, after.eukeys)
