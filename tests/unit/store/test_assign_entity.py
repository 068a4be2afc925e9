"""assign_entity: an assignment's ownership check and its write are one atomic step.

Issue 5 item 2 (DESIGN §5 "checks and the writes they guard happen in one transaction:
racing claims, one winner"): the service's server machines check an entity's owner and
epoch on a read; ``assign_entity`` writes only if the row is still what was checked.
Every test runs on both stores (in memory and SQLite).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpns.errors import StoreError
from cpns.records import EntityRecord, UserRecord
from cpns.store import MemoryStore, SQLStore
from cpns.store.base import ClaimConflict, ServerStore, WriteTx
from cpns.store.masterkey import MasterKey
from cpns.types import EntityKind

KEY = bytes(range(32))


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerStore]:
    """A store of each implementation (SQLStore on both back ends) with users alice and bob."""
    s: ServerStore
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "sqlite":
        s = SQLStore.open(tmp_path / "cpns.db", master_key=MasterKey(KEY))
    else:
        dsn: str = request.getfixturevalue("pg_dsn")
        s = SQLStore.open(dsn, master_key=MasterKey(KEY))

    def users(tx: WriteTx) -> None:
        for name in ("alice", "bob"):
            tx.add_user(UserRecord(user_id=name, password_key=b"P" * 32, created_at=0))

    s.write(users)
    yield s
    s.close()


def pne(owner: str, epoch: int, key: int = 1) -> EntityRecord:
    return EntityRecord(
        entity_id="pne-1",
        kind=EntityKind.PNE,
        owner=owner,
        eukeys=(bytes([key]) * 32, bytes([key + 1]) * 32),
        key_index=1,
        epoch=epoch,
    )


def test_first_assignment_and_later_ones_advance_the_epoch(store: ServerStore) -> None:
    """D-003-11: epoch 1 at the first assignment, +1 at each later one of the same owner."""
    store.write(lambda tx: tx.assign_entity(pne("alice", 1), expected_epoch=0))
    assert store.get_entity("pne-1") == pne("alice", 1)
    store.write(lambda tx: tx.assign_entity(pne("alice", 2, key=9), expected_epoch=1))
    assert store.get_entity("pne-1") == pne("alice", 2, key=9)


@pytest.mark.parametrize(
    ("stored", "attempt", "expected"),
    [
        # Two first claims: the second saw no row (expected 0), but one is there now.
        pytest.param(pne("alice", 1), pne("bob", 1), 0, id="second-first-claim-other-user"),
        pytest.param(pne("alice", 1), pne("alice", 1, key=5), 0, id="second-first-claim-same-user"),
        # A re-assignment checked against epoch 1 while another one already made it 2.
        pytest.param(pne("alice", 2), pne("alice", 2, key=5), 1, id="stale-epoch"),
        pytest.param(pne("alice", 1), pne("bob", 2), 1, id="owner-changed"),
    ],
)
def test_a_claim_that_lost_the_race_writes_nothing(
    store: ServerStore, stored: EntityRecord, attempt: EntityRecord, expected: int
) -> None:
    """Issue 5 item 2: the write happens only if the row is still the one checked;
    otherwise ClaimConflict and the stored entity is untouched."""
    store.write(lambda tx: tx.put_entity(stored))
    with pytest.raises(ClaimConflict):
        store.write(lambda tx: tx.assign_entity(attempt, expected_epoch=expected))
    assert store.get_entity("pne-1") == stored


def test_revoked_or_other_kind_is_never_overwritten(store: ServerStore) -> None:
    """A revoked entity, or one of another kind, is not re-assigned by a racing write."""
    revoked = EntityRecord(
        entity_id="pne-1", kind=EntityKind.PNE, owner="alice", revoked=True, epoch=1
    )
    store.write(lambda tx: tx.put_entity(revoked))
    with pytest.raises(ClaimConflict):
        store.write(lambda tx: tx.assign_entity(pne("alice", 2), expected_epoch=1))
    gateway = EntityRecord(entity_id="gw-1", kind=EntityKind.PN_GW, owner="alice", epoch=1)
    store.write(lambda tx: tx.put_entity(gateway))
    as_pne = EntityRecord(
        entity_id="gw-1", kind=EntityKind.PNE, owner="alice", eukeys=(b"k" * 32,), epoch=2
    )
    with pytest.raises(ClaimConflict):
        store.write(lambda tx: tx.assign_entity(as_pne, expected_epoch=1))
    assert store.get_entity("pne-1") == revoked
    assert store.get_entity("gw-1") == gateway


def test_epoch_must_follow_the_expected_one(store: ServerStore) -> None:
    """The caller states the epoch it checked; the new one is exactly that plus one."""
    with pytest.raises(StoreError, match="epoch"):
        store.write(lambda tx: tx.assign_entity(pne("alice", 3), expected_epoch=0))


def test_many_concurrent_first_claims_have_one_winner(store: ServerStore) -> None:
    """Issue 5 item 2: 32 threads claim one new Entity ID at once (each having checked
    that it was free): exactly one write lands and the entity is the winner's."""
    barrier = threading.Barrier(32)
    outcomes: list[str] = []
    lock = threading.Lock()

    def claim(i: int) -> None:
        owner = "alice" if i % 2 else "bob"
        barrier.wait()
        try:
            store.write(lambda tx: tx.assign_entity(pne(owner, 1, key=i), expected_epoch=0))
            result = f"won:{i}"
        except ClaimConflict:
            result = "lost"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1
    assert outcomes.count("lost") == 31
    i = int(winners[0].split(":")[1])
    assert store.get_entity("pne-1") == pne("alice" if i % 2 else "bob", 1, key=i)
