"""The PN GW's PNE ledger (cpns.gateway.ledger): typed records over the sealed key store,
written by group commit to its journal and folded into one file per PNE; records an
earlier release kept in the main map are moved out; a malformed stored record is refused,
not half-read."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from cpns.errors import StoreError
from cpns.gateway.daemon import offline_status
from cpns.gateway.ledger import COMPACTION_RETRY, STORE_NAME, PNELedger
from cpns.gateway.records import MalformedRecord, PendingRequest, PNERecord
from cpns.store.keystore import LocalKeyStore, RecordChanges

TXID = bytes(range(16))
REQUEST = {"txid": TXID, "encoded": b"x", "user_id": "alice", "created_at": 7}


def _store(tmp_path: Path) -> LocalKeyStore:
    return LocalKeyStore.open_or_create(tmp_path, STORE_NAME)


def test_records_in_the_main_map_are_moved_to_their_own_files(tmp_path: Path) -> None:
    """An earlier release kept PNE records inside the main map (``pnes``): loading moves
    each to its own file (a file already there wins) and drops them from the map."""
    store = _store(tmp_path)
    store.save_record("pne-2", {"last_status": "OK"})
    data: dict[str, Any] = {
        "entity_id": "gw-1",
        "pnes": {"pne-1": {"request": REQUEST}, "pne-2": {"last_status": "REPLAY"}},
    }
    store.save(data)
    with store.lock():
        ledger = PNELedger(store)
        ledger.load(store.load())
        assert ledger.get("pne-1").request == PendingRequest.decode(REQUEST)
        assert ledger.get("pne-2").last_status == "OK"
        assert "pnes" not in store.load()
        assert store.load_records() == {
            "pne-1": {"request": REQUEST},
            "pne-2": {"last_status": "OK"},
        }


def test_save_writes_the_newest_record_in_the_stored_format(tmp_path: Path) -> None:
    """put changes memory only; save writes the PNE's current record as the key store map
    earlier releases wrote. get of an unknown PNE is an empty record, not an entry."""
    store = _store(tmp_path)
    with store.lock():
        ledger = PNELedger(store)
        ledger.load(store.load())
        assert ledger.get("pne-9") == PNERecord()
        assert "pne-9" not in ledger.records
        ledger.put("pne-1", PNERecord(request=PendingRequest.decode(REQUEST)))
        assert store.load_records() == {}
        asyncio.run(ledger.save("pne-1"))
        assert store.load_records() == {"pne-1": {"request": REQUEST}}
        assert (ledger.pending_requests(), ledger.pending_deliveries()) == (1, 0)


def test_a_malformed_stored_record_is_refused(tmp_path: Path) -> None:
    """A record file of the wrong shape stops the load with a StoreError naming the PNE
    (offline status too), rather than a daemon running on half a record."""
    store = _store(tmp_path)
    store.save({"entity_id": "gw-1"})
    store.save_record("pne-1", {"set": {"txid": "not bytes"}})
    with store.lock():
        ledger = PNELedger(store)
        with pytest.raises(MalformedRecord, match="record of 'pne-1'"):
            ledger.load(store.load())
    with pytest.raises(StoreError, match="pne-1"):
        offline_status(tmp_path)


def test_saves_made_during_a_write_share_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit (docs/deployment.md): every save made while a write is in flight joins
    the next write, one journal append for all of them, and none returns before the write
    holding its record is durable."""
    store = _store(tmp_path)
    writes: list[list[str]] = []
    original = LocalKeyStore.commit_records

    def slow_commit(s: LocalKeyStore, changes: RecordChanges) -> None:
        writes.append(sorted(changes))
        time.sleep(0.05 if len(writes) == 1 else 0)
        original(s, changes)

    monkeypatch.setattr(LocalKeyStore, "commit_records", slow_commit)
    done: list[str] = []

    async def scenario(ledger: PNELedger) -> None:
        async def save(pne_id: str) -> None:
            ledger.put(pne_id, PNERecord(last_status=pne_id))
            await ledger.save(pne_id)
            done.append(pne_id)
            assert pne_id in store.load_records(), "durable before save returns"

        first = asyncio.create_task(save("pne-0"))
        while not writes:
            await asyncio.sleep(0.001)
        await asyncio.gather(first, *(save(f"pne-{n}") for n in range(1, 9)))
        await ledger.drain()

    with store.lock():
        ledger = PNELedger(store)
        ledger.load(store.load())
        asyncio.run(scenario(ledger))
    assert writes == [["pne-0"], [f"pne-{n}" for n in range(1, 9)]]
    assert sorted(done) == [f"pne-{n}" for n in range(9)]
    assert store.load_records() == {f"pne-{n}": {"last_status": f"pne-{n}"} for n in range(9)}


