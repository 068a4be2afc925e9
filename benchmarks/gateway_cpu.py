"""The PN GW's CPU time per upstream exchange (gateway -> CPNS Server), under load.

Real processes on loopback, as in production: ``cpns server run`` (HTTPS, SQLite) and one
``cpns gateway run``. The script plays the users: it sends EUKey assignments (003, PNEs
without UI) to the gateway's control socket, ``--concurrency`` at a time, for
``--seconds`` after a warm-up, and reads the gateway process's CPU time (user + system,
``/proc/<pid>/stat``) before and after the measured phase. The number of upstream
exchanges comes from the gateway's own ``cpns_gateway_upstream_exchanges_total`` (its
operator port, scraped once before and once after), so a retried or re-challenged
exchange is counted as the gateway counts it.

It prints the gateway's CPU milliseconds per upstream exchange and per assignment, the
assignments per second and the server's CPU per assignment (for scale). Figures only,
never a pass/fail; the machine may be shared, so compare medians of several runs.

    .venv/bin/python benchmarks/gateway_cpu.py --seconds 20 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from loadgen import Load, cpu_seconds, percentiles_ms, tree_cpu_seconds

from cpns.crypto.kdf import password_key
from cpns.localnet import LocalDeployment
from cpns.protocol.key_assignment import claim_key

USER = "bench"
_TICK = os.sysconf("SC_CLK_TCK")
_EXCHANGES = "cpns_gateway_upstream_exchanges_total"


@dataclass
class Figures:
    assignments: int
    rate: float
    exchanges: float
    gateway_cpu: float
    main_thread_cpu: float
    server_cpu: float
    latencies: str
    statuses: dict[str, int]

    @property
    def ms_per_exchange(self) -> float:
        return 1000 * self.gateway_cpu / self.exchanges if self.exchanges else 0.0

    @property
    def main_ms_per_exchange(self) -> float:
        return 1000 * self.main_thread_cpu / self.exchanges if self.exchanges else 0.0

    @property
    def server_ms_per_assignment(self) -> float:
        return 1000 * self.server_cpu / self.assignments if self.assignments else 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _thread_cpu(pid: int) -> float:
    """CPU time of a process's main thread (its event loop; key store writes run in
    worker threads)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _exchanges(metrics_url: str) -> float:
    """The sum of the gateway's upstream exchange counter over all its labels."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(_EXCHANGES + "{")
    )


async def _one(args: argparse.Namespace, base: Path) -> Figures:
    password = secrets.token_urlsafe(12)
    budget = int(600 * (args.seconds + args.warmup)) + 100
    pnes = [f"pne-{i:07d}" for i in range(budget)]
    net = LocalDeployment(base)
    operator = _free_port()
    net.env["CPNS_GATEWAY_OPERATOR_PORT"] = str(operator)
    metrics_url = f"http://127.0.0.1:{operator}/metrics"
    with net.running():
        net.init_server(
            users=[(USER, password)],
            tk_records=[(p, secrets.token_bytes(32)) for p in pnes],
        )
        port_file = net.server_dir / "server.port"
        port_file.unlink(missing_ok=True)
        server = net.start("server", "server", "run", "--data-dir", str(net.server_dir))
        url = f"https://localhost:{net.wait_for_file(port_file, name='server')}"
        net.enroll_gateway(entity_id="bench-gw", user_id=USER, password=password, server_url=url)
        gw_port = net.gateway_dir() / "gateway.port"
        gw_port.unlink(missing_ok=True)
        gateway = net.start("gw", "gateway", "run", "--data-dir", str(net.gateway_dir()))
        net.wait_for_file(gw_port, name="gw")
        key_hex = password_key(password, realm="cpns", user_id=USER).hex()
        claims = {p: claim_key(c).hex() for p, c in net.claim_codes.items()}
        load = Load([net.gateway_dir() / "control.sock"], USER, key_hex, claims)
        await load.closed_loop(args.warmup, args.concurrency)
        exchanges_before = _exchanges(metrics_url)
        gateway_before = cpu_seconds(gateway.pid)
        main_before = _thread_cpu(gateway.pid)
        server_before = tree_cpu_seconds(server.pid)
        started = time.monotonic()
        tally = await load.closed_loop(args.seconds, args.concurrency)
        elapsed = time.monotonic() - started
        gateway_cpu = cpu_seconds(gateway.pid) - gateway_before
        main_thread_cpu = _thread_cpu(gateway.pid) - main_before
        server_cpu = tree_cpu_seconds(server.pid) - server_before
        exchanges = _exchanges(metrics_url) - exchanges_before
    ok = tally.statuses["OK"]
    return Figures(
        assignments=ok,
        rate=ok / elapsed,
        exchanges=exchanges,
        gateway_cpu=gateway_cpu,
        main_thread_cpu=main_thread_cpu,
        server_cpu=server_cpu,
        latencies=percentiles_ms(tally.latencies),
        statuses=dict(tally.statuses),
    )


async def _main(args: argparse.Namespace) -> int:
    results = []
    with tempfile.TemporaryDirectory(prefix="cpns-gwcpu-") as tmp:
        for n in range(args.runs):
            print(f"run {n + 1} of {args.runs} ...", file=sys.stderr)
            results.append(await _one(args, Path(tmp) / f"run{n}"))
    print(
        f"PN GW CPU per upstream exchange: EUKey assignments (003), one PN GW, one server "
        f"process on SQLite, concurrency {args.concurrency}, {args.seconds:.0f}s per run"
    )
    print(
        f"  {'run':>4}{'assign/s':>10}{'exchanges':>11}{'GW CPU s':>10}"
        f"{'GW CPU ms/exchange':>20}{'main thread':>13}{'server ms/assign':>18}   latency ms"
    )
    for n, r in enumerate(results, 1):
        print(
            f"  {n:>4}{r.rate:>10.1f}{r.exchanges:>11.0f}{r.gateway_cpu:>10.2f}"
            f"{r.ms_per_exchange:>20.3f}{r.main_ms_per_exchange:>13.3f}"
            f"{r.server_ms_per_assignment:>18.3f}   {r.latencies}  {r.statuses}"
        )
    median = statistics.median
    print(
        f"  median: {median(r.rate for r in results):.1f} assignments/s, "
        f"gateway CPU {median(r.ms_per_exchange for r in results):.3f} ms per upstream exchange "
        f"(main thread {median(r.main_ms_per_exchange for r in results):.3f})"
    )
    return 0 if all(r.assignments == sum(r.statuses.values()) for r in results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="measured (default 20)")
    parser.add_argument("--warmup", type=float, default=3, help="seconds not measured")
    parser.add_argument("--concurrency", type=int, default=16, help="commands in flight")
    parser.add_argument("--runs", type=int, default=1, help="deployments in turn (default 1)")
    args = parser.parse_args()
    if not (0 < args.seconds <= 600 and 0 <= args.warmup <= 60):
        parser.error("--seconds in (0, 600], --warmup in [0, 60]")
    if not (1 <= args.concurrency <= 256 and 1 <= args.runs <= 10):
        parser.error("--concurrency 1..256, --runs 1..10")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
