"""Does response time tell an existing identity from an unknown one? (issue 5 item 7)

A real ``cpns server run`` on loopback (HTTPS, TLS 1.3, SQLite), one keep-alive
connection, requests interleaved so that drift hits both sides alike. Two oracles:

* **Digest 401**: ``GET /cpns/v1/whoami`` with a wrong Digest response for an enrolled
  PN GW's Entity ID and for an unknown one (same length), on one valid nonce.
* **Enrolment**: a ``UserKeyAssignmentRequest`` with a wrong password for an existing
  User ID and for an unknown one (same length), on ``POST /cpns/v1/messages``.

For each it prints the median response time of both sides, the difference in
microseconds, and the spread (interquartile range) that difference has to be read
against. The guessing guard's limits are raised for the run so that every proof is
really checked. A figure, never a pass/fail.

    .venv/bin/python benchmarks/timing_oracle.py --rounds 2000
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from cpns.crypto.kdf import password_key
from cpns.localnet import LocalDeployment
from cpns.messages.codec import decode, encode
from cpns.protocol.digest import DigestClient
from cpns.protocol.user_key_assignment import UserKeyAssignmentClient
from cpns.runtime import SystemRandom
from cpns.types import EntityKind

PASSWORD = "timing oracle password"
#: Guard limits high enough that no proof of the run is refused unchecked.
_NO_GUARD = {
    "CPNS_SERVER_MAX_AUTH_FAILURES": "1000000",
    "CPNS_SERVER_MAX_AUTH_FAILURES_PER_USER_SOURCE": "1000000",
    "CPNS_SERVER_MAX_AUTH_FAILURES_PER_SOURCE": "1000000",
}


def _timed(send: Callable[[], httpx.Response]) -> tuple[int, httpx.Response]:
    start = time.perf_counter_ns()
    response = send()
    return time.perf_counter_ns() - start, response


def _report(name: str, a_label: str, a: list[int], b_label: str, b: list[int]) -> None:
    """Medians of both sides, and the median of the paired differences (request i of one
    side against request i of the other, sent next to each other) with a rough 95 %
    interval, which is what a difference has to be read against on a busy machine."""

    def us(ns: float) -> float:
        return ns / 1000

    ma, mb = statistics.median(a), statistics.median(b)
    qa, qb = statistics.quantiles(a, n=4), statistics.quantiles(b, n=4)
    pairs = [x - y for x, y in zip(a, b, strict=False)]
    md = statistics.median(pairs)
    q = statistics.quantiles(pairs, n=4)
    half = 1.58 * (q[2] - q[0]) / 1.349 / len(pairs) ** 0.5  # ~95 % for a median
    print(f"{name}:")
    print(f"  {a_label:<28} median {us(ma):9.1f} us  IQR {us(qa[2] - qa[0]):8.1f} us")
    print(f"  {b_label:<28} median {us(mb):9.1f} us  IQR {us(qb[2] - qb[0]):8.1f} us")
    print(f"  difference of medians        {us(ma - mb):+9.1f} us")
    print(f"  median paired difference     {us(md):+9.1f} us  (+/- {us(half):.1f} us, ~95 %)")


def _digest_oracle(http: httpx.Client, url: str, rounds: int) -> None:
    uri = "/cpns/v1/whoami"
    first = http.get(url + uri)
    challenges = first.headers.get_list("www-authenticate")
    rng = SystemRandom()
    times: dict[str, list[int]] = {"gw-1": [], "gw-0": []}  # enrolled / unknown
    codes: collections.Counter[tuple[str, int]] = collections.Counter()
    for i in range(rounds * 2 + 100):
        entity = "gw-1" if i % 4 in (0, 3) else "gw-0"  # ABBA: order effects cancel
        header = DigestClient(entity, "ab" * 32).authorization(
            challenges=challenges, method="GET", uri=uri, rng=rng
        )
        elapsed, reply = _timed(
            functools.partial(http.get, url + uri, headers={"authorization": header})
        )
        if i >= 100:  # warm-up left out
            times[entity].append(elapsed)
            codes[(entity, reply.status_code)] += 1
    _report(
        "Digest 401 (wrong response)",
        "existing Entity ID gw-1",
        times["gw-1"],
        "unknown Entity ID gw-0",
        times["gw-0"],
    )
    print(f"  HTTP statuses: {dict(codes)}")


def _enrolment_oracle(http: httpx.Client, url: str, rounds: int) -> None:
    rng = SystemRandom()
    wrong = {
        user: password_key("not the password", realm="cpns", user_id=user)
        for user in ("alice", "zorro")
    }
    times: dict[str, list[int]] = {"alice": [], "zorro": []}  # existing / unknown
    statuses: collections.Counter[tuple[str, str]] = collections.Counter()
    for i in range(rounds * 2 + 100):
        user = "alice" if i % 4 in (0, 3) else "zorro"
        client = UserKeyAssignmentClient(
            entity_id=f"gw-t{i}", entity_kind=EntityKind.PN_GW, server_id="cpns-server", rng=rng
        )
        client.start(user_id=user, password_key=wrong[user], now=int(time.time()))
        [message] = client.messages_to_send()
        send = functools.partial(
            http.post,
            url + "/cpns/v1/messages",
            content=encode(message),
            headers={"content-type": "application/cbor"},
        )
        elapsed, reply = _timed(send)
        if i >= 100:
            times[user].append(elapsed)
            status = getattr(decode(reply.content), "status", None)
            statuses[(user, getattr(status, "name", str(status)))] += 1
    _report(
        "Enrolment refusal (wrong password)",
        "existing User ID alice",
        times["alice"],
        "unknown User ID zorro",
        times["zorro"],
    )
    print(f"  protocol statuses: {dict(statuses)}")


def run(rounds: int, base: Path) -> None:
    net = LocalDeployment(base, env=dict(_NO_GUARD))
    with net.running():
        net.init_server(users=[("alice", PASSWORD)])
        url = net.start_server()
        net.enroll_gateway(entity_id="gw-1", user_id="alice", password=PASSWORD, server_url=url)
        shown = net.cpns(
            "admin", "entity", "show", "gw-1", "--data-dir", str(net.server_dir)
        ).stdout
        assert json.loads(shown)["entity_id"] == "gw-1"
        context = ssl.create_default_context(cafile=str(net.ca_file))
        with httpx.Client(verify=context, timeout=30) as http:
            print(f"{rounds} rounds per side, one keep-alive HTTPS connection, interleaved")
            _digest_oracle(http, url, rounds)
            _enrolment_oracle(http, url, rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000, help="requests per side")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cpns-timing-") as tmp:
        run(args.rounds, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
