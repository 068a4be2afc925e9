"""Durable writes per second of SQLStore: one writer vs many (the group-commit gain).

Every write is what a protocol request persists: one used nonce and one audit event, in
one durable transaction (WAL, synchronous=FULL: fsync at each commit). With one caller each
write pays its own fsync; with many concurrent callers the writer thread puts every queued
write into one transaction, so many writes share one fsync (DESIGN §8).

Usage::

    PYTHONPATH=src python benchmarks/store_write.py [--writes 2000] [--threads 32] [--dir .]

Run it on the disk the server will use (the default is a temp directory under --dir, not
/tmp, which may be a RAM disk where fsync is free and the comparison meaningless).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cpns.store import AuditEvent, MasterKey, SQLStore, WriteTx

_counter = itertools.count()


def request_write(tx: WriteTx) -> None:
    """The facts one authentication request persists before its reply."""
    n = next(_counter)
    tx.use_nonce(n.to_bytes(8, "big") * 4, expires_at=n)
    tx.audit(AuditEvent(at=n, actor="gw-bench", procedure="bench", outcome="OK"))


def run_threads(store: SQLStore, threads: int, writes: int) -> None:
    """``threads`` threads, each doing ``writes`` blocking writes."""

    def worker() -> None:
        for _ in range(writes):
            store.write(request_write)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def run_asyncio(store: SQLStore, tasks: int, writes: int) -> None:
    """``tasks`` asyncio tasks on one loop, each awaiting ``writes`` write_async calls."""

    async def worker() -> None:
        for _ in range(writes):
            await store.write_async(request_write)

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(tasks)))

    asyncio.run(main())


def measure(
    directory: Path, label: str, writers: int, writes: int, run: Callable[..., None]
) -> float:
    """Run one scenario on a fresh database; print and return writes/s."""
    with tempfile.TemporaryDirectory(dir=directory, prefix="cpns-bench-") as tmp:
        store = SQLStore.open(Path(tmp) / "bench.db", master_key=MasterKey(bytes(32)))
        try:
            store.write(request_write)  # warm up: connection, statement cache
            before = store.write_stats
            start = time.perf_counter()
            run(store, writers, writes)
            elapsed = time.perf_counter() - start
            stats = store.write_stats
        finally:
            store.close()
    total = writers * writes
    commits = stats.commits - before.commits
    rate = total / elapsed
    print(
        f"{label:<28} {total:>7} writes in {elapsed:6.2f} s = {rate:>8.0f} writes/s, "
        f"{commits:>6} commits ({total / max(commits, 1):5.1f} writes/commit)"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=2000, help="writes per writer")
    parser.add_argument("--threads", type=int, default=32, help="concurrent writers")
    parser.add_argument("--dir", type=Path, default=Path(), help="where the db goes")
    args = parser.parse_args()
    writes = max(1, args.writes)
    single = measure(args.dir, "1 thread", 1, writes, run_threads)
    many = measure(args.dir, f"{args.threads} threads", args.threads, writes, run_threads)
    tasks = measure(args.dir, f"{args.threads} asyncio tasks", args.threads, writes, run_asyncio)
    print(f"group-commit gain: {many / single:.1f}x (threads), {tasks / single:.1f}x (asyncio)")


if __name__ == "__main__":
    main()
