"""Server guards end to end (issue 5 items 5, 6, 9): a real ``cpns server`` process, real
TLS, once on SQLite and once on the session's PostgreSQL (the counters and the audit
aggregates live in the store); distinct loopback addresses (127.0.0.2, 127.0.0.3, ...)
bound by the client are distinct sources."""

from __future__ import annotations

import json
import secrets
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tests.postgres import raw

from cpns.crypto.kdf import password_key
from cpns.errors import ErrorCode
from cpns.localnet import LocalDeployment
from cpns.messages.codec import decode, encode
from cpns.messages.model import UserKeyAssignmentRequest, UserKeyAssignmentResponse
from cpns.protocol.user_key_assignment import UserKeyAssignmentClient
from cpns.runtime import SystemRandom
from cpns.types import EntityKind

PASSWORD = "correct horse battery"
#: scrypt is slow on purpose: compute each password key once.
_KEYS: dict[tuple[str, str], bytes] = {}


@dataclass
class Server:
    net: LocalDeployment
    url: str
    #: The PostgreSQL URL of its database, or None for the default SQLite file.
    dsn: str | None = None

    def query(self, statement: str) -> list[tuple[object, ...]]:
        """One read-only statement on the server's database, outside the server."""
        if self.dsn is not None:
            return [tuple(row) for row in raw(self.dsn, statement)]
        db = self.net.server_dir / "cpns.db"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return conn.execute(statement).fetchall()
        finally:
            conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """A running server with the user alice; default guard limits (5 / 30 / 50). Once on
    SQLite, once on a fresh PostgreSQL database."""
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    net = LocalDeployment(tmp_path / "net")
    with net.running():
        net.init_server(
            users=[("alice", PASSWORD)],
            tk_records=[("pne-1", secrets.token_bytes(32))],
            database=dsn,
        )
        yield Server(net, net.start_server(), dsn)


def _key(user: str, password: str) -> bytes:
    if (user, password) not in _KEYS:
        _KEYS[user, password] = password_key(password, realm="cpns", user_id=user)
    return _KEYS[user, password]


def enrolment(
    *, user: str = "alice", password: str = "not the password", entity: str = "gw-new"
) -> bytes:
    client = UserKeyAssignmentClient(
        entity_id=entity, entity_kind=EntityKind.PN_GW, server_id="cpns-server", rng=SystemRandom()
    )
    client.start(user_id=user, password_key=_key(user, password), now=int(time.time()))
    [message] = client.messages_to_send()
    assert isinstance(message, UserKeyAssignmentRequest)
    return encode(message)


class Source:
    """An HTTPS client bound to one loopback address."""

    def __init__(self, server: Server, address: str) -> None:
        context = ssl.create_default_context(cafile=str(server.net.ca_file))
        transport = httpx.HTTPTransport(verify=context, local_address=address)
        self._client = httpx.Client(transport=transport, timeout=10.0)
        self._url = server.url.rstrip("/") + "/cpns/v1/messages"

    def send(self, body: bytes) -> ErrorCode | int:
        response = self._client.post(
            self._url, content=body, headers={"content-type": "application/cbor"}
        )
        assert response.status_code == 200, response.text
        reply = decode(response.content)
        assert isinstance(reply, UserKeyAssignmentResponse)
        return reply.status

    def close(self) -> None:
        self._client.close()


FAILED = ErrorCode.AUTHENTICATION_FAILED
LIMITED = ErrorCode.TOO_MANY_ATTEMPTS


def test_a_strangers_flood_does_not_stop_the_users_enrolment(server: Server) -> None:
    """Issue 5 item 5, D-SRV-1: 40 bad proofs for alice from 127.0.0.2 are cut off after
    5; alice's correct proof from 127.0.0.3 succeeds."""
    stranger, alice = Source(server, "127.0.0.2"), Source(server, "127.0.0.3")
    try:
        verdicts = [stranger.send(enrolment()) for _ in range(40)]
        assert verdicts == [FAILED] * 5 + [LIMITED] * 35
        assert alice.send(enrolment(password=PASSWORD)) == ErrorCode.OK
    finally:
        stranger.close()
        alice.close()


def test_one_source_spraying_user_ids_is_cut_off_and_others_are_not(server: Server) -> None:
    """Issue 5 item 5, D-SRV-1: one source sending proofs for 60 User IDs gets
    TOO_MANY_ATTEMPTS for every proof after 30, even a correct one; another source is
    served."""
    sprayer, alice = Source(server, "127.0.0.4"), Source(server, "127.0.0.5")
    try:
        verdicts = [sprayer.send(enrolment(user=f"user-{i}")) for i in range(60)]
        assert verdicts == [FAILED] * 30 + [LIMITED] * 30
        assert sprayer.send(enrolment(password=PASSWORD)) == LIMITED
        assert alice.send(enrolment(password=PASSWORD)) == ErrorCode.OK
    finally:
        sprayer.close()
        alice.close()


