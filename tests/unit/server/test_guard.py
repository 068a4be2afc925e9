"""The guessing guard and the cost of unauthenticated refusals (deviations D-SRV-1, D-SRV-2,
issue 5 items 5 and 6): the real CPNSService over the in-memory and the SQLite stores, fed
with enrolment requests made by the real with-UI client machine."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import FIXED_NOW, PASSWORDS, SERVER_ID, FixedRandom, cached_password_key

from cpns.errors import ErrorCode
from cpns.messages.codec import decode
from cpns.messages.model import UserKeyAssignmentRequest
from cpns.protocol.key_assignment import AssignmentPolicy
from cpns.protocol.user_key_assignment import UserKeyAssignmentClient
from cpns.records import AuditEvent, UserRecord
from cpns.server.config import ServerConfig
from cpns.server.guard import AttemptGuard, GuardLimits
from cpns.server.main import housekeeping
from cpns.server.service import CPNSService, Reply
from cpns.store.base import ServerStore, WriteTx
from cpns.store.masterkey import MasterKey
from cpns.store.memory import MemoryStore
from cpns.store.sql import SQLStore
from cpns.types import EntityKind

ENROL = "eukey-assignment-ui-004"
LIMITS = GuardLimits(per_user_source=5, per_source=30, per_user=50, window=900)


def _users(store: ServerStore) -> None:
    def setup(tx: WriteTx) -> None:
        for user_id, password in PASSWORDS.items():
            key = cached_password_key(user_id, password)
            tx.add_user(UserRecord(user_id=user_id, password_key=key, created_at=1))

    store.write(setup)


@pytest.fixture
def store() -> MemoryStore:
    """alice and bob, nothing enrolled."""
    s = MemoryStore()
    _users(s)
    return s


def service(
    store: ServerStore, limits: GuardLimits = LIMITS, *, now: int = FIXED_NOW
) -> CPNSService:
    return CPNSService(
        store=store,
        policy=AssignmentPolicy(server_id=SERVER_ID),
        rng=FixedRandom(7),
        clock=lambda: now,
        guard=AttemptGuard(store, limits),
    )


_seeds = iter(range(1000, 10**6))


def enrolment(
    *, user: str = "alice", password: str = "a wrong guess", entity: str = "gw-new"
) -> UserKeyAssignmentRequest:
    """A with-UI enrolment request of a PN GW (004 §5.x.1), each with fresh randoms."""
    client = UserKeyAssignmentClient(
        entity_id=entity,
        entity_kind=EntityKind.PN_GW,
        server_id=SERVER_ID,
        rng=FixedRandom(next(_seeds)),
    )
    client.start(user_id=user, password_key=cached_password_key(user, password), now=FIXED_NOW)
    [message] = client.messages_to_send()
    assert isinstance(message, UserKeyAssignmentRequest)
    return message


def send(svc: CPNSService, message: UserKeyAssignmentRequest, source: str) -> ErrorCode | int:
    reply = asyncio.run(svc.handle(message, authenticated=None, source=source))
    assert isinstance(reply, Reply)
    status: ErrorCode | int = decode(reply.body).status  # type: ignore[attr-defined]
    return status


FAILED = ErrorCode.AUTHENTICATION_FAILED
LIMITED = ErrorCode.TOO_MANY_ATTEMPTS


def test_a_strangers_flood_from_one_source_does_not_lock_the_user_out(store: MemoryStore) -> None:
    """Issue 5 item 5, D-SRV-1: bad proofs for alice from one source are cut off after L1
    for that source, and alice's correct proof from another source still succeeds."""
    svc = service(store)
    verdicts = [send(svc, enrolment(), "192.0.2.66") for _ in range(40)]
    assert verdicts[:5] == [FAILED] * 5
    assert verdicts[5:] == [LIMITED] * 35
    assert send(svc, enrolment(password=PASSWORDS["alice"]), "192.0.2.66") == LIMITED
    assert send(svc, enrolment(password=PASSWORDS["alice"]), "198.51.100.7") == ErrorCode.OK
    assert store.get_entity("gw-new") is not None


def test_one_source_spraying_user_ids_is_cut_off(store: MemoryStore) -> None:
    """Issue 5 item 5, D-SRV-1: one source trying many User IDs gets TOO_MANY_ATTEMPTS for
    every proof once L2 of them failed, even a correct one; other sources are unaffected."""
    svc = service(store)
    spray = [send(svc, enrolment(user=f"user-{i}"), "192.0.2.66") for i in range(60)]
    assert spray[:30] == [FAILED] * 30
    assert spray[30:] == [LIMITED] * 30
    assert send(svc, enrolment(password=PASSWORDS["alice"]), "192.0.2.66") == LIMITED
    assert send(svc, enrolment(password=PASSWORDS["alice"]), "198.51.100.7") == ErrorCode.OK


