"""The local sealed key store of the PN GW and the PNE (DESIGN §6 "written atomically")."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from cpns.errors import ConfigurationError, LocalProtocolError, StoreError
from cpns.store import LocalKeyStore, keystore

DATA = {
    "entity_id": "gw-1",
    "eukey": bytes(range(32)),
    "chain": [b"\x01" * 32, b"\x02" * 32],
    "key_index": 2,
    "secure_pan": False,
    "assigned_via": None,
    "pnes": {"pne-1": {"tk": b"\x07" * 16, "local": [1, "two", True]}},
}


@pytest.fixture
def ks(tmp_path: Path) -> LocalKeyStore:
    return LocalKeyStore.open_or_create(tmp_path, "gateway")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip(ks: LocalKeyStore) -> None:
    """save() then load() gives the same map; a store never saved loads as {}."""
    assert ks.load() == {}
    ks.save(DATA)
    assert ks.load() == DATA
    ks.save({"entity_id": "gw-1"})
    assert ks.load() == {"entity_id": "gw-1"}


def test_reopen_uses_the_same_key(tmp_path: Path) -> None:
    """open_or_create() generates <name>.key once and reuses it, so data survives restarts."""
    LocalKeyStore.open_or_create(tmp_path, "dev").save(DATA)
    assert LocalKeyStore.open_or_create(tmp_path, "dev").load() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.key", "dev.store"]


def test_files_are_private(ks: LocalKeyStore, tmp_path: Path) -> None:
    """The store, its key file and its lock file are 0600."""
    ks.save(DATA)
    with ks.lock():
        assert mode(ks.lock_path) == 0o600
    assert mode(ks.path) == 0o600
    assert mode(tmp_path / "gateway.key") == 0o600


def test_secrets_are_not_in_the_file_in_clear(ks: LocalKeyStore) -> None:
    """The file is sealed: no key or identifier appears in its bytes."""
    ks.save(DATA)
    blob = ks.path.read_bytes()
    assert bytes(range(32)) not in blob
    assert b"\x07" * 16 not in blob
    assert b"gw-1" not in blob


def test_failed_replace_keeps_the_old_content(
    ks: LocalKeyStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash before the rename leaves the previous store loadable and no temp file."""
    ks.save(DATA)

    def crash(src: object, dst: object) -> None:
        raise OSError(5, "simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="simulated crash"):
        ks.save({"entity_id": "new"})
    monkeypatch.undo()
    assert ks.load() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.key", "gateway.store"]


def test_failed_write_keeps_the_old_content(
    ks: LocalKeyStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while writing or syncing the temp file never touches the store file."""
    ks.save(DATA)

    def crash(fd: int) -> None:
        raise OSError(28, "simulated disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(StoreError, match="disk full"):
        ks.save({"entity_id": "new"})
    monkeypatch.undo()
    assert ks.load() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.key", "gateway.store"]


def test_stale_temp_file_from_a_crash_is_harmless(ks: LocalKeyStore, tmp_path: Path) -> None:
    """A temp file left by a crash mid-write does not disturb load() or the next save()."""
    ks.save(DATA)
    (tmp_path / ".gateway.store.deadbeef.tmp").write_bytes(b"half a ke")
    assert ks.load() == DATA
    ks.save({"x": 1})
    assert ks.load() == {"x": 1}


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[:-1], id="truncated"),
        pytest.param(lambda b: b[: len(b) // 2], id="half"),
        pytest.param(lambda b: b[:10], id="header-only"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:], id="flipped-tag"),
        pytest.param(lambda b: b[:30] + bytes([b[30] ^ 0x80]) + b[31:], id="flipped-body"),
        pytest.param(lambda b: b"X" + b[1:], id="bad-magic"),
        pytest.param(lambda b: b + b"\x00", id="trailing"),
    ],
)
def test_tampered_or_truncated_file_is_a_store_error(ks: LocalKeyStore, damage: object) -> None:
    """Any alteration of the sealed file -> StoreError with a clear message, never raw."""
    ks.save(DATA)
    assert callable(damage)
    ks.path.write_bytes(damage(ks.path.read_bytes()))
    with pytest.raises(StoreError, match=r"gateway\.store"):
        ks.load()


def test_other_key_or_renamed_file_does_not_open(ks: LocalKeyStore, tmp_path: Path) -> None:
    """The seal binds key and file name: another key, or the file under another name, fails."""
    ks.save(DATA)
    with pytest.raises(StoreError, match="another key"):
        LocalKeyStore(ks.path, b"\x00" * 32).load()
    moved = tmp_path / "device.store"
    moved.write_bytes(ks.path.read_bytes())
    key = bytes.fromhex((tmp_path / "gateway.key").read_text())
    with pytest.raises(StoreError):
        LocalKeyStore(moved, key).load()
    assert LocalKeyStore(ks.path, key).load() == DATA


def test_lock_held_by_a_second_instance(tmp_path: Path) -> None:
    """Two daemons cannot use one store: the second lock() raises StoreError."""
    first = LocalKeyStore.open_or_create(tmp_path, "gw")
    second = LocalKeyStore.open_or_create(tmp_path, "gw")
    first.lock()
    try:
        with pytest.raises(StoreError, match="in use by another process"):
            second.lock()
        assert not second.locked
    finally:
        first.unlock()
    with second:
        assert second.locked
    assert not second.locked
    second.unlock()  # unlocking twice is harmless


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    """The lock is a real flock: a lock held in another process blocks us, and dies with it."""
    LocalKeyStore.open_or_create(tmp_path, "gw")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                from pathlib import Path
                from cpns.store import LocalKeyStore, keystore
                ks = LocalKeyStore.open_or_create(Path({str(tmp_path)!r}), "gw").lock()
                print("locked", flush=True)
                sys.stdin.read()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"locked\n"
        with pytest.raises(StoreError, match="in use"):
            LocalKeyStore.open_or_create(tmp_path, "gw").lock()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
        child.stdout.close()
    with LocalKeyStore.open_or_create(tmp_path, "gw") as ks:
        assert ks.locked


def test_locking_twice_in_one_instance_is_a_usage_error(ks: LocalKeyStore) -> None:
    """lock() on an instance that holds the lock is a programming error."""
    with ks.lock(), pytest.raises(LocalProtocolError):
        ks.lock()


def test_key_file_mode_is_checked(tmp_path: Path) -> None:
    """A <name>.key readable by group or others is refused (ConfigurationError)."""
    LocalKeyStore.open_or_create(tmp_path, "gw")
    (tmp_path / "gw.key").chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        LocalKeyStore.open_or_create(tmp_path, "gw")


@pytest.mark.parametrize(
    "bad",
    [{"f": 1.5}, {"s": {1, 2}}, {1: "int key"}, {"t": (1, 2)}, {"nested": {"x": [object()]}}],
)
def test_only_cbor_plain_values_are_accepted(ks: LocalKeyStore, bad: dict[object, object]) -> None:
    """save() accepts str, bytes, int, bool, None, lists, str-keyed dicts; nothing else."""
    with pytest.raises(LocalProtocolError):
        ks.save(bad)
    assert not ks.path.exists()


def test_short_key_and_bad_name_are_refused(tmp_path: Path) -> None:
    """A key store key is at least 16 bytes; a store name is a plain file name."""
    with pytest.raises(LocalProtocolError):
        LocalKeyStore(tmp_path / "x.store", b"short")
    for name in ("", "../x", ".hidden"):
        with pytest.raises(LocalProtocolError):
            LocalKeyStore.open_or_create(tmp_path, name)


# -- records: per-PNE files (a write is O(1) in the number of PNEs) --------------------------


def test_records_round_trip_and_delete(ks: LocalKeyStore, tmp_path: Path) -> None:
    """save_record() goes to the journal and load_records() returns every record by name
    at once; compaction leaves one sealed 0600 file per record in <name>.d; delete_record()
    removes one (a missing one is no error)."""
    assert ks.load_records() == {}
    ks.save_record("pne-1", {"tk": b"\x07" * 16})
    ks.save_record("pne-2", {"set": {"eukeys": [b"\x01" * 32]}})
    ks.save_record("pne-1", {"tk": b"\x08" * 16})
    expected = {
        "pne-1": {"tk": b"\x08" * 16},
        "pne-2": {"set": {"eukeys": [b"\x01" * 32]}},
    }
    assert ks.load_records() == expected
    ks.close_journal()
    assert ks.compact_records() == 2
    assert ks.load_records() == expected
    assert not list(tmp_path.glob("gateway.journal-*")), "a compacted generation is deleted"
    records = tmp_path / "gateway.d"
    assert mode(records) == 0o700
    assert {p.name: mode(p) for p in records.iterdir()} == {
        "pne-1.store": 0o600,
        "pne-2.store": 0o600,
    }
    assert b"\x08" * 16 not in (records / "pne-1.store").read_bytes()
    ks.delete_record("pne-1")
    ks.delete_record("pne-9")
    assert list(ks.load_records()) == ["pne-2"]
    ks.close_journal()
    ks.compact_records()
    assert list(ks.load_records()) == ["pne-2"]
    assert [p.name for p in records.iterdir()] == ["pne-2.store"]
    assert ks.load() == {}, "records never touch the main file"


def test_a_record_write_leaves_the_other_records_alone(ks: LocalKeyStore, tmp_path: Path) -> None:
    """Writing one PNE's record does not rewrite another's file (same bytes, same inode)."""
    ks.save_record("pne-1", {"tk": b"\x07" * 16})
    ks.close_journal()
    ks.compact_records()
    other = tmp_path / "gateway.d" / "pne-1.store"
    before = (other.read_bytes(), other.stat().st_ino)
    ks.save_record("pne-2", {"tk": b"\x09" * 16})
    assert (other.read_bytes(), other.stat().st_ino) == before


def test_swapped_records_do_not_open(ks: LocalKeyStore, tmp_path: Path) -> None:
    """Each record is bound to its file name: pne-2's file copied over pne-1's fails to
    open (StoreError), so one PNE's keys cannot be passed off as another's."""
    ks.save_record("pne-1", {"tk": b"\x07" * 16})
    ks.save_record("pne-2", {"tk": b"\x09" * 16})
    ks.close_journal()
    ks.compact_records()
    records = tmp_path / "gateway.d"
    (records / "pne-1.store").write_bytes((records / "pne-2.store").read_bytes())
    with pytest.raises(StoreError, match="does not open"):
        ks.load_records()


@pytest.mark.parametrize("name", ["", ".hidden", "../escape", "a/b", "x" * 129])
def test_record_names_are_entity_ids(ks: LocalKeyStore, name: str) -> None:
    """A record name is an Entity ID (no path separators, no leading dot): anything else
    is a usage error and writes nothing."""
    with pytest.raises(LocalProtocolError):
        ks.save_record(name, {})
    with pytest.raises(LocalProtocolError):
        ks.delete_record(name)
    assert ks.load_records() == {}


def test_temp_files_and_strangers_in_the_records_dir_are_ignored(
    ks: LocalKeyStore, tmp_path: Path
) -> None:
    """A temp file left by a crash mid-write, or a file that is no record, is not loaded."""
    ks.save_record("pne-1", {"tk": b"\x07" * 16})
    ks.close_journal()
    ks.compact_records()
    records = tmp_path / "gateway.d"
    (records / ".pne-1.store.0123456789abcdef.tmp").write_bytes(b"half")
    (records / "notes.txt").write_text("hello")
    assert list(ks.load_records()) == ["pne-1"]


# -- the journal: group commit of records, torn tails, generations, compaction ---------------


def frames_of(path: Path) -> list[bytes]:
    """The frames of a journal file, split by its documented layout (magic, then per frame
    a 4-byte big-endian length and the sealed bytes)."""
    blob = path.read_bytes()
    assert blob.startswith(b"CPNS-KJ1")
    pos, frames = 8, []
    while pos < len(blob):
        size = int.from_bytes(blob[pos : pos + 4], "big")
        frames.append(blob[pos : pos + 4 + size])
        pos += 4 + size
    return frames


def journals(directory: Path) -> list[Path]:
    return sorted(directory.glob("gateway.journal-*"))


def test_one_commit_of_several_records_is_one_durable_frame(
    ks: LocalKeyStore, tmp_path: Path
) -> None:
    """Our rule (docs/deployment.md, group commit): commit_records() writes several records
    and deletions with one append (one frame) of a 0600 journal; no record is in clear."""
    ks.save_record("pne-3", {"tk": b"\x03" * 16})
    ks.commit_records({"pne-1": {"tk": b"\x07" * 16}, "pne-2": {"tk": b"\x09" * 16}, "pne-3": None})
    assert ks.load_records() == {"pne-1": {"tk": b"\x07" * 16}, "pne-2": {"tk": b"\x09" * 16}}
    (journal,) = journals(tmp_path)
    assert mode(journal) == 0o600
    assert len(frames_of(journal)) == 2
    assert b"\x07" * 16 not in journal.read_bytes()
    assert not (tmp_path / "gateway.d").exists(), "no record file before a compaction"


def test_a_torn_last_frame_is_ignored(ks: LocalKeyStore, tmp_path: Path) -> None:
    """DESIGN §6 (a crash never leaves half a key): a crash in the middle of an append
    leaves a prefix of the last frame (or zeros after it); that frame was never
    acknowledged and reading ignores it, at every cut point, keeping what came before."""
    ks.save_record("pne-1", {"tk": b"\x01" * 16})
    ks.save_record("pne-1", {"tk": b"\x02" * 16})
    ks.close_journal()
    (journal,) = journals(tmp_path)
    whole = journal.read_bytes()
    last = frames_of(journal)[-1]
    start = len(whole) - len(last)
    for cut in range(start, len(whole)):
        journal.write_bytes(whole[:cut])
        assert ks.load_records() == {"pne-1": {"tk": b"\x01" * 16}}, cut
    journal.write_bytes(whole[:start] + bytes(len(last)))  # the tail never reached the disk
    assert ks.load_records() == {"pne-1": {"tk": b"\x01" * 16}}
    journal.write_bytes(b"CPNS")  # created, crash before the magic was whole
    assert ks.load_records() == {}


def test_a_damaged_reordered_or_moved_frame_is_a_store_error(
    ks: LocalKeyStore, tmp_path: Path
) -> None:
    """DESIGN §6: only the last frame can be torn by a crash. A frame that does not open
    anywhere else (altered, frames swapped or one dropped from the middle: each is bound to
    its sequence number), or a journal renamed (bound to its file name), stops the load
    with a StoreError instead of silently losing or reordering record changes."""
    for n in range(4):
        ks.save_record("pne-1", {"n": n})
    ks.close_journal()
    (journal,) = journals(tmp_path)
    whole = journal.read_bytes()
    one, two, three, four = frames_of(journal)
    damaged = bytearray(whole)
    damaged[8 + 20] ^= 1
    magic = whole[:8]
    for bad in (bytes(damaged), magic + two + one + three + four, magic + one + three + four):
        journal.write_bytes(bad)
        with pytest.raises(StoreError, match="damaged"):
            ks.load_records()
    journal.write_bytes(whole)
    assert ks.load_records() == {"pne-1": {"n": 3}}
    journal.rename(tmp_path / "gateway.journal-00000007")
    with pytest.raises(StoreError, match="damaged"):
        ks.load_records()
    (tmp_path / "gateway.journal-00000007").write_bytes(b"something else")
    with pytest.raises(StoreError, match="not a CPNS key store journal"):
        ks.load_records()


def test_a_failed_append_is_not_acknowledged_and_the_next_goes_to_a_new_generation(
    ks: LocalKeyStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our rule (docs/deployment.md): a commit whose write fails raises StoreError, what
    reached the file of its frame is cut off again, and the journal file whose tail is in
    doubt is never appended to again; the next commit works, in a new generation."""
    ks.save_record("pne-1", {"n": 1})
    original = keystore._write_all

    def failing(fd: int, data: bytes) -> None:
        original(fd, data[: len(data) // 2])  # half the frame reaches the file
        raise OSError(5, "I/O error")

    monkeypatch.setattr(keystore, "_write_all", failing)
    with pytest.raises(StoreError, match="cannot write key store journal"):
        ks.save_record("pne-1", {"n": 2})
    monkeypatch.undo()
    assert ks.load_records() == {"pne-1": {"n": 1}}
    assert ks.compaction_due
    ks.save_record("pne-2", {"n": 3})
    assert [p.name for p in journals(tmp_path)] == [
        "gateway.journal-00000001",
        "gateway.journal-00000002",
    ]
    assert ks.load_records() == {"pne-1": {"n": 1}, "pne-2": {"n": 3}}


def test_generations_replay_oldest_first_and_compaction_keeps_the_newest(
    ks: LocalKeyStore, tmp_path: Path
) -> None:
    """Our rule (docs/deployment.md): a generation is closed at journal_limit bytes (and a
    new process starts its own); reading replays the record files and then every generation
    oldest first, so a later change (or deletion) wins; compaction folds the closed ones
    into the record files, each record written once with its newest state, and deletes
    them, leaving the generation in use alone."""
    ks.journal_limit = 1  # every commit closes its generation
    ks.save_record("pne-1", {"n": 1})
    ks.save_record("pne-2", {"n": 1})
    ks.save_record("pne-1", {"n": 2})
    ks.delete_record("pne-2")
    ks.journal_limit = 1 << 20
    ks.save_record("pne-3", {"n": 1})  # in the open generation
    other = LocalKeyStore.open_or_create(tmp_path, "gateway")  # a later process
    other.save_record("pne-4", {"n": 1})
    expected = {"pne-1": {"n": 2}, "pne-3": {"n": 1}, "pne-4": {"n": 1}}
    assert len(journals(tmp_path)) == 6
    assert ks.load_records() == expected
    assert ks.compaction_due
    assert ks.compact_records() == 2  # pne-1 (in two generations) once, pne-2 removed
    assert not ks.compaction_due
    assert [p.name for p in journals(tmp_path)] == [
        "gateway.journal-00000005",
        "gateway.journal-00000006",
    ]
    assert sorted(p.name for p in (tmp_path / "gateway.d").iterdir()) == ["pne-1.store"]
    assert ks.load_records() == expected
    other.close_journal()
    ks.close_journal()
    fresh = LocalKeyStore.open_or_create(tmp_path, "gateway")  # start-up: all are closed
    assert fresh.compact_records() == 2
    assert journals(tmp_path) == []
    assert fresh.load_records() == expected


@pytest.mark.parametrize(
    ("where", "after"),
    [("temp", 0), ("temp", 1), ("flush", 0), ("rename", 0), ("rename", 1), ("journal", 0)],
)
@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync-each"])
def test_a_crash_in_the_middle_of_a_compaction_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, after: int, syncfs: bool
) -> None:
    """DESIGN §6 (nothing written is lost, a crash never leaves half a key): a compaction
    stopped after any number of temp files, before or after the flush, after any number
    of renames, or before deleting its generation reads exactly the same records, and the
    next compaction finishes the job. Without syncfs(2) each temp file is fsynced."""
    if not syncfs:
        monkeypatch.setattr(keystore, "_SYNCFS", None)
    ks = LocalKeyStore.open_or_create(tmp_path, "gateway")
    ks.save_record("pne-1", {"n": 0})
    ks.close_journal()
    ks.compact_records()  # pne-1 has an old record file
    ks.commit_records({"pne-1": {"n": 1}, "pne-2": {"n": 1}, "pne-3": {"n": 1}})
    ks.commit_records({"pne-1": {"n": 2}, "pne-3": None})
    ks.close_journal()
    expected = {"pne-1": {"n": 2}, "pne-2": {"n": 1}}
    calls = {"temp": 0, "rename": 0}
    write_all, replace, unlink = keystore._write_all, os.replace, Path.unlink

    def crashing_write(fd: int, data: bytes) -> None:
        if where == "temp" and calls["temp"] == after:
            raise OSError(5, "power lost")
        calls["temp"] += 1
        write_all(fd, data)

    def crashing_replace(src: Path, dst: Path) -> None:
        if where == "rename" and calls["rename"] == after:
            raise OSError(5, "power lost")
        calls["rename"] += 1
        replace(src, dst)

    def crashing_flush(directory: Path) -> None:
        raise OSError(5, "power lost")

    def crashing_unlink(path: Path, missing_ok: bool = False) -> None:
        if where == "journal" and path.name.startswith("gateway.journal-"):
            raise OSError(5, "power lost")
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(keystore, "_write_all", crashing_write)
    monkeypatch.setattr(os, "replace", crashing_replace)
    monkeypatch.setattr(Path, "unlink", crashing_unlink)
    if where == "flush" and syncfs:
        monkeypatch.setattr(keystore, "_syncfs", crashing_flush)
    if where == "flush" and not syncfs:
        monkeypatch.setattr(os, "fsync", lambda fd: crashing_flush(tmp_path))
    with pytest.raises(StoreError):
        ks.compact_records()
    monkeypatch.undo()
    assert ks.compaction_due, "retried later"
    fresh = LocalKeyStore.open_or_create(tmp_path, "gateway")
    assert fresh.load_records() == expected
    fresh.compact_records()
    assert journals(tmp_path) == []
    assert fresh.load_records() == expected
    assert sorted(p.name for p in (tmp_path / "gateway.d").iterdir()) == [
        "pne-1.store",
        "pne-2.store",
    ], "no temp file is left behind"


def test_commits_from_threads_during_compactions_keep_every_newest_record(
    ks: LocalKeyStore,
) -> None:
    """Our rule (docs/deployment.md): commits from several threads are serialised and a
    compaction may run meanwhile; at the end every record holds its newest state."""
    ks.journal_limit = 512

    def writer(w: int) -> None:
        for n in range(40):
            ks.commit_records({f"pne-{w}-{n % 5}": {"n": n}, f"pne-{w}-x": {"n": n}})

    def compactor(stop: threading.Event) -> None:
        while not stop.is_set():
            ks.compact_records()

    stop = threading.Event()
    background = threading.Thread(target=compactor, args=(stop,))
    background.start()
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    background.join()
    expected = {f"pne-{w}-{k}": {"n": 35 + k} for w in range(4) for k in range(5)}
    expected.update({f"pne-{w}-x": {"n": 39} for w in range(4)})
    assert ks.load_records() == dict(sorted(expected.items()))
    ks.close_journal()
    ks.compact_records()
    assert LocalKeyStore.open_or_create(ks.path.parent, "gateway").load_records() == dict(
        sorted(expected.items())
    )