def test_guessing_one_user_is_bounded_across_sources(server: Server) -> None:
    """Issue 5 item 5, D-SRV-1: from 12 sources, at most 50 proofs for alice are checked in
    a window; then even her correct proof from a fresh source is refused."""
    checked = 0
    for n in range(12):
        source = Source(server, f"127.0.1.{n + 1}")
        try:
            checked += sum(source.send(enrolment()) == FAILED for _ in range(6))
        finally:
            source.close()
    assert checked == 50
    fresh = Source(server, "127.0.2.1")
    try:
        assert fresh.send(enrolment(password=PASSWORD)) == LIMITED
    finally:
        fresh.close()


def _audit_rows(server: Server) -> int:
    return int(str(server.query("SELECT count(*) FROM audit")[0][0]))


def test_a_flood_of_bad_enrolments_grows_the_audit_by_its_keys_not_its_requests(
    server: Server,
) -> None:
    """Issue 5 item 6, D-SRV-2: 200 bad enrolments from one source add a handful of audit
    rows (one per procedure, outcome, source and User ID) whose counts add up to 200,
    written by the periodic flush or at the latest when the server stops."""
    before = _audit_rows(server)
    flooder = Source(server, "127.0.0.6")
    try:
        statuses = [flooder.send(enrolment(user=f"user-{i % 4}")) for i in range(200)]
    finally:
        flooder.close()
    assert set(statuses) == {FAILED, LIMITED}
    server.net.stop("server")
    rows = server.query(
        "SELECT outcome, source, user_id, count FROM audit WHERE source = '127.0.0.6'"
    )
    assert _audit_rows(server) - before == len(rows) <= 8
    assert sum(int(str(r[3])) for r in rows) == 200
    # The operator sees the counts; a purge keeps what is within the retention.
    data_dir = str(server.net.server_dir)
    shown = server.net.cpns("admin", "audit", "--limit", "1000", "--data-dir", data_dir).stdout
    counts = [json.loads(line) for line in shown.splitlines()]
    assert sum(e["count"] for e in counts if e["source"] == "127.0.0.6") == 200
    purged = server.net.cpns("admin", "audit", "--purge", "--data-dir", data_dir).stdout
    assert "purged 0 audit event(s) older than 90 days" in purged


def test_unauth_flood_benchmark_runs() -> None:
    """The flood benchmark (issue 5 item 6) keeps working: on a tiny load it prints its
    figures and exits 0 (a smoke run, never judged on speed)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "unauth_flood.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--requests", "40", "--concurrency", "2"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "refusals/s" in proc.stdout
    assert "per 10k refusals" in proc.stdout


# -- Entity ID syntax (issue 5 item 9, D-SRV-3) -------------------------------------------------


def test_enrolment_refuses_reserved_and_case_variant_entity_ids(server: Server) -> None:
    """Issue 5 item 9, D-SRV-3: with alice's right password, enrolment of the server's own
    Entity ID, an IP address, the PAN address or a case variant of an enrolled ID gets
    INVALID_ENTITY_ID and registers nothing; the canonical ID enrols."""
    alice = Source(server, "127.0.0.7")
    try:
        assert alice.send(enrolment(password=PASSWORD, entity="gw-alice")) == ErrorCode.OK
        for entity in ("cpns-server", "127.0.0.1", "pan", "GW-Alice", "GW-ALICE"):
            status = alice.send(enrolment(password=PASSWORD, entity=entity))
            assert status == ErrorCode.INVALID_ENTITY_ID, entity
    finally:
        alice.close()
    listed = server.net.cpns(
        "admin", "entity", "list", "--data-dir", str(server.net.server_dir)
    ).stdout
    assert "gw-alice" in listed
    for entity in ("cpns-server", "127.0.0.1", "GW-Alice", "GW-ALICE"):
        assert entity not in listed.replace("gw-alice", "")


def test_tk_import_refuses_reserved_and_case_variant_entity_ids(server: Server) -> None:
    """Issue 5 item 9, D-SRV-3: `cpns admin tk import` refuses a record for the server's own
    ID, an IP address or a case variant of an existing PNE ID, naming the line, and imports
    nothing of the file (exit 2)."""
    net = server.net
    for entity in ("cpns-server", "127.0.0.1", "PNE-1"):
        csv = net.server_dir.parent / f"bad-{entity}.csv"
        csv.write_text(f"entity_id,tk\npne-9,{'00' * 32}\n{entity},{'11' * 32}\n")
        result = net.cpns(
            "admin", "tk", "import", str(csv), "--data-dir", str(net.server_dir), check=False
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert "line 3" in result.stderr
    ids = {r[0] for r in server.query("SELECT entity_id FROM tk_records")}
    assert ids == {"pne-1"}
