"""The PN GW's PN Establishment coordinator and the PNE agent's participant, wired in memory
(tests/pn_gateway_world.py): real machines, a real PNE ledger, a server double running the
real server machines. The same over real processes: tests/integration/
test_pn_establishment_e2e.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from tests.pn_gateway_world import GW_ID, GatewayWorld

from cpns.device.establishment import EstablishResult
from cpns.messages.model import PNSetupRequest


def run[T](coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


def _statuses(result: EstablishResult) -> dict[str, str]:
    return {p: s for p, s, _ in result.members}


def _flows(result: EstablishResult) -> dict[str, str]:
    return {p: f for p, _, f in result.members}


def test_eight_pnes_of_both_kinds_join_and_a_second_establishment_works(tmp_path: Path) -> None:
    """002 §7.5.4 and 000 §7.5: one PN with 8 PNEs (4 with UI: rand/hash, 4 assigned
    without UI: TK) through the PN GW; every one joins and holds a session key; the PN GW
    keeps memberships and the routing table; the TK state advanced on the PN GW (stored)
    and on each TK PNE; a second establishment of the same PNEs works (the ratchet moved
    on every side, the resync rule keeps them in step)."""

    async def scenario() -> None:
        world = GatewayWorld(tmp_path)
        origin = world.add_ui_pne("pne-0")
        invited = []
        for i in range(1, 8):
            pne_id = f"pne-{i}"
            if i % 2:
                world.add_tk_pne(pne_id)
            else:
                world.add_ui_pne(pne_id)
            invited.append(pne_id)
        result = await origin.establish("pn-home", invited)
        await world.settle()
        assert result.status == "OK"
        assert _statuses(result) == {f"pne-{i}": "OK" for i in range(8)}
        assert _flows(result) == {f"pne-{i}": "tk" if i % 2 else "rand-hash" for i in range(8)}
        assert world.gateway.routes == {"pn-home": tuple(f"pne-{i}" for i in range(8))}
        assert world.server.inventory["pn-home"] == {f"pne-{i}": "OK" for i in range(8)}
        for i in range(8):
            entry = world.holders[f"pne-{i}"].data["pns"]["pn-home"]
            assert entry["status"] == "member"
            assert isinstance(entry["sk"], bytes)
            membership = world.ledger.get(f"pne-{i}").membership("pn-home")
            assert membership is not None
            assert membership.joined
        tk_pne = world.ledger.get("pne-1")
        assert tk_pne.tk_state is not None
        assert tk_pne.tk_state.tk_step == 1  # confirmed by the server's OK
        assert world.holders["pne-1"].data["tk_auth"]["tk_step"] == 1
        assert world.holders["pne-1"].data["tk_auth"]["key_index"] == 2
        # The ledger was written: a fresh read of the store holds the same TK state.
        stored = world.store.load_records()["pne-1"]["tk_state"]
        assert stored["tk_step"] == 1

        again = await origin.establish("pn-home", invited)
        await world.settle()
        assert _statuses(again) == {f"pne-{i}": "OK" for i in range(8)}
        assert world.ledger.get("pne-1").tk_state.tk_step == 2  # type: ignore[union-attr]
        assert world.holders["pne-3"].data["tk_auth"]["key_index"] == 3
        assert world.server.entities["pne-3"].key_index == 3

    run(scenario())


def test_tk_state_is_stored_before_the_pne_answers(tmp_path: Path) -> None:
    """DESIGN §6 / 000 §7.5.1: the PNE stores its new TK state (pending key included)
    before its AUTHENTICATE Response leaves; the gateway stores its TK state before it
    relays the AUTHENTICATE Request (the coordinator applies events before sending)."""

    async def scenario() -> None:
        world = GatewayWorld(tmp_path)
        origin = world.add_ui_pne("pne-0")
        world.add_tk_pne("pne-1")
        await origin.establish("pn-1", ["pne-1"])
        await world.settle()
        log = world.holders["pne-1"].log
        answer = log.index("send PNE_AUTHENTICATE_RESPONSE")
        assert "save" in log[:answer]

    run(scenario())


def test_a_pne_asking_for_a_local_eukey_authenticates_with_its_gateway(tmp_path: Path) -> None:
    """002 §7.5.4 LocalEUKey, "7.5.5": the originator asks for a LocalEUKey; both it and the
    PN GW store their copy; on a PAN that is not Secure the PNE then authenticates with
    the PN GW using it and both store the same session key."""

    async def scenario() -> None:
        world = GatewayWorld(tmp_path)
        origin = world.add_tk_pne("pne-0")
        world.add_ui_pne("pne-1")
        result = await origin.establish("pn-1", ["pne-1"], local_eukey=True)
        await world.settle()
        assert result.status == "OK"
        assert result.local == "OK"
        entry = world.holders["pne-0"].data["pns"]["pn-1"]
        membership = world.ledger.get("pne-0").membership("pn-1")
        assert membership is not None
        assert entry["local_eukey"] == membership.local_eukey
        assert entry["local_sk"] is not None
        assert entry["local_sk"] == membership.local_sk
        assert world.ledger.get("pne-1").membership("pn-1").local_eukey is None  # type: ignore[union-attr]

    run(scenario())


def test_an_invited_pne_asking_for_a_local_eukey_authenticates_too(tmp_path: Path) -> None:
    """002 §7.5.4.1: an invited PNE indicates its LocalEUKey need in its SETUP Response;
    after the establishment it authenticates with the PN GW using the LocalEUKey ("7.5.5")
    and both store the session key."""

    async def scenario() -> None:
        world = GatewayWorld(tmp_path)
        origin = world.add_ui_pne("pne-0")
        world.add_tk_pne("pne-1", want_local_eukey=True)
        result = await origin.establish("pn-1", ["pne-1"])
        await world.settle()
        assert _statuses(result) == {"pne-0": "OK", "pne-1": "OK"}
        entry = world.holders["pne-1"].data["pns"]["pn-1"]
        membership = world.ledger.get("pne-1").membership("pn-1")
        assert membership is not None
        assert membership.local_sk is not None
        assert entry["local_sk"] == membership.local_sk

    run(scenario())


def test_secure_pan_skips_the_local_authentication(tmp_path: Path) -> None:
    """002 §7.5.4: the LocalEUKey authentication runs only where the PAN is not a Secure
    PAN; on a Secure PAN the LocalEUKey is stored and nothing more happens."""

    async def scenario() -> None:
        world = GatewayWorld(tmp_path)
        origin = world.add_ui_pne("pne-0", secure_pan=True)
        result = await origin.establish("pn-1", [], local_eukey=True)
        await world.settle()
        assert result.status == "OK"
        assert result.local is None
        assert world.holders["pne-0"].data["pns"]["pn-1"]["local_sk"] is None

    run(scenario())


def test_invited_pne_not_attached_or_silent_is_timeout_the_others_join(tmp_path: Path) -> None:
    """002 §7.5.4.1, our rule: an invited PNE that is not attached, or does not answer in
    time, is reported TIMEOUT (not joined); the others go on and join."""

    async def scenario() -> None:
        world = GatewayWorld(tmp_path, answer_timeout=0.2)
        origin = world.add_ui_pne("pne-0")
        world.add_ui_pne("pne-1")
        world.add_tk_pne("pne-2")
        world.add_ui_pne("pne-3")
        world.attached.discard("pne-2")  # not attached
        world.silent.add("pne-3")  # attached, never answers
        result = await origin.establish("pn-1", ["pne-1", "pne-2", "pne-3", "pne-9"])
        await world.settle()
        assert _statuses(result) == {
            "pne-0": "OK",
            "pne-1": "OK",
            "pne-2": "TIMEOUT",
            "pne-3": "TIMEOUT",
            "pne-9": "TIMEOUT",
        }
        assert world.gateway.routes == {"pn-1": ("pne-0", "pne-1")}

    run(scenario())


def test_lost_upstream_reply_is_retried_with_the_same_txid(tmp_path: Path) -> None:
    """DESIGN §5: the upstream retry sends the identical message (same txid); the server
    answers it from its stored reply, so the establishment completes once."""

    async def scenario() -> None:
        world = GatewayWorld(tmp_path)
        origin = world.add_ui_pne("pne-0")
        world.add_tk_pne("pne-1")
        world.server.lose_replies = 1
        result = await origin.establish("pn-1", ["pne-1"])
        await world.settle()
        assert _statuses(result) == {"pne-0": "OK", "pne-1": "OK"}
        first, second = world.server.received[:2]
        assert first == second

    run(scenario())


def test_unreachable_server_tells_every_pne(tmp_path: Path) -> None:
    """The server cannot be reached: the originator's SETUP Response says
    UPSTREAM_UNAVAILABLE, the invited PNEs hear it in their notification, no state moves."""

    async def scenario() -> None:
        world = GatewayWorld(tmp_path)
        origin = world.add_ui_pne("pne-0")
        world.add_tk_pne("pne-1")
        world.server.unreachable = True
        result = await origin.establish("pn-1", ["pne-1"])
        await world.settle()
        assert result.status == "UPSTREAM_UNAVAILABLE"
        assert "pns" not in world.holders["pne-1"].data
        assert world.ledger.get("pne-1").tk_state is None
        assert world.gateway.outcomes[-1].failure == "UPSTREAM_UNAVAILABLE"

    run(scenario())


def test_a_reply_to_another_transaction_ends_the_run(tmp_path: Path) -> None:
    """A server reply that does not answer the pending upstream request is ignored by the
    machine; nothing else comes on that exchange, so the PN GW ends the run at once with
    UPSTREAM_UNAVAILABLE and tells every PNE (no TK state moved)."""

    async def scenario() -> None:
        world = GatewayWorld(tmp_path)
        origin = world.add_ui_pne("pne-0")
        world.add_tk_pne("pne-1")
        world.server.wrong_txid = True
        result = await origin.establish("pn-1", ["pne-1"])
        await world.settle()
        assert result.status == "UPSTREAM_UNAVAILABLE"
        assert world.ledger.get("pne-1").tk_state is None

    run(scenario())


def test_one_running_establishment_per_originator(tmp_path: Path) -> None:
    """Our rule (bounded resources): while a PNE's establishment runs, another SETUP
    Request of the same PNE is refused TOO_MANY_ATTEMPTS; the first one goes on."""

    async def scenario() -> None:
        world = GatewayWorld(tmp_path, answer_timeout=0.3)
        origin = world.add_ui_pne("pne-0")
        world.add_ui_pne("pne-1")
        world.silent.add("pne-1")  # keeps the first establishment waiting
        first = asyncio.ensure_future(origin.establish("pn-1", ["pne-1"]))
        while not world.gateway.running():
            await asyncio.sleep(0.01)
        second = await origin.establish("pn-2", [])
        assert second.status == "TOO_MANY_ATTEMPTS"
        result = await first
        await world.settle()
        assert _statuses(result) == {"pne-0": "OK", "pne-1": "TIMEOUT"}

    run(scenario())


def test_exhausted_chain_joins_and_queues_a_reassignment(tmp_path: Path) -> None:
    """000 with our resync rule: a TK PNE at the last key of its chain joins with it; the
    server sets reassign and the PN GW queues a 003 re-assignment in the PNE's record."""

    async def scenario() -> None:
        world = GatewayWorld(tmp_path)
        origin = world.add_ui_pne("pne-0")
        world.add_tk_pne("pne-1", chain_length=1)
        result = await origin.establish("pn-1", ["pne-1"])
        await world.settle()
        assert _statuses(result)["pne-1"] == "OK"
        assert world.ledger.get("pne-1").reassign == "CHAIN_EXHAUSTED"

    run(scenario())


