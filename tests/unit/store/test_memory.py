"""The ServerStore contract (cpns.store.base), checked on MemoryStore and SQLStore alike.

Every test here runs three times through the parametrized ``store`` fixture (memory,
SQLite, PostgreSQL), so neither the in-memory store that service-layer tests use nor the
PostgreSQL back end can drift from the SQLite one. SQL-only properties
(sealing, group commit, migrations, several processes) are in test_sql.py.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cpns.errors import AuthenticationFailed, LocalProtocolError, StoreError
from cpns.protocol.digest import advance_nc
from cpns.store import (
    AuditEvent,
    ConflictError,
    EntityRecord,
    MasterKey,
    MemoryStore,
    NonceReused,
    ServerStore,
    SQLStore,
    StoredReply,
    TKRecord,
    UserRecord,
    WriteTx,
)
from cpns.types import EntityKind

KEY = bytes(range(32))


def user(user_id: str = "alice", password_key: bytes = b"P" * 32) -> UserRecord:
    return UserRecord(user_id=user_id, password_key=password_key, created_at=1000)


def entity(entity_id: str = "pne-1", owner: str = "alice", n: int = 3) -> EntityRecord:
    return EntityRecord(
        entity_id=entity_id,
        kind=EntityKind.PNE,
        owner=owner,
        eukeys=tuple(bytes([i]) * 32 for i in range(1, n + 1)),
        key_index=1 if n else 0,
        assigned_via="gw-1",
        assigned_at=2000,
    )


def tk(entity_id: str, tk_byte: int = 7) -> TKRecord:
    return TKRecord(entity_id=entity_id, tk=bytes([tk_byte]) * 16, source="m.csv", imported_at=5)


def reply(txid: bytes = b"\x01" * 16, created_at: int = 100) -> StoredReply:
    return StoredReply(
        requester="gw-1",
        txid=txid,
        request_digest=b"\xdd" * 32,
        reply=b"reply with key material",
        created_at=created_at,
    )


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerStore]:
    """A fresh, empty store of each implementation (SQLStore on both back ends), with a
    50-second reply retention."""
    s: ServerStore
    if request.param == "memory":
        s = MemoryStore(reply_retention=50)
    elif request.param == "sqlite":
        s = SQLStore.open(tmp_path / "cpns.db", master_key=MasterKey(KEY), reply_retention=50)
    else:
        dsn: str = request.getfixturevalue("pg_dsn")
        s = SQLStore.open(dsn, master_key=MasterKey(KEY), reply_retention=50)
    yield s
    s.close()


def test_user_round_trip_and_listing(store: ServerStore) -> None:
    """A user written in one transaction reads back equal; list_users is ordered by ID."""
    store.write(lambda tx: tx.add_user(user("bob")))
    store.write(lambda tx: tx.add_user(user("alice", b"Q" * 32)))
    assert store.get_user("alice") == user("alice", b"Q" * 32)
    assert store.get_user("nobody") is None
    assert [u.user_id for u in store.list_users()] == ["alice", "bob"]


def test_duplicate_user_is_a_conflict(store: ServerStore) -> None:
    """add_user with an existing User ID raises ConflictError and changes nothing."""
    store.write(lambda tx: tx.add_user(user()))
    with pytest.raises(ConflictError, match="alice"):
        store.write(lambda tx: tx.add_user(user(password_key=b"X" * 32)))
    assert store.get_user("alice") == user()


def test_set_password_key(store: ServerStore) -> None:
    """set_password_key replaces the key of an existing user; unknown user -> StoreError."""
    store.write(lambda tx: tx.add_user(user()))
    store.write(lambda tx: tx.set_password_key("alice", b"N" * 32))
    got = store.get_user("alice")
    assert got is not None
    assert got.password_key == b"N" * 32
    assert got.created_at == 1000
    with pytest.raises(StoreError, match="bob"):
        store.write(lambda tx: tx.set_password_key("bob", b"N" * 32))


def test_entity_round_trip_upsert_and_listing(store: ServerStore) -> None:
    """put_entity inserts or replaces by Entity ID; list_entities filters by owner, in order."""

    def setup(tx: WriteTx) -> None:
        tx.add_user(user("alice"))
        tx.add_user(user("bob"))
        tx.put_entity(entity("pne-2"))
        tx.put_entity(entity("gw-1", owner="bob", n=1))
        tx.put_entity(entity("pne-1", n=0))

    store.write(setup)
    assert store.get_entity("pne-2") == entity("pne-2")
    assert store.get_entity("pne-1") == entity("pne-1", n=0)
    assert store.get_entity("none") is None
    assert [e.entity_id for e in store.list_entities()] == ["gw-1", "pne-1", "pne-2"]
    assert [e.entity_id for e in store.list_entities(owner="alice")] == ["pne-1", "pne-2"]
    assert store.list_entities(owner="carol") == []

    advanced = EntityRecord(
        entity_id="pne-2",
        kind=EntityKind.PNE,
        owner="bob",
        eukeys=entity("pne-2").eukeys,
        key_index=2,
    )
    store.write(lambda tx: tx.put_entity(advanced))
    got = store.get_entity("pne-2")
    assert got == advanced
    assert got is not None
    assert got.eukey == bytes([2]) * 32


def test_entity_needs_a_known_owner_and_32_byte_keys(store: ServerStore) -> None:
    """An entity's owner must be a user; EUKeys are 32 bytes. Either fault -> StoreError."""
    with pytest.raises(StoreError, match="owner"):
        store.write(lambda tx: tx.put_entity(entity(owner="ghost")))
    store.write(lambda tx: tx.add_user(user()))
    bad = EntityRecord(entity_id="x", kind=EntityKind.PNE, owner="alice", eukeys=(b"short",))
    with pytest.raises(StoreError, match="32 bytes"):
        store.write(lambda tx: tx.put_entity(bad))
    assert store.list_entities() == []


