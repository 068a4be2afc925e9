"""Master-key rotation (issue 7 item 6): every secret re-sealed under a new key in one
transaction, the key file swapped afterwards, and a crash at any step leaves a store that
opens with one of the two keys (finishing the swap itself when the commit happened)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from tests.unit.store.test_dump import fill, snapshot

from cpns.errors import ConfigurationError, StoreError
from cpns.store import MasterKey, SQLStore
from cpns.store.rotation import (
    SEALED,
    new_key_path,
    open_store_rotating,
    reseal,
    rotate,
)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    folder.mkdir()
    path = folder / "master.key"
    MasterKey.generate(path)
    return path


def filled(target: str, key_file: Path) -> dict[str, object]:
    with SQLStore.open(target, master_key=MasterKey.load(key_file)) as store:
        fill(store)
        return snapshot(store)


def test_rotation_reseals_every_secret_and_swaps_the_key_file(
    store_target: str, key_file: Path
) -> None:
    """After rotate: the key file holds a new 0600 key, every secret opens under it and
    equals what it was, the old key is refused at open, no .new file is left; the rotation
    is audited (key IDs only) in its own transaction."""
    before = filled(store_target, key_file)
    old, new, counts = rotate(store_target, key_file)
    assert old != new
    assert MasterKey.load(key_file) == new
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert not new_key_path(key_file).exists()
    assert counts == {
        "users": 2,
        "entities": 2,
        "tk_records": 1,
        "replies": 1,
        "pn_establishments": 1,
    }
    assert set(counts) == {c.table for c in SEALED}
    with SQLStore.open(store_target, master_key=new) as store:
        assert snapshot(store) == before
        [event] = store.audit_events(limit=1)
        assert event.procedure == "master-key-rotate"
        assert event.detail == f"from {old.key_id} to {new.key_id}, 7 values re-sealed"
    with pytest.raises(StoreError, match="wrong master key"):
        SQLStore.open(store_target, master_key=old)


def test_crash_before_the_commit_leaves_the_old_key_working(
    store_target: str, key_file: Path
) -> None:
    """Interrupted after the new key file was written and during the re-seal (the
    transaction fails half way): the database is still entirely under the old key, the
    server opens it with the key file as it is, and the next rotation starts afresh."""
    before = filled(store_target, key_file)
    old = MasterKey.load(key_file)
    half = MasterKey.generate(new_key_path(key_file))  # step 1 done

    def crash(phase: str, rows: int, total: int) -> None:
        if phase == "re-sealing entities":
            raise KeyboardInterrupt  # the process dies in the middle of the transaction

    with pytest.raises(KeyboardInterrupt):
        reseal(store_target, old, half, progress=crash)
    with open_store_rotating(store_target, key_file, MasterKey.load(key_file)) as store:
        assert snapshot(store) == before
    assert MasterKey.load(key_file) == old
    _, new, _ = rotate(store_target, key_file)
    assert new != half
    with SQLStore.open(store_target, master_key=new) as store:
        assert snapshot(store) == before


def test_crash_after_the_commit_is_finished_at_the_next_open(
    store_target: str, key_file: Path
) -> None:
    """Interrupted after the commit, before the key files were swapped: the key file
    still holds the old key, the database is under the new one. Opening the store the way
    the server does finds the new key file, finishes the swap, and serves the data."""
    before = filled(store_target, key_file)
    old = MasterKey.load(key_file)
    half = MasterKey.generate(new_key_path(key_file))
    reseal(store_target, old, half)  # committed; the process dies before the swap
    with open_store_rotating(store_target, key_file, old) as store:
        assert snapshot(store) == before
    assert MasterKey.load(key_file) == half
    assert not new_key_path(key_file).exists()


def test_rotate_after_a_committed_crash_finishes_it_and_says_so(
    store_target: str, key_file: Path
) -> None:
    """Running rotate again after a crash past the commit finishes that rotation and
    tells the operator, rather than rotating from a key the database no longer uses."""
    filled(store_target, key_file)
    half = MasterKey.generate(new_key_path(key_file))
    reseal(store_target, MasterKey.load(key_file), half)
    with pytest.raises(ConfigurationError, match="interrupted rotation"):
        rotate(store_target, key_file)
    assert MasterKey.load(key_file) == half


def test_rotation_refuses_a_database_under_another_key(store_target: str, key_file: Path) -> None:
    """A key file that does not open the database is refused before anything is written;
    no new key file is left behind."""
    SQLStore.open(store_target, master_key=MasterKey(bytes(32))).close()
    with pytest.raises(StoreError, match="wrong master key"):
        rotate(store_target, key_file)
    assert not new_key_path(key_file).exists()
