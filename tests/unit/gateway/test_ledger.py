"""The PN GW's PNE ledger (cpns.gateway.ledger): typed records over the sealed key store,
one file per PNE; records an earlier release kept in the main map are moved out; a
malformed stored record is refused, not half-read."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cpns.errors import StoreError
from cpns.gateway.daemon import offline_status
from cpns.gateway.ledger import STORE_NAME, PNELedger
from cpns.gateway.records import MalformedRecord, PendingRequest, PNERecord
from cpns.store.keystore import LocalKeyStore

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
