"""A PNE with UI gets its EUKey through the PN GW (004 §5.x.1 over the PAN), end to end.

Real server, gateway daemon and ``cpns device enroll`` processes on loopback; nothing is
mocked. The lost-reply case plays the PNE's PAN side in the test process (a real socket
to the real gateway daemon) so that it can drop an answer on purpose.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from tests.integration.conftest import OTHER_PASSWORD, PASSWORD, Net

from cpns.crypto.kdf import password_key
from cpns.errors import ErrorCode
from cpns.messages.codec import encode
from cpns.messages.model import PNEHello, UserKeyAssignmentRequest, UserKeyAssignmentResponse
from cpns.protocol.user_key_assignment import EUKeyReceived, UserKeyAssignmentClient
from cpns.runtime import SystemRandom, wall_time
from cpns.store.keystore import LocalKeyStore
from cpns.transport.stream import read_message, write_message
from cpns.types import EntityKind

pytestmark = pytest.mark.integration


def _entity(run: Net, entity_id: str, *, secrets: bool = False) -> dict[str, object]:
    args = ["admin", "entity", "show", entity_id, "--data-dir", str(run.net.server_dir)]
    shown = json.loads(run.net.cpns(*args, *(["--show-secrets"] if secrets else [])).stdout)
    assert isinstance(shown, dict)
    return shown


def _walk_bytes(value: object) -> list[bytes]:
    if isinstance(value, bytes):
        return [value]
    if isinstance(value, dict):
        return [b for v in value.values() for b in _walk_bytes(v)]
    if isinstance(value, list | tuple):
        return [b for v in value for b in _walk_bytes(v)]
    return []


def _audit(run: Net) -> list[dict[str, object]]:
    out = run.net.cpns(
        "admin", "audit", "--limit", "50", "--data-dir", str(run.net.server_dir)
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_pne_with_ui_enrols_through_the_pn_gw(running: Net) -> None:
    """004 §5.x.1: the server assigns the PNE an EUKey after the User ID/password proof
    relayed by the PN GW, and stores it with the Entity ID and the User ID; the PNE
    holds it as credential kind "ui"; the PN GW's key store does not hold it (it never
    sees the password key, so it cannot open it); no secret is in any log."""
    net = running.net
    result = net.enroll_device(
        "pne-ui",
        entity_id="pne-ui",
        user_id="alice",
        password=PASSWORD,
        pan_port=running.pan_port,
        check=True,
    )
    assert "OK" in result.stdout
    # The flow ID the PNE started is carried through the PN GW to the server and back.
    flow = re.search(r"flow ([0-9a-f]{16})", result.stdout)
    assert flow is not None
    assert f"flow={flow.group(1)}" in net.log("gw")
    assert f"flow={flow.group(1)}" in net.log("server")
    device = json.loads(
        net.cpns("device", "status", "--data-dir", str(net.device_dir("pne-ui"))).stdout
    )
    assert (device["credential"], device["has_key"], device["user_id"]) == ("ui", True, "alice")

    record = _entity(running, "pne-ui", secrets=True)
    assert (record["kind"], record["owner"], record["assigned_via"]) == ("PNE", "alice", None)
    eukeys = record["eukeys"]
    assert isinstance(eukeys, list)
    eukey = bytes.fromhex(eukeys[0])
    held = LocalKeyStore.open_or_create(net.device_dir("pne-ui"), "device").load()
    assert held["eukey"] == eukey

    gateway = LocalKeyStore.open_or_create(net.gateway_dir(), "gateway")
    in_gateway = _walk_bytes(gateway.load()) + _walk_bytes(gateway.load_records())
    assert eukey not in in_gateway

    # The server knows which PN GW relayed it: the audit names the gateway as the actor.
    relayed = [
        e for e in _audit(running) if e.get("entity") == "pne-ui" and e.get("outcome") == "OK"
    ]
    assert relayed
    assert relayed[0]["actor"] == "gw-alice"

    secrets = [eukey.hex(), password_key(PASSWORD, realm="cpns", user_id="alice").hex(), PASSWORD]
    logs = net.log("gw") + net.log("server") + result.stdout + result.stderr
    assert not any(s in logs for s in secrets)


@pytest.mark.parametrize(
    ("user", "password", "status"),
    [
        ("alice", "not the password", "WRONG_PASSWORD"),
        # D-004-5: only the relaying PN GW's own user, existing or not (as D-003-9).
        ("bob", OTHER_PASSWORD, "NOT_AUTHORIZED"),
        ("mallory", PASSWORD, "NOT_AUTHORIZED"),
    ],
)
def test_refusals_are_relayed_with_the_hop(
    running: Net, user: str, password: str, status: str
) -> None:
    """004 §5.x.1/§5.x.3: the server's refusal reaches the PNE unchanged through the PN GW,
    named with the hop that decided it (the server); exit code 3; nothing is stored."""
    net = running.net
    result = net.enroll_device(
        "pne-ui", entity_id="pne-ui", user_id=user, password=password, pan_port=running.pan_port
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"{status}: enrolment refused at server" in result.stdout
    device = json.loads(
        net.cpns("device", "status", "--data-dir", str(net.device_dir("pne-ui"))).stdout
    )
    assert (device["has_key"], device["credential"]) == (False, None)


def test_a_retry_after_a_lost_reply_gets_the_same_answer(running: Net) -> None:
    """Our rule (docs/procedures/pne-enrolment.md, idempotent retries): the PNE sends the
    same request again after losing the answer; the PN GW relays it and the server
    answers from the reply it stored: the same bytes, the same EUKey, one assignment."""
    machine = UserKeyAssignmentClient(
        entity_id="pne-lost",
        entity_kind=EntityKind.PNE,
        server_id="cpns-server",
        rng=SystemRandom(),
    )
    machine.start(
        user_id="alice",
        password_key=password_key(PASSWORD, realm="cpns", user_id="alice"),
        now=wall_time(),
    )
    (request,) = machine.messages_to_send()

    async def one_link() -> UserKeyAssignmentResponse:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.pan_port)
        try:
            hello = PNEHello(
                txid=SystemRandom().token_bytes(16),
                src="pne-lost",
                dst="pan",
                has_ui=True,
                key_index=0,
            )
            await write_message(writer, hello)
            await write_message(writer, request)
            reply = await asyncio.wait_for(read_message(reader), 30)
            assert isinstance(reply, UserKeyAssignmentResponse)
            return reply
        finally:
            writer.close()  # the first answer is "lost": the PNE never uses it

    first = asyncio.run(one_link())
    second = asyncio.run(one_link())
    assert first.status is ErrorCode.OK
    assert encode(second) == encode(first)
    (event,) = machine.receive(second)
    assert isinstance(event, EUKeyReceived)
    record = _entity(running, "pne-lost", secrets=True)
    assert record["eukeys"] == [event.eukey.hex()]
    assert record["owner"] == "alice"
    # Neither the PN GW nor the server logs the proof, the sealed key or the key.
    assert isinstance(request, UserKeyAssignmentRequest)
    assert second.sealed_eukey is not None
    logs = running.net.log("gw") + running.net.log("server")
    for secret in (request.auth_data, second.sealed_eukey, event.eukey):
        assert secret.hex() not in logs


def test_the_pne_retries_on_its_own_when_the_gateway_is_away(running: Net) -> None:
    """Our rule (idempotent retries): ``cpns device enroll`` tries again on a new PAN
    link when the first one gets no answer; with no gateway at all it reports the PN GW
    unreachable (exit 4) after its tries."""
    net = running.net
    net.stop("gw")
    result = net.enroll_device(
        "pne-ui",
        entity_id="pne-ui",
        user_id="alice",
        password=PASSWORD,
        pan_port=running.pan_port,
        extra=["--tries", "2", "--timeout", "5"],
    )
    assert result.returncode == 4, result.stdout + result.stderr
    assert "after 2 tries" in result.stderr
