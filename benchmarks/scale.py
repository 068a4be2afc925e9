"""Does authentication stay as fast with a million entities as with a thousand? (issue 7)

For each back end (SQLite, PostgreSQL) and each database size N (``--entities``, default
1,000 and 1,000,000) the benchmark:

1. initialises a server data directory (``cpns server init``; PostgreSQL: a fresh database
   of a throwaway cluster started with scripts/pg-cluster, or of ``--pg-admin-dsn``);
2. fills it through the bulk path and times each import: N/2 users with precomputed
   password keys (``cpns admin user import``), N/2 manufacturer TK records (``cpns admin
   tk import``), and N entities with their keys (:func:`cpns.store.bulk.import_entities`):
   N/2 PN GWs with one EUKey each and N/2 PNEs with a 16-key EUKey chain;
3. starts a real ``cpns server run`` and plays PN GWs: over one keep-alive HTTPS
   connection (TLS 1.3), for each sample a random enrolled PN GW fetches a Digest
   challenge (``GET /cpns/v1/whoami`` without credentials, 401) and then sends the
   authenticated request, whose latency is measured (the server looks the Entity ID up,
   opens its sealed EUKey and checks the Digest response);
   The servers of all sizes run at once and are sampled in turn (ABBA), so the noise
   of a shared machine falls on every size alike;
4. prints p50/p99 per size and the ratio of the largest size's p99 to the smallest's
   (target: <= 1.2). Figures only, no pass/fail.

    .venv/bin/python benchmarks/scale.py                        # 1k and 1M, both back ends
    .venv/bin/python benchmarks/scale.py --entities 50,100 --requests 20   # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import random
import secrets
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg

from cpns.localnet import LocalDeployment
from cpns.protocol.digest import DigestClient
from cpns.records import EntityRecord
from cpns.runtime import SystemRandom
from cpns.server.config import load_server_config
from cpns.server.main import open_store
from cpns.store import bulk
from cpns.store.masterkey import write_private_file
from cpns.types import EntityKind

ROOT = Path(__file__).resolve().parent.parent
CHAIN = 16
URI = "/cpns/v1/whoami"


def _key(seed: bytes, label: str, i: int) -> bytes:
    """Deterministic 32-byte key material: the client re-derives what the import stored."""
    return hashlib.sha256(seed + f"/{label}/{i}".encode()).digest()


@dataclass
class Result:
    backend: str
    entities: int
    users_s: float
    tks_s: float
    entities_s: float
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int]


@contextmanager
def pg_admin(admin_dsn: str | None) -> Iterator[str | None]:
    """The admin URL of a PostgreSQL cluster: the one given, or a throwaway one."""
    if admin_dsn is not None:
        yield admin_dsn
        return
    script = ROOT / "scripts" / "pg-cluster"
    out = subprocess.run(
        [str(script), "start"], check=True, capture_output=True, text=True, timeout=600
    ).stdout.split()
    try:
        yield out[1]
    finally:
        subprocess.run([str(script), "stop", out[0]], check=True, timeout=120)


@contextmanager
def pg_database(admin_dsn: str) -> Iterator[str]:
    name = "scale_" + secrets.token_hex(4)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())
    try:
        yield urlunsplit(urlsplit(admin_dsn)._replace(path="/" + name))
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(
                b"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            conn.execute(f"DROP DATABASE {name}".encode())


def _fill(net: LocalDeployment, n: int, seed: bytes, quiet: bool) -> tuple[float, float, float]:
    half = max(1, n // 2)
    progress = () if quiet else ("--progress",)
    users = net.base / "users.csv"
    lines = ["user_id,password_key", *(f"u{i}," + _key(seed, "pw", i).hex() for i in range(half))]
    write_private_file(users, ("\n".join(lines) + "\n").encode(), overwrite=False)
    started = time.perf_counter()
    net.cpns("admin", "user", "import", str(users), "--data-dir", str(net.server_dir), *progress,
             timeout=3600)  # fmt: skip
    users_s = time.perf_counter() - started

    tks = net.base / "tk.csv"
    lines = ["entity_id,tk", *(f"pne-{i}," + _key(seed, "tk", i).hex() for i in range(half))]
    write_private_file(tks, ("\n".join(lines) + "\n").encode(), overwrite=False)
    started = time.perf_counter()
    net.cpns("admin", "tk", "import", str(tks), "--data-dir", str(net.server_dir), *progress,
             timeout=3600)  # fmt: skip
    tks_s = time.perf_counter() - started

    now = int(time.time())
    entities: list[EntityRecord] = []
    for i in range(half):
        entities.append(
            EntityRecord(
                entity_id=f"gw-{i}",
                kind=EntityKind.PN_GW,
                owner=f"u{i}",
                eukeys=(_key(seed, "gw", i),),
                key_index=1,
                assigned_at=now,
                epoch=1,
            )
        )
        entities.append(
            EntityRecord(
                entity_id=f"pne-{i}",
                kind=EntityKind.PNE,
                owner=f"u{i}",
                eukeys=tuple(_key(seed, f"pne-{i}", k) for k in range(CHAIN)),
                key_index=1,
                assigned_via=f"gw-{i}",
                assigned_at=now,
                epoch=1,
            )
        )
    started = time.perf_counter()
    store = open_store(load_server_config(net.server_dir))
    try:
        bulk.import_entities(store, entities)
    finally:
        store.close()
    return users_s, tks_s, time.perf_counter() - started


class _Prober:
    """One PN GW population of one server, sampled over one keep-alive connection."""

    def __init__(self, net: LocalDeployment, url: str, n: int, seed: bytes) -> None:
        self._url = url
        self._half = max(1, n // 2)
        self._seed = seed
        self._pick = random.Random(n)
        self._rng = SystemRandom()
        context = ssl.create_default_context(cafile=str(net.ca_file))
        self._http = httpx.Client(verify=context, timeout=30)
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}

    def sample(self, *, keep: bool) -> None:
        """A random PN GW: challenge, then the timed authenticated request."""
        g = self._pick.randrange(self._half)
        challenge = self._http.get(self._url + URI)
        client = DigestClient(f"gw-{g}", _key(self._seed, "gw", g).hex())
        header = client.authorization(
            challenges=challenge.headers.get_list("www-authenticate"),
            method="GET",
            uri=URI,
            rng=self._rng,
        )
        started = time.perf_counter()
        reply = self._http.get(self._url + URI, headers={"authorization": header})
        elapsed = time.perf_counter() - started
        if keep:
            self.latencies.append(elapsed * 1000)
            self.statuses[reply.status_code] = self.statuses.get(reply.status_code, 0) + 1

    def quantiles(self) -> tuple[float, float]:
        q = statistics.quantiles(self.latencies, n=100)
        return q[49], q[98]

    def close(self) -> None:
        self._http.close()


def run_backend(
    backend: str, sizes: list[int], args: argparse.Namespace, admin_dsn: str | None, tmp: Path
) -> list[Result]:
    """Fill one database per size, start one server on each, then sample them
    interleaved (ABBA order), so the noise of a shared machine hits every size alike."""
    with ExitStack() as stack:
        probers: list[_Prober] = []
        imports: list[tuple[float, float, float]] = []
        for n in sizes:
            seed = secrets.token_bytes(16)
            net = stack.enter_context(LocalDeployment(tmp / f"{backend}-{n}").running())
            dsn = None if backend == "sqlite" else stack.enter_context(pg_database(admin_dsn or ""))
            net.init_server(database=dsn)
            imports.append(_fill(net, n, seed, args.quiet))
            url = net.start_server()
            prober = _Prober(net, url, n, seed)
            stack.callback(prober.close)
            probers.append(prober)
        for i in range(args.warmup + args.requests):
            order = probers if i % 2 == 0 else probers[::-1]
            for prober in order:
                prober.sample(keep=i >= args.warmup)
        results = []
        for n, prober, (users_s, tks_s, entities_s) in zip(sizes, probers, imports, strict=True):
            p50, p99 = prober.quantiles()
            results.append(
                Result(backend, n, users_s, tks_s, entities_s, p50, p99, prober.statuses)
            )
        return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", default="1000,1000000", help="sizes, comma-separated")
    parser.add_argument("--requests", type=int, default=2000, help="measured per size")
    parser.add_argument("--warmup", type=int, default=200, help="requests not measured")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-admin-dsn", help="an existing cluster's admin URL (default: "
                        "start a throwaway one with scripts/pg-cluster)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no import progress bars")
    args = parser.parse_args(argv)
    try:
        sizes = sorted({int(x) for x in args.entities.split(",")})
    except ValueError:
        parser.error("--entities takes integers, e.g. 1000,1000000")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not sizes or min(sizes) < 2 or not set(backends) <= {"sqlite", "postgresql"}:
        parser.error("--entities >= 2 each; --backends sqlite and/or postgresql")
    if args.requests < 2 or args.warmup < 0:
        parser.error("--requests >= 2, --warmup >= 0")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="cpns-scale-") as tmp:
        admin = pg_admin(args.pg_admin_dsn) if "postgresql" in backends else nullcontext()
        with admin as admin_dsn:
            for backend in backends:
                for result in run_backend(backend, sizes, args, admin_dsn, Path(tmp)):
                    results.append(result)
                    print(
                        f"{backend:<10} {result.entities:>9} entities: "
                        f"import users {result.users_s:7.1f} s, "
                        f"TKs {result.tks_s:7.1f} s, entities {result.entities_s:7.1f} s; "
                        f"auth p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
                        f"statuses {result.statuses}",
                        flush=True,
                    )
    print(
        f"Digest-authenticated GET {URI} over HTTPS, {args.requests} requests per size, "
        "sizes sampled interleaved"
    )
    for backend in backends:
        mine = [r for r in results if r.backend == backend]
        small, large = mine[0], mine[-1]
        print(
            f"  {backend:<10} p99 {large.entities} / {small.entities} entities: "
            f"{large.p99_ms:.2f} / {small.p99_ms:.2f} ms = ratio {large.p99_ms / small.p99_ms:.2f} "
            f"(p50 ratio {large.p50_ms / small.p50_ms:.2f}; target p99 ratio <= 1.2)"
        )
    ok = all(r.statuses == {200: args.requests} for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