def test_a_failed_write_fails_every_save_in_it_and_the_next_write_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our rule (docs/deployment.md): when a group write fails, every save in it raises
    StoreError (nothing of it is acknowledged; each caller then keeps its earlier state),
    and the next write goes ahead."""
    store = _store(tmp_path)
    original = LocalKeyStore.commit_records
    failures = [True]

    def commit(s: LocalKeyStore, changes: RecordChanges) -> None:
        if failures and failures.pop():
            raise StoreError("disk full")
        original(s, changes)

    monkeypatch.setattr(LocalKeyStore, "commit_records", commit)

    async def scenario(ledger: PNELedger) -> list[BaseException | None]:
        for pne_id in ("pne-1", "pne-2"):
            ledger.put(pne_id, PNERecord(last_status="OK"))
        outcomes = await asyncio.gather(
            ledger.save("pne-1"), ledger.save("pne-2"), return_exceptions=True
        )
        await ledger.save("pne-3")
        return list(outcomes)

    with store.lock():
        ledger = PNELedger(store)
        ledger.load(store.load())
        outcomes = asyncio.run(scenario(ledger))
    assert [type(o) for o in outcomes] == [StoreError, StoreError]
    assert store.load_records() == {"pne-3": {}}


def test_closed_journal_generations_are_compacted_in_the_background(tmp_path: Path) -> None:
    """Our rule (docs/deployment.md): once the journal generation in use is closed, the
    ledger folds it into the per-PNE record files in the background; at start-up it folds
    what an earlier run left in the journal."""
    store = _store(tmp_path)
    store.save_record("pne-0", {"last_status": "OK"})  # an earlier run's journal
    store.close_journal()

    async def scenario(ledger: PNELedger) -> None:
        store.journal_limit = 1
        ledger.put("pne-1", PNERecord(last_status="OK"))
        await ledger.save("pne-1")
        await ledger.drain()

    with store.lock():
        ledger = PNELedger(store)
        ledger.load(store.load())
        assert sorted(p.name for p in (tmp_path / "gateway.d").iterdir()) == ["pne-0.store"]
        asyncio.run(scenario(ledger))
    assert sorted(p.name for p in (tmp_path / "gateway.d").iterdir()) == [
        "pne-0.store",
        "pne-1.store",
    ]
    assert not list(tmp_path.glob("gateway.journal-*"))


def test_a_failed_compaction_loses_nothing_and_waits_before_retrying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Our rule (docs/deployment.md): a compaction that fails is logged and retried later
    (not after every write), the journal keeps every record meanwhile, and stopping does
    not wait out the retry delay."""
    store = _store(tmp_path)
    attempts: list[int] = []

    def failing(s: LocalKeyStore) -> int:
        attempts.append(1)
        raise StoreError("disk full")

    async def scenario(ledger: PNELedger) -> None:
        store.journal_limit = 1
        for n in range(3):
            ledger.put(f"pne-{n}", PNERecord(last_status="OK"))
            await ledger.save(f"pne-{n}")
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await ledger.drain()
        assert time.monotonic() - started < COMPACTION_RETRY

    with store.lock():
        ledger = PNELedger(store)
        ledger.load(store.load())
        monkeypatch.setattr(LocalKeyStore, "compact_records", failing)
        asyncio.run(scenario(ledger))
    monkeypatch.undo()
    assert attempts == [1]
    assert "cannot compact the key store journal" in caplog.text
    assert sorted(store.load_records()) == ["pne-0", "pne-1", "pne-2"]
