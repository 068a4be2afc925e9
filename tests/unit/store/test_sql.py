"""SQLStore-specific rules: migrations, Secure Storage sealing, group commit, processes.

Every rule that is not about SQLite's files runs on both back ends through the
parametrized ``backend`` fixture (SQLite, and a fresh database of the session's real
PostgreSQL cluster); the few SQLite-file and PostgreSQL-connection rules have their own
tests. The store contract shared with MemoryStore (duplicates, nonces, replies, audit,
purge) is checked on every implementation in test_memory.py.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import secrets
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from tests.metrics import sample
from tests.postgres import PGCluster
from tests.postgres import raw as pg_raw

import cpns.store
from cpns.errors import AuthenticationFailed, LocalProtocolError, StoreError
from cpns.protocol.digest import advance_nc
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


def raw(db: Path, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run one statement on the file with plain sqlite3, as an attacker with the file would."""
    conn = sqlite3.connect(db, autocommit=True)
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


@dataclass
class Backend:
    """Where a test's store lives, and raw access to it as an attacker with the database
    (or a DBA) would have: a SQLite file, or a database of the session's PostgreSQL."""

    name: str
    #: What SQLStore.open is given.
    target: str
    #: A second, empty database of the same kind.
    other_target: str

    def raw(self, query: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement with ``?`` placeholders, outside the store."""
        if self.name == "sqlite":
            return raw(Path(self.target), query, params)
        return [tuple(r) for r in pg_raw(self.target, query.replace("?", "%s"), params)]

    def tables(self) -> set[str]:
        if self.name == "sqlite":
            return {r[0] for r in self.raw("SELECT name FROM sqlite_master WHERE type = 'table'")}
        query = "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        return {r[0] for r in self.raw(query)}

    def schema_version(self) -> int:
        if self.name == "sqlite":
            return int(self.raw("PRAGMA user_version")[0][0])
        return int(self.raw("SELECT MAX(version) FROM schema_version")[0][0])

    def set_schema_version(self, version: int) -> None:
        if self.name == "sqlite":
            self.raw(f"PRAGMA user_version = {version}")
        else:
            self.raw("UPDATE schema_version SET version = ?", (version,))

    def create_version_1(self) -> None:
        """The schema as the first release left it: only migration 0001 applied."""
        folder = Path(cpns.store.__file__).parent / "migrations"
        if self.name == "sqlite":
            conn = sqlite3.connect(self.target, autocommit=True)
            conn.executescript((folder / "0001_init.sql").read_text())
            conn.execute("PRAGMA user_version = 1")
            conn.close()
        else:
            script = (folder / "postgresql" / "0001_init.sql").read_text()
            self.raw(script)
            self.raw("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            self.raw("INSERT INTO schema_version (version) VALUES (1)")

    def open_connections(self) -> int:
        """Connections the store left open (SQLite: a WAL file means a connection was
        never closed, since the last close checkpoints and removes it)."""
        if self.name == "sqlite":
            return int((Path(self.target).parent / (Path(self.target).name + "-wal")).exists())
        dbname = self.target.rsplit("/", 1)[1]
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = ? "
            "AND application_name = 'cpns-server'"
        )
        deadline = time.monotonic() + 5  # a backend exits a moment after its client left
        while (count := int(self.raw(query, (dbname,))[0][0])) and time.monotonic() < deadline:
            time.sleep(0.05)
        return count


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each back end in turn: two SQLite files, or two fresh PostgreSQL databases."""
    if request.param == "sqlite":
        yield Backend("sqlite", str(tmp_path / "cpns.db"), str(tmp_path / "other.db"))
        return
    cluster: PGCluster = request.getfixturevalue("pg_cluster")
    with ExitStack() as stack:
        first = stack.enter_context(cluster.database())
        second = stack.enter_context(cluster.database())
        yield Backend("postgresql", first, second)


@pytest.fixture
def store(backend: Backend) -> Iterator[SQLStore]:
    s = SQLStore.open(backend.target, master_key=KEY)
    yield s
    s.close()


def add_user(store: SQLStore, user_id: str, password_key: bytes = b"P" * 32) -> None:
    store.write(
        lambda tx: tx.add_user(UserRecord(user_id=user_id, password_key=password_key, created_at=1))
    )


#: Schema version after every packaged migration (0001_init.sql ... 000n_*.sql): the
#: highest number (numbers may have gaps).
LATEST = max(
    int(p.name[:4]) for p in (Path(cpns.store.__file__).parent / "migrations").glob("0*.sql")
)


def test_migrations_create_the_schema_and_reopen_is_idempotent(backend: Backend) -> None:
    """Opening applies every migration (user_version, or schema_version on PostgreSQL = their
    number); reopening applies nothing and keeps the rows."""
    assert LATEST >= 3
    with SQLStore.open(backend.target, master_key=KEY) as s:
        assert s.schema_version == LATEST
        add_user(s, "alice")
    tables = backend.tables()
    assert {
        "users",
        "entities",
        "tk_records",
        "nonces",
        "replies",
        "audit",
        "meta",
        "auth_failures",
        "digest_nc",
    } <= tables
    assert backend.schema_version() == LATEST
    with SQLStore.open(backend.target, master_key=KEY) as s:
        assert s.schema_version == LATEST
        assert [u.user_id for u in s.list_users()] == ["alice"]
    assert backend.schema_version() == LATEST


def test_sqlite_store_runs_in_wal_mode(db: Path) -> None:
    """SQLite: the file is in WAL mode (readers never block the writer, DESIGN §8)."""
    SQLStore.open(db, master_key=KEY).close()
    assert raw(db, "PRAGMA journal_mode") == [("wal",)]


def test_both_back_ends_have_the_same_migrations_and_columns(pg_dsn: str, db: Path) -> None:
    """Each SQLite migration has a PostgreSQL variant of the same number and name, and the
    migrated schemas have the same tables and columns in the same order."""
    folder = Path(cpns.store.__file__).parent / "migrations"
    assert sorted(p.name for p in folder.glob("0*.sql")) == sorted(
        p.name for p in (folder / "postgresql").glob("0*.sql")
    )
    SQLStore.open(db, master_key=KEY).close()
    SQLStore.open(pg_dsn, master_key=KEY).close()
    tables = [r[0] for r in raw(db, "SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        if table.startswith("sqlite_"):
            continue
        lite = [r[1] for r in raw(db, f"PRAGMA table_info({table})")]
        query = (
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
            "ORDER BY ordinal_position"
        )
        pg = [r[0] for r in pg_raw(pg_dsn, query, (table,))]
        assert lite == pg, table


def test_a_version_1_database_is_migrated_in_place(backend: Backend) -> None:
    """A database created by the first release (schema 1: only 0001_init.sql) gains every
    later migration on open (auth_failures, the audit count/source columns, ...) and keeps
    its rows: an audit row of then reads back with count 1 and no source."""
    backend.create_version_1()
    backend.raw(
        "INSERT INTO audit (at, actor, procedure, outcome, hop, detail) "
        "VALUES (1, 'admin', 'user-add', 'OK', 'admin', '')"
    )
    with SQLStore.open(backend.target, master_key=KEY) as s:
        assert s.schema_version == LATEST
        assert s.auth_failures("alice", now=0) == 0
        [event] = s.audit_events()
        assert (event.actor, event.count, event.source) == ("admin", 1, None)
        add_user(s, "alice")
        assert [u.user_id for u in s.list_users()] == ["alice"]


def test_an_audit_flow_id_of_another_length_is_refused_by_the_schema(backend: Backend) -> None:
    """0006_flow_id.sql: the audit table's flow_id column holds 16 hex digits or NULL; the
    schema refuses any other length (StoreError from the store)."""
    with SQLStore.open(backend.target, master_key=KEY) as s:
        bad = AuditEvent(at=1, actor="x", procedure="p", outcome="OK", flow_id="abc")
        with pytest.raises(StoreError):
            s.write(lambda tx: tx.audit(bad))
        assert s.audit_events() == []


def test_migration_numbers_may_have_gaps(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Migrations written in parallel take their own numbers: a gap in the packaged numbers
    is accepted, every migration above the recorded version runs, and the version recorded
    is the highest number."""
    import cpns.store.sql as sql

    real = sql._migrations

    def with_gap(dialect: Any) -> list[tuple[int, str, str]]:
        found = real(dialect)
        return [*found, (LATEST + 5, f"{LATEST + 5:04d}_gap.sql", "CREATE TABLE gap (x INTEGER)")]

    monkeypatch.setattr(sql, "_migrations", with_gap)
    with SQLStore.open(backend.target, master_key=KEY) as s:
        assert s.schema_version == LATEST + 5
    assert "gap" in backend.tables()
    assert backend.schema_version() == LATEST + 5


def test_newer_schema_is_refused(backend: Backend) -> None:
    """A database migrated by a newer cpns is not opened (StoreError), never downgraded."""
    SQLStore.open(backend.target, master_key=KEY).close()
    backend.set_schema_version(99)
    with pytest.raises(StoreError, match="newer"):
        SQLStore.open(backend.target, master_key=KEY)
    assert backend.schema_version() == 99


def test_sqlite_errors_do_not_escape_raw(tmp_path: Path) -> None:
    """A missing directory or a file that is not a database gives StoreError, not sqlite3."""
    with pytest.raises(StoreError):
        SQLStore.open(tmp_path / "missing" / "cpns.db", master_key=KEY)
    junk = tmp_path / "junk.db"
    junk.write_bytes(secrets.token_bytes(8192))
    with pytest.raises(StoreError):
        SQLStore.open(junk, master_key=KEY)


def test_postgresql_errors_are_store_errors_and_never_show_the_password(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong password or an unknown database gives StoreError (not a psycopg error), and
    the DSN's password appears in no message, repr or log line; the redacted DSN does."""
    password = urlsplit(pg_dsn).password
    assert password
    caplog.set_level(logging.DEBUG)
    wrong = pg_dsn.replace(f":{password}@", ":not-the-password@")
    missing = pg_dsn.rsplit("/", 1)[0] + "/no_such_database"
    for target in (wrong, missing):
        with pytest.raises(StoreError) as info:
            SQLStore.open(target, master_key=KEY, busy_timeout=5)
        assert "***" in str(info.value)
        assert "not-the-password" not in str(info.value)
        assert password not in str(info.value)
    with SQLStore.open(pg_dsn, master_key=KEY) as s:
        add_user(s, "alice")
        assert password not in repr(s)
        assert "***" in repr(s)
        assert s.backend == "postgresql"
    assert caplog.records
    for record in caplog.records:
        assert password not in record.getMessage()
        assert "not-the-password" not in record.getMessage()


def test_secrets_are_not_in_the_postgresql_files_in_clear(
    pg_cluster: PGCluster, pg_dsn: str
) -> None:
    """Secure Storage on PostgreSQL: after a checkpoint, no secret (nor a used nonce) is in
    any file of the cluster (tables, indexes, WAL), and the columns hold only sealed bytes."""
    password_key, eukey, tk, reply_bytes = (secrets.token_bytes(32) for _ in range(4))
    nonce = secrets.token_bytes(32)
    started = time.time() - 2  # WAL segments written since then hold this test's commits
    with SQLStore.open(pg_dsn, master_key=KEY) as s:
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
    pg_raw(pg_cluster.admin_dsn, "CHECKPOINT")
    [(oid,)] = pg_raw(
        pg_cluster.admin_dsn,
        "SELECT oid FROM pg_database WHERE datname = %s",
        (pg_dsn.rsplit("/", 1)[1],),
    )
    data = pg_cluster.directory / "data"
    files = [p for p in (data / "base" / str(oid)).iterdir() if p.is_file()]
    files += [
        p for p in (data / "pg_wal").iterdir() if p.is_file() and p.stat().st_mtime >= started
    ]
    assert len(files) > 10
    sealed = pg_raw(pg_dsn, "SELECT password_key_sealed FROM users")[0][0]
    seen_sealed = False
    for path in files:
        blob = path.read_bytes()
        seen_sealed = seen_sealed or sealed in blob
        for value in secret_values:
            assert value not in blob, f"a secret is in clear in {path}"
    assert seen_sealed  # the rows really are in the files searched
    assert pg_raw(pg_dsn, "SELECT nonce_hash FROM nonces") == [(nonce_digest(nonce),)]


def test_secrets_round_trip_across_reopen(backend: Backend) -> None:
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

    with SQLStore.open(backend.target, master_key=KEY) as s:
        s.write(setup)
    with SQLStore.open(backend.target, master_key=KEY) as s:
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


def test_wrong_master_key_is_refused_at_open(backend: Backend) -> None:
    """A store opened with another master key fails at start-up, naming both key ids."""
    with SQLStore.open(backend.target, master_key=KEY) as s:
        add_user(s, "alice")
    with pytest.raises(StoreError, match="wrong master key") as info:
        SQLStore.open(backend.target, master_key=OTHER_KEY)
    assert KEY.key_id in str(info.value)
    assert OTHER_KEY.key_id in str(info.value)


def test_row_sealed_under_another_key_does_not_open(backend: Backend) -> None:
    """A sealed column that does not open under the master key -> StoreError, not a crash."""
    with SQLStore.open(backend.other_target, master_key=OTHER_KEY) as other:
        add_user(other, "alice")
    other_db = Backend(backend.name, backend.other_target, backend.target)
    foreign = other_db.raw("SELECT password_key_sealed FROM users")[0][0]
    with SQLStore.open(backend.target, master_key=KEY) as s:
        add_user(s, "alice")
        backend.raw("UPDATE users SET password_key_sealed = ?", (foreign,))
        with pytest.raises(StoreError, match=r"users\.password_key.*master key"):
            s.get_user("alice")


def test_sealed_value_moved_to_another_row_does_not_open(store: SQLStore, backend: Backend) -> None:
    """Sealing binds the row's primary key: bob's key copied into alice's row -> StoreError."""
    add_user(store, "alice", b"A" * 32)
    add_user(store, "bob", b"B" * 32)
    store.write(lambda tx: tx.put_tks([TKRecord(entity_id="pne-1", tk=b"T" * 16)]))
    backend.raw(
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
    backend.raw("UPDATE entities SET eukeys_sealed = (SELECT tk_sealed FROM tk_records)")
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


def test_two_stores_on_one_database_share_rows(backend: Backend) -> None:
    """Several server processes over one database: both write, each sees the other's rows."""
    a = SQLStore.open(backend.target, master_key=KEY, busy_timeout=30)
    b = SQLStore.open(backend.target, master_key=KEY, busy_timeout=30)
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


def test_two_stores_racing_on_one_digest_nonce_accept_each_nc_once(backend: Backend) -> None:
    """RFC 7616 §5.4 across processes: two stores over one database (two server
    processes) record the same nonce concurrently. Each (nonce, nc) sent to both is
    accepted by exactly one; distinct nc values inside the window are all accepted (the
    compare and set retries a lost race instead of refusing it). Through
    record_digest_nc, the path the server takes (SQLite: the writer; PostgreSQL: a pooled
    connection, in parallel)."""
    a = SQLStore.open(backend.target, master_key=KEY, busy_timeout=30)
    b = SQLStore.open(backend.target, master_key=KEY, busy_timeout=30)
    accepted: list[tuple[str, int]] = []
    refused: list[tuple[str, int]] = []
    lock = threading.Lock()

    def record(s: SQLStore, nc: int) -> None:
        advance = functools.partial(advance_nc, nc=nc, window=64)

        async def main() -> None:
            await s.record_digest_nc("nonce", keep_until=9, advance=advance)

        try:
            asyncio.run(main())  # the server's path: record_digest_nc on an event loop
        except AuthenticationFailed:
            with lock:
                refused.append(("a" if s is a else "b", nc))
        else:
            with lock:
                accepted.append(("a" if s is a else "b", nc))

    try:
        threads = [
            threading.Thread(target=record, args=(s, nc)) for nc in range(1, 41) for s in (a, b)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(nc for _, nc in accepted) == list(range(1, 41))
        assert sorted(nc for _, nc in refused) == list(range(1, 41))
        [(highest,)] = backend.raw("SELECT highest FROM digest_nc WHERE nonce = 'nonce'")
        assert highest == 40
    finally:
        a.close()
        b.close()


def test_purge_uses_the_configured_reply_retention(backend: Backend) -> None:
    """Replies are kept reply_retention seconds (default one day) after created_at."""
    with SQLStore.open(backend.target, master_key=KEY) as s:
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


def test_close_is_clean(backend: Backend) -> None:
    """close() commits pending work, ends the writer and closes every reader connection
    (per thread on SQLite, pooled on PostgreSQL)."""
    s = SQLStore.open(backend.target, master_key=KEY)
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
    with SQLStore.open(backend.target, master_key=KEY) as again:
        assert len(again.list_users()) == 6
    # Every connection is closed (SQLite: nothing holds the WAL open, so it was
    # checkpointed away; PostgreSQL: the server has no cpns session on the database).
    assert backend.open_connections() == 0


def test_write_from_inside_a_write_function_is_refused(store: SQLStore) -> None:
    """A write function calling write() would deadlock the writer; it is refused instead."""
    with pytest.raises(LocalProtocolError):
        store.write(lambda tx: store.write(lambda tx2: None))
    add_user(store, "alice")


# -- operator metrics (docs/metrics.md) --------------------------------------------------


def test_group_commit_batches_are_measured(store: SQLStore, backend: Backend) -> None:
    """docs/metrics.md: each committed transaction of the writer is observed once in
    cpns_store_commit_batch_size (its number of write functions) and once in
    cpns_store_commit_duration_seconds, labelled with the back end."""
    n = 5
    labels = {"backend": backend.name}

    def batch(suffix: str, **extra: str) -> float:
        return sample("cpns_store_commit_batch_size" + suffix, **labels, **extra)

    before = (
        batch("_count"),
        batch("_sum"),
        batch("_bucket", le="4.0"),
        batch("_bucket", le="8.0"),
    )
    durations = sample("cpns_store_commit_duration_seconds_count", **labels)

    async def scenario() -> None:
        running, gate = threading.Event(), threading.Event()

        def hold(tx: WriteTx) -> None:
            running.set()
            gate.wait(30)

        # The writer runs the first job alone; the next n queue up behind it and share
        # the next commit.
        first = asyncio.ensure_future(store.write_async(hold))
        await asyncio.to_thread(running.wait, 30)
        rest = [
            store.write_async(lambda tx, i=i: tx.use_nonce(f"m{i}".encode(), expires_at=1))
            for i in range(n)
        ]
        gate.set()
        await asyncio.gather(first, *rest)

    asyncio.run(scenario())
    after = (batch("_count"), batch("_sum"), batch("_bucket", le="4.0"), batch("_bucket", le="8.0"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, n + 1, 1, 2]
    assert sample("cpns_store_commit_duration_seconds_count", **labels) == durations + 2


def test_a_lost_transaction_is_counted_as_a_commit_failure(pg_dsn: str) -> None:
    """docs/metrics.md: a write transaction the database loses as a whole (here the
    PostgreSQL server ends the writer's connection) counts once in
    cpns_store_commit_failures_total and in no batch."""
    store = SQLStore.open(pg_dsn, master_key=KEY)
    try:
        store.write(lambda tx: tx.use_nonce(b"warm", expires_at=1))
        failures = sample("cpns_store_commit_failures_total", backend="postgresql")
        batches = sample("cpns_store_commit_batch_size_count", backend="postgresql")
        pg_raw(
            pg_dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        with pytest.raises(StoreError):
            store.write(lambda tx: tx.use_nonce(b"lost", expires_at=1))
        assert sample("cpns_store_commit_failures_total", backend="postgresql") == failures + 1
        assert sample("cpns_store_commit_batch_size_count", backend="postgresql") == batches
    finally:
        store.close()


def test_the_writer_reconnects_after_postgresql_lost_its_connection(pg_dsn: str) -> None:
    """Issue 7 (PostgreSQL restarted mid-load: the server recovers by itself): once the
    database ends the writer's connection, the write in flight fails with StoreError (the
    server answers 503, its clients retry) and the next write runs on a new connection
    and is stored; nothing written before is lost."""
    store = SQLStore.open(pg_dsn, master_key=KEY)
    try:
        store.write(lambda tx: tx.use_nonce(b"before", expires_at=10))
        pg_raw(
            pg_dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        with pytest.raises(StoreError):
            store.write(lambda tx: tx.use_nonce(b"lost", expires_at=10))
        store.write(lambda tx: tx.use_nonce(b"after", expires_at=10))
        assert store.nonce_used(b"before")
        assert store.nonce_used(b"after")
        assert not store.nonce_used(b"lost")
    finally:
        store.close()


def test_ping_reads_the_store(backend: Backend) -> None:
    """/readyz (docs/metrics.md): ping() succeeds on a reachable store and raises
    StoreError, naming the database without a password, once it cannot be read."""
    store = SQLStore.open(backend.target, master_key=KEY)
    try:
        store.ping()
    finally:
        store.close()
    with pytest.raises(StoreError, match="closed"):
        store.ping()


def test_ping_fails_when_the_sqlite_file_is_gone(db: Path) -> None:
    """/readyz: a SQLite file that disappears under a running store (a volume unmounted)
    fails the next ping, and the ping does not create an empty file in its place."""
    store = SQLStore.open(db, master_key=KEY)
    try:
        store.ping()
        for path in db.parent.glob(db.name + "*"):
            path.rename(path.with_name("moved-" + path.name))
        with pytest.raises(StoreError, match="cannot read store"):
            store.ping()
        assert not db.exists()
    finally:
        store.close()