def test_guessing_per_user_is_bounded_across_sources(store: MemoryStore) -> None:
    """Issue 5 item 5, D-SRV-1: however many sources, at most L3 proofs for one User ID
    are checked per window; then every proof for it is refused unchecked."""
    svc = service(store)
    verdicts = [
        send(svc, enrolment(), f"10.0.{n}.1")
        for n in range(20)
        for _ in range(LIMITS.per_user_source + 2)
    ]
    assert verdicts.count(FAILED) == LIMITS.per_user
    assert send(svc, enrolment(password=PASSWORDS["alice"]), "198.51.100.7") == LIMITED
    # bob is another user: not affected.
    assert (
        send(svc, enrolment(user="bob", password=PASSWORDS["bob"], entity="gw-bob"), "10.0.0.1")
        == ErrorCode.OK
    )
    # After the window, alice can enrol again.
    later = service(store, now=FIXED_NOW + LIMITS.window + 1)
    asyncio.run(svc.flush())
    later_request = _at(FIXED_NOW + LIMITS.window + 1)
    assert send(later, later_request, "198.51.100.7") == ErrorCode.OK


def _at(now: int) -> UserKeyAssignmentRequest:
    client = UserKeyAssignmentClient(
        entity_id="gw-new",
        entity_kind=EntityKind.PN_GW,
        server_id=SERVER_ID,
        rng=FixedRandom(next(_seeds)),
    )
    client.start(
        user_id="alice", password_key=cached_password_key("alice", PASSWORDS["alice"]), now=now
    )
    [message] = client.messages_to_send()
    assert isinstance(message, UserKeyAssignmentRequest)
    return message


def test_a_success_resets_only_its_own_source(store: MemoryStore) -> None:
    """D-SRV-1: alice's typos from her source are forgiven by her success, so she is never
    locked out by her own mistakes; the per-user count keeps running (a success cannot
    reset the guessing bound)."""
    svc = service(store)
    for _ in range(4):
        assert send(svc, enrolment(), "198.51.100.7") == FAILED
    assert send(svc, enrolment(password=PASSWORDS["alice"]), "198.51.100.7") == ErrorCode.OK
    for _ in range(4):
        assert send(svc, enrolment(entity="gw-other"), "198.51.100.7") == FAILED
    assert (
        send(svc, enrolment(password=PASSWORDS["alice"], entity="gw-other"), "198.51.100.7")
        == ErrorCode.OK
    )
    pair, _, user = AttemptGuard.keys(ENROL, "alice", "198.51.100.7")
    asyncio.run(svc.flush())
    assert store.auth_failures(pair, now=FIXED_NOW) == 0
    assert store.auth_failures(user, now=FIXED_NOW) == 8


def test_flushed_counts_survive_a_restart(tmp_path: Path, store_target: str) -> None:
    """D-SRV-1/D-SRV-2: the counters reach the database at a flush, so a restarted server
    (a fresh guard over the same SQLite file or PostgreSQL database) still refuses the
    limited source."""
    key = MasterKey.generate(tmp_path / "master.key")
    with SQLStore.open(store_target, master_key=key) as store:
        _users(store)
        svc = service(store)
        for _ in range(5):
            assert send(svc, enrolment(), "192.0.2.66") == FAILED
        asyncio.run(svc.flush())
    with SQLStore.open(store_target, master_key=key) as store:
        again = service(store)
        assert send(again, enrolment(password=PASSWORDS["alice"]), "192.0.2.66") == LIMITED
        assert send(again, enrolment(password=PASSWORDS["alice"]), "198.51.100.7") == ErrorCode.OK


# -- cost and growth of unauthenticated refusals (issue 5 item 6, D-SRV-2) --------------------


@pytest.fixture
def sql(tmp_path: Path, store_target: str) -> Iterator[SQLStore]:
    """A real store with alice and bob, on each back end (SQLite, PostgreSQL)."""
    key = MasterKey.generate(tmp_path / "master.key")
    with SQLStore.open(store_target, master_key=key) as s:
        _users(s)
        yield s


def test_unauthenticated_refusals_cost_no_commit_and_o1_audit_rows(sql: SQLStore) -> None:
    """Issue 5 item 6, D-SRV-2: 300 bad enrolments (wrong password, unknown users, stale
    time, TOO_MANY_ATTEMPTS) from 3 sources commit nothing on the request path; one flush
    writes them in ONE commit as one audit row per (procedure, outcome, source, User ID),
    whose counts add up to the 300 refusals."""
    svc = service(sql)
    commits, rows = sql.write_stats.commits, len(sql.audit_events(limit=10_000))
    sources = ("192.0.2.1", "192.0.2.2", "192.0.2.3")
    stale = _at(FIXED_NOW - 3600)
    for i in range(100):
        for source in sources:
            message = enrolment(user="alice" if i % 2 else "nobody")
            send(svc, stale if i == 50 else message, source)
    assert sql.write_stats.commits == commits
    assert len(sql.audit_events(limit=10_000)) == rows
    written = asyncio.run(svc.flush())
    assert sql.write_stats.commits == commits + 1
    new = sql.audit_events(limit=10_000)[: len(sql.audit_events(limit=10_000)) - rows]
    assert len(new) == written <= 3 * 2 * 3  # sources x users x outcomes
    assert sum(e.count for e in new) == 300
    assert {e.source for e in new} == set(sources)
    assert {e.outcome for e in new} == {"AUTHENTICATION_FAILED", "TOO_MANY_ATTEMPTS", "STALE_TIME"}
    # Nothing left to write: a second flush is free.
    assert asyncio.run(svc.flush()) == 0
    assert sql.write_stats.commits == commits + 1


