"""Bulk writes (issue 7 item 3): rows sealed before the transaction, inserted in batches
(executemany on SQLite, COPY on PostgreSQL), all or nothing, on both back ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cpns.errors import StoreError
from cpns.records import EntityRecord, TKRecord, UserRecord
from cpns.store import ConflictError, MasterKey, SQLStore, bulk
from cpns.types import EntityKind

KEY = MasterKey(bytes(range(32)))


@pytest.fixture
def store(store_target: str) -> Iterator[SQLStore]:
    with SQLStore.open(store_target, master_key=KEY) as s:
        yield s


def test_more_than_one_batch_is_written_and_reads_back(store: SQLStore) -> None:
    """BATCH + 1 users and as many PN GWs: every batch lands, each secret opens under
    the master key bound to its own row, progress adds up per phase."""
    n = bulk.BATCH + 1
    users = [
        UserRecord(user_id=f"u{i}", password_key=i.to_bytes(32), created_at=1) for i in range(n)
    ]
    seen: dict[str, int] = {}

    def progress(phase: str, rows: int, total: int) -> None:
        seen[phase] = seen.get(phase, 0) + rows

    assert bulk.import_users(store, users, progress=progress) == n
    assert seen == {"sealing": n, "writing": n}
    entities = [
        EntityRecord(
            entity_id=f"gw-{i}",
            kind=EntityKind.PN_GW,
            owner=f"u{i}",
            eukeys=(i.to_bytes(32),),
            key_index=1,
        )
        for i in range(n)
    ]
    assert bulk.import_entities(store, entities) == n
    last = store.get_entity(f"gw-{n - 1}")
    assert last is not None
    assert last.eukey == (n - 1).to_bytes(32)
    user = store.get_user("u7")
    assert user is not None
    assert user.password_key == (7).to_bytes(32)


def test_an_existing_row_refuses_the_whole_import(store: SQLStore) -> None:
    """A TK record already in the database makes the import refused, naming it, and none
    of the other records is written; a duplicate inside the batch is refused too."""
    bulk.import_tks(store, [TKRecord(entity_id="pne-5", tk=b"a" * 32)])
    batch = [TKRecord(entity_id=f"pne-{i}", tk=b"b" * 32) for i in range(10)]
    with pytest.raises(ConflictError, match="'pne-5' already exists"):
        bulk.import_tks(store, batch)
    assert store.get_tk("pne-0") is None
    with pytest.raises(ConflictError, match="twice"):
        bulk.import_tks(store, [batch[0], batch[0]])


def test_an_entity_of_an_unknown_owner_is_refused(store: SQLStore) -> None:
    """The foreign key holds in bulk too: an entity whose owner is not a user is a
    StoreError, and nothing is written."""
    with pytest.raises(StoreError, match="unknown user"):
        bulk.import_entities(
            store,
            [EntityRecord(entity_id="gw-x", kind=EntityKind.PN_GW, owner="nobody")],
        )
    assert store.get_entity("gw-x") is None


def test_names_spliced_into_sql_are_checked() -> None:
    """Table and column names go into statements as text: anything but a plain lowercase
    name is refused."""
    with pytest.raises(StoreError):
        bulk.ident("users; DROP TABLE users")
