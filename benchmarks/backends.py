"""Key assignments on SQLite and PostgreSQL, with one and two server processes, side by side.

One run, four deployments in turn, each measured the same way: real processes on
loopback, the server's store on the chosen back end, ``--gateways`` PN GW daemons in
front of it, and this script playing the users, who send EUKey assignments (003, PNEs
without UI) to the gateways' control sockets, ``--concurrency`` at a time, for
``--seconds`` after a warm-up. Two server processes are ``cpns server run --workers 2``
on PostgreSQL, and two ``cpns server run`` processes side by side on one SQLite file
(``--workers`` refuses SQLite: its single write lock makes one process the faster choice,
which this benchmark shows), each gateway enrolled with one of them.

For each deployment it prints assignments per second, latency, the CPU seconds the server
processes and the database server (PostgreSQL's processes; SQLite runs inside the server)
spent, and assignments per server core-second, with and without the database's share;
then the ratio of each deployment to one process on SQLite. Figures only, never a
pass/fail.

    .venv/bin/python benchmarks/backends.py --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from loadgen import gateways_and_users, percentiles_ms, tree_cpu_seconds

from cpns.localnet import LocalDeployment

ROOT = Path(__file__).resolve().parent.parent
PG_CLUSTER = ROOT / "scripts" / "pg-cluster"
USER = "bench"
CONFIGS = (("sqlite", 1), ("sqlite", 2), ("postgresql", 1), ("postgresql", 2))


@dataclass
class Figures:
    backend: str
    processes: int
    rate: float
    latencies: str
    statuses: dict[str, int]
    server_cpu: float
    db_cpu: float
    assignments: int

    @property
    def per_server_core(self) -> float:
        return self.assignments / self.server_cpu if self.server_cpu else 0.0

    @property
    def per_core_with_db(self) -> float:
        spent = self.server_cpu + self.db_cpu
        return self.assignments / spent if spent else 0.0


def _start_servers(
    net: LocalDeployment, backend: str, processes: int
) -> tuple[list[str], list[int]]:
    """The server processes of one deployment: their URLs and PIDs."""
    port_file = net.server_dir / "server.port"
    if backend == "postgresql" or processes == 1:
        port_file.unlink(missing_ok=True)
        args = ["server", "run", "--data-dir", str(net.server_dir)]
        if processes > 1:
            args += ["--workers", str(processes)]
        proc = net.start("server", *args)
        port = int(net.wait_for_file(port_file, name="server"))
        return [f"https://localhost:{port}"], [proc.pid]
    urls, pids = [], []
    for i in range(processes):  # side by side on one SQLite file, each on its own port
        port_file.unlink(missing_ok=True)
        name = f"server{i}"
        proc = net.start(name, "server", "run", "--data-dir", str(net.server_dir))
        port = int(net.wait_for_file(port_file, name=name))
        urls.append(f"https://localhost:{port}")
        pids.append(proc.pid)
    return urls, pids


def _postmaster(pg_dir: Path | None) -> int | None:
    if pg_dir is None:
        return None
    return int((pg_dir / "data" / "postmaster.pid").read_text().split()[0])


def _cpu(pids: list[int]) -> float:
    return sum(tree_cpu_seconds(p) for p in pids)


async def _one(
    args: argparse.Namespace,
    backend: str,
    processes: int,
    base: Path,
    dsn: str | None,
    pg_dir: Path | None,
) -> Figures:
    password = secrets.token_urlsafe(12)
    budget = int(500 * (args.seconds + args.warmup))
    pnes = [f"pne-{i:07d}" for i in range(budget)]
    net = LocalDeployment(base)
    with net.running():
        net.init_server(
            users=[(USER, password)],
            tk_records=[(p, secrets.token_bytes(32)) for p in pnes],
            database=dsn,
        )
        urls, pids = _start_servers(net, backend, processes)
        load = gateways_and_users(net, urls, args.gateways, user_id=USER, password=password)
        await load.closed_loop(args.warmup, args.concurrency)
        postmaster = _postmaster(pg_dir)
        server_before = _cpu(pids)
        db_before = _cpu([postmaster]) if postmaster else 0.0
        started = time.monotonic()
        tally = await load.closed_loop(args.seconds, args.concurrency)
        elapsed = time.monotonic() - started
        server_cpu = _cpu(pids) - server_before
        db_cpu = (_cpu([postmaster]) - db_before) if postmaster else 0.0
    ok = tally.statuses["OK"]
    return Figures(
        backend=backend,
        processes=processes,
        rate=ok / elapsed,
        latencies=percentiles_ms(tally.latencies),
        statuses=dict(tally.statuses),
        server_cpu=server_cpu,
        db_cpu=db_cpu,
        assignments=ok,
    )


async def _main(args: argparse.Namespace) -> int:
    out = subprocess.run(
        [str(PG_CLUSTER), "start"], check=True, capture_output=True, text=True
    ).stdout.split()
    pg_dir, admin_dsn = Path(out[0]), out[1]
    results: list[Figures] = []
    try:
        with tempfile.TemporaryDirectory(prefix="cpns-backends-") as tmp:
            for n, (backend, processes) in enumerate(CONFIGS):
                if args.only and backend not in args.only:
                    continue
                dsn = None
                if backend == "postgresql":
                    name = f"bench{n}"
                    with psycopg.connect(admin_dsn, autocommit=True) as conn:
                        conn.execute(f"CREATE DATABASE {name}".encode())
                    dsn = admin_dsn.rsplit("/", 1)[0] + "/" + name
                print(f"{backend}, {processes} process(es) ...", file=sys.stderr)
                results.append(
                    await _one(
                        args,
                        backend,
                        processes,
                        Path(tmp) / f"run{n}",
                        dsn,
                        pg_dir if dsn else None,
                    )
                )
    finally:
        subprocess.run([str(PG_CLUSTER), "stop", str(pg_dir)], check=False)
    _report(args, results)
    return 0 if all(sum(r.statuses.values()) == r.assignments for r in results) else 1


def _report(args: argparse.Namespace, results: list[Figures]) -> None:
    print(
        f"key assignments (003), {args.gateways} PN GWs, concurrency {args.concurrency}, "
        f"{args.seconds:.0f}s per deployment, one run"
    )
    print(
        f"  {'back end':<11}{'procs':>5}{'assign/s':>10}{'server CPU s':>14}{'DB CPU s':>10}"
        f"{'per server core-s':>19}{'per core-s incl. DB':>21}   latency ms"
    )
    for r in results:
        print(
            f"  {r.backend:<11}{r.processes:>5}{r.rate:>10.1f}{r.server_cpu:>14.1f}"
            f"{r.db_cpu:>10.1f}{r.per_server_core:>19.1f}{r.per_core_with_db:>21.1f}"
            f"   {r.latencies}"
        )
        if set(r.statuses) != {"OK"}:
            print(f"  {'':<16}statuses {r.statuses}")
    base = results[0] if results else None
    if base is not None and base.rate:
        print(f"  ratio to {base.backend} with {base.processes} process(es):")
        for r in results[1:]:
            print(
                f"    {r.backend:<11}{r.processes:>2}: throughput {r.rate / base.rate:.2f}x, "
                f"per core-s incl. DB {r.per_core_with_db / base.per_core_with_db:.2f}x"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30, help="measured seconds each")
    parser.add_argument("--warmup", type=float, default=5, help="warm-up seconds each")
    parser.add_argument("--concurrency", type=int, default=32, help="users at once")
    parser.add_argument("--gateways", type=int, default=2, help="PN GW daemons (default 2)")
    parser.add_argument(
        "--only", action="append", choices=("sqlite", "postgresql"), help="one back end"
    )
    args = parser.parse_args()
    if not (0 < args.seconds <= 600 and 1 <= args.gateways <= 8 and 1 <= args.concurrency <= 256):
        parser.error("--seconds in (0, 600], --gateways 1..8, --concurrency 1..256")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
