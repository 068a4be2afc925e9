"""Cost of a flood of unauthenticated bad enrolments against one CPNS Server process.

A real ``cpns server run`` on loopback (HTTPS, SQLite with fsync). The benchmark sends
``--requests`` enrolment requests with wrong passwords for ``--users`` User IDs from
``--sources`` loopback addresses (127.0.3.1, ...), ``--concurrency`` at a time, then stops
the server (which flushes what it holds) and prints the refusals per second, the outcomes,
and how much the database grew per 10,000 refusals (deviations D-SRV-2: refusals are
aggregated in memory, not written one row per request). A figure, never a pass/fail.

    .venv/bin/python benchmarks/unauth_flood.py --requests 20000 --concurrency 32

``--in-process`` runs the same flood straight into the service layer over a SQLite store
(no HTTP, no TLS: the server's own cost), then as many correct enrolments, and prints
refusals/s, store commits per refusal and per real request.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import secrets
import sqlite3
import ssl
import sys
import tempfile
import time
from pathlib import Path

import httpx

from cpns.crypto.kdf import password_key
from cpns.errors import ErrorCode
from cpns.localnet import LocalDeployment
from cpns.messages.codec import decode, encode
from cpns.protocol.user_key_assignment import UserKeyAssignmentClient
from cpns.runtime import SystemRandom
from cpns.types import EntityKind


def _db_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.glob("cpns.db*"))


def _audit_rows(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])
    finally:
        conn.close()


def _bodies(count: int, users: int) -> list[bytes]:
    key = password_key("a wrong guess", realm="cpns", user_id="bench")
    rng = SystemRandom()
    out = []
    for i in range(count):
        client = UserKeyAssignmentClient(
            entity_id=f"gw-{i % 97}", entity_kind=EntityKind.PN_GW, server_id="cpns-server", rng=rng
        )
        # The proof is computed under one wrong key: the server checks it all the same.
        client.start(user_id=f"user-{i % users}", password_key=key, now=int(time.time()))
        [message] = client.messages_to_send()
        out.append(encode(message))
    return out


async def _flood(
    url: str, ca: Path, bodies: list[bytes], sources: int, concurrency: int
) -> tuple[float, collections.Counter[str]]:
    context = ssl.create_default_context(cafile=str(ca))
    clients = [
        httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(verify=context, local_address=f"127.0.3.{n + 1}"),
            timeout=30.0,
        )
        for n in range(sources)
    ]
    statuses: collections.Counter[str] = collections.Counter()
    queue = iter(zip(bodies, itertools.cycle(clients), strict=False))

    async def worker() -> None:
        for body, client in queue:
            response = await client.post(
                url, content=body, headers={"content-type": "application/cbor"}
            )
            status = decode(response.content).status  # type: ignore[attr-defined]
            statuses[ErrorCode(status).name] += 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        for client in clients:
            await client.aclose()
    return time.perf_counter() - started, statuses


async def _in_process(requests: int, users: int, sources: int, concurrency: int) -> None:
    from cpns.protocol.key_assignment import AssignmentPolicy
    from cpns.records import UserRecord
    from cpns.server.service import CPNSService
    from cpns.store.masterkey import MasterKey
    from cpns.store.sql import SQLStore

    with tempfile.TemporaryDirectory() as tmp:
        store = SQLStore.open(Path(tmp) / "cpns.db", master_key=MasterKey.generate(Path(tmp) / "k"))
        good = password_key("bench password", realm="cpns", user_id="bench")
        store.write(
            lambda tx: tx.add_user(UserRecord(user_id="bench", password_key=good, created_at=0))
        )
        svc = CPNSService(
            store=store,
            policy=AssignmentPolicy(server_id="cpns-server"),
            rng=SystemRandom(),
            clock=lambda: int(time.time()),
        )
        bodies = [decode(b) for b in _bodies(requests, users)]
        size0, commits0 = _db_bytes(Path(tmp)), store.write_stats.commits
        statuses: collections.Counter[str] = collections.Counter()

        async def one(i: int) -> None:
            reply = await svc.handle(bodies[i], authenticated=None, source=f"10.0.{i % sources}.1")
            statuses[ErrorCode(reply.status).name] += 1

        started = time.perf_counter()
        for start in range(0, requests, concurrency):
            await asyncio.gather(
                *(one(i) for i in range(start, min(start + concurrency, requests)))
            )
        await svc.flush()
        elapsed = time.perf_counter() - started
        refusal_commits = store.write_stats.commits - commits0
        grown = _db_bytes(Path(tmp)) - size0
        print(f"in process: {requests} refusals {dict(statuses)}")
        print(f"{requests / elapsed:.0f} refusals/s, {refusal_commits} commits in all")
        print(f"database growth: {grown * 10_000 / requests / 1024:.1f} KiB per 10k refusals")
        real = min(requests, 2000)
        commits1 = store.write_stats.commits
        started = time.perf_counter()
        for i in range(real):
            client = UserKeyAssignmentClient(
                entity_id=f"gw-ok-{i}",
                entity_kind=EntityKind.PN_GW,
                server_id="cpns-server",
                rng=SystemRandom(),
            )
            client.start(user_id="bench", password_key=good, now=int(time.time()))
            [message] = client.messages_to_send()
            reply = await svc.handle(message, authenticated=None, source="10.9.9.9")
            assert reply.status is ErrorCode.OK, reply.status
        elapsed = time.perf_counter() - started
        per_real = (store.write_stats.commits - commits1) / real
        print(f"{real} correct enrolments: {real / elapsed:.0f}/s, {per_real:.2f} commits each")
        print(f"commits per refusal: {refusal_commits / requests:.4f}")
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--in-process", action="store_true", help="service layer, no HTTP")
    args = parser.parse_args()
    if args.in_process:
        asyncio.run(_in_process(args.requests, args.users, args.sources, args.concurrency))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        net = LocalDeployment(Path(tmp) / "net")
        with net.running():
            net.init_server(
                users=[("bench", "bench password")],
                tk_records=[("pne-1", secrets.token_bytes(32))],
            )
            url = net.start_server().rstrip("/") + "/cpns/v1/messages"
            db = net.server_dir / "cpns.db"
            size_before, rows_before = _db_bytes(net.server_dir), _audit_rows(db)
            bodies = _bodies(args.requests, args.users)
            elapsed, statuses = asyncio.run(
                _flood(url, net.ca_file, bodies, args.sources, args.concurrency)
            )
            net.stop("server")
            grown = _db_bytes(net.server_dir) - size_before
            rows = _audit_rows(db) - rows_before
    per_10k = 10_000 / max(args.requests, 1)
    print(f"requests {args.requests}, sources {args.sources}, users {args.users}")
    print(f"statuses {dict(statuses)}")
    print(f"{args.requests / elapsed:.0f} refusals/s over HTTPS ({elapsed:.2f} s)")
    print(f"audit rows added: {rows} ({rows * per_10k:.1f} per 10k refusals)")
    print(f"database growth: {grown} bytes ({grown * per_10k / 1024:.1f} KiB per 10k refusals)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