def test_set_revoked(store: ServerStore) -> None:
    """set_revoked flips the flag and keeps the rest; unknown entity -> StoreError."""
    store.write(lambda tx: (tx.add_user(user()), tx.put_entity(entity())))
    store.write(lambda tx: tx.set_revoked("pne-1", True))
    got = store.get_entity("pne-1")
    assert got is not None
    assert got.revoked
    assert got.eukeys == entity().eukeys
    store.write(lambda tx: tx.set_revoked("pne-1", False))
    assert store.get_entity("pne-1") == entity()
    with pytest.raises(StoreError, match="nope"):
        store.write(lambda tx: tx.set_revoked("nope", True))


def test_tk_records_round_trip(store: ServerStore) -> None:
    """put_tks stores every record of a batch; get_tk returns it, or None."""
    store.write(lambda tx: tx.put_tks([tk("a"), tk("b", 9)]))
    assert store.get_tk("a") == tk("a")
    assert store.get_tk("b") == tk("b", 9)
    assert store.get_tk("c") is None


def test_tk_batch_with_a_duplicate_in_the_store_writes_nothing(store: ServerStore) -> None:
    """003 TK import: a batch clashing with a stored record -> ConflictError naming it, no row."""
    store.write(lambda tx: tx.put_tks([tk("b")]))
    with pytest.raises(ConflictError, match="'b'"):
        store.write(lambda tx: tx.put_tks([tk("a"), tk("b", 8), tk("c")]))
    assert store.get_tk("a") is None
    assert store.get_tk("c") is None
    assert store.get_tk("b") == tk("b")


def test_tk_batch_with_a_duplicate_inside_writes_nothing(store: ServerStore) -> None:
    """A batch naming one Entity ID twice -> ConflictError naming it, and no row written."""
    with pytest.raises(ConflictError, match="'a'"):
        store.write(lambda tx: tx.put_tks([tk("z"), tk("a"), tk("a", 2)]))
    assert store.get_tk("z") is None
    assert store.get_tk("a") is None


def test_rejected_tk_batch_is_undone_even_if_the_function_goes_on(store: ServerStore) -> None:
    """put_tks is all or nothing by itself: a caller that catches the conflict keeps the rest."""
    store.write(lambda tx: tx.put_tks([tk("b")]))

    def import_then_audit(tx: WriteTx) -> str:
        try:
            tx.put_tks([tk("a"), tk("b", 8)])
        except ConflictError:
            tx.audit(AuditEvent(at=1, actor="admin", procedure="tk-import", outcome="CONFLICT"))
            return "conflict"
        return "ok"

    assert store.write(import_then_audit) == "conflict"
    assert store.get_tk("a") is None
    assert [e.outcome for e in store.audit_events()] == ["CONFLICT"]


