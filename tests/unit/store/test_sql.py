"""SQLStore-specific rules: migrations, Secure Storage sealing, group commit, processes.

The store contract shared with MemoryStore (duplicates, nonces, replies, audit, purge)
is checked on both implementations in test_memory.py.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import cpns.store
from cpns.errors import LocalProtocolError, StoreError
from cpns.store import (
    AuditEvent,
    ConflictError,
    EntityRecord,
    MasterKey,
    NonceReused,
    SQLStore,
    StoredReply,
    TKRecord,
    UserRecord,
    WriteTx,
)
from cpns.store.sql import nonce_digest
from cpns.types import EntityKind

KEY = MasterKey(bytes(range(32)))
OTHER_KEY = MasterKey(bytes(range(1, 33)))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "cpns.db"


@pytest.fixture
def store(db: Path) -> Iterator[SQLStore]:
    s = SQLStore.open(db, master_key=KEY)
    yield s
    s.close()


def raw(db: Path, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run one statement on the file with plain sqlite3, as an attacker with the file would."""
    conn = sqlite3.connect(db, autocommit=True)
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def add_user(store: SQLStore, user_id: str, password_key: bytes = b"P" * 32) -> None:
    store.write(
        lambda tx: tx.add_user(UserRecord(user_id=user_id, password_key=password_key, created_at=1))
    )


#: Schema version after every packaged migration (0001_init.sql ... 000n_*.sql).
LATEST = len(list((Path(cpns.store.__file__).parent / "migrations").glob("0*.sql")))


