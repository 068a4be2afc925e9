"""The PN GW's CPU time per upstream exchange (gateway -> CPNS Server), under load.

Real processes on loopback, as in production: ``cpns server run`` (HTTPS, SQLite) and one
``cpns gateway run``. The script plays the users: it sends EUKey assignments (003, PNEs
without UI) to the gateway's control socket, ``--concurrency`` at a time, for
``--seconds`` after a warm-up, and reads the gateway process's CPU time (user + system,
``/proc/<pid>/stat``) before and after the measured phase. The number of upstream
exchanges comes from the gateway's own ``cpns_gateway_upstream_exchanges_total`` (its
operator port, scraped once before and once after), so a retried or re-challenged
exchange is counted as the gateway counts it.

It prints the gateway's CPU milliseconds per upstream exchange (the whole process, and
its main thread, the event loop: key store writes run in worker threads), the
assignments per second and the server's CPU per assignment (for scale).

``--client-only`` measures the upstream client alone: this script enrols a gateway, then
runs the gateway's :class:`~cpns.gateway.upstream.ServerClient` itself (on uvloop, 8 lanes,
``--concurrency`` exchanges in flight) against the real server for ``--seconds``,
resending one EUKeyAssignmentRequest (the server answers each resend with the reply it
stored: a full Digest + TLS exchange each time), and prints its own process's CPU
milliseconds per exchange: the cost of the HTTP client, Digest and CBOR, nothing of the
assignment procedure or the key store.

Figures only, never a pass/fail; the machine may be shared, so compare medians of several
runs (``--runs``).

    .venv/bin/python benchmarks/gateway_cpu.py --seconds 20 --runs 3
    .venv/bin/python benchmarks/gateway_cpu.py --client-only --seconds 10 --runs 3

To compare with another version of the code (say the main branch's), put its ``src`` first
on ``PYTHONPATH``: the script and the processes it starts then import that ``cpns``.
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
from cpns.gateway.upstream import ServerClient
from cpns.localnet import LocalDeployment
from cpns.messages.model import EUKeyAssignmentRequest
from cpns.protocol.key_assignment import claim_key
from cpns.runtime import run_event_loop, wall_time
from cpns.store.keystore import LocalKeyStore

USER = "bench"
_TICK = os.sysconf("SC_CLK_TCK")
_EXCHANGES = "cpns_gateway_upstream_exchanges_total"
_BATCH = "cpns_gateway_store_commit_batch_size"


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
    #: Key store journal writes and the PNE records they held (0, 0 on a gateway that
    #: does not count them).
    journal_writes: float = 0.0
    journal_records: float = 0.0

    @property
    def records_per_write(self) -> float:
        return self.journal_records / self.journal_writes if self.journal_writes else 0.0

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


def _scrape(metrics_url: str) -> tuple[float, float, float]:
    """The sum of the gateway's upstream exchange counter over all its labels, and its
    key store journal writes and the records they held."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    exchanges = writes = records = 0.0
    for line in text.splitlines():
        value = line.rsplit(" ", 1)[-1]
        if line.startswith(_EXCHANGES + "{"):
            exchanges += float(value)
        elif line.startswith(_BATCH + "_count"):
            writes = float(value)
        elif line.startswith(_BATCH + "_sum"):
            records = float(value)
    return exchanges, writes, records


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
        exchanges_before, writes_before, records_before = _scrape(metrics_url)
        gateway_before = cpu_seconds(gateway.pid)
        main_before = _thread_cpu(gateway.pid)
        server_before = tree_cpu_seconds(server.pid)
        started = time.monotonic()
        tally = await load.closed_loop(args.seconds, args.concurrency)
        elapsed = time.monotonic() - started
        gateway_cpu = cpu_seconds(gateway.pid) - gateway_before
        main_thread_cpu = _thread_cpu(gateway.pid) - main_before
        server_cpu = tree_cpu_seconds(server.pid) - server_before
        exchanges_after, writes_after, records_after = _scrape(metrics_url)
        exchanges = exchanges_after - exchanges_before
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
        journal_writes=writes_after - writes_before,
        journal_records=records_after - records_before,
    )


