"""The PN GW's PNE records in memory and on disk (one sealed file per PNE).

:class:`PNELedger` holds the typed :class:`~cpns.gateway.records.PNERecord` of every PNE
the gateway knows, loads them from the key store (moving records an earlier release kept
inside the main map out to their own files), and writes one PNE's record at a time: atomic
and fsynced, O(1) in the number of PNEs, in a worker thread so the event loop serves other
PNEs meanwhile. It also hands out one lock per PNE, held by a procedure step that must not
interleave with another on the same PNE (a request and its resend).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Final

from cpns.gateway.records import PNERecord
from cpns.store.keystore import LocalKeyStore

__all__ = ["STORE_NAME", "STORE_VERSION", "PNELedger", "load_pne_maps"]

#: Name of the gateway's key store in its data directory.
STORE_NAME: Final = "gateway"
#: Version of the store layout written by this package.
STORE_VERSION: Final = 1


def load_pne_maps(store: LocalKeyStore, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The PNE records (key store maps) of a locked store. Records kept inside the main map
    by an earlier release (``pnes``) are moved out to their own files first, then dropped
    from the map.

    Raises StoreError."""
    legacy: dict[str, dict[str, Any]] = data.get("pnes", {})
    records = store.load_records()
    if legacy:
        for pne_id, record in legacy.items():
            if pne_id not in records:
                store.save_record(pne_id, record)
                records[pne_id] = record
        del data["pnes"]
        store.save(data)
    return records


def decode_all(maps: Mapping[str, object]) -> dict[str, PNERecord]:
    """Typed records of stored maps. Raises MalformedRecord naming the PNE."""
    return {pne_id: PNERecord.decode(m, f"record of {pne_id!r}") for pne_id, m in maps.items()}


class PNELedger:
    """Every PNE's record, as the daemon sees it; the store is written one PNE at a time."""

    def __init__(self, store: LocalKeyStore) -> None:
        self._store = store
        self._records: dict[str, PNERecord] = {}
        #: One lock per PNE record file: its writes never overlap (see save).
        self._write_locks: dict[str, asyncio.Lock] = {}
        #: One lock per PNE for procedure steps (see lock_for).
        self._locks: dict[str, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"<PNELedger {len(self._records)} PNE(s)>"

    def load(self, data: dict[str, Any]) -> None:
        """Read every record of the locked store whose main map is ``data``.

        Raises StoreError (MalformedRecord for a record of the wrong shape)."""
        self._records = decode_all(load_pne_maps(self._store, data))

    @property
    def records(self) -> Mapping[str, PNERecord]:
        """PNE ID -> record (a live view: do not keep it across awaits)."""
        return self._records

    def get(self, pne_id: str) -> PNERecord:
        """The PNE's record; an empty one (not added) if it has none."""
        return self._records.get(pne_id) or PNERecord()

    def put(self, pne_id: str, record: PNERecord) -> None:
        """Replace the PNE's record in memory (:meth:`save` writes it)."""
        self._records[pne_id] = record

    async def save(self, pne_id: str) -> None:
        """Persist one PNE's record (atomic, fsynced; O(1) in the number of PNEs).

        The write and its fsyncs run in a worker thread, so the loop serves other PNEs
        meanwhile. Writes of one PNE are serialised and each encodes the record only once
        it is its turn, so the file always ends with the newest state, whatever order
        concurrent callers (an assignment, an Ack) come in.

        Raises StoreError."""
        async with self._write_locks.setdefault(pne_id, asyncio.Lock()):
            snapshot = self.get(pne_id).encode()
            await asyncio.to_thread(self._store.save_record, pne_id, snapshot)

    def lock_for(self, pne_id: str) -> asyncio.Lock:
        """The PNE's procedure lock."""
        return self._locks.setdefault(pne_id, asyncio.Lock())

    def pending_requests(self) -> int:
        """Stored requests the server has not answered yet."""
        return sum(1 for r in list(self._records.values()) if r.request is not None)

    def pending_deliveries(self) -> int:
        """Stored key sets not yet proven delivered."""
        return sum(1 for r in list(self._records.values()) if r.pending_set is not None)
