"""Claims of a PNE over real processes: possession of its label, and one winner per race.

Issue 5 items 1 and 2. A PN GW of another user that knows only a PNE's Entity ID gets
nothing (D-003-10: the claim proves the label's claim code, derived from the PNE's TK);
many claims of one new Entity ID racing over real HTTPS have exactly one winner and every
other claim gets a refusal with no key material (compare and set on the entity's epoch).
Real server process, real TLS and Digest, real SQLite; the racing clients are the real
gateway library (ServerClient + the 003 machine) and plain HTTPS POSTs of real messages.
"""

from __future__ import annotations

import asyncio
import json
import ssl

import httpx
import pytest
from tests.integration.conftest import OTHER_PASSWORD, PASSWORD, Net

from cpns.crypto.kdf import password_key
from cpns.errors import ErrorCode
from cpns.gateway.daemon import offline_status
from cpns.gateway.upstream import ServerClient
from cpns.messages import decode, encode
from cpns.messages.model import (
    EUKeyAssignmentResponse,
    UserKeyAssignmentRequest,
    UserKeyAssignmentResponse,
)
from cpns.protocol.key_assignment import (
    EUKeyAssignmentGateway,
    EUKeySetReceived,
    claim_code,
    claim_key,
)
from cpns.protocol.user_key_assignment import UserKeyAssignmentClient
from cpns.runtime import SystemRandom, wall_time
from cpns.types import EntityKind

pytestmark = pytest.mark.integration

WRONG_CODE = "AAAA-AAAA-AAAA-AAAA"


def _entities(run: Net) -> dict[str, dict[str, object]]:
    out = run.net.cpns(
        "admin", "entity", "list", "--json", "--data-dir", str(run.net.server_dir)
    ).stdout
    return {e["entity_id"]: e for e in json.loads(out)}


def _eukey(run: Net, entity_id: str) -> bytes:
    shown = json.loads(
        run.net.cpns(
            "admin",
            "entity",
            "show",
            entity_id,
            "--show-secrets",
            "--data-dir",
            str(run.net.server_dir),
        ).stdout
    )
    return bytes.fromhex(shown["eukeys"][0])


def _enroll_bob(run: Net) -> None:
    run.net.enroll_gateway(
        entity_id="gw-bob",
        user_id="bob",
        password=OTHER_PASSWORD,
        server_url=run.url,
        name="gwb",
    )


def test_a_gateway_without_the_claim_code_gets_nothing(running: Net) -> None:
    """Issue 5 item 1 / D-003-10: bob's PN GW names alice's still unassigned PNE (its
    Entity ID is on the box) without its label's claim code: CLAIM_NOT_PROVEN, no entity
    on the server, nothing stored at bob's gateway; alice, holding the label, then gets
    the PNE (not OWNED_BY_OTHER_USER)."""
    net = running.net
    _enroll_bob(running)
    net.start_gateway("gwb")
    stolen = net.assign(
        pne_id="pne-1", user_id="bob", password=OTHER_PASSWORD, name="gwb", claim_code=WRONG_CODE
    )
    assert stolen.returncode == 3, stolen.stdout + stolen.stderr
    assert "CLAIM_NOT_PROVEN" in stolen.stdout + stolen.stderr
    assert "pne-1" not in _entities(running)
    net.stop("gwb")
    bob_view = offline_status(net.gateway_dir("gwb"))
    assert bob_view["pnes"] == [] or all(  # no TK, no chain: nothing was released
        p.get("key_index", 0) == 0
        for p in bob_view["pnes"]  # type: ignore[attr-defined]
    )
    # An unknown PNE reads the same as a known one claimed without its code.
    ghost = net.assign(pne_id="pne-404", user_id="alice", password=PASSWORD, claim_code=WRONG_CODE)
    assert "CLAIM_NOT_PROVEN" in ghost.stdout + ghost.stderr

    owner = net.assign(pne_id="pne-1", user_id="alice", password=PASSWORD)
    assert owner.returncode == 0, owner.stdout + owner.stderr
    assert _entities(running)["pne-1"]["owner"] == "alice"


