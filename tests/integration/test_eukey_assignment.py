"""EUKey assignment end to end: real server, gateway and device processes on loopback.

Every test here drives the ``cpns`` commands an operator would type; nothing is mocked.
Stale-time and replay cases need a gateway whose clock or random values are wrong: they
use the real gateway library (ServerClient + the 003 machine) in the test process against
the real server process, over HTTPS with Digest.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct

import httpx
import pytest
from tests.integration.conftest import OTHER_PASSWORD, PASSWORD, Net

from cpns.crypto.kdf import password_key
from cpns.errors import ErrorCode
from cpns.gateway.upstream import ServerClient
from cpns.messages import EUKeyAssignmentRequest, EUKeyAssignmentResponse, decode
from cpns.protocol.key_assignment import auth_data, claim_code, claim_key, claim_proof
from cpns.runtime import SystemRandom, wall_time

pytestmark = pytest.mark.integration


def _status(result_stdout: str, result_stderr: str) -> str:
    return result_stdout + result_stderr


def _server_entities(run: Net) -> dict[str, dict[str, object]]:
    out = run.net.cpns(
        "admin", "entity", "list", "--json", "--data-dir", str(run.net.server_dir)
    ).stdout
    return {e["entity_id"]: e for e in json.loads(out)}


def test_pn_gw_and_pne_without_ui_get_their_eukeys(running: Net) -> None:
    """004 §5.x.1 + 003 §7.4.2.2: the PN GW enrols with the user's password, then a PNE
    without UI gets EUKey_1 sealed under its TK; the server stores the chain with the
    Entity ID and User ID, the PN GW the TK and the set, the PNE its EUKey."""
    net = running.net
    net.init_device("pne-1", entity_id="pne-1", tk=running.tk["pne-1"])
    net.start_device("pne-1", pan_port=running.pan_port, once=True, timeout=60)
    result = net.assign(pne_id="pne-1", user_id="alice", password=PASSWORD, wait=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert net.wait("pne-1", timeout=60) == 0, net.log("pne-1")

    entities = _server_entities(running)
    assert entities["gw-alice"]["kind"] == "PN_GW"
    assert entities["gw-alice"]["owner"] == "alice"
    assert entities["pne-1"]["owner"] == "alice"
    assert entities["pne-1"]["keys"] == 16
    assert entities["pne-1"]["assigned_via"] == "gw-alice"
    device = json.loads(
        net.cpns("device", "status", "--data-dir", str(net.device_dir("pne-1"))).stdout
    )
    assert device["key_index"] == 1
    # The server, the gateway and the device hold the same EUKey_1.
    shown = json.loads(
        net.cpns(
            "admin", "entity", "show", "pne-1", "--show-secrets", "--data-dir", str(net.server_dir)
        ).stdout
    )
    eukey_1 = bytes.fromhex(shown["eukeys"][0])
    from cpns.store.keystore import LocalKeyStore

    stored = LocalKeyStore.open_or_create(net.device_dir("pne-1"), "device").load()
    assert eukey_1 in _walk_bytes(stored)


def _walk_bytes(value: object) -> list[bytes]:
    if isinstance(value, bytes):
        return [value]
    if isinstance(value, dict):
        return [b for v in value.values() for b in _walk_bytes(v)]
    if isinstance(value, list | tuple):
        return [b for v in value for b in _walk_bytes(v)]
    return []


@pytest.mark.parametrize(
    ("pne", "user", "password", "status"),
    [
        # D-003-9: a user other than the PN GW's owner, existing or not, is NOT_AUTHORIZED.
        ("pne-1", "mallory", PASSWORD, "NOT_AUTHORIZED"),
        ("pne-1", "alice", "not the password", "WRONG_PASSWORD"),
        ("pne-unknown", "alice", PASSWORD, "CLAIM_NOT_PROVEN"),
        ("pne-1", "bob", OTHER_PASSWORD, "NOT_AUTHORIZED"),
    ],
)
def test_refusals_are_seen_end_to_end(
    running: Net, pne: str, user: str, password: str, status: str
) -> None:
    """003 §7.4.2.1.1.2 step 2: a failed check gives a Response with a fail status, which
    the PN GW relays unchanged to the user (exit code 3 and the status name)."""
    result = running.net.assign(pne_id=pne, user_id=user, password=password, wait=0)
    assert result.returncode == 3, result.stdout + result.stderr
    assert status in result.stdout + result.stderr


def test_entity_owned_by_another_user(running: Net) -> None:
    """004 §5.x.1/§5.x.3: a PNE registered to alice cannot be taken by bob through bob's
    own PN GW: OWNED_BY_OTHER_USER."""
    net = running.net
    first = net.assign(pne_id="pne-1", user_id="alice", password=PASSWORD, wait=0)
    assert first.returncode == 0, first.stdout + first.stderr
    net.enroll_gateway(
        entity_id="gw-bob",
        user_id="bob",
        password=OTHER_PASSWORD,
        server_url=running.url,
        name="gwb",
    )
    net.start_gateway("gwb")
    result = net.assign(pne_id="pne-1", user_id="bob", password=OTHER_PASSWORD, name="gwb")
    assert result.returncode == 3
    assert "OWNED_BY_OTHER_USER" in result.stdout + result.stderr


def test_gateway_enrolment_refusals(running: Net) -> None:
    """004 §5.x.1: enrolment needs the right password; an Entity ID registered to another
    user cannot be enrolled by a second user."""
    net = running.net
    wrong = net.enroll_gateway(
        entity_id="gw-x",
        user_id="alice",
        password="nope nope",
        server_url=running.url,
        name="gwx",
        check=False,
    )
    # The enrolling entity is not authenticated yet: one opaque code (deviations D-004-2).
    assert wrong.returncode == 3
    assert "AUTHENTICATION_FAILED" in wrong.stdout + wrong.stderr
    unknown = net.enroll_gateway(
        entity_id="gw-z",
        user_id="nobody",
        password="whatever1",
        server_url=running.url,
        name="gwz",
        check=False,
    )
    assert unknown.returncode == 3
    assert "AUTHENTICATION_FAILED" in unknown.stdout + unknown.stderr
    taken = net.enroll_gateway(
        entity_id="gw-alice",
        user_id="bob",
        password=OTHER_PASSWORD,
        server_url=running.url,
        name="gwy",
        check=False,
    )
    assert taken.returncode == 3
    assert "OWNED_BY_OTHER_USER" in taken.stdout + taken.stderr


def _gateway_key(run: Net) -> bytes:
    shown = json.loads(
        run.net.cpns(
            "admin",
            "entity",
            "show",
            "gw-alice",
            "--show-secrets",
            "--data-dir",
            str(run.net.server_dir),
        ).stdout
    )
    return bytes.fromhex(shown["eukeys"][0])


def _client(run: Net, eukey: bytes) -> ServerClient:
    return ServerClient(
        server_url=run.url, ca_file=run.net.ca_file, entity_id="gw-alice", eukey=eukey
    )


def _request(
    run: Net, *, rand: bytes, time: int, txid: bytes, pne: str = "pne-2"
) -> EUKeyAssignmentRequest:
    key = password_key(PASSWORD, realm="cpns", user_id="alice")
    code = claim_code(run.tk[pne], pne)
    return EUKeyAssignmentRequest(
        txid=txid,
        src="gw-alice",
        dst="cpns-server",
        pne_id=pne,
        user_id="alice",
        time=time,
        rand_pngw=rand,
        auth_data=auth_data(
            key, rand_pngw=rand, time=time, user_id="alice", pne_id=pne, gateway_id="gw-alice"
        ),
        claim_proof=claim_proof(
            claim_key(code),
            rand_pngw=rand,
            time=time,
            user_id="alice",
            pne_id=pne,
            gateway_id="gw-alice",
        ),
    )


def test_stale_time_and_replay_are_refused(running: Net) -> None:
    """003 §7.4.2.1.1.1 step 3 / §7.4.2.1.1.2: Time outside the window gives STALE_TIME;
    a reused RANDPNGW gives REPLAY; an identical retry of a transaction gets the stored
    reply (idempotent), not a second chain."""
    rng = SystemRandom()
    client = _client(running, _gateway_key(running))

    async def scenario() -> list[EUKeyAssignmentResponse]:
        try:
            now = wall_time()
            rand = rng.token_bytes(32)
            stale = _request(
                running, rand=rng.token_bytes(32), time=now - 3600, txid=rng.token_bytes(16)
            )
            first = _request(running, rand=rand, time=now, txid=rng.token_bytes(16))
            replay = _request(running, rand=rand, time=now, txid=rng.token_bytes(16))
            replies = []
            for message in (stale, first, first, replay):
                reply = await client.exchange(message)
                assert isinstance(reply, EUKeyAssignmentResponse)
                replies.append(reply)
            return replies
        finally:
            await client.aclose()

    stale, ok, retry, replay = asyncio.run(scenario())
    assert stale.status is ErrorCode.STALE_TIME
    assert ok.status is ErrorCode.OK
    assert retry == ok
    assert replay.status is ErrorCode.REPLAY


def test_malformed_messages_get_malformed_status(running: Net) -> None:
    """DESIGN §3: undecodable bytes get one error with a code, on both links: the server
    answers 400 with MALFORMED_MESSAGE, the PN GW answers an ErrorMessage on the PAN and
    keeps serving."""
    ctx = ssl.create_default_context(cafile=str(running.net.ca_file))
    with httpx.Client(verify=ctx) as http:
        response = http.post(f"{running.url}/cpns/v1/messages", content=b"\xa1\x00garbage")
    assert response.status_code == 400
    assert decode(response.content).status is ErrorCode.MALFORMED_MESSAGE  # type: ignore[attr-defined]

    with socket.create_connection(("127.0.0.1", running.pan_port), timeout=10) as sock:
        payload = b"\xff\x00not cbor"
        sock.sendall(struct.pack(">I", len(payload)) + payload)
        header = _recv_exact(sock, 4)
        reply = decode(_recv_exact(sock, struct.unpack(">I", header)[0]))
    assert reply.status is ErrorCode.MALFORMED_MESSAGE  # type: ignore[attr-defined]
    # The daemon still serves: a real assignment goes through afterwards.
    result = running.net.assign(pne_id="pne-1", user_id="alice", password=PASSWORD)
    assert result.returncode == 0, result.stdout + result.stderr


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def test_gateway_restarted_between_response_and_notification(running: Net) -> None:
    """DESIGN §5-6: the PN GW stores TK and [EUKeyPNE] before notifying (003
    §7.4.2.1.1.3 step 1); killed after the Response and before any PNE connected, the
    restarted PN GW still delivers the key."""
    net = running.net
    result = net.assign(pne_id="pne-1", user_id="alice", password=PASSWORD, wait=0)
    assert result.returncode == 0, result.stdout + result.stderr
    net.stop("gw", kill=True)
    pan_port = net.start_gateway()
    net.init_device("pne-1", entity_id="pne-1", tk=running.tk["pne-1"])
    net.start_device("pne-1", pan_port=pan_port, once=True, timeout=60)
    assert net.wait("pne-1", timeout=60) == 0, net.log("pne-1") + net.log("gw")


def test_server_down_then_restarted_loses_nothing(running: Net) -> None:
    """DESIGN §5: a lost exchange never forces re-onboarding. With the server down the
    assignment is refused as UPSTREAM_UNAVAILABLE but the request is kept; after the
    server and the PN GW restart, the PN GW resends it and the PNE gets its key."""
    net = running.net
    net.stop("server")
    result = net.assign(pne_id="pne-2", user_id="alice", password=PASSWORD, wait=0)
    assert result.returncode == 4 or "UPSTREAM_UNAVAILABLE" in result.stdout + result.stderr
    net.start_server()
    net.stop("gw")
    pan_port = net.start_gateway()
    net.init_device("pne-2", entity_id="pne-2", tk=running.tk["pne-2"])
    net.start_device("pne-2", pan_port=pan_port, once=True, timeout=60)
    assert net.wait("pne-2", timeout=60) == 0, net.log("pne-2") + net.log("gw")
    assert _server_entities(running)["pne-2"]["keys"] == 16


def test_no_secret_in_any_log(running: Net) -> None:
    """DESIGN §5 / STYLE §4: logs carry key IDs, never keys: after a full run with text
    logs and another with JSON logs (docs/logging.md: every structured field written), no
    log file contains the TK, an EUKey or the password, in hex or raw."""
    net = running.net
    secrets_hex = [_gateway_key(running).hex()]
    pan_port = running.pan_port
    for pne, log_format in (("pne-1", "text"), ("pne-2", "json")):
        if log_format == "json":  # the same programs again, now writing JSON lines
            net.stop("gw")
            net.stop("server")
            net.env["CPNS_LOG_FORMAT"] = "json"
            net.start_server()
            pan_port = net.start_gateway()
        net.init_device(pne, entity_id=pne, tk=running.tk[pne])
        net.start_device(pne, pan_port=pan_port, once=True, timeout=60)
        assert net.assign(pne_id=pne, user_id="alice", password=PASSWORD, wait=30).returncode == 0
        assert net.wait(pne, timeout=60) == 0
        shown = json.loads(
            net.cpns(
                "admin", "entity", "show", pne, "--show-secrets", "--data-dir", str(net.server_dir)
            ).stdout
        )
        secrets_hex += [running.tk[pne].hex(), *shown["eukeys"]]
    net.stop_all()
    json_lines = [
        json.loads(line)
        for name in ("server", "gw", "pne-2")
        for line in net.log(name).splitlines()
        if line.startswith("{")
    ]
    assert any(line.get("event") == "message" for line in json_lines)
    logs = "".join(net.log(name) for name in ("server", "gw", "pne-1", "pne-2"))
    assert logs, "the daemons wrote no logs at all"
    for value in secrets_hex:
        assert value not in logs
        assert value[:16] not in logs
    assert PASSWORD not in logs


def test_password_guessing_is_bounded_end_to_end(running: Net) -> None:
    """D-SRV-1: with the server configured (environment override) for 2 failures, two wrong
    passwords are WRONG_PASSWORD and then even the right one is TOO_MANY_ATTEMPTS, seen by
    the user as exit 3 with the status, until the window passes."""
    net = running.net
    net.stop("server")
    net.env["CPNS_SERVER_MAX_AUTH_FAILURES"] = "2"
    net.start_server()
    for _ in range(2):
        wrong = net.assign(pne_id="pne-1", user_id="alice", password="not it at all", wait=0)
        assert wrong.returncode == 3
        assert "WRONG_PASSWORD" in wrong.stdout + wrong.stderr
    locked = net.assign(pne_id="pne-1", user_id="alice", password=PASSWORD, wait=0)
    assert locked.returncode == 3, locked.stdout + locked.stderr
    assert "TOO_MANY_ATTEMPTS" in locked.stdout + locked.stderr
    assert "pne-1" not in _server_entities(running)
