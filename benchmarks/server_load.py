"""PNE authentications per server core-second: one CPNS Server under many PN GWs, beside
FreeRADIUS measured the same way in the same run.

One ``cpns server run`` process (durable store: SQLite by default, ``--database`` for a
PostgreSQL URL) pinned to CPU 0; this script, ONE process pinned to CPU 1, plays
``--gateways`` PN GWs and their PNEs with the project's own role machines
(``pn_client.PNGateway``, the same driver the integration tests use): each PN GW talks to
the server over real HTTPS + Digest keep-alive connections (the gateway's own
:class:`~cpns.gateway.upstream.ServerClient`), and ``--concurrency`` establishments are in
flight at once (closed loop: each slot starts its next establishment when the last one
ends). Each slot owns a group of PNEs of one PN GW, so no PNE is in two establishments at
once; a share ``--tk-share`` of them authenticate with the TK flow (000, a 003 chain), the
others with rand/hash (002 §7.5.4, an EUKey enrolled with UI).

Setup, not timed: the user with ``cpns admin user add``, the manufacturer TKs with ``cpns
admin tk import``, every PN GW and PNE with its keys through the bulk path
(:func:`cpns.store.bulk.import_entities`, as a provisioning system would), so the server
starts with N gateways and their PNEs as if they had enrolled and been assigned.

Measured, for each number of PNEs per establishment (``--pnes-per-est``, default 1,8,32),
over ``--seconds`` after ``--warmup``: PNE authentications per second (PNEs the server
answered OK and that authenticated the server in turn), establishments per second, the
latency of an establishment (both halves, p50/p99), the server process's CPU (utime +
stime from ``/proc/<pid>/stat``, threads included: SQLite runs inside it; a PostgreSQL
server's own CPU is not counted), and from them authentications and establishments per
server core-second. Then FreeRADIUS 3.2's PAP and EAP-MD5 figures from
``--freeradius DIR`` (its ``run.sh``: server on CPU 0, load generator on CPU 1, per server
core-second) and the two ratios the targets name:

* ours with 32 PNEs per establishment, auths per server core-s / FreeRADIUS PAP's;
* ours single-PNE establishments per server core-s / FreeRADIUS EAP-MD5's.

Figures only, never a pass/fail (the exit status says only whether every establishment
ended OK). The machine may be shared: per core-second figures are the ones to compare.

    .venv/bin/python benchmarks/server_load.py                # 20 s per configuration
    .venv/bin/python benchmarks/server_load.py --seconds 5 --no-freeradius --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadgen import children, cpu_seconds

from cpns.crypto.hashchain import build_chain
from cpns.device.establishment import AGENT_SOCKET
from cpns.errors import ErrorCode
from cpns.gateway.upstream import ServerClient
from cpns.localnet import LocalDeployment
from cpns.records import EntityRecord
from cpns.runtime import SystemRandom, run_event_loop
from cpns.server.config import load_server_config
from cpns.server.main import open_store
from cpns.store import bulk
from cpns.types import EntityKind
from pn_client import PNGateway

ROOT = Path(__file__).resolve().parent.parent
USER = "bench"
SERVER_ID = "cpns-server"
SERVER_CPU = 0
LOAD_CPU = 1


@dataclass
class Figures:
    """One configuration's figures."""

    pnes_per_est: int
    seconds: float
    establishments: int
    auths: int
    server_cpu_s: float
    loadgen_cpu_s: float
    p50_ms: float | None
    p99_ms: float | None
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def est_per_s(self) -> float:
        return self.establishments / self.seconds if self.seconds else 0.0

    @property
    def auths_per_s(self) -> float:
        return self.auths / self.seconds if self.seconds else 0.0

    @property
    def server_cpu_pct(self) -> float:
        return 100 * self.server_cpu_s / self.seconds if self.seconds else 0.0

    @property
    def auths_per_core_s(self) -> float:
        return self.auths / self.server_cpu_s if self.server_cpu_s else 0.0

    @property
    def est_per_core_s(self) -> float:
        return self.establishments / self.server_cpu_s if self.server_cpu_s else 0.0

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("est_per_s", "auths_per_s", "server_cpu_pct"):
            out[name] = round(getattr(self, name), 1)
        out["auths_per_server_core_s"] = round(self.auths_per_core_s, 1)
        out["est_per_server_core_s"] = round(self.est_per_core_s, 1)
        return out