def test_migrations_create_the_schema_and_reopen_is_idempotent(db: Path) -> None:
    """Opening applies every migration (user_version = their number); reopening applies
    nothing and keeps the rows."""
    assert LATEST >= 3
    with SQLStore.open(db, master_key=KEY) as s:
        assert s.schema_version == LATEST
        add_user(s, "alice")
    tables = {r[0] for r in raw(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {
        "users",
        "entities",
        "tk_records",
        "nonces",
        "replies",
        "audit",
        "meta",
        "auth_failures",
    } <= tables
    assert raw(db, "PRAGMA user_version") == [(LATEST,)]
    assert raw(db, "PRAGMA journal_mode") == [("wal",)]
    with SQLStore.open(db, master_key=KEY) as s:
        assert s.schema_version == LATEST
        assert [u.user_id for u in s.list_users()] == ["alice"]
    assert raw(db, "PRAGMA user_version") == [(LATEST,)]


def test_a_version_1_database_is_migrated_in_place(db: Path) -> None:
    """A database created by the first release (schema 1: only 0001_init.sql) gains every
    later migration on open (auth_failures, the audit count/source columns, ...) and keeps
    its rows: an audit row of then reads back with count 1 and no source."""
    init = (Path(cpns.store.__file__).parent / "migrations" / "0001_init.sql").read_text()
    conn = sqlite3.connect(db, autocommit=True)
    conn.executescript(init)
    conn.execute(
        "INSERT INTO audit (at, actor, procedure, outcome, hop, detail) "
        "VALUES (1, 'admin', 'user-add', 'OK', 'admin', '')"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with SQLStore.open(db, master_key=KEY) as s:
        assert s.schema_version == LATEST
        assert s.auth_failures("alice", now=0) == 0
        [event] = s.audit_events()
        assert (event.actor, event.count, event.source) == ("admin", 1, None)
        add_user(s, "alice")
        assert [u.user_id for u in s.list_users()] == ["alice"]


def test_newer_schema_is_refused(db: Path) -> None:
    """A database migrated by a newer cpns is not opened (StoreError), never downgraded."""
    SQLStore.open(db, master_key=KEY).close()
    raw(db, "PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer"):
        SQLStore.open(db, master_key=KEY)


def test_sqlite_errors_do_not_escape_raw(tmp_path: Path) -> None:
    """A missing directory or a file that is not a database gives StoreError, not sqlite3."""
    with pytest.raises(StoreError):
        SQLStore.open(tmp_path / "missing" / "cpns.db", master_key=KEY)
    junk = tmp_path / "junk.db"
    junk.write_bytes(secrets.token_bytes(8192))
    with pytest.raises(StoreError):
        SQLStore.open(junk, master_key=KEY)


def test_secrets_round_trip_across_reopen(db: Path) -> None:
    """002 §3.2: password key, EUKey chain, TK and reply come back intact after reopening."""
    eukeys = tuple(secrets.token_bytes(32) for _ in range(4))
    tk = secrets.token_bytes(24)
    reply = StoredReply(
        requester="gw-1",
        txid=b"\x00\x01" * 8,
        request_digest=b"\x07" * 32,
        reply=secrets.token_bytes(40),
        created_at=9,
    )
    pne = EntityRecord(
        entity_id="pne-1",
        kind=EntityKind.PNE,
        owner="alice",
        eukeys=eukeys,
        key_index=3,
        assigned_via="gw-1",
        assigned_at=77,
    )

    def setup(tx: WriteTx) -> None:
        tx.add_user(UserRecord(user_id="alice", password_key=b"K" * 32, created_at=5))
        tx.put_entity(pne)
        tx.put_tks([TKRecord(entity_id="pne-1", tk=tk, source="acme.csv", imported_at=3)])
        tx.put_reply(reply)

    with SQLStore.open(db, master_key=KEY) as s:
        s.write(setup)
    with SQLStore.open(db, master_key=KEY) as s:
        assert s.get_entity("pne-1") == pne
        assert s.get_tk("pne-1") == TKRecord(
            entity_id="pne-1", tk=tk, source="acme.csv", imported_at=3
        )
        assert s.get_reply("gw-1", b"\x00\x01" * 8) == reply
        got = s.get_user("alice")
        assert got is not None
        assert got.password_key == b"K" * 32


def test_secrets_are_not_in_the_database_files_in_clear(db: Path) -> None:
    """Secure Storage: no secret (nor a used nonce) appears in the db or WAL bytes or columns."""
    password_key, eukey, tk, reply_bytes = (secrets.token_bytes(32) for _ in range(4))
    nonce = secrets.token_bytes(32)
    s = SQLStore.open(db, master_key=KEY)
    try:
        s.write(
            lambda tx: (
                tx.add_user(UserRecord(user_id="alice", password_key=password_key, created_at=1)),
                tx.put_entity(
                    EntityRecord(
                        entity_id="gw-1", kind=EntityKind.PN_GW, owner="alice", eukeys=(eukey,)
                    )
                ),
                tx.put_tks([TKRecord(entity_id="pne-9", tk=tk)]),
                tx.put_reply(
                    StoredReply(
                        requester="gw-1",
                        txid=b"t" * 16,
                        request_digest=b"d" * 32,
                        reply=reply_bytes,
                        created_at=1,
                    )
                ),
                tx.use_nonce(nonce, expires_at=10),
            )
        )
        secret_values = [password_key, eukey, tk, reply_bytes, nonce]
        files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]
        assert any(p.name.endswith("-wal") for p in files)  # the commit is in the WAL now
        for path in files:
            blob = path.read_bytes()
            for value in secret_values:
                assert value not in blob, f"a secret is in clear in {path.name}"
        columns = raw(
            db,
            "SELECT password_key_sealed FROM users UNION ALL SELECT eukeys_sealed FROM entities "
            "UNION ALL SELECT tk_sealed FROM tk_records UNION ALL SELECT reply_sealed FROM "
            "replies UNION ALL SELECT nonce_hash FROM nonces",
        )
        assert len(columns) == 5
        for (column,) in columns:
            assert isinstance(column, bytes)
            for value in secret_values:
                assert value not in column
        assert raw(db, "SELECT nonce_hash FROM nonces") == [(nonce_digest(nonce),)]
    finally:
        s.close()
    for path in db.parent.iterdir():
        blob = path.read_bytes()
        for value in secret_values:
            assert value not in blob


def test_wrong_master_key_is_refused_at_open(db: Path) -> None:
    """A store opened with another master key fails at start-up, naming both key ids."""
    with SQLStore.open(db, master_key=KEY) as s:
        add_user(s, "alice")
    with pytest.raises(StoreError, match="wrong master key") as info:
        SQLStore.open(db, master_key=OTHER_KEY)
    assert KEY.key_id in str(info.value)
    assert OTHER_KEY.key_id in str(info.value)


def test_row_sealed_under_another_key_does_not_open(db: Path) -> None:
    """A sealed column that does not open under the master key -> StoreError, not a crash."""
    with SQLStore.open(db, master_key=OTHER_KEY) as other:
        add_user(other, "alice")
    foreign = raw(db, "SELECT password_key_sealed FROM users")[0][0]
    db.unlink()
    for leftover in db.parent.iterdir():
        leftover.unlink()
    with SQLStore.open(db, master_key=KEY) as s:
        add_user(s, "alice")
        raw(db, "UPDATE users SET password_key_sealed = ?", (foreign,))
        with pytest.raises(StoreError, match=r"users\.password_key.*master key"):
            s.get_user("alice")


def test_sealed_value_moved_to_another_row_does_not_open(store: SQLStore, db: Path) -> None:
    """Sealing binds the row's primary key: bob's key copied into alice's row -> StoreError."""
    add_user(store, "alice", b"A" * 32)
    add_user(store, "bob", b"B" * 32)
    store.write(lambda tx: tx.put_tks([TKRecord(entity_id="pne-1", tk=b"T" * 16)]))
    raw(
        db,
        "UPDATE users SET password_key_sealed = "
        "(SELECT password_key_sealed FROM users WHERE user_id = 'bob') WHERE user_id = 'alice'",
    )
    with pytest.raises(StoreError, match="'alice'"):
        store.get_user("alice")
    with pytest.raises(StoreError):
        store.list_users()
    bob = store.get_user("bob")
    assert bob is not None
    assert bob.password_key == b"B" * 32
    # Same row key, other column: a TK blob is not an EUKey set either.
    store.write(
        lambda tx: tx.put_entity(
            EntityRecord(entity_id="pne-1", kind=EntityKind.PNE, owner="bob", eukeys=())
        )
    )
    raw(db, "UPDATE entities SET eukeys_sealed = (SELECT tk_sealed FROM tk_records)")
    with pytest.raises(StoreError, match=r"entities\.eukeys"):
        store.get_entity("pne-1")


def test_failing_job_does_not_roll_back_the_others_of_its_commit(store: SQLStore) -> None:
    """Group commit: one job raising in a shared commit loses only its own writes and error."""
    n = 32
    gate = threading.Event()
    started = threading.Barrier(n + 1)
    errors: dict[int, BaseException] = {}

    def job(i: int) -> None:
        def fn(tx: WriteTx) -> int:
            tx.add_user(UserRecord(user_id=f"u{i:02}", password_key=b"P" * 32, created_at=i))
            tx.use_nonce(f"n{i}".encode(), expires_at=1)
            if i == 13:
                raise ValueError("job 13 fails after writing")
            return i

        started.wait()
        try:
            assert store.write(fn) == i
        except BaseException as exc:
            errors[i] = exc

    # Hold the writer on a first job so the others queue up and share the next commit.
    blocker = threading.Thread(target=store.write, args=(lambda tx: gate.wait(10),))
    blocker.start()
    threads = [threading.Thread(target=job, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    before = store.write_stats
    started.wait()
    time.sleep(0.2)
    gate.set()
    for t in [blocker, *threads]:
        t.join(10)
    assert list(errors) == [13]
    assert isinstance(errors[13], ValueError)
    assert [u.user_id for u in store.list_users()] == [f"u{i:02}" for i in range(n) if i != 13]
    assert not store.nonce_used(b"n13")
    assert store.nonce_used(b"n12")
    after = store.write_stats
    assert after.jobs - before.jobs == n + 1
    # All 33 jobs in far fewer commits than jobs: that is group commit.
    assert after.commits - before.commits < n // 2


def test_many_concurrent_writers_with_conflicts(store: SQLStore) -> None:
    """Threads racing on the same nonces: each nonce is accepted exactly once."""
    accepted: list[int] = []
    refused: list[int] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        for i in range(50):
            nonce = f"nonce-{i}".encode()
            try:
                store.write(lambda tx, nonce=nonce: tx.use_nonce(nonce, expires_at=1))
            except NonceReused:
                with lock:
                    refused.append(i)
            else:
                with lock:
                    accepted.append(i)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(accepted) == list(range(50))
    assert len(refused) == 50 * 7


def test_write_async_does_not_block_the_loop(store: SQLStore) -> None:
    """write_async resolves after the commit; meanwhile the event loop keeps running."""

    async def main() -> tuple[list[str], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        gate = threading.Event()
        blocked = store.write_async(lambda tx: gate.wait(5))
        await asyncio.sleep(0.05)  # the writer is held; the loop must still run
        gate.set()
        await blocked
        names = await asyncio.gather(
            *(
                store.write_async(
                    lambda tx, i=i: (
                        tx.add_user(
                            UserRecord(user_id=f"a{i}", password_key=b"P" * 32, created_at=1)
                        ),
                        f"a{i}",
                    )[1]
                )
                for i in range(40)
            )
        )
        with pytest.raises(ConflictError):
            await store.write_async(
                lambda tx: tx.add_user(
                    UserRecord(user_id="a0", password_key=b"x" * 32, created_at=1)
                )
            )
        stop.set()
        await task
        return list(names), ticks

    names, ticks = asyncio.run(main())
    assert names == [f"a{i}" for i in range(40)]
    assert ticks > 10
    assert len(store.list_users()) == 40


def test_cancelled_async_write_that_never_ran_is_dropped(store: SQLStore) -> None:
    """A write_async cancelled while queued is not run; queued jobs after it still commit."""

    async def main() -> None:
        gate = threading.Event()
        first = store.write_async(lambda tx: gate.wait(5))
        await asyncio.sleep(0.05)
        dropped = store.write_async(lambda tx: add_in(tx, "dropped"))
        kept = store.write_async(lambda tx: add_in(tx, "kept"))
        dropped.cancel()
        await asyncio.sleep(0.01)  # the cancellation reaches the writer's queue via the loop
        gate.set()
        await first
        await kept

    def add_in(tx: WriteTx, name: str) -> None:
        tx.add_user(UserRecord(user_id=name, password_key=b"P" * 32, created_at=1))

    asyncio.run(main())
    assert store.get_user("dropped") is None
    assert store.get_user("kept") is not None


def test_two_stores_on_one_file_share_rows(db: Path) -> None:
    """Several server processes over one database: both write, each sees the other's rows."""
    a = SQLStore.open(db, master_key=KEY, busy_timeout=30)
    b = SQLStore.open(db, master_key=KEY, busy_timeout=30)
    try:

        def worker(s: SQLStore, prefix: str) -> None:
            for i in range(25):
                s.write(lambda tx, i=i: tx.use_nonce(f"{prefix}{i}".encode(), expires_at=1))
                s.write(
                    lambda tx, i=i: tx.audit(
                        AuditEvent(at=i, actor=prefix, procedure="p", outcome="OK")
                    )
                )

        threads = [
            threading.Thread(target=worker, args=(s, f"{name}{t}-"))
            for s, name in ((a, "a"), (b, "b"))
            for t in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        add_user(a, "from-a")
        add_user(b, "from-b")
        for s in (a, b):
            assert [u.user_id for u in s.list_users()] == ["from-a", "from-b"]
            assert s.nonce_used(b"a3-24")
            assert s.nonce_used(b"b0-0")
            assert len(s.audit_events(limit=1000)) == 200
        with pytest.raises(NonceReused):
            b.write(lambda tx: tx.use_nonce(b"a1-1", expires_at=1))
    finally:
        a.close()
        b.close()


def test_purge_uses_the_configured_reply_retention(db: Path) -> None:
    """Replies are kept reply_retention seconds (default one day) after created_at."""
    with SQLStore.open(db, master_key=KEY) as s:
        s.write(
            lambda tx: tx.put_reply(
                StoredReply(
                    requester="gw", txid=b"t", request_digest=b"d", reply=b"r", created_at=1000
                )
            )
        )
        assert s.purge_expired(now=1000 + 86400) == 0
        assert s.purge_expired(now=1001 + 86400) == 1


def test_writes_after_a_failed_job_still_work(store: SQLStore) -> None:
    """A job that raises leaves the writer healthy: the next write commits normally."""
    with pytest.raises(ZeroDivisionError):
        store.write(lambda tx: 1 // 0)
    add_user(store, "alice")
    assert store.get_user("alice") is not None


def test_close_is_clean(db: Path) -> None:
    """close() commits pending work, ends the writer and closes every per-thread reader."""
    s = SQLStore.open(db, master_key=KEY)
    add_user(s, "alice")

    def reader() -> None:
        assert s.get_user("alice") is not None

    threads = [threading.Thread(target=reader) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pending = [threading.Thread(target=add_user, args=(s, f"late{i}")) for i in range(5)]
    for t in pending:
        t.start()
    for t in pending:
        t.join()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s.close()
        del threads, pending, reader
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert not [t for t in threading.enumerate() if t.name.startswith("cpns-store-writer")]
    with SQLStore.open(db, master_key=KEY) as again:
        assert len(again.list_users()) == 6
    # Every connection is closed: nothing holds the WAL open, so it was checkpointed away.
    assert not (db.parent / (db.name + "-wal")).exists()


def test_write_from_inside_a_write_function_is_refused(store: SQLStore) -> None:
    """A write function calling write() would deadlock the writer; it is refused instead."""
    with pytest.raises(LocalProtocolError):
        store.write(lambda tx: store.write(lambda tx2: None))
    add_user(store, "alice")
