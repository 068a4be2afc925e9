"""The store side of PN Establishment (issue 6 items 2, 5 and 6; 002 §7.5.4, 000), checked on
every implementation (memory, SQLite, PostgreSQL) through the parametrized ``store``
fixture: the pending state of an establishment keyed (gw_id, est_id) and purged after its
expiry, the PN inventory (members and failures, never another user's PN), and the
compare-and-set advances of the TK ratchet step and the EUKey chain index that keep the
ratcheted state from being lost or moved twice (N1). SQL-only rules (sealing at rest,
several processes on one database, migration of an older database) follow at the end."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.unit.store.test_sql import Backend

from cpns.errors import StoreError
from cpns.records import FLOW_NONE, FLOW_RAND_HASH, FLOW_TK, MEMBER
from cpns.store import (
    AuditEvent,
    ConflictError,
    EntityRecord,
    MasterKey,
    MemoryStore,
    PendingEntry,
    PendingEstablishment,
    PNMember,
    PNRecord,
    ServerStore,
    SQLStore,
    TKRecord,
    UserRecord,
    WriteTx,
)
from cpns.store.base import ClaimConflict
from cpns.types import EntityKind

KEY = MasterKey(bytes(range(32)))
EST = b"\x01" * 16
LOCAL_EUKEY = b"\x4c" * 32


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerStore]:
    """A fresh store of each implementation, with alice (pne-1 holding a 3-key chain at
    index 1 and a TK at step 0) and bob."""
    s: ServerStore
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "sqlite":
        s = SQLStore.open(tmp_path / "cpns.db", master_key=KEY)
    else:
        s = SQLStore.open(request.getfixturevalue("pg_dsn"), master_key=KEY)

    def setup(tx: WriteTx) -> None:
        for user_id in ("alice", "bob"):
            tx.add_user(UserRecord(user_id=user_id, password_key=b"P" * 32, created_at=1))
        tx.put_entity(
            EntityRecord(
                entity_id="pne-1",
                kind=EntityKind.PNE,
                owner="alice",
                eukeys=(b"1" * 32, b"2" * 32, b"3" * 32),
                key_index=1,
                assigned_via="gw-alice",
                epoch=1,
            )
        )
        tx.put_tks([TKRecord(entity_id="pne-1", tk=b"T" * 32, source="m.csv", imported_at=5)])

    s.write(setup)
    yield s
    s.close()


def pending(
    est_id: bytes = EST, *, gw_id: str = "gw-alice", expires_at: int = 1300
) -> PendingEstablishment:
    return PendingEstablishment(
        gw_id=gw_id,
        est_id=est_id,
        pn_id="pn-home",
        rand_server=b"R" * 32,
        created_at=1000,
        expires_at=expires_at,
        entries=(
            PendingEntry(pne_id="pne-1", rand_pne=b"a" * 32, flow=FLOW_TK, tk_step=0, key_index=1),
            PendingEntry(
                pne_id="pne-2", rand_pne=b"b" * 32, flow=FLOW_RAND_HASH, local_eukey=LOCAL_EUKEY
            ),
            PendingEntry(
                pne_id="pne-9", rand_pne=b"c" * 32, flow=FLOW_NONE, status="UNKNOWN_ENTITY"
            ),
        ),
    )


def result(
    pne_id: str, status: str = MEMBER, flow: str = FLOW_RAND_HASH, at: int = 1010
) -> PNMember:
    return PNMember(pne_id=pne_id, flow=flow, status=status, at=at)


def record(
    store: ServerStore,
    *results: PNMember,
    pn_id: str = "pn-home",
    gateway_id: str = "gw-alice",
    owner: str = "alice",
    now: int = 1010,
) -> PNRecord:
    store.write(lambda tx: tx.record_pn(pn_id, gateway_id, owner, now, list(results)))
    pn = store.get_pn(pn_id)
    assert pn is not None
    return pn


# -- pending establishments ---------------------------------------------------------------


def test_pending_establishment_round_trips_and_hides_its_secrets(store: ServerStore) -> None:
    """Pending state (between 44 and 47) is one record keyed (gw_id, est_id) holding pn_id,
    rand_server, the times and every per-PNE entry (refused ones with their status); it
    reads back equal; its repr shows no rand or LocalEUKey; another key reads None."""
    store.write(lambda tx: tx.put_establishment(pending()))
    got = store.get_establishment("gw-alice", EST)
    assert got == pending()
    assert got is not None
    entry = got.entry("pne-2")
    assert entry is not None
    assert entry.local_eukey == LOCAL_EUKEY
    assert got.entry("nobody") is None
    for text in (repr(got), repr(got.entries)):
        assert LOCAL_EUKEY.hex() not in text
        assert repr(LOCAL_EUKEY) not in text
        assert repr(b"R" * 32) not in text
        assert repr(b"a" * 32) not in text
    assert store.get_establishment("gw-bob", EST) is None
    assert store.get_establishment("gw-alice", b"\x02" * 16) is None


def test_a_pending_establishment_key_is_stored_once(store: ServerStore) -> None:
    """A second put under the same (gw_id, est_id) is a ConflictError and keeps the first;
    the same est_id under another PN GW is another establishment; est_id is 16 bytes."""
    store.write(lambda tx: tx.put_establishment(pending()))
    other = PendingEstablishment(
        gw_id="gw-alice", est_id=EST, pn_id="pn-x", rand_server=b"X" * 32, created_at=1,
        expires_at=2,
    )  # fmt: skip
    with pytest.raises(ConflictError):
        store.write(lambda tx: tx.put_establishment(other))
    assert store.get_establishment("gw-alice", EST) == pending()
    store.write(lambda tx: tx.put_establishment(pending(gw_id="gw-bob")))
    assert store.get_establishment("gw-bob", EST) == pending(gw_id="gw-bob")
    with pytest.raises(StoreError, match="16 bytes"):
        store.write(lambda tx: tx.put_establishment(pending(b"short")))


def test_deleting_a_pending_establishment_has_one_winner(store: ServerStore) -> None:
    """pn-design "Server rules": the pending row is deleted when 48 is committed; a second
    delete (a different 47 for a finished est_id, or a second process) is a ClaimConflict,
    so of two processes finishing one establishment exactly one commits."""
    store.write(lambda tx: tx.put_establishment(pending()))
    store.write(lambda tx: tx.delete_establishment("gw-alice", EST))
    assert store.get_establishment("gw-alice", EST) is None
    with pytest.raises(ClaimConflict):
        store.write(lambda tx: tx.delete_establishment("gw-alice", EST))


def test_the_second_half_is_one_transaction(store: ServerStore) -> None:
    """pn-design "Server rules": on 47 the inventory, the TK/index advances and the pending
    deletion are ONE transaction: when a compare and set loses (the TK moved meanwhile),
    nothing of it is written (the establishment is still pending, no PN recorded)."""
    store.write(lambda tx: tx.put_establishment(pending()))

    def finish(tx: WriteTx) -> None:
        tx.delete_establishment("gw-alice", EST)
        tx.record_pn("pn-home", "gw-alice", "alice", 1010, [result("pne-1", flow=FLOW_TK)])
        tx.set_key_index("pne-1", 2, expected_index=1)
        tx.set_tk_state("pne-1", b"U" * 32, 6, expected_step=5)  # the store is at step 0

    with pytest.raises(ClaimConflict):
        store.write(finish)
    assert store.get_establishment("gw-alice", EST) == pending()
    assert store.get_pn("pn-home") is None
    entity = store.get_entity("pne-1")
    assert entity is not None
    assert entity.key_index == 1
    tk = store.get_tk("pne-1")
    assert tk is not None
    assert (tk.tk, tk.tk_step) == (b"T" * 32, 0)


def test_purge_drops_expired_establishments_only(store: ServerStore) -> None:
    """pn-design: pending state expires (300 s); purge_expired drops those whose
    expires_at has passed and keeps the others."""
    store.write(lambda tx: tx.put_establishment(pending(expires_at=1300)))
    store.write(lambda tx: tx.put_establishment(pending(b"\x02" * 16, expires_at=1600)))
    assert not pending(expires_at=1300).expired(1300)
    assert pending(expires_at=1300).expired(1301)
    assert store.purge_expired(now=1300) == 0  # expires_at < now, as for nonces
    assert store.purge_expired(now=1301) == 1
    assert store.get_establishment("gw-alice", EST) is None
    assert store.get_establishment("gw-alice", b"\x02" * 16) is not None


# -- the PN inventory -------------------------------------------------------------------------


def test_record_pn_keeps_members_and_failures_apart(store: ServerStore) -> None:
    """Issue 6 item 6: the server records each PN (PN ID, PN GW, owner, when) with every
    PNE's flow and outcome; a failure (policy denied, authentication failed) is recorded
    with its status and is not a member."""
    pn = record(
        store,
        result("pne-2"),
        result("pne-1", flow=FLOW_TK),
        result("pne-3", "AUTHENTICATION_FAILED"),
        result("pne-bob", "POLICY_DENIED", flow=FLOW_NONE),
    )
    assert store.get_pn("pn-home") == pn
    assert (pn.pn_id, pn.gateway_id, pn.owner, pn.created_at, pn.updated_at) == (
        "pn-home",
        "gw-alice",
        "alice",
        1010,
        1010,
    )
    assert [m.pne_id for m in pn.members] == ["pne-1", "pne-2", "pne-3", "pne-bob"]
    assert [(m.pne_id, m.flow) for m in pn.joined] == [("pne-1", FLOW_TK), ("pne-2", "rand-hash")]
    assert [(m.pne_id, m.status) for m in pn.failed] == [
        ("pne-3", "AUTHENTICATION_FAILED"),
        ("pne-bob", "POLICY_DENIED"),
    ]
    assert store.get_pn("pn-other") is None


def test_a_later_establishment_updates_the_pn(store: ServerStore) -> None:
    """The PN is upserted: created_at stays, updated_at and the PN GW follow the latest
    establishment; each PNE's latest outcome replaces its previous one (a failed PNE that
    now joins becomes a member, a member that now fails is not one); PNEs not listed this
    time keep their rows."""
    record(store, result("pne-1"), result("pne-2", "TIMEOUT"), result("pne-3"))
    pn = record(
        store,
        result("pne-2", at=2000),
        result("pne-3", "AUTHENTICATION_FAILED", at=2000),
        now=2000,
        gateway_id="gw-alice-2",
    )
    assert (pn.gateway_id, pn.created_at, pn.updated_at) == ("gw-alice-2", 1010, 2000)
    assert [(m.pne_id, m.status, m.at) for m in pn.members] == [
        ("pne-1", MEMBER, 1010),
        ("pne-2", MEMBER, 2000),
        ("pne-3", "AUTHENTICATION_FAILED", 2000),
    ]
    assert store.get_pn("pn-home") == pn


def test_a_pn_of_another_user_is_never_taken_over(store: ServerStore) -> None:
    """Issue 6 item 6 (a PN GW only brings its own user's PNEs): a PN ID already recorded
    for alice cannot be recorded for bob: ConflictError, nothing written."""
    before = record(store, result("pne-1"))
    with pytest.raises(ConflictError, match="another user"):
        record(store, result("pne-bob"), owner="bob", gateway_id="gw-bob", now=3000)
    assert store.get_pn("pn-home") == before


def test_bad_results_write_nothing(store: ServerStore) -> None:
    """A PNE listed twice in one result set is a ConflictError (pn-design DUPLICATE_PNE is
    decided before); an unknown flow or an empty status is a StoreError; nothing is written."""
    with pytest.raises(ConflictError, match="twice"):
        record(store, result("pne-1"), result("pne-1", "TIMEOUT"))
    with pytest.raises(StoreError, match="flow"):
        record(store, result("pne-1", flow="local"))
    with pytest.raises(StoreError, match="status"):
        record(store, result("pne-1", status=""))
    assert store.get_pn("pn-home") is None


def test_list_pns_filters_by_owner_and_gateway(store: ServerStore) -> None:
    """``cpns admin pn list``: every PN ordered by PN ID, optionally of one owner and/or one
    PN GW; a PN recorded with no result lists with no members."""
    record(store, result("pne-1"), pn_id="pn-b")
    record(store, pn_id="pn-a", gateway_id="gw-alice-2")
    record(store, result("pne-bob"), pn_id="pn-c", owner="bob", gateway_id="gw-bob")
    assert [p.pn_id for p in store.list_pns()] == ["pn-a", "pn-b", "pn-c"]
    assert [p.pn_id for p in store.list_pns(owner="alice")] == ["pn-a", "pn-b"]
    assert [p.pn_id for p in store.list_pns(gateway="gw-bob")] == ["pn-c"]
    assert [p.pn_id for p in store.list_pns(owner="alice", gateway="gw-alice")] == ["pn-b"]
    assert store.list_pns(owner="carol") == []
    [pn_a] = store.list_pns(gateway="gw-alice-2")
    assert pn_a.members == ()
    assert store.list_pns(owner="alice")[1] == store.get_pn("pn-b")


# -- compare and set of the ratcheted state ---------------------------------------------------


def test_tk_state_is_a_compare_and_set(store: ServerStore) -> None:
    """000 with the resync rule (N1): the server commits TK_{t+1} only if its stored step
    is still the one it verified at; a stale expected step, a missing TK record, and a step
    that does not move forward write nothing."""
    store.write(lambda tx: tx.set_tk_state("pne-1", b"U" * 32, 3, expected_step=0))
    tk = store.get_tk("pne-1")
    assert tk is not None
    assert (tk.tk, tk.tk_step, tk.source, tk.imported_at) == (b"U" * 32, 3, "m.csv", 5)
    with pytest.raises(ClaimConflict, match="step 0"):
        store.write(lambda tx: tx.set_tk_state("pne-1", b"V" * 32, 4, expected_step=0))
    with pytest.raises(ClaimConflict):
        store.write(lambda tx: tx.set_tk_state("pne-none", b"V" * 32, 1, expected_step=0))
    with pytest.raises(StoreError, match="forward"):
        store.write(lambda tx: tx.set_tk_state("pne-1", b"V" * 32, 3, expected_step=3))
    assert store.get_tk("pne-1") == tk


def test_key_index_is_a_compare_and_set(store: ServerStore) -> None:
    """000 / 003 chain: the server moves i_s to i+1 only if the entity is still at i; a
    stale expected index, an unknown entity or a backward move write nothing; the rest of
    the entity (keys, epoch, owner) is untouched."""
    before = store.get_entity("pne-1")
    assert before is not None
    store.write(lambda tx: tx.set_key_index("pne-1", 2, expected_index=1))
    after = store.get_entity("pne-1")
    assert after is not None
    assert after.key_index == 2
    assert (after.eukeys, after.epoch, after.owner) == (before.eukeys, before.epoch, "alice")
    assert after.eukey == b"2" * 32
    with pytest.raises(ClaimConflict, match="index 1"):
        store.write(lambda tx: tx.set_key_index("pne-1", 3, expected_index=1))
    with pytest.raises(ClaimConflict):
        store.write(lambda tx: tx.set_key_index("pne-none", 2, expected_index=1))
    with pytest.raises(StoreError, match="forward"):
        store.write(lambda tx: tx.set_key_index("pne-1", 1, expected_index=2))
    assert store.get_entity("pne-1") == after


def test_set_revoked_keeps_the_rest_of_the_entity(store: ServerStore) -> None:
    """Revoking changes only the revoked flag (the assignment epoch and chain index stay;
    the memory store used to reset the epoch)."""
    store.write(lambda tx: tx.set_revoked("pne-1", True))
    got = store.get_entity("pne-1")
    assert got is not None
    assert (got.revoked, got.epoch, got.key_index) == (True, 1, 1)


def test_batched_reads_return_what_single_reads_return(store: ServerStore) -> None:
    """Our rule (docs/deployment.md, PN Establishment under load): an establishment's half
    reads all its PNEs' entities and TK records in one query per table; each record found
    is the one get_entity / get_tk returns, unknown IDs are absent, an ID listed twice is
    read once, and an empty list reads nothing."""
    store.write(
        lambda tx: tx.put_entity(
            EntityRecord(entity_id="pne-2", kind=EntityKind.PNE, owner="alice", eukeys=(b"E" * 32,))
        )
    )
    ids = ["pne-2", "pne-none", "pne-1", "pne-2"]
    entities = store.get_entities(ids)
    assert entities == {"pne-1": store.get_entity("pne-1"), "pne-2": store.get_entity("pne-2")}
    assert store.get_tks(ids) == {"pne-1": store.get_tk("pne-1")}
    assert store.get_entities([]) == {}
    assert store.get_tks([]) == {}
    many = [f"pne-x{i}" for i in range(300)] + ["pne-1"]  # more than one query's worth
    assert list(store.get_entities(many)) == ["pne-1"]


def test_get_pn_owner_reads_the_owner_alone(store: ServerStore) -> None:
    """Issue 6 item 6 (a PN ID is one user's): the owner check of both halves reads the
    PN's owner, the one get_pn returns, or None for a PN ID not in the inventory."""
    assert store.get_pn_owner("pn-home") is None
    record(store, result("pne-1"))
    pn = store.get_pn("pn-home")
    assert pn is not None
    assert store.get_pn_owner("pn-home") == pn.owner == "alice"


def test_audit_many_appends_in_order(store: ServerStore) -> None:
    """DESIGN §7 audit trail: the per-PNE rows of an establishment are appended in one
    batch, in order, each as audit() would append it; an empty batch appends nothing."""
    events = [
        AuditEvent(at=1000 + i, actor="gw-alice", procedure="p", outcome="OK", entity_id=f"e{i}")
        for i in range(3)
    ]
    store.write(lambda tx: tx.audit_many([]))
    store.write(lambda tx: tx.audit_many(events))
    assert store.audit_events(limit=10) == events[::-1]


def race(n: int, attempt: Callable[[int], None]) -> list[BaseException | None]:
    """Run ``attempt(i)`` for i in range(n) on n threads started together; their outcomes."""
    outcomes: list[BaseException | None] = [None] * n
    gate = threading.Barrier(n)

    def run(i: int) -> None:
        gate.wait()
        try:
            attempt(i)
        except BaseException as exc:  # collected and asserted on below
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_racing_ratchet_advances_have_one_winner(store: ServerStore) -> None:
    """N1: many writers advancing the same TK from the same step (a duplicated 47 handled
    twice at once) and finishing the same establishment: exactly one commits, every other
    one gets ClaimConflict and wrote nothing."""
    store.write(lambda tx: tx.put_establishment(pending()))

    def attempt(i: int) -> None:
        def finish(tx: WriteTx) -> None:
            tx.set_tk_state("pne-1", bytes([i]) * 32, 1, expected_step=0)
            tx.set_key_index("pne-1", 2, expected_index=1)
            tx.delete_establishment("gw-alice", EST)

        store.write(finish)

    outcomes = race(8, attempt)
    winners = [i for i, o in enumerate(outcomes) if o is None]
    assert len(winners) == 1
    assert all(isinstance(o, ClaimConflict) for o in outcomes if o is not None)
    tk = store.get_tk("pne-1")
    assert tk is not None
    assert (tk.tk, tk.tk_step) == (bytes([winners[0]]) * 32, 1)
    entity = store.get_entity("pne-1")
    assert entity is not None
    assert entity.key_index == 2
    assert store.get_establishment("gw-alice", EST) is None


# -- SQL only ---------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A SQLite file or a fresh PostgreSQL database (the second target is unused)."""
    if request.param == "sqlite":
        yield Backend("sqlite", str(tmp_path / "cpns.db"), str(tmp_path / "other.db"))
        return
    dsn = request.getfixturevalue("pg_dsn")
    yield Backend("postgresql", dsn, dsn)


def test_pending_state_is_sealed_at_rest_and_bound_to_its_row(backend: Backend) -> None:
    """002 §3.2 Secure Storage: the per-PNE entries (LocalEUKey, rand values) are sealed
    under the master key, not in clear in the database; a sealed state copied to another
    establishment's row does not open (StoreError), nor under another master key."""
    with SQLStore.open(backend.target, master_key=KEY) as s:
        s.write(lambda tx: tx.put_establishment(pending()))
        s.write(lambda tx: tx.put_establishment(pending(b"\x02" * 16)))
    rows = backend.raw("SELECT gateway_id, est_id, pn_id, state_sealed FROM pn_establishments")
    assert {(r[0], bytes(r[1]), r[2]) for r in rows} == {
        ("gw-alice", EST, "pn-home"),
        ("gw-alice", b"\x02" * 16, "pn-home"),
    }
    for row in rows:
        sealed = bytes(row[3])
        assert LOCAL_EUKEY not in sealed
        assert b"R" * 32 not in sealed
        assert b"b" * 32 not in sealed
    first = next(bytes(r[3]) for r in rows if bytes(r[1]) == EST)
    backend.raw(
        "UPDATE pn_establishments SET state_sealed = ? WHERE est_id = ?", (first, b"\x02" * 16)
    )
    with SQLStore.open(backend.target, master_key=KEY) as s:
        assert s.get_establishment("gw-alice", EST) == pending()
        with pytest.raises(StoreError, match="does not open"):
            s.get_establishment("gw-alice", b"\x02" * 16)


def test_two_processes_finish_one_establishment_once(backend: Backend) -> None:
    """pn-design: any server process can take the second half; two stores on one database
    (two server processes) racing to finish one establishment and advance one TK: exactly
    one commits."""
    with (
        SQLStore.open(backend.target, master_key=KEY) as a,
        SQLStore.open(backend.target, master_key=KEY) as b,
    ):
        a.write(lambda tx: tx.put_tks([TKRecord(entity_id="pne-1", tk=b"T" * 32)]))
        a.write(lambda tx: tx.put_establishment(pending()))
        stores = [a, b] * 4

        def attempt(i: int) -> None:
            def finish(tx: WriteTx) -> None:
                tx.delete_establishment("gw-alice", EST)
                tx.set_tk_state("pne-1", bytes([i]) * 32, 1, expected_step=0)

            stores[i].write(finish)

        outcomes = race(len(stores), attempt)
        assert sum(o is None for o in outcomes) == 1
        assert all(isinstance(o, ClaimConflict) for o in outcomes if o is not None)
        assert b.get_establishment("gw-alice", EST) is None
        tk = a.get_tk("pne-1")
        assert tk is not None
        assert tk.tk_step == 1


def test_an_older_database_gains_the_pn_tables_and_tk_steps(backend: Backend) -> None:
    """Migration 0007 on a database of an earlier release: TK records already there get
    step 0, and the PN tables start empty."""
    backend.create_version_1()
    backend.raw(
        "INSERT INTO tk_records (entity_id, tk_sealed, source, imported_at) "
        "VALUES ('pne-0', ?, 'old.csv', 1)",
        (b"placeholder",),
    )
    with SQLStore.open(backend.target, master_key=KEY) as s:
        assert backend.raw("SELECT tk_step FROM tk_records") == [(0,)]
        assert s.list_pns() == []
        assert s.get_establishment("gw", EST) is None