def test_a_pne_restored_from_an_old_backup_is_stale_and_queued_for_reassignment(
    tmp_path: Path,
) -> None:
    """000 with our resync rule: a TK PNE holding an older EUKey than the server's index
    (restored from a backup) fails alone with STALE_CREDENTIAL; the PN GW queues a 003
    re-assignment for it; the others join."""

    async def scenario() -> None:
        world = GatewayWorld(tmp_path)
        origin = world.add_ui_pne("pne-0")
        world.add_tk_pne("pne-1")
        entity = world.server.entities["pne-1"]
        world.server.entities["pne-1"] = replace(entity, key_index=2)  # the server moved on
        result = await origin.establish("pn-1", ["pne-1"])
        await world.settle()
        assert _statuses(result) == {"pne-0": "OK", "pne-1": "STALE_CREDENTIAL"}
        assert world.ledger.get("pne-1").reassign == "STALE_CREDENTIAL"
        assert world.gateway.routes == {"pn-1": ("pne-0",)}

    run(scenario())


def test_setup_request_for_another_pne_ends_the_link(tmp_path: Path) -> None:
    """A SETUP Request whose src is not the link's PNE is a PAN peer's fault: refused
    NOT_AUTHORIZED, the link ends, no establishment starts."""

    async def scenario() -> None:
        world = GatewayWorld(tmp_path)
        world.add_ui_pne("pne-0")
        forged = PNSetupRequest(
            txid=bytes(16),
            src="pne-7",
            dst=GW_ID,
            pn_id="pn-1",
            rand_pne=bytes(32),
            local_eukey=False,
            invite=(),
        )
        keep = await world.gateway.on_setup(world.links["pne-0"], forged)
        assert keep is False
        assert world.pan.refused == [("pne-0", "NOT_AUTHORIZED")]
        assert world.gateway.outcomes == []

    run(scenario())