def test_a_real_request_still_commits_its_audit_at_once(sql: SQLStore) -> None:
    """D-SRV-2: only what nobody authenticated is aggregated: a success is written with its
    facts in its own commit, before its reply (DESIGN §6)."""
    svc = service(sql)
    commits = sql.write_stats.commits
    assert send(svc, enrolment(password=PASSWORDS["alice"]), "192.0.2.1") == ErrorCode.OK
    assert sql.write_stats.commits == commits + 1
    [event] = [e for e in sql.audit_events() if e.outcome == "OK"]
    assert (event.entity_id, event.count) == ("gw-new", 1)


def test_the_aggregate_is_bounded_in_memory(store: MemoryStore) -> None:
    """D-SRV-2: beyond max_audit_keys distinct aggregates in one interval, further keys
    fold into one overflow row per (procedure, outcome): memory and rows stay bounded."""
    limits = GuardLimits(per_source=1000, per_user=1000, max_audit_keys=10)
    svc = service(store, limits)
    for i in range(100):
        assert send(svc, enrolment(user=f"user-{i}"), "192.0.2.9") == FAILED
    assert asyncio.run(svc.flush()) == 11
    rows = store.audit_events(limit=1000)
    [overflow] = [e for e in rows if e.source == "*"]
    assert overflow.count == 90
    assert sum(e.count for e in rows) == 100


def test_audit_retention_purges_old_rows(sql: SQLStore) -> None:
    """Issue 5 item 6, D-SRV-2: the server's housekeeping deletes audit events older than
    audit_retention_days and keeps newer ones."""
    day = 86400
    old = AuditEvent(at=FIXED_NOW - 91 * day, actor="x", procedure="p", outcome="OK")
    recent = AuditEvent(at=FIXED_NOW - 89 * day, actor="y", procedure="p", outcome="OK")
    sql.write(lambda tx: (tx.audit(old), tx.audit(recent)))
    config = ServerConfig(audit_retention_days=90)
    guard = AttemptGuard(sql, LIMITS)
    removed = asyncio.run(housekeeping(sql, guard, config, now=FIXED_NOW))
    assert removed >= 1
    actors = {e.actor for e in sql.audit_events(limit=1000)}
    assert "x" not in actors
    assert "y" in actors


# -- an unknown User ID costs what a known one does (issue 5 item 7, enrolment half) ----------


def _enrolment_work(sql: SQLStore, monkeypatch: pytest.MonkeyPatch, user: str) -> list[object]:
    """Every operation one refused enrolment makes: SQL reads, unseals, MACs, reply size."""
    import cpns.protocol.user_key_assignment as uka
    import cpns.store.sql as sqlmod

    ops: list[object] = []
    real_query, real_open, real_verify = SQLStore._query, sqlmod._Sealer.open, uka.verify_mac

    def query(self: SQLStore, statement: str, params: Any) -> list[Any]:
        ops.append(("sql", statement))
        return real_query(self, statement, params)

    def unseal(self: Any, column: str, blob: bytes, row: Any) -> bytes:
        ops.append(("unseal", column, len(blob)))
        return real_open(self, column, blob, row)

    def verify(key: bytes, tag: bytes, label: str, *parts: Any) -> None:
        ops.append(("verify_mac", len(key), label))
        real_verify(key, tag, label, *parts)

    monkeypatch.setattr(SQLStore, "_query", query)
    monkeypatch.setattr(sqlmod._Sealer, "open", unseal)
    monkeypatch.setattr(uka, "verify_mac", verify)
    svc = service(sql)
    reply = asyncio.run(svc.handle(enrolment(user=user), authenticated=None, source="192.0.2.1"))
    ops.append(("reply", reply.http_status, len(reply.body), decode(reply.body).status))  # type: ignore[attr-defined]
    ops.append(("unflushed", svc.guard.unflushed))
    monkeypatch.undo()
    return ops


def test_unknown_and_existing_user_ids_cost_the_same(
    sql: SQLStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 5 item 7 (enrolment), D-004-2: a wrong password for an existing User ID and any
    proof for an unknown one run the same SQL reads, the same unseal of a password key,
    the same MAC, the same failure counting and audit path, and get replies of one size
    and status: nothing tells them apart, by answer or by work done."""
    existing = _enrolment_work(sql, monkeypatch, "alice")
    unknown = _enrolment_work(sql, monkeypatch, "nobody-at-all")
    assert ("unseal", "users.password_key", len(sql._no_user)) in existing
    assert existing == unknown