def test_nonce_reuse_is_refused(store: ServerStore) -> None:
    """A random value (RANDPNGW, rand) used twice -> NonceReused, in one or two writes."""
    assert not store.nonce_used(b"n1")
    store.write(lambda tx: tx.use_nonce(b"n1", expires_at=100))
    assert store.nonce_used(b"n1")
    assert not store.nonce_used(b"n2")
    with pytest.raises(NonceReused):
        store.write(lambda tx: tx.use_nonce(b"n1", expires_at=200))

    def twice(tx: WriteTx) -> None:
        tx.use_nonce(b"n3", expires_at=100)
        tx.use_nonce(b"n3", expires_at=100)

    with pytest.raises(NonceReused):
        store.write(twice)
    assert not store.nonce_used(b"n3")


def test_reply_round_trip_and_first_reply_wins(store: ServerStore) -> None:
    """A stored reply is returned for a retry; a second reply for the txid is a conflict."""
    store.write(lambda tx: tx.put_reply(reply()))
    assert store.get_reply("gw-1", b"\x01" * 16) == reply()
    assert store.get_reply("gw-2", b"\x01" * 16) is None
    assert store.get_reply("gw-1", b"\x02" * 16) is None
    with pytest.raises(ConflictError):
        store.write(lambda tx: tx.put_reply(reply(created_at=101)))
    assert store.get_reply("gw-1", b"\x01" * 16) == reply()


def test_audit_events_newest_first_with_limit(store: ServerStore) -> None:
    """audit_events lists the newest events first, at most ``limit`` of them."""
    events = [
        AuditEvent(
            at=i,
            actor="gw-1",
            procedure="eukey-assignment-003",
            outcome="OK" if i % 2 else "WRONG_PASSWORD",
            entity_id=f"pne-{i}",
            user_id="alice",
            hop="server",
            correlation_id=f"{i:032x}",
            detail=f"event {i}",
        )
        for i in range(5)
    ]
    store.write(lambda tx: [tx.audit(e) for e in events[:3]])
    store.write(lambda tx: [tx.audit(e) for e in events[3:]])
    assert store.audit_events() == events[::-1]
    assert store.audit_events(limit=2) == [events[4], events[3]]
    assert store.audit_events(limit=0) == []


def test_audit_events_keep_their_flow_id(store: ServerStore) -> None:
    """docs/logging.md: an audit event stores the flow ID of its flow (16 hex digits) and
    reads it back; an event without one reads back with None."""
    with_flow = AuditEvent(
        at=1,
        actor="gw-1",
        procedure="eukey-assignment-tk-003",
        outcome="OK",
        correlation_id="ab" * 16,
        flow_id="0123456789abcdef",
    )
    without = AuditEvent(at=2, actor="admin", procedure="user-add", outcome="OK")
    store.write(lambda tx: [tx.audit(with_flow), tx.audit(without)])
    assert store.audit_events() == [without, with_flow]
    assert store.audit_events()[1].flow_id == "0123456789abcdef"
    assert store.audit_events()[0].flow_id is None


def test_write_is_all_or_nothing(store: ServerStore) -> None:
    """A write function that raises leaves no trace, and its exception reaches the caller."""

    def half(tx: WriteTx) -> None:
        tx.add_user(user())
        tx.put_tks([tk("a")])
        tx.use_nonce(b"n", expires_at=1)
        tx.audit(AuditEvent(at=1, actor="x", procedure="p", outcome="OK"))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.write(half)
    assert store.get_user("alice") is None
    assert store.get_tk("a") is None
    assert not store.nonce_used(b"n")
    assert store.audit_events() == []


def test_write_returns_the_function_result(store: ServerStore) -> None:
    """write() hands back what the function returned."""
    assert store.write(lambda tx: 42) == 42


def test_write_tx_is_dead_after_its_function(store: ServerStore) -> None:
    """A WriteTx kept past its function cannot write outside its transaction."""
    kept: list[WriteTx] = []
    store.write(kept.append)
    with pytest.raises(LocalProtocolError):
        kept[0].add_user(user())
    assert store.get_user("alice") is None


