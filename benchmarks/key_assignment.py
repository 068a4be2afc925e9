"""Key assignments per second through one PN GW against one CPNS Server process.

Real processes on loopback, as in production: ``cpns server run`` (HTTPS, SQLite with
fsync per group commit) and ``cpns gateway run``. The benchmark plays the user's UI: it
derives the password key once (as ``cpns gateway assign`` does) and sends ``assign``
commands to the gateway's control socket, ``--concurrency`` at a time, one distinct PNE
each. It measures from command to the gateway's answer that the key set is stored (the
003 request/response round trip through the gateway, Digest and TLS included; delivery to
a PNE is not part of it) and prints a figure, never a pass/fail.

    .venv/bin/python benchmarks/key_assignment.py --assignments 2000 --concurrency 16

``--database postgresql://...`` runs the server on that (existing, empty) PostgreSQL
database instead of SQLite (``scripts/pg-cluster start`` makes a throwaway cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loadgen import assign
from rich.progress import Progress

from cpns.crypto.kdf import password_key
from cpns.localnet import LocalDeployment
from cpns.protocol.key_assignment import claim_key


async def _assign(control: Path, pne_id: str, key_hex: str, claim_hex: str) -> tuple[float, str]:
    started = time.perf_counter()
    status = await assign(control, pne_id, "bench", key_hex, claim_hex)
    return time.perf_counter() - started, status


async def _run(
    control: Path,
    pnes: list[str],
    key_hex: str,
    claims: dict[str, str],
    concurrency: int,
    progress: Progress,
) -> tuple[list[float], dict[str, int], float]:
    task = progress.add_task("assigning", total=len(pnes))
    queue: asyncio.Queue[str] = asyncio.Queue()
    for pne in pnes:
        queue.put_nowait(pne)
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    async def worker() -> None:
        while not queue.empty():
            pne = queue.get_nowait()
            latency, status = await _assign(control, pne, key_hex, claims[pne])
            latencies.append(latency)
            statuses[status] = statuses.get(status, 0) + 1
            progress.advance(task)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, statuses, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assignments", type=int, default=1000, help="how many (default 1000)")
    parser.add_argument("--concurrency", type=int, default=16, help="commands in flight")
    parser.add_argument("--warmup", type=int, default=50, help="assignments not measured")
    parser.add_argument(
        "--database", metavar="URL", help="an empty PostgreSQL database (default: SQLite)"
    )
    args = parser.parse_args()
    if not 1 <= args.assignments <= 100_000 or not 1 <= args.concurrency <= 256:
        parser.error("--assignments 1..100000, --concurrency 1..256")
    password = secrets.token_urlsafe(12)
    total = args.assignments + args.warmup
    pnes = [f"bench-pne-{i:06d}" for i in range(total)]
    with tempfile.TemporaryDirectory(prefix="cpns-bench-") as tmp:
        net = LocalDeployment(Path(tmp))
        with net.running(), Progress(transient=True) as progress:
            net.init_server(
                users=[("bench", password)],
                tk_records=[(p, secrets.token_bytes(32)) for p in pnes],
                database=args.database,
            )
            url = net.start_server()
            net.enroll_gateway(
                entity_id="bench-gw", user_id="bench", password=password, server_url=url
            )
            net.start_gateway()
            control = net.gateway_dir() / "control.sock"
            key_hex = password_key(password, realm="cpns", user_id="bench").hex()
            # The claim key of each PNE's label code, as `cpns gateway assign` derives it.
            claims = {p: claim_key(code).hex() for p, code in net.claim_codes.items()}
            asyncio.run(
                _run(control, pnes[: args.warmup], key_hex, claims, args.concurrency, progress)
            )
            latencies, statuses, elapsed = asyncio.run(
                _run(control, pnes[args.warmup :], key_hex, claims, args.concurrency, progress)
            )
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    q = statistics.quantiles(ms, n=100) if len(ms) >= 2 else ms * 99
    backend = "PostgreSQL" if args.database else "SQLite"
    print(
        f"key assignments (003) through one PN GW, one server process on {backend}, "
        f"concurrency {args.concurrency}"
    )
    print(f"  assignments   {len(ms)}  statuses {statuses}")
    print(f"  throughput    {len(ms) / elapsed:8.1f} assignments/s")
    print(f"  latency ms    p50 {q[49]:.2f}  p90 {q[89]:.2f}  p99 {q[98]:.2f}  max {ms[-1]:.2f}")
    return 0 if statuses.get("OK", 0) == len(ms) else 1


if __name__ == "__main__":
    sys.exit(main())
