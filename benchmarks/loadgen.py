"""What the benchmarks share: users sending EUKey assignments (003) to PN GW daemons'
control sockets, and reading processes' CPU time and memory from /proc.

Not a benchmark itself: ``key_assignment.py``, ``soak.py`` and ``backends.py`` import it
(they run as scripts, with this folder on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cpns.crypto.kdf import password_key
from cpns.localnet import LocalDeployment
from cpns.protocol.key_assignment import claim_key


@dataclass
class Tally:
    """What the users saw, second by second."""

    started: float = field(default_factory=time.monotonic)
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    #: (second since start, status) of every answer that was not OK.
    failures: list[tuple[float, str]] = field(default_factory=list)
    in_flight: int = 0
    skipped: int = 0


async def assign(control: Path, pne_id: str, user_id: str, key_hex: str, claim_hex: str) -> str:
    """One ``assign`` command on a PN GW's control socket (what ``cpns gateway assign``
    sends); the status the gateway answers."""
    reader, writer = await asyncio.open_unix_connection(str(control))
    try:
        command = {
            "op": "assign",
            "pne_id": pne_id,
            "user_id": user_id,
            "password_key": key_hex,
            "claim_key": claim_hex,
            "wait": 0,
        }
        writer.write(json.dumps(command).encode() + b"\n")
        await writer.drain()
        answer = json.loads(await asyncio.wait_for(reader.readline(), 120))
    finally:
        writer.close()
        await writer.wait_closed()
    return str(answer.get("status"))


def gateways_and_users(
    net: LocalDeployment, urls: list[str], count: int, *, user_id: str, password: str
) -> Load:
    """Enrol and start ``count`` PN GWs of ``user_id`` (gateway i on ``urls[i % n]``) and
    return the users' load over their control sockets: the password key derived once and
    each PNE's claim key from its label code, as ``cpns gateway assign`` derives them."""
    controls = []
    for g in range(count):
        name = f"gw{g}"
        net.enroll_gateway(
            entity_id=f"bench-{name}",
            user_id=user_id,
            password=password,
            server_url=urls[g % len(urls)],
            name=name,
        )
        net.start_gateway(name)
        controls.append(net.gateway_dir(name) / "control.sock")
    key_hex = password_key(password, realm="cpns", user_id=user_id).hex()
    claims = {p: claim_key(c).hex() for p, c in net.claim_codes.items()}
    return Load(controls, user_id, key_hex, claims)


class Load:
    """Hands out fresh PNE IDs and sends their assignments round-robin over the gateways."""

    def __init__(
        self, controls: list[Path], user_id: str, key_hex: str, claims: dict[str, str]
    ) -> None:
        self._controls = controls
        self._user_id = user_id
        self._key_hex = key_hex
        self._claims = claims
        self._pnes = iter(sorted(claims))
        self._turn = 0

    def next_pne(self) -> str | None:
        return next(self._pnes, None)

    async def one(self, tally: Tally, pne: str) -> None:
        control = self._controls[self._turn % len(self._controls)]
        self._turn += 1
        tally.in_flight += 1
        started = time.monotonic()
        try:
            status = await assign(control, pne, self._user_id, self._key_hex, self._claims[pne])
        except (OSError, TimeoutError, ValueError) as exc:
            status = f"client:{type(exc).__name__}"
        finally:
            tally.in_flight -= 1
        tally.statuses[status] += 1
        if status == "OK":
            tally.latencies.append(time.monotonic() - started)
            tally.acknowledged.append(pne)
        else:
            tally.failures.append((started - tally.started, status))

    async def closed_loop(self, seconds: float, concurrency: int) -> Tally:
        tally = Tally()
        deadline = time.monotonic() + seconds

        async def user() -> None:
            while time.monotonic() < deadline and (pne := self.next_pne()) is not None:
                await self.one(tally, pne)

        await asyncio.gather(*(user() for _ in range(concurrency)))
        return tally

    async def open_loop(self, seconds: float, rate: float, max_in_flight: int) -> Tally:
        tally = Tally()
        tasks: set[asyncio.Task[None]] = set()
        interval = 1.0 / rate
        next_at = time.monotonic()
        deadline = next_at + seconds
        while next_at < deadline:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            if tally.in_flight >= max_in_flight:
                tally.skipped += 1  # the system is behind: count it, do not pile up
                continue
            pne = self.next_pne()
            if pne is None:
                break
            task = asyncio.create_task(self.one(tally, pne))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        return tally


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def rss_kib(pid: int) -> int:
    """Resident memory of a process, KiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and of its children it has waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command: state ppid ... utime(14) stime(15) cutime(16) cstime(17), 1-based
    # in proc(5), so indexes 11..14 here.
    return sum(int(x) for x in fields[11:15]) / _TICK


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and of every live descendant."""
    return cpu_seconds(pid) + sum(tree_cpu_seconds(c) for c in children(pid))


def percentiles_ms(latencies: list[float]) -> str:
    """``p50 .. p99 .. max ..`` in milliseconds."""
    if len(latencies) < 2:
        return "n/a"
    q = statistics.quantiles([x * 1000 for x in latencies], n=100)
    return f"p50 {q[49]:.1f}  p99 {q[98]:.1f}  max {max(latencies) * 1000:.1f}"