def test_nested_write_is_refused(store: ServerStore) -> None:
    """Calling write() from inside a write function is a programming error, not a deadlock."""
    with pytest.raises(LocalProtocolError):
        store.write(lambda tx: store.write(lambda tx2: None))


def test_write_async(store: ServerStore) -> None:
    """write_async resolves to the function's result, or raises its exception, in asyncio."""

    async def main() -> list[int]:
        results = await asyncio.gather(
            *(
                store.write_async(lambda tx, i=i: (tx.use_nonce(bytes([i]), expires_at=9), i)[1])
                for i in range(20)
            )
        )
        with pytest.raises(NonceReused):
            await store.write_async(lambda tx: tx.use_nonce(b"\x00", expires_at=9))
        return list(results)

    assert asyncio.run(main()) == list(range(20))
    assert store.nonce_used(b"\x13")


def test_purge_expired(store: ServerStore) -> None:
    """purge_expired drops nonces past expires_at and replies older than the retention (50 s)."""

    def setup(tx: WriteTx) -> None:
        tx.use_nonce(b"old", expires_at=10)
        tx.use_nonce(b"edge", expires_at=15)
        tx.use_nonce(b"new", expires_at=20)
        tx.put_reply(reply(b"\x01" * 16, created_at=0))
        tx.put_reply(reply(b"\x02" * 16, created_at=60))

    store.write(setup)
    assert store.purge_expired(now=15) == 1
    assert not store.nonce_used(b"old")
    assert store.nonce_used(b"edge")
    assert store.get_reply("gw-1", b"\x01" * 16) is not None
    assert store.purge_expired(now=51) == 3
    assert store.get_reply("gw-1", b"\x01" * 16) is None
    assert store.get_reply("gw-1", b"\x02" * 16) is not None
    assert not store.nonce_used(b"new")
    # A purged nonce is forgotten: only the Time window protects it from then on.
    store.write(lambda tx: tx.use_nonce(b"old", expires_at=100))


def test_closed_store_refuses_work(store: ServerStore) -> None:
    """After close() reads and writes raise StoreError; close() is idempotent."""
    store.close()
    store.close()
    with pytest.raises(StoreError):
        store.get_user("alice")
    with pytest.raises(StoreError):
        store.write(lambda tx: None)


# -- failed password proofs (deviations D-SRV-1) ---------------------------------------------


def test_auth_failures_count_within_the_window_and_restart_after_it(store: ServerStore) -> None:
    """Each failure counts while the last one is less than ``window`` s old; after that the
    count starts again from 1; an unknown key counts 0."""
    assert store.auth_failures("alice", now=0) == 0
    for at in (100, 110, 120):
        store.write(lambda tx, at=at: tx.record_auth_failure("alice", now=at, window=60))
    assert store.auth_failures("alice", now=121) == 3
    assert store.auth_failures("alice", now=179) == 3
    assert store.auth_failures("alice", now=180) == 0
    store.write(lambda tx: tx.record_auth_failure("alice", now=200, window=60))
    assert store.auth_failures("alice", now=200) == 1
    assert store.auth_failures("bob", now=200) == 0


def test_auth_failures_are_cleared_and_rolled_back_with_their_transaction(
    store: ServerStore,
) -> None:
    """clear_auth_failures forgets the count; both writes obey the transaction: a write
    function that raises leaves the count as it was."""
    store.write(lambda tx: tx.record_auth_failure("alice", now=100, window=60))

    def failing(tx: WriteTx) -> None:
        tx.clear_auth_failures("alice")
        tx.record_auth_failure("bob", now=100, window=60)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.write(failing)
    assert store.auth_failures("alice", now=100) == 1
    assert store.auth_failures("bob", now=100) == 0
    store.write(lambda tx: tx.clear_auth_failures("alice"))
    store.write(lambda tx: tx.clear_auth_failures("nobody"))
    assert store.auth_failures("alice", now=100) == 0


def test_purge_drops_expired_auth_failures(store: ServerStore) -> None:
    """purge_expired also drops failure counts whose window has passed."""
    store.write(lambda tx: tx.record_auth_failure("alice", now=0, window=10))
    store.write(lambda tx: tx.record_auth_failure("bob", now=0, window=100))
    assert store.purge_expired(now=10) == 1
    assert store.auth_failures("bob", now=10) == 1