async def _client_only(args: argparse.Namespace, base: Path) -> tuple[int, float, float]:
    """(exchanges, seconds, CPU seconds of this process) of ServerClient alone."""
    password = secrets.token_urlsafe(12)
    net = LocalDeployment(base)
    with net.running():
        net.init_server(users=[(USER, password)], tk_records=[("pne-1", secrets.token_bytes(32))])
        url = net.start_server()
        net.enroll_gateway(entity_id="bench-gw", user_id=USER, password=password, server_url=url)
        eukey = LocalKeyStore.open_or_create(net.gateway_dir(), "gateway").load()["eukey"]
        request = EUKeyAssignmentRequest(
            txid=secrets.token_bytes(16),
            src="bench-gw",
            dst="cpns-server",
            pne_id="pne-1",
            user_id=USER,
            time=wall_time(),
            rand_pngw=secrets.token_bytes(32),
            auth_data=secrets.token_bytes(32),
            claim_proof=secrets.token_bytes(32),
        )
        client = ServerClient(
            server_url=url, ca_file=net.ca_file, entity_id="bench-gw", eukey=eukey, lanes=8
        )
        try:

            async def user(until: float) -> int:
                n = 0
                while time.monotonic() < until:
                    await client.exchange(request)
                    n += 1
                return n

            await asyncio.gather(*(user(time.monotonic() + args.warmup) for _ in range(16)))
            cpu_before = time.process_time()
            started = time.monotonic()
            until = started + args.seconds
            counts = await asyncio.gather(*(user(until) for _ in range(args.concurrency)))
            elapsed = time.monotonic() - started
            cpu = time.process_time() - cpu_before
        finally:
            await client.aclose()
    return sum(counts), elapsed, cpu


async def _main_client_only(args: argparse.Namespace) -> int:
    results = []
    with tempfile.TemporaryDirectory(prefix="cpns-gwcpu-") as tmp:
        for n in range(args.runs):
            print(f"run {n + 1} of {args.runs} ...", file=sys.stderr)
            results.append(await _client_only(args, Path(tmp) / f"run{n}"))
    print(
        f"upstream client alone (ServerClient, 8 lanes, {args.concurrency} in flight) against "
        f"one server process, {args.seconds:.0f}s per run"
    )
    print(f"  {'run':>4}{'exchanges/s':>13}{'CPU s':>8}{'client CPU ms/exchange':>24}")
    per = []
    for n, (count, elapsed, cpu) in enumerate(results, 1):
        per.append(1000 * cpu / count)
        print(f"  {n:>4}{count / elapsed:>13.1f}{cpu:>8.2f}{per[-1]:>24.3f}")
    print(
        f"  median: {statistics.median(c / e for c, e, _ in results):.1f} exchanges/s, "
        f"client CPU {statistics.median(per):.3f} ms per upstream exchange"
    )
    return 0


async def _main(args: argparse.Namespace) -> int:
    if args.client_only:
        return await _main_client_only(args)
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
        f"{'GW CPU ms/exchange':>20}{'main thread':>13}{'server ms/assign':>18}"
        f"{'records/fsync':>15}   latency ms"
    )
    for n, r in enumerate(results, 1):
        print(
            f"  {n:>4}{r.rate:>10.1f}{r.exchanges:>11.0f}{r.gateway_cpu:>10.2f}"
            f"{r.ms_per_exchange:>20.3f}{r.main_ms_per_exchange:>13.3f}"
            f"{r.server_ms_per_assignment:>18.3f}{r.records_per_write:>15.2f}"
            f"   {r.latencies}  {r.statuses}"
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
    parser.add_argument(
        "--client-only", action="store_true", help="the upstream client alone (see above)"
    )
    parser.add_argument("--runs", type=int, default=1, help="deployments in turn (default 1)")
    args = parser.parse_args()
    if not (0 < args.seconds <= 600 and 0 <= args.warmup <= 60):
        parser.error("--seconds in (0, 600], --warmup in [0, 60]")
    if not (1 <= args.concurrency <= 256 and 1 <= args.runs <= 10):
        parser.error("--concurrency 1..256, --runs 1..10")
    # The event loop the daemons run on (uvloop), so the client costs what it costs there.
    return run_event_loop(_main(args))


if __name__ == "__main__":
    sys.exit(main())
