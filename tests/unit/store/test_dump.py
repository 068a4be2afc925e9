"""Backup and restore of the server store (issue 7 item 6): a logical dump of every table
from one snapshot, secrets still sealed, checked by a checksum, restored all or nothing
into an empty database, across back ends (SQLite -> PostgreSQL and back)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.postgres import PGCluster

from cpns.errors import ConfigurationError
from cpns.store import (
    AuditEvent,
    EntityRecord,
    MasterKey,
    PendingEntry,
    PendingEstablishment,
    PNMember,
    SQLStore,
    StoredReply,
    TKRecord,
    UserRecord,
    WriteTx,
)
from cpns.store.dump import MAGIC, backup, read_info, restore
from cpns.types import EntityKind

KEY = MasterKey(bytes(range(32)))
OTHER_KEY = MasterKey(bytes(range(1, 33)))


@pytest.fixture(params=["sqlite", "postgresql"])
def second_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A second, empty database to restore into: SQLite, or another PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "restored.db")
        return
    cluster: PGCluster = request.getfixturevalue("pg_cluster")
    with cluster.database() as dsn:
        yield dsn


def fill(store: SQLStore) -> None:
    """One row in every table the server writes."""

    def write(tx: WriteTx) -> None:
        tx.add_user(UserRecord(user_id="alice", password_key=b"P" * 32, created_at=10))
        tx.add_user(UserRecord(user_id="bob", password_key=b"Q" * 32, created_at=11, disabled=True))
        tx.put_entity(
            EntityRecord(
                entity_id="gw-alice",
                kind=EntityKind.PN_GW,
                owner="alice",
                eukeys=(b"E" * 32,),
                key_index=1,
                assigned_at=20,
                epoch=1,
            )
        )
        tx.put_entity(
            EntityRecord(
                entity_id="pne-1",
                kind=EntityKind.PNE,
                owner="alice",
                eukeys=(b"1" * 32, b"2" * 32, b"3" * 32),
                key_index=2,
                assigned_via="gw-alice",
                assigned_at=21,
                revoked=True,
                epoch=3,
            )
        )
        tx.put_tks(
            [TKRecord(entity_id="pne-1", tk=b"T" * 32, source="acme.csv", imported_at=5, tk_step=4)]
        )
        tx.put_establishment(PENDING)
        tx.record_pn(
            "pn-home",
            "gw-alice",
            "alice",
            40,
            [
                PNMember(pne_id="pne-1", flow="tk", status="member", at=40),
                PNMember(pne_id="pne-x", flow="", status="POLICY_DENIED", at=40),
            ],
        )
        tx.use_nonce(b"n" * 16, expires_at=2**40)
        tx.put_reply(
            StoredReply(
                requester="gw-alice",
                txid=b"x" * 16,
                request_digest=b"d" * 32,
                reply=b"reply bytes",
                created_at=2**40,
            )
        )
        tx.record_auth_failure("mallory", now=100, window=2**40)
        for i in range(3):
            tx.audit(AuditEvent(at=30 + i, actor="admin", procedure=f"p{i}", outcome="OK"))

    store.write(write)


#: A pending establishment (far from expiry) with a LocalEUKey: its state is sealed.
PENDING = PendingEstablishment(
    gw_id="gw-alice",
    est_id=b"e" * 16,
    pn_id="pn-home",
    rand_server=b"r" * 32,
    created_at=40,
    expires_at=2**40,
    entries=(
        PendingEntry(pne_id="pne-1", rand_pne=b"p" * 32, flow="tk", tk_step=4, key_index=2),
        PendingEntry(pne_id="pne-2", rand_pne=b"q" * 32, flow="rand-hash", local_eukey=b"L" * 32),
    ),
)


def snapshot(store: SQLStore) -> dict[str, object]:
    """Everything a server reads, secrets opened."""
    return {
        "users": store.list_users(),
        "entities": store.list_entities(),
        "tk": store.get_tk("pne-1"),
        "nonce": store.nonce_used(b"n" * 16),
        "reply": store.get_reply("gw-alice", b"x" * 16),
        "failures": store.auth_failures("mallory", now=200),
        "pending": store.get_establishment("gw-alice", b"e" * 16),
        "pns": store.list_pns(),
        "audit": [e for e in store.audit_events(limit=10) if e.procedure not in OPERATIONS],
    }


#: Audit events of the operations themselves (backup, restore, rotation), left out of
#: :func:`snapshot` and checked on their own.
OPERATIONS = frozenset({"backup", "restore", "master-key-rotate"})


def test_backup_restores_every_row_across_back_ends(
    store_target: str, second_target: str, tmp_path: Path
) -> None:
    """Every table comes back equal (secrets open under the same master key), from either
    back end into either back end; the file is 0600 and starts with the magic; new audit
    rows after a restore get new ids (PostgreSQL's identity moved past the restored ones);
    the backup is audited in the source, the restore in the target. The PN inventory and
    the pending establishments (issue 6: sealed state, TK step) come back too, PNs before
    their members."""
    path = tmp_path / "cpns.backup"
    with SQLStore.open(store_target, master_key=KEY) as source:
        fill(source)
        before = snapshot(source)
        info = backup(source, path, server_id="cpns-server", realm="cpns")
        [event] = source.audit_events(limit=1)
        assert (event.procedure, event.detail) == ("backup", "17 rows to cpns.backup")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes().startswith(MAGIC)
    assert info.rows["users"] == 2
    assert info.rows["audit"] == 3
    assert (info.rows["pns"], info.rows["pn_members"], info.rows["pn_establishments"]) == (1, 2, 1)
    assert read_info(path).rows == info.rows
    restored = restore(second_target, path, master_key=KEY, server_id="cpns-server", realm="cpns")
    assert restored.rows == info.rows
    with SQLStore.open(second_target, master_key=KEY) as target:
        assert snapshot(target) == before
        target.write(
            lambda tx: tx.audit(AuditEvent(at=99, actor="admin", procedure="x", outcome="OK"))
        )
        newest = target.audit_events(limit=3)
        assert [e.procedure for e in newest] == ["x", "restore", "p2"]
        assert newest[1].detail.startswith("17 rows from cpns.backup")


def test_restore_refuses_a_database_that_is_not_empty(store_target: str, tmp_path: Path) -> None:
    """Restore only into an empty database: a database holding a user is refused with a
    clear message, and is left as it was."""
    path = tmp_path / "cpns.backup"
    with SQLStore.open(store_target, master_key=KEY) as source:
        fill(source)
        backup(source, path)
    with pytest.raises(ConfigurationError, match="is not empty"):
        restore(store_target, path, master_key=KEY)
    with SQLStore.open(store_target, master_key=KEY) as again:
        assert len(again.list_users()) == 2


def test_restore_refuses_another_master_key_before_writing(
    store_target: str, second_target: str, tmp_path: Path
) -> None:
    """A backup is useless without its master key: restoring with another key is refused,
    naming both key IDs, and nothing is written."""
    path = tmp_path / "cpns.backup"
    with SQLStore.open(store_target, master_key=KEY) as source:
        fill(source)
        backup(source, path)
    with pytest.raises(ConfigurationError) as info:
        restore(second_target, path, master_key=OTHER_KEY)
    assert KEY.key_id in str(info.value)
    assert OTHER_KEY.key_id in str(info.value)
    with SQLStore.open(second_target, master_key=OTHER_KEY) as target:
        assert target.list_users() == []


def test_a_restore_into_a_fresh_init_replaces_its_master_key_check(
    store_target: str, second_target: str, tmp_path: Path
) -> None:
    """The empty database of a fresh 'cpns server init' was checked against ITS new key;
    once the saved master key is put in place, restore replaces that check row."""
    path = tmp_path / "cpns.backup"
    with SQLStore.open(store_target, master_key=KEY) as source:
        fill(source)
        backup(source, path)
    SQLStore.open(second_target, master_key=OTHER_KEY).close()  # "init" under another key
    restore(second_target, path, master_key=KEY)
    with SQLStore.open(second_target, master_key=KEY) as target:
        assert len(target.list_users()) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic"])
def test_a_damaged_backup_is_refused_and_nothing_is_written(tmp_path: Path, damage: str) -> None:
    """The checksum covers the whole file: one flipped byte, a truncated file or a file
    that is not a backup is refused before any row is read."""
    path = tmp_path / "cpns.backup"
    with SQLStore.open(tmp_path / "a.db", master_key=KEY) as source:
        fill(source)
        backup(source, path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
    elif damage == "truncate":
        del data[-100:]
    else:
        data[0:4] = b"XXXX"
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigurationError, match=r"damaged|not a valid"):
        restore(str(tmp_path / "b.db"), path, master_key=KEY)
    with SQLStore.open(tmp_path / "b.db", master_key=KEY) as target:
        assert target.list_users() == []


def test_backup_never_overwrites_and_restore_checks_the_server_identity(tmp_path: Path) -> None:
    """An existing file is never overwritten; a backup of another server ID or realm is
    refused (password keys are salted with the realm)."""
    path = tmp_path / "cpns.backup"
    path.write_bytes(b"precious")
    with SQLStore.open(tmp_path / "a.db", master_key=KEY) as source:
        with pytest.raises(ConfigurationError, match="already exists"):
            backup(source, path)
        assert path.read_bytes() == b"precious"
        path.unlink()
        backup(source, path, server_id="cpns-server", realm="cpns")
    with pytest.raises(ConfigurationError, match="realm"):
        restore(str(tmp_path / "b.db"), path, master_key=KEY, realm="other")
    assert not list(tmp_path.glob(".*.tmp"))