def _nc(nc: int, window: int = 4) -> Callable[[tuple[int, int] | None], tuple[int, int]]:
    return functools.partial(advance_nc, nc=nc, window=window)


def test_digest_nc_is_a_compare_and_set_kept_until_its_nonce_is_stale(
    store: ServerStore,
) -> None:
    """RFC 7616 §5.4 in the store: advance_digest_nc applies the window rule to the stored
    state; a replayed nc raises with nothing written (the rest of the transaction goes on);
    states are per nonce; purge drops a state only after keep_until."""
    store.write(lambda tx: tx.advance_digest_nc("n1", keep_until=100, advance=_nc(1)))
    store.write(lambda tx: tx.advance_digest_nc("n1", keep_until=100, advance=_nc(3)))
    store.write(lambda tx: tx.advance_digest_nc("n2", keep_until=100, advance=_nc(3)))

    def replay_then_go_on(tx: WriteTx) -> None:
        with pytest.raises(AuthenticationFailed, match="replayed"):
            tx.advance_digest_nc("n1", keep_until=100, advance=_nc(3))
        tx.advance_digest_nc("n1", keep_until=100, advance=_nc(2))  # in the window, unseen

    store.write(replay_then_go_on)
    for replayed in (1, 2, 3):
        with pytest.raises(AuthenticationFailed, match="replayed"):
            store.write(
                lambda tx, nc=replayed: tx.advance_digest_nc("n1", keep_until=100, advance=_nc(nc))
            )
    store.write(lambda tx: tx.advance_digest_nc("n2", keep_until=100, advance=_nc(2)))


def test_digest_nc_states_are_purged_after_keep_until(store: ServerStore) -> None:
    """A nonce's counter state is deleted by purge_expired once keep_until has passed
    (its nonce is then stale by age everywhere), never before."""
    store.write(lambda tx: tx.advance_digest_nc("n1", keep_until=100, advance=_nc(5)))
    assert store.purge_expired(now=100) == 0
    with pytest.raises(AuthenticationFailed):
        store.write(lambda tx: tx.advance_digest_nc("n1", keep_until=100, advance=_nc(5)))
    assert store.purge_expired(now=101) == 1
    store.write(lambda tx: tx.advance_digest_nc("n1", keep_until=200, advance=_nc(5)))


def test_record_digest_nc_is_the_compare_and_set_in_a_transaction_of_its_own(
    store: ServerStore,
) -> None:
    """record_digest_nc (what the server awaits per authenticated request) applies the
    window rule like advance_digest_nc, raises on a replay without writing, and its
    states are purged after keep_until like the others."""

    async def main() -> None:
        await store.record_digest_nc("n1", keep_until=50, advance=_nc(2))
        await store.record_digest_nc("n1", keep_until=50, advance=_nc(1))
        with pytest.raises(AuthenticationFailed, match="replayed"):
            await store.record_digest_nc("n1", keep_until=50, advance=_nc(2))
        await store.record_digest_nc("n1", keep_until=50, advance=_nc(3))

    asyncio.run(main())
    with pytest.raises(AuthenticationFailed):
        store.write(lambda tx: tx.advance_digest_nc("n1", keep_until=50, advance=_nc(3)))
    assert store.purge_expired(now=51) == 1


def test_non_durable_async_writes_commit_like_the_others(store: ServerStore) -> None:
    """write_async(durable=False) commits atomically and visibly, alone or mixed with
    durable writes in one batch; a failing one still raises to its caller only."""

    async def main() -> None:
        await asyncio.gather(
            *(
                store.write_async(
                    lambda tx, i=i: tx.advance_digest_nc(f"n{i}", keep_until=9, advance=_nc(1)),
                    durable=i % 2 == 0,
                )
                for i in range(20)
            ),
            store.write_async(lambda tx: tx.use_nonce(b"durable", expires_at=9)),
        )
        with pytest.raises(AuthenticationFailed):
            await store.write_async(
                lambda tx: tx.advance_digest_nc("n3", keep_until=9, advance=_nc(1)), durable=False
            )
        await store.write_async(lambda tx: tx.use_nonce(b"after", expires_at=9))

    asyncio.run(main())
    assert store.nonce_used(b"durable")
    assert store.nonce_used(b"after")
    assert store.purge_expired(now=10) == 22
