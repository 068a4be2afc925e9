"""Cost of a flood of unauthenticated bad enrolments against one CPNS Server process.

A real ``cpns server run`` on loopback (HTTPS, SQLite with fsync). The benchmark sends
``--requests`` enrolment requests with wrong passwords for ``--users`` User IDs from
``--sources`` loopback addresses (127.0.3.1, ...), ``--concurrency`` at a time, then stops
the server (which flushes what it holds) and prints the refusals per second, the outcomes,
and how much the database grew per 10,000 refusals (deviations D-SRV-2: refusals are
aggregated in memory, not written one row per request). A figure, never a pass/fail.

    .venv/bin/python benchmarks/unauth_flood.py --requests 20000 --concurrency 32
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
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
