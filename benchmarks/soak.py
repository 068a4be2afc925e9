"""Soak and fault runs: several server processes over one database, under steady load.

Real processes on loopback, as in production: one ``cpns server run --workers N`` over
PostgreSQL (or SQLite), ``--gateways`` PN GW daemons in front of it, and this script
playing the users, who send ``assign`` commands (EUKey assignment for a PNE without UI,
003) to the gateways' control sockets. Each run has three phases:

1. probe: ``--probe`` seconds closed-loop at ``--concurrency``, to measure the maximum;
2. soak: ``--duration`` seconds open-loop at ``--load`` times that maximum (default 0.5),
   with the chosen ``--fault``:

   ``none``        nothing breaks;
   ``kill-worker`` every ``--fault-every`` seconds one server worker gets SIGKILL (the
                   supervisor starts a new one; the gateways retry on the others);
   ``db-restart``  PostgreSQL stops in the middle of the run for ``--db-down`` seconds
                   and starts again (the server must answer 503 on ``/readyz`` meanwhile,
                   refuse cleanly, and recover by itself);

3. check: every assignment a gateway acknowledged (status OK) is read back from the
   database: an acknowledged assignment that is not there is *lost*.

It prints figures and never a pass/fail of its own, except its exit code: 1 when an
acknowledged assignment was lost or when, with ``--fault none`` or ``kill-worker``, an
assignment failed. Bounded: it stops by itself after probe + duration + check.

    .venv/bin/python benchmarks/soak.py --duration 600 --fault none
    .venv/bin/python benchmarks/soak.py --duration 600 --fault kill-worker
    .venv/bin/python benchmarks/soak.py --duration 120 --fault db-restart
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import psycopg
from loadgen import Tally, children, gateways_and_users, percentiles_ms, rss_kib

from cpns.localnet import LocalDeployment

ROOT = Path(__file__).resolve().parent.parent
PG_CLUSTER = ROOT / "scripts" / "pg-cluster"
USER = "soak"


def _ready(url: str | None) -> str:
    if url is None:
        return "n/a"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except OSError:
        return "down"


async def _watch(
    server_pid: int,
    ready_url: str | None,
    memory: list[tuple[float, int, int]],
    health: list[tuple[float, str]],
    stop: asyncio.Event,
) -> None:
    """Every second: readiness; every 10 s: RSS of the supervisor and of each worker."""
    started = time.monotonic()
    tick = 0
    while not stop.is_set():
        now = time.monotonic() - started
        health.append((now, await asyncio.to_thread(_ready, ready_url)))
        if tick % 10 == 0:
            workers = children(server_pid)
            rss = [rss_kib(p) for p in workers]
            memory.append((now, rss_kib(server_pid), sum(rss) // max(1, len(rss))))
        tick += 1
        with_timeout = asyncio.wait_for(stop.wait(), 1.0)
        try:
            await with_timeout
        except TimeoutError:
            pass


async def _faults(
    kind: str, server_pid: int, every: float, pg_dir: Path | None, down: float, duration: float
) -> list[str]:
    """Inject the fault; return what was done, with times."""
    done: list[str] = []
    started = time.monotonic()
    if kind == "kill-worker":
        while time.monotonic() - started + every < duration:
            await asyncio.sleep(every)
            workers = children(server_pid)
            if workers:
                victim = workers[0]
                os.kill(victim, signal.SIGKILL)
                done.append(f"{time.monotonic() - started:6.1f}s SIGKILL worker {victim}")
    elif kind == "db-restart" and pg_dir is not None:
        await asyncio.sleep(duration / 2 - down / 2)
        done.append(f"{time.monotonic() - started:6.1f}s PostgreSQL down")
        await asyncio.to_thread(subprocess.run, [str(PG_CLUSTER), "down", str(pg_dir)], check=True)
        await asyncio.sleep(down)
        await asyncio.to_thread(subprocess.run, [str(PG_CLUSTER), "up", str(pg_dir)], check=True)
        done.append(f"{time.monotonic() - started:6.1f}s PostgreSQL up")
    return done


def _stored(dsn: str | None, sqlite_file: Path, ids: list[str]) -> set[str]:
    """Which of ``ids`` have an assigned entity in the database (read directly)."""
    query = "SELECT entity_id FROM entities"
    if dsn is not None:
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(query).fetchall()
    else:
        with sqlite3.connect(sqlite_file) as conn:
            rows = conn.execute(query).fetchall()
    have = {str(r[0]) for r in rows}
    return {i for i in ids if i in have}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--workers", type=int, default=2, help="server processes (default 2)")
    parser.add_argument("--gateways", type=int, default=2, help="PN GW daemons (default 2)")
    parser.add_argument("--probe", type=float, default=30, help="probe seconds (default 30)")
    parser.add_argument("--duration", type=float, default=600, help="soak seconds")
    parser.add_argument("--load", type=float, default=0.5, help="fraction of the maximum")
    parser.add_argument("--concurrency", type=int, default=32, help="probe users")
    parser.add_argument("--fault", choices=("none", "kill-worker", "db-restart"), default="none")
    parser.add_argument("--fault-every", type=float, default=60, help="kill period (s)")
    parser.add_argument("--db-down", type=float, default=10, help="PostgreSQL down (s)")
    parser.add_argument("--pnes", type=int, default=0, help="TK records (0: from the rate)")
    args = parser.parse_args()
    if not (1 <= args.workers <= 16 and 1 <= args.gateways <= 8 and 0 < args.load <= 1):
        parser.error("--workers 1..16, --gateways 1..8, --load in (0, 1]")
    if args.duration > 3600 or args.probe > 600:
        parser.error("bounded runs: --duration <= 3600, --probe <= 600")
    if args.fault == "db-restart" and args.backend != "postgresql":
        parser.error("--fault db-restart needs --backend postgresql")
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    password = secrets.token_urlsafe(12)
    pg_dir: Path | None = None
    dsn: str | None = None
    if args.backend == "postgresql":
        out = subprocess.run(
            [str(PG_CLUSTER), "start"], check=True, capture_output=True, text=True
        ).stdout.split()
        pg_dir, admin_dsn = Path(out[0]), out[1]
        dsn = admin_dsn.rsplit("/", 1)[0] + "/soak"
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(b"CREATE DATABASE soak")
    # Enough PNEs for the probe at a generous maximum and the soak at the chosen load.
    budget = args.pnes or int(400 * args.probe + 400 * args.load * args.duration) + 1000
    pnes = [f"soak-pne-{i:07d}" for i in range(budget)]
    try:
        with tempfile.TemporaryDirectory(prefix="cpns-soak-") as tmp:
            net = LocalDeployment(Path(tmp))
            with net.running():
                print(f"importing {budget} TK records ...", file=sys.stderr)
                net.init_server(
                    users=[(USER, password)],
                    tk_records=[(p, secrets.token_bytes(32)) for p in pnes],
                    database=dsn,
                )
                operator = _free_port()
                net.env["CPNS_SERVER_OPERATOR_PORT"] = str(operator)
                url, server_pid = _start_server(net, args.workers)
                ready_url = f"http://127.0.0.1:{operator}/readyz"
                load = gateways_and_users(
                    net, [url], args.gateways, user_id=USER, password=password
                )

                probe = await load.closed_loop(args.probe, args.concurrency)
                maximum = probe.statuses["OK"] / args.probe
                rate = max(1.0, maximum * args.load)
                print(
                    f"probe: {maximum:.1f} assignments/s at concurrency {args.concurrency} "
                    f"({dict(probe.statuses)}); soak at {rate:.1f}/s for {args.duration:.0f}s, "
                    f"fault {args.fault}",
                    file=sys.stderr,
                )
                memory: list[tuple[float, int, int]] = []
                health: list[tuple[float, str]] = []
                stop = asyncio.Event()
                watcher = asyncio.create_task(_watch(server_pid, ready_url, memory, health, stop))
                faults = asyncio.create_task(
                    _faults(
                        args.fault,
                        server_pid,
                        args.fault_every,
                        pg_dir,
                        args.db_down,
                        args.duration,
                    )
                )
                soak = await load.open_loop(args.duration, rate, max_in_flight=4 * args.concurrency)
                done = await faults
                stop.set()
                await watcher
                acknowledged = probe.acknowledged + soak.acknowledged
                stored = _stored(dsn, net.server_dir / "cpns.db", acknowledged)
                lost = len(acknowledged) - len(stored)
                _report(args, maximum, rate, soak, done, memory, health, lost, len(acknowledged))
    finally:
        if pg_dir is not None:
            subprocess.run([str(PG_CLUSTER), "stop", str(pg_dir)], check=False)
    errors = sum(n for s, n in soak.statuses.items() if s != "OK")
    if lost or (args.fault != "db-restart" and errors):
        return 1
    return 0


def _start_server(net: LocalDeployment, workers: int) -> tuple[str, int]:
    """``cpns server run --workers N``; its URL and the supervisor's PID."""
    port_file = net.server_dir / "server.port"
    port_file.unlink(missing_ok=True)
    process = net.start(
        "server", "server", "run", "--data-dir", str(net.server_dir), "--workers", str(workers)
    )
    port = int(net.wait_for_file(port_file, name="server"))
    return f"https://localhost:{port}", process.pid


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _report(
    args: argparse.Namespace,
    maximum: float,
    rate: float,
    soak: Tally,
    faults: list[str],
    memory: list[tuple[float, int, int]],
    health: list[tuple[float, str]],
    lost: int,
    acknowledged: int,
) -> None:
    print(
        f"soak: {args.backend}, {args.workers} server processes, {args.gateways} PN GWs, "
        f"fault {args.fault}"
    )
    print(f"  maximum (probe)   {maximum:8.1f} assignments/s")
    print(f"  offered load      {rate:8.1f} assignments/s for {args.duration:.0f}s")
    served = soak.statuses["OK"] / args.duration
    print(f"  served            {served:8.1f} assignments/s  statuses {dict(soak.statuses)}")
    print(f"  not sent (behind) {soak.skipped}")
    print(f"  latency ms        {percentiles_ms(soak.latencies)}")
    print(f"  acknowledged      {acknowledged}  lost {lost}")
    for line in faults:
        print(f"  fault             {line}")
    if soak.failures:
        first, last = soak.failures[0][0], soak.failures[-1][0]
        print(f"  failures between  {first:.1f}s and {last:.1f}s of the soak")
        buckets = Counter(int(t // 10) * 10 for t, _ in soak.failures)
        print("  failures per 10 s " + "  ".join(f"{t}s:{n}" for t, n in sorted(buckets.items())))
    not_ready = [t for t, s in health if s not in ("200", "n/a")]
    if not_ready:
        print(
            f"  /readyz not 200   {len(not_ready)} s (from {not_ready[0]:.0f}s to "
            f"{not_ready[-1]:.0f}s); statuses {dict(Counter(s for _, s in health))}"
        )
    if len(memory) >= 2:
        first_min = [m for m in memory if m[0] <= 60] or memory[:1]
        last_min = [m for m in memory if m[0] >= memory[-1][0] - 60] or memory[-1:]
        avg = lambda rows, i: sum(r[i] for r in rows) / len(rows) / 1024  # noqa: E731
        print(
            f"  RSS MiB           supervisor {avg(first_min, 1):.1f} -> {avg(last_min, 1):.1f}"
            f"   worker (mean) {avg(first_min, 2):.1f} -> {avg(last_min, 2):.1f}"
            "   (first minute -> last minute)"
        )


if __name__ == "__main__":
    sys.exit(main())