# -- CPU pinning -----------------------------------------------------------------------------


#: Whether this machine lets us pin: both CPUs available to this process at its start.
_PIN = hasattr(os, "sched_setaffinity") and {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0)


def _pinning() -> bool:
    return _PIN


@contextlib.contextmanager
def _children_on(cpu: int) -> Iterator[None]:
    """Processes started inside inherit CPU ``cpu``; this one returns to LOAD_CPU after."""
    pin = _pinning()
    if pin:
        os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        if pin:
            os.sched_setaffinity(0, {LOAD_CPU})


def _pin_process(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` on ``cpu`` (threads started later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), {cpu})


# -- setup (not timed) ---------------------------------------------------------------------------


@dataclass
class Slot:
    """One establishment in flight at a time: a PN GW and the PNEs it brings into its PN."""

    gateway: PNGateway
    members: list[str]
    pn_id: str
    turn: int = 0

    def next_group(self, k: int) -> list[str]:
        """The next ``k`` members, round the group, so every PNE takes its turn."""
        start = self.turn * k
        self.turn += 1
        return [self.members[(start + i) % len(self.members)] for i in range(k)]


def _is_tk(j: int, share: float) -> bool:
    """PNE j of a group uses the TK flow: ``share`` of them, spread evenly."""
    return int((j + 1) * share) > int(j * share)


def _provision(
    net: LocalDeployment, args: argparse.Namespace, group: int
) -> tuple[dict[str, bytes], list[list[tuple[str, bytes | None, bytes | None]]]]:
    """Users, TKs and entities in the store (bulk paths). Returns each PN GW's EUKey and
    each slot's PNEs as (pne_id, tk or None, seed or EUKey)."""
    rng = SystemRandom()
    password = secrets.token_urlsafe(12)
    gateways = {f"bench-gw{g}": rng.token_bytes(32) for g in range(args.gateways)}
    slots: list[list[tuple[str, bytes | None, bytes | None]]] = []
    tks: list[tuple[str, bytes]] = []
    for s in range(args.concurrency):
        pnes: list[tuple[str, bytes | None, bytes | None]] = []
        for j in range(group):
            pne_id = f"s{s}-pne{j}"
            if _is_tk(j, args.tk_share):
                tk = rng.token_bytes(32)
                tks.append((pne_id, tk))
                pnes.append((pne_id, tk, rng.token_bytes(32)))
            else:
                pnes.append((pne_id, None, rng.token_bytes(32)))
        slots.append(pnes)
    net.init_server(users=[(USER, password)], tk_records=tks, database=args.database)
    now = int(time.time())
    entities = [
        EntityRecord(
            entity_id=gw_id,
            kind=EntityKind.PN_GW,
            owner=USER,
            eukeys=(key,),
            key_index=1,
            assigned_at=now,
            epoch=1,
        )
        for gw_id, key in gateways.items()
    ]
    gw_ids = list(gateways)
    for s, pnes in enumerate(slots):
        for pne_id, tk, secret in pnes:
            assert secret is not None
            if tk is None:  # enrolled with UI (004): one EUKey the PN GW does not hold
                entities.append(
                    EntityRecord(
                        entity_id=pne_id,
                        kind=EntityKind.PNE,
                        owner=USER,
                        eukeys=(secret,),
                        key_index=1,
                        assigned_at=now,
                        epoch=1,
                    )
                )
            else:  # assigned without UI (003) through its PN GW: a chain
                entities.append(
                    EntityRecord(
                        entity_id=pne_id,
                        kind=EntityKind.PNE,
                        owner=USER,
                        eukeys=tuple(build_chain(secret, args.chain)),
                        key_index=1,
                        assigned_via=gw_ids[s % len(gw_ids)],
                        assigned_at=now,
                        epoch=1,
                    )
                )
    store = open_store(load_server_config(net.server_dir))
    try:
        bulk.import_entities(store, entities)
    finally:
        store.close()
    return gateways, slots


def _start_server(net: LocalDeployment) -> tuple[str, int]:
    port_file = net.server_dir / "server.port"
    port_file.unlink(missing_ok=True)
    with _children_on(SERVER_CPU):
        proc = net.start("server", "server", "run", "--data-dir", str(net.server_dir))
    port = int(net.wait_for_file(port_file, name="server"))
    if _pinning():
        _pin_process(proc.pid, SERVER_CPU)
    return f"https://localhost:{port}", proc.pid


# -- the load ------------------------------------------------------------------------------------


@dataclass
class Tally:
    establishments: int = 0
    auths: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


async def _drive(slots: list[Slot], k: int, seconds: float) -> Tally:
    """Closed loop: every slot runs establishments of ``k`` PNEs back to back."""
    tally = Tally()
    deadline = time.monotonic() + seconds

    async def loop(slot: Slot) -> None:
        while time.monotonic() < deadline:
            group = slot.next_group(k)
            started = time.perf_counter()
            try:
                run = await slot.gateway.establish(group[0], group[1:], pn_id=slot.pn_id)
            except Exception as exc:  # counted and shown, the run goes on
                tally.errors[type(exc).__name__] += 1
                continue
            elapsed = time.perf_counter() - started
            statuses = run.server_status()
            joined = 0
            for pne_id in group:
                status = statuses.get(pne_id)
                name = status.name if isinstance(status, ErrorCode) else str(status)
                if status == ErrorCode.OK and run.joined(pne_id) is not None:
                    joined += 1
                else:
                    tally.statuses[f"pne:{name}"] += 1
            finished = run.finished()
            if joined:
                tally.establishments += 1
                tally.auths += joined
                tally.latencies.append(elapsed)
            else:
                tally.statuses[f"est:{finished.status.name if finished else 'unfinished'}"] += 1

    await asyncio.gather(*(loop(slot) for slot in slots))
    return tally


def _quantiles(latencies: list[float]) -> tuple[float | None, float | None]:
    if len(latencies) < 2:
        return None, None
    q = statistics.quantiles([x * 1000 for x in latencies], n=100)
    return round(q[49], 2), round(q[98], 2)


async def _measure(args: argparse.Namespace, base: Path) -> tuple[list[Figures], dict[str, Any]]:
    group = max(args.pnes_per_est)
    net = LocalDeployment(base)
    info: dict[str, Any] = {"pinned": _pinning(), "loadavg_start": round(os.getloadavg()[0], 2)}
    with net.running():
        print("provisioning ...", file=sys.stderr)
        gateways, slot_pnes = _provision(net, args, group)
        url, server_pid = _start_server(net)
        print(f"server pid {server_pid} at {url}", file=sys.stderr)
        rng = SystemRandom()
        per_gateway = -(-args.concurrency // args.gateways)
        clients = {
            gw_id: ServerClient(
                server_url=url,
                ca_file=net.ca_file,
                entity_id=gw_id,
                eukey=key,
                rng=rng,
                lanes=max(1, min(64, per_gateway)),
                retries=4,
            )
            for gw_id, key in gateways.items()
        }
        drivers = {
            gw_id: PNGateway(
                gw_id=gw_id,
                gw_eukey=key,
                server_id=SERVER_ID,
                exchange=clients[gw_id].exchange,
                rng=rng,
                wire=False,
            )
            for gw_id, key in gateways.items()
        }
        gw_ids = list(gateways)
        slots = []
        for s, pnes in enumerate(slot_pnes):
            driver = drivers[gw_ids[s % len(gw_ids)]]
            for pne_id, tk, secret in pnes:
                assert secret is not None
                if tk is None:
                    driver.add_rand_hash_pne(pne_id, secret)
                else:
                    driver.add_tk_pne(pne_id, tk=tk, chain=build_chain(secret, args.chain))
            slots.append(Slot(driver, [p for p, _, _ in pnes], pn_id=f"pn-bench-{s}"))
        results = []
        try:
            for k in args.pnes_per_est:
                print(f"{k} PNE(s) per establishment ...", file=sys.stderr)
                if args.warmup:
                    await _drive(slots, k, args.warmup)
                server_before = cpu_seconds(server_pid)
                load_before = time.process_time()
                started = time.monotonic()
                tally = await _drive(slots, k, args.seconds)
                elapsed = time.monotonic() - started
                server_cpu = cpu_seconds(server_pid) - server_before
                load_cpu = time.process_time() - load_before
                p50, p99 = _quantiles(tally.latencies)
                results.append(
                    Figures(
                        pnes_per_est=k,
                        seconds=round(elapsed, 3),
                        establishments=tally.establishments,
                        auths=tally.auths,
                        server_cpu_s=round(server_cpu, 2),
                        loadgen_cpu_s=round(load_cpu, 2),
                        p50_ms=p50,
                        p99_ms=p99,
                        statuses=dict(tally.statuses),
                        errors=dict(tally.errors),
                    )
                )
        finally:
            for client in clients.values():
                await client.aclose()
    info["loadavg_end"] = round(os.getloadavg()[0], 2)
    return results, info


# -- through one real PN GW daemon --------------------------------------------------------------


@dataclass
class GatewayFigures:
    """``--through-gateway``: establishments through one ``cpns gateway run``."""

    pnes_per_est: int
    groups: int
    seconds: float
    establishments: int
    auths: int
    server_cpu_s: float
    gateway_cpu_s: float
    p50_ms: float | None
    p99_ms: float | None
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def est_per_s(self) -> float:
        return self.establishments / self.seconds if self.seconds else 0.0

    @property
    def gateway_ms_per_exchange(self) -> float:
        """Two upstream exchanges per establishment (its SETUP and AUTHENTICATE halves)."""
        n = 2 * self.establishments
        return 1000 * self.gateway_cpu_s / n if n else 0.0

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["est_per_s"] = round(self.est_per_s, 1)
        out["gateway_cpu_ms_per_upstream_exchange"] = round(self.gateway_ms_per_exchange, 3)
        out["est_per_server_core_s"] = (
            round(self.establishments / self.server_cpu_s, 1) if self.server_cpu_s else 0.0
        )
        return out


def _child_pid(command: str) -> int:
    """The PID of our child process whose command line holds ``command``."""
    for pid in children(os.getpid()):
        with contextlib.suppress(OSError):
            if command in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                return pid
    raise RuntimeError(f"no child process runs {command!r}")


async def _agent_establish(path: Path, pn_id: str, invite: list[str]) -> dict[str, Any]:
    """``cpns device establish`` without the CLI: one request on the agent's socket."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        request = {"op": "establish", "pn_id": pn_id, "invite": invite, "timeout": 60}
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        reply: dict[str, Any] = json.loads(await asyncio.wait_for(reader.readline(), 120))
    finally:
        writer.close()
        await writer.wait_closed()
    return reply


async def _through_gateway(args: argparse.Namespace, base: Path) -> GatewayFigures:
    """One PN GW daemon and ``--gw-groups`` groups of 8 PNE agents (half TK flow, half
    rand/hash), every credential obtained the real way (003 through the PN GW, 004
    through its relay); each group's first PNE originates establishments of its group
    back to back through its agent's control socket."""
    k = 8
    rng = SystemRandom()
    password = secrets.token_urlsafe(12)
    gw_id = "bench-gw"
    groups = [[f"g{g}-pne{j}" for j in range(k)] for g in range(args.gw_groups)]
    tk_pnes = [p for group in groups for j, p in enumerate(group) if _is_tk(j, args.tk_share)]
    tks = {p: rng.token_bytes(32) for p in tk_pnes}
    net = LocalDeployment(base)
    net.init_server(
        users=[(USER, password)], tk_records=sorted(tks.items()), database=args.database
    )
    with net.running():
        print("through one PN GW daemon: credentials the real way ...", file=sys.stderr)
        url, server_pid = _start_server(net)
        net.enroll_gateway(entity_id=gw_id, user_id=USER, password=password, server_url=url)
        pan_port = net.start_gateway()  # on LOAD_CPU, with the agents and this script
        gateway_pid = _child_pid("gateway run")
        for pne in tk_pnes:
            net.init_device(pne, entity_id=pne, tk=tks[pne])
            net.start_device(pne, pan_port=pan_port, once=True, timeout=60)
            assigned = net.assign(pne_id=pne, user_id=USER, password=password, wait=30)
            if assigned.returncode != 0 or net.wait(pne) != 0:
                raise RuntimeError(f"003 assignment of {pne} failed: {assigned.stdout}")
        for group in groups:
            for pne in group:
                if pne not in tks:
                    net.enroll_device(
                        pne,
                        entity_id=pne,
                        user_id=USER,
                        password=password,
                        pan_port=pan_port,
                        check=True,
                    )
        every = [p for group in groups for p in group]
        for pne in every:
            net.start_device(
                pne, pan_port=pan_port, once=False, timeout=3600, extra=["--gateway-id", gw_id]
            )
        net.wait_attached(every)
        tally = Tally()

        async def loop(g: int, group: list[str], until: float, measured: bool) -> None:
            path = net.device_dir(group[0]) / AGENT_SOCKET
            while time.monotonic() < until:
                started = time.perf_counter()
                try:
                    reply = await _agent_establish(path, f"pn-gw-{g}", group[1:])
                except (OSError, TimeoutError, ValueError) as exc:
                    tally.errors[type(exc).__name__] += 1
                    continue
                elapsed = time.perf_counter() - started
                if not measured:
                    continue
                members = reply.get("members") or []
                joined = sum(1 for m in members if m.get("status") == "OK")
                for m in members:
                    if m.get("status") != "OK":
                        tally.statuses[f"pne:{m.get('status')}"] += 1
                if reply.get("ok") and joined:
                    tally.establishments += 1
                    tally.auths += joined
                    tally.latencies.append(elapsed)
                else:
                    tally.statuses[f"est:{reply.get('status')}"] += 1

        if args.warmup:
            until = time.monotonic() + args.warmup
            await asyncio.gather(*(loop(g, gr, until, False) for g, gr in enumerate(groups)))
        server_before = cpu_seconds(server_pid)
        gateway_before = cpu_seconds(gateway_pid)
        started = time.monotonic()
        until = started + args.seconds
        await asyncio.gather(*(loop(g, gr, until, True) for g, gr in enumerate(groups)))
        elapsed = time.monotonic() - started
        server_cpu = cpu_seconds(server_pid) - server_before
        gateway_cpu = cpu_seconds(gateway_pid) - gateway_before
    p50, p99 = _quantiles(tally.latencies)
    statuses = dict(tally.statuses)
    statuses.update({f"error:{e}": n for e, n in tally.errors.items()})
    return GatewayFigures(
        pnes_per_est=k,
        groups=len(groups),
        seconds=round(elapsed, 3),
        establishments=tally.establishments,
        auths=tally.auths,
        server_cpu_s=round(server_cpu, 2),
        gateway_cpu_s=round(gateway_cpu, 2),
        p50_ms=p50,
        p99_ms=p99,
        statuses=statuses,
    )


# -- FreeRADIUS ------------------------------------------------------------------------------------


def _freeradius(directory: Path, mode: str) -> dict[str, Any]:
    """One ``run.sh MODE``: its JSON line, or {"error": why}."""
    script = directory / "run.sh"
    if not script.exists():
        return {"error": f"{script} not found"}
    try:
        proc = subprocess.run(
            [str(script), mode],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            # run.sh pins FreeRADIUS to CPU 0 and its load generator to CPU 1 itself.
            preexec_fn=(lambda: os.sched_setaffinity(0, {SERVER_CPU, LOAD_CPU}))
            if _pinning()
            else None,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"run.sh {mode}: {exc}"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"run.sh {mode} exited {proc.returncode}: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _ratio(ours: float, theirs: Any) -> float | None:
    if not isinstance(theirs, int | float) or not theirs:
        return None
    return round(ours / theirs, 3)


def _targets(results: list[Figures], radius: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    by_k = {r.pnes_per_est: r for r in results}
    targets = []
    if 32 in by_k and "pap" in radius:
        targets.append(
            {
                "target": "auths per server core-s, 32 PNEs/est >= FreeRADIUS PAP",
                "ours": round(by_k[32].auths_per_core_s, 1),
                "freeradius": radius["pap"].get("auths_per_server_core_s"),
                "ratio": _ratio(
                    by_k[32].auths_per_core_s, radius["pap"].get("auths_per_server_core_s")
                ),
            }
        )
    if 1 in by_k and "eapmd5" in radius:
        targets.append(
            {
                "target": "single-PNE establishments per server core-s >= FreeRADIUS EAP-MD5",
                "ours": round(by_k[1].est_per_core_s, 1),
                "freeradius": radius["eapmd5"].get("auths_per_server_core_s"),
                "ratio": _ratio(
                    by_k[1].est_per_core_s, radius["eapmd5"].get("auths_per_server_core_s")
                ),
            }
        )
    for t in targets:
        t["met"] = None if t["ratio"] is None else t["ratio"] >= 1
    return targets


# -- report ----------------------------------------------------------------------------------------


def _report(
    args: argparse.Namespace,
    results: list[Figures],
    radius: dict[str, dict[str, Any]],
    targets: list[dict[str, Any]],
    info: dict[str, Any],
) -> None:
    backend = "PostgreSQL" if args.database else "SQLite"
    print(
        f"PN Establishment against one cpns server process ({backend}), "
        f"{args.gateways} PN GWs, {args.concurrency} establishments in flight, "
        f"TK share {args.tk_share:.2f}, {args.seconds:g}s per configuration"
    )
    if info["pinned"]:
        print(f"  server pinned to CPU {SERVER_CPU}, load generator to CPU {LOAD_CPU}")
    else:
        print("  NOT pinned (fewer than 2 CPUs available to this process)")
    busy = max(info["loadavg_start"], info["loadavg_end"]) > 2
    print(
        f"  1-minute load average {info['loadavg_start']} at the start, {info['loadavg_end']} "
        f"at the end"
        + (": other jobs shared these CPUs (compare per core-second figures)" if busy else "")
    )
    print(
        f"  {'PNEs/est':>8}{'est/s':>9}{'auths/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'server CPU':>12}{'auths/core-s':>14}{'est/core-s':>12}{'loadgen CPU':>13}"
    )
    for r in results:
        load_pct = 100 * r.loadgen_cpu_s / r.seconds if r.seconds else 0.0
        print(
            f"  {r.pnes_per_est:>8}{r.est_per_s:>9.1f}{r.auths_per_s:>10.1f}"
            f"{r.p50_ms if r.p50_ms is not None else float('nan'):>9.1f}"
            f"{r.p99_ms if r.p99_ms is not None else float('nan'):>9.1f}"
            f"{r.server_cpu_pct:>11.0f}%{r.auths_per_core_s:>14.1f}{r.est_per_core_s:>12.1f}"
            f"{load_pct:>12.0f}%"
        )
        if r.statuses or r.errors:
            print(f"  {'':>8}not OK: {r.statuses} {r.errors}")
    for mode, figures in radius.items():
        if "error" in figures:
            print(f"  FreeRADIUS {mode}: not measured: {figures['error']}")
        else:
            print(
                f"  FreeRADIUS {mode}: {figures.get('auths_per_s')} auths/s, server CPU "
                f"{figures.get('server_cpu_pct')}%, {figures.get('auths_per_server_core_s')} "
                f"auths per server core-s   {json.dumps(figures)}"
            )
    for t in targets:
        verdict = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        print(
            f"  target {t['target']}: ours {t['ours']} / FreeRADIUS {t['freeradius']} "
            f"= ratio {t['ratio']}  {verdict}"
        )


def _report_gateway(g: GatewayFigures) -> None:
    print(
        f"  through one PN GW daemon ({g.pnes_per_est} PNE agents per establishment, "
        f"{g.groups} at once): {g.est_per_s:.1f} est/s, p50 {g.p50_ms} ms, p99 {g.p99_ms} ms, "
        f"gateway CPU {100 * g.gateway_cpu_s / g.seconds:.0f}% of a core = "
        f"{2 * g.gateway_ms_per_exchange:.2f} ms per establishment "
        f"({g.gateway_ms_per_exchange:.2f} ms per upstream exchange, 2 per establishment, "
        f"PAN side included), "
        f"server CPU {100 * g.server_cpu_s / g.seconds:.0f}%"
    )
    if g.statuses:
        print(f"  {'':>8}not OK: {g.statuses}")


def _parse_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or not all(1 <= v <= 64 for v in values):
        raise argparse.ArgumentTypeError("a comma-separated list of 1..64")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="per configuration (20)")
    parser.add_argument("--warmup", type=float, default=2, help="not measured, each (2)")
    parser.add_argument("--concurrency", type=int, default=16, help="establishments in flight")
    parser.add_argument("--gateways", type=int, default=8, help="PN GWs (8)")
    parser.add_argument(
        "--pnes-per-est", type=_parse_list, default=[1, 8, 32], help="list (1,8,32)"
    )
    parser.add_argument(
        "--tk-share", type=float, default=0.5, help="share of PNEs on the TK flow (0.5)"
    )
    parser.add_argument(
        "--chain", type=int, default=128, help="EUKey chain length of TK-flow PNEs (128)"
    )
    parser.add_argument("--database", help="a postgresql:// URL instead of SQLite")
    parser.add_argument(
        "--freeradius",
        type=Path,
        default=ROOT.parent / "shared" / "bench" / "freeradius",
        help="the FreeRADIUS reference scripts (../shared/bench/freeradius)",
    )
    parser.add_argument("--no-freeradius", action="store_true", help="our figures only")
    parser.add_argument(
        "--through-gateway",
        action="store_true",
        help="also: 8-PNE establishments through one real PN GW daemon and PNE agents",
    )
    parser.add_argument(
        "--gw-groups", type=int, default=1, help="with --through-gateway: groups of 8 PNEs (1)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON document")
    args = parser.parse_args()
    if not (0 < args.seconds <= 600 and 0 <= args.warmup <= 60 and 0 <= args.tk_share <= 1):
        parser.error("--seconds in (0, 600], --warmup in [0, 60], --tk-share in [0, 1]")
    if not (1 <= args.concurrency <= 256 and 1 <= args.gateways <= args.concurrency):
        parser.error("--concurrency 1..256, --gateways 1..concurrency")
    if not 2 <= args.chain <= 1024:
        parser.error("--chain 2..1024")
    if not 1 <= args.gw_groups <= 8:
        parser.error("--gw-groups 1..8")
    if _pinning():
        os.sched_setaffinity(0, {LOAD_CPU})
    with tempfile.TemporaryDirectory(prefix="cpns-server-load-") as tmp:
        results, info = run_event_loop(_measure(args, Path(tmp) / "direct"))
        through = (
            run_event_loop(_through_gateway(args, Path(tmp) / "gateway"))
            if args.through_gateway
            else None
        )
    radius: dict[str, dict[str, Any]] = {}
    if not args.no_freeradius:
        for mode in ("pap", "eapmd5"):
            print(f"FreeRADIUS {mode} ...", file=sys.stderr)
            radius[mode] = _freeradius(args.freeradius, mode)
    targets = _targets(results, radius)
    if args.json:
        doc = {
            "config": {
                "seconds": args.seconds,
                "concurrency": args.concurrency,
                "gateways": args.gateways,
                "tk_share": args.tk_share,
                "backend": "postgresql" if args.database else "sqlite",
                **info,
            },
            "cpns": [r.as_json() for r in results],
            "through_gateway": through.as_json() if through is not None else None,
            "freeradius": radius,
            "targets": targets,
        }
        print(json.dumps(doc, indent=2))
    else:
        _report(args, results, radius, targets, info)
        if through is not None:
            _report_gateway(through)
    clean = all(not r.statuses and not r.errors for r in results)
    return 0 if clean and (through is None or not through.statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