def test_racing_claims_of_one_pne_have_one_winner(running: Net) -> None:
    """Issue 5 item 2: 16 claims of one new PNE at the same instant (8 through alice's PN
    GW, 8 through bob's, all holding the label). Exactly one first claim wins (one OK of
    epoch 1); a claim that read the same state and lost gets CLAIM_CONFLICT, one of the
    other user after the win OWNED_BY_OTHER_USER, neither with key material. Claims of the
    winner's own user that arrive after the win are legitimate re-assignments (003): each
    has its own epoch, so no two OKs were decided on the same check, and no OK ever goes
    to the user who lost."""
    _enroll_bob(running)
    users = {"gw-alice": ("alice", PASSWORD), "gw-bob": ("bob", OTHER_PASSWORD)}
    code = claim_code(running.tk["pne-2"], "pne-2")
    rng = SystemRandom()

    async def claim(client: ServerClient, gateway_id: str, eukey: bytes) -> tuple[str, object, int]:
        user_id, password = users[gateway_id]
        machine = EUKeyAssignmentGateway(
            gateway_id=gateway_id, gateway_eukey=eukey, server_id="cpns-server", rng=rng
        )
        machine.start(
            pne_id="pne-2",
            user_id=user_id,
            password_key=password_key(password, realm="cpns", user_id=user_id),
            claim_key=claim_key(code),
            now=wall_time(),
        )
        [request] = machine.messages_to_send()
        reply = await client.exchange(request)
        epoch = 0
        if isinstance(reply, EUKeyAssignmentResponse) and reply.status is ErrorCode.OK:
            [received] = [e for e in machine.receive(reply) if isinstance(e, EUKeySetReceived)]
            epoch = received.epoch  # opened with the gateway's EUKey: the server's count
        return user_id, reply, epoch

    async def race() -> list[tuple[str, object, int]]:
        clients = {
            gw: ServerClient(
                server_url=running.url,
                ca_file=running.net.ca_file,
                entity_id=gw,
                eukey=_eukey(running, gw),
            )
            for gw in users
        }
        try:
            jobs = [claim(clients[gw], gw, _eukey(running, gw)) for gw in users for _ in range(8)]
            return await asyncio.gather(*jobs)
        finally:
            for client in clients.values():
                await client.aclose()

    results = asyncio.run(race())
    replies = [(u, r, e) for u, r, e in results if isinstance(r, EUKeyAssignmentResponse)]
    assert len(replies) == 16
    ok = [(u, e) for u, r, e in replies if r.status is ErrorCode.OK]
    assert [e for _, e in ok].count(1) == 1, [r.status for _, r, _ in replies]
    assert len({e for _, e in ok}) == len(ok)  # one epoch per success: one per check
    assert len({u for u, _ in ok}) == 1  # the user who lost never got a bundle
    winner = ok[0][0]
    refused = [r for _, r, _ in replies if r.status is not ErrorCode.OK]
    assert refused
    assert {r.status for r in refused} <= {
        ErrorCode.CLAIM_CONFLICT,
        ErrorCode.OWNED_BY_OTHER_USER,
    }
    assert all(r.sealed_bundle is None for r in refused)
    entity = _entities(running)["pne-2"]
    assert entity["owner"] == winner


def test_racing_first_enrolments_of_one_entity_id_have_one_winner(running: Net) -> None:
    """Issue 5 item 2 (enrolment, 004 §5.x.1): 16 enrolment requests for one new Entity ID,
    from alice and bob, posted at once: only one user ever gets an EUKey for it (later
    requests of that same user are re-enrolments, which 004 allows); every other gets a
    refusal without key material; the entity belongs to that user."""
    rng = SystemRandom()
    requests: list[tuple[str, UserKeyAssignmentRequest]] = []
    for i in range(16):
        user_id, password = ("alice", PASSWORD) if i % 2 else ("bob", OTHER_PASSWORD)
        client = UserKeyAssignmentClient(
            entity_id="gw-contested",
            entity_kind=EntityKind.PN_GW,
            server_id="cpns-server",
            rng=rng,
        )
        client.start(
            user_id=user_id,
            password_key=password_key(password, realm="cpns", user_id=user_id),
            now=wall_time(),
        )
        [message] = client.messages_to_send()
        assert isinstance(message, UserKeyAssignmentRequest)
        requests.append((user_id, message))
    ctx = ssl.create_default_context(cafile=str(running.net.ca_file))

    async def race() -> list[tuple[str, UserKeyAssignmentResponse]]:
        async with httpx.AsyncClient(verify=ctx, timeout=30) as http:

            async def post(user_id: str, message: UserKeyAssignmentRequest) -> tuple[str, object]:
                response = await http.post(
                    f"{running.url}/cpns/v1/messages",
                    content=encode(message),
                    headers={"content-type": "application/cbor"},
                )
                return user_id, decode(response.content)

            return await asyncio.gather(*(post(u, m) for u, m in requests))  # type: ignore[return-value]

    replies = asyncio.run(race())
    ok = [(u, r) for u, r in replies if r.status is ErrorCode.OK]
    assert ok
    assert len({u for u, _ in ok}) == 1, [(u, r.status) for u, r in replies]
    assert all(r.sealed_eukey is not None for _, r in ok)
    refused = [r for _, r in replies if r.status is not ErrorCode.OK]
    assert all(r.sealed_eukey is None for r in refused)
    assert {r.status for r in refused} <= {
        ErrorCode.CLAIM_CONFLICT,
        ErrorCode.OWNED_BY_OTHER_USER,
    }
    assert _entities(running)["gw-contested"]["owner"] == ok[0][0]
