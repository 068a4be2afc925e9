"""The PN GW's PNE records in memory and on disk (the key store's records and journal).

:class:`PNELedger` holds the typed :class:`~cpns.gateway.records.PNERecord` of every PNE
the gateway knows, loads them from the key store (moving records an earlier release kept
inside the main map out to their own records), and writes them with *group commit*: every
:meth:`PNELedger.save` that arrives while a write is in flight joins the next one, which
writes each of those PNEs' newest record in one frame of the key store's journal (one
synchronous ``write`` for all of them, O(1) in the number of PNEs the gateway holds, in a
worker thread so the event loop serves other PNEs meanwhile). A caller returns only once
a write holding its record (or a newer one) is durable, so what it persisted is on disk
before the reply that depends on it. Closed journal generations are folded into
the per-PNE record files in the background.

It also hands out one lock per PNE, held by a procedure step that must not interleave with
another on the same PNE (a request and its resend).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Final

from cpns import metrics
from cpns.gateway.records import PNERecord
from cpns.store.keystore import LocalKeyStore

__all__ = ["STORE_NAME", "STORE_VERSION", "PNELedger", "load_pne_maps"]

#: Name of the gateway's key store in its data directory.
STORE_NAME: Final = "gateway"
#: Version of the store layout written by this package.
STORE_VERSION: Final = 1

#: Seconds between two attempts at a compaction that failed.
COMPACTION_RETRY: Final = 5.0

log = logging.getLogger("cpns.gateway")


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


def _retrieve(batch: asyncio.Future[None]) -> None:
    """Mark a batch's outcome as seen (its callers may all have been cancelled)."""
    if not batch.cancelled():
        batch.exception()


class PNELedger:
    """Every PNE's record, as the daemon sees it; the store is written by group commit."""

    def __init__(self, store: LocalKeyStore) -> None:
        self._store = store
        self._records: dict[str, PNERecord] = {}
        #: PNEs whose record the next write holds (an ordered set).
        self._dirty: dict[str, None] = {}
        #: Resolved once the next write is durable (or has failed).
        self._next_write: asyncio.Future[None] | None = None
        #: The task writing batches, while there is anything to write.
        self._writer: asyncio.Task[None] | None = None
        #: The background compaction of closed journal generations, if one runs.
        self._compactor: asyncio.Task[None] | None = None
        #: Whether that compaction failed and waits before the next may start.
        self._compaction_waits = False
        #: One lock per PNE for procedure steps (see lock_for).
        self._locks: dict[str, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"<PNELedger {len(self._records)} PNE(s)>"

    def load(self, data: dict[str, Any]) -> None:
        """Read every record of the locked store whose main map is ``data``, then fold
        what an earlier run left in the journal into the record files.

        Raises StoreError (MalformedRecord for a record of the wrong shape)."""
        self._records = decode_all(load_pne_maps(self._store, data))
        self._store.compact_records()

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
        """Persist the PNE's record: return once it (or a newer one) is durable.

        Group commit: the PNE joins the next write, which starts as soon as the one in
        flight (if any) is done and holds every PNE saved meanwhile, each encoded only
        then, so the store always ends with each PNE's newest state, whatever order
        concurrent callers (an assignment, an Ack) come in. One write is in flight at a
        time, so writes land in order. Cancelling a caller does not cancel the write.

        Raises StoreError (the whole write failed: nothing of it is acknowledged)."""
        self._dirty[pne_id] = None
        write = self._next_write
        if write is None:
            write = self._next_write = asyncio.get_running_loop().create_future()
            write.add_done_callback(_retrieve)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_batches())
        await asyncio.shield(write)

    async def _write_batches(self) -> None:
        """Write batches until no PNE waits; then start a compaction if one is due."""
        try:
            while self._dirty:
                names, self._dirty = self._dirty, {}
                write, self._next_write = self._next_write, None
                assert write is not None
                try:
                    changes = {pne_id: self.get(pne_id).encode() for pne_id in names}
                    await asyncio.to_thread(self._store.commit_records, changes)
                    metrics.GATEWAY_STORE_COMMIT_BATCH.observe(len(changes))
                except asyncio.CancelledError:
                    write.cancel()
                    raise
                except Exception as exc:  # StoreError, or a bug: the callers see it
                    write.set_exception(exc)
                else:
                    write.set_result(None)
                if self._store.compaction_due and self._compactor is None:
                    self._compactor = asyncio.get_running_loop().create_task(self._compact())
        finally:
            self._writer = None
            if self._next_write is not None:  # cancelled: the callers waiting see it
                self._next_write.cancel()
                self._next_write = None
                self._dirty.clear()

    async def _compact(self) -> None:
        """Fold closed journal generations into the record files (in a worker thread).

        A failure is logged and retried after the next write, but not before
        :data:`COMPACTION_RETRY` seconds: the journal keeps everything meanwhile."""
        try:
            count = await asyncio.to_thread(self._store.compact_records)
            log.debug("key store journal compacted: %d PNE record(s) written", count)
        except Exception as exc:  # StoreError
            log.error("cannot compact the key store journal (retried later): %s", exc)
            self._compaction_waits = True
            await asyncio.sleep(COMPACTION_RETRY)
        finally:
            self._compaction_waits = False
            self._compactor = None

    async def drain(self) -> None:
        """Wait until nothing is being written or compacted (before the store is closed)."""
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._compactor is not None:
            if self._compaction_waits:  # a failed one waiting to retry: nothing to finish
                self._compactor.cancel()
            await asyncio.gather(self._compactor, return_exceptions=True)

    def lock_for(self, pne_id: str) -> asyncio.Lock:
        """The PNE's procedure lock."""
        return self._locks.setdefault(pne_id, asyncio.Lock())

    def pending_requests(self) -> int:
        """Stored requests the server has not answered yet."""
        return sum(1 for r in list(self._records.values()) if r.request is not None)

    def pending_deliveries(self) -> int:
        """Stored key sets not yet proven delivered."""
        return sum(1 for r in list(self._records.values()) if r.pending_set is not None)
