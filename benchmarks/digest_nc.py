"""What recording the Digest ``nc`` in the store costs, flushed per request or not.

The CPNS Server records each accepted (nonce, nc) in the database by compare and set, so
every server process refuses a replay any of them accepted (docs/deployment.md). This
prints, for a durable write through the group-commit writer (the commit waits for the
disk, like a protocol fact) and for ``record_digest_nc`` (what the server uses: committed
and visible at once, not waited on to reach the disk; on PostgreSQL on a pooled
connection, beside the writer), the mean latency of one record with nothing else in flight and the
records/s of ``--tasks`` concurrent asyncio callers. Figures only, never a verdict.

    PYTHONPATH=src python benchmarks/digest_nc.py [--records 500] [--tasks 16] [--dir .]
    PYTHONPATH=src python benchmarks/digest_nc.py --database postgresql://...

Run it on the disk the server will use (default: a temp directory under --dir, not /tmp,
which may be a RAM disk where fsync is free).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import secrets
import tempfile
import time
from pathlib import Path

from cpns.protocol.digest import advance_nc
from cpns.store import MasterKey, SQLStore, WriteTx

_nonces = itertools.count()


def _record(tx: WriteTx, nonce: str, nc: int) -> None:
    tx.advance_digest_nc(
        nonce, keep_until=2**40, advance=functools.partial(advance_nc, nc=nc, window=64)
    )


async def _one(store: SQLStore, nonce: str, nc: int, durable: bool) -> None:
    if durable:  # a durable job of the group-commit writer, like a protocol fact
        await store.write_async(functools.partial(_record, nonce=nonce, nc=nc))
    else:  # what the server does
        advance = functools.partial(advance_nc, nc=nc, window=64)
        await store.record_digest_nc(nonce, keep_until=2**40, advance=advance)


async def _sequential(store: SQLStore, records: int, durable: bool) -> float:
    """Mean seconds per record, one at a time (a gateway's keep-alive stream)."""
    nonce = f"seq-{secrets.token_hex(8)}-{next(_nonces)}"
    start = time.perf_counter()
    for nc in range(1, records + 1):
        await _one(store, nonce, nc, durable)
    return (time.perf_counter() - start) / records


async def _concurrent(store: SQLStore, records: int, tasks: int, durable: bool) -> float:
    """Records per second with ``tasks`` callers, each on its own nonce."""

    async def worker() -> None:
        nonce = f"con-{secrets.token_hex(8)}-{next(_nonces)}"
        for nc in range(1, records + 1):
            await _one(store, nonce, nc, durable)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return records * tasks / (time.perf_counter() - start)


def _run(target: str, records: int, tasks: int) -> None:
    store = SQLStore.open(target, master_key=MasterKey(bytes(32)))
    try:
        for durable in (True, False):
            latency = asyncio.run(_sequential(store, records, durable))
            rate = asyncio.run(_concurrent(store, max(1, records // tasks), tasks, durable))
            label = "durable writer job" if durable else "record_digest_nc"
            print(
                f"{store.backend:<10} {label:<21} one at a time {latency * 1e3:7.3f} ms/record"
                f"   {tasks} concurrent {rate:8.0f} records/s"
            )
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500, help="records per scenario")
    parser.add_argument("--tasks", type=int, default=16, help="concurrent callers")
    parser.add_argument("--dir", type=Path, default=Path(), help="where the SQLite db goes")
    parser.add_argument("--database", metavar="URL", help="a PostgreSQL database instead")
    args = parser.parse_args()
    if not 1 <= args.records <= 1_000_000 or not 1 <= args.tasks <= 1024:
        parser.error("--records 1..1000000, --tasks 1..1024")
    if args.database:
        _run(args.database, args.records, args.tasks)
        return
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="cpns-bench-") as tmp:
        _run(str(Path(tmp) / "bench.db"), args.records, args.tasks)


if __name__ == "__main__":
    main()
