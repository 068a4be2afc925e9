"""Regressions found by the PN Establishment simulator (tests/pn_sim.py), each pinned at
the machine that was fixed and by the schedule that found it.

Seeds: 000 §7.5 (TK flow) and our resynchronisation rule (N1,
docs/procedures/tk-authentication.md): a challenge superseded by another run is late, not
stale; only a PNE that lost track needs a 003 re-assignment.
"""

from __future__ import annotations

import dataclasses

import pytest
from tests.pn_sim import Simulation
from tests.pn_world import GW_ID, PN_ID, SERVER_ID, World

from cpns.errors import ErrorCode
from cpns.messages.constants import AuthFlow
from cpns.messages.model import AuthenticateResponse, AuthProof, PNEstablishResponse
from cpns.protocol import tk_auth
from cpns.protocol.pn_establishment import (
    EstablishmentPending,
    PendingPNE,
    PNEstablished,
    ServerCompletion,
)

EST_ID = b"\x05" * 16


def _stale_verdict(world: World, *, moved: bool) -> tuple[PNEstablishResponse, PNEstablished]:
    """The server's second half for a TK PNE challenged at (t=0, i=1) whose PN GW answered
    STALE_CREDENTIAL; ``moved``: another run has moved the stored state to (1, 2) since."""
    world.add_tk_pne("pne-t")
    if moved:
        tk, _ = world.server_tk["pne-t"]
        world.server_tk["pne-t"] = (tk_auth.ratchet(tk), 1)
        world.entities["pne-t"] = dataclasses.replace(world.entities["pne-t"], key_index=2)
    pending = EstablishmentPending(
        gw_id=GW_ID,
        est_id=EST_ID,
        pn_id=PN_ID,
        rand_server=b"s" * 32,
        created_at=world.now,
        expires_at=world.now + 300,
        entries=(
            PendingPNE(
                pne_id="pne-t",
                rand_pne=b"p" * 32,
                status=ErrorCode.OK,
                flow=AuthFlow.TK,
                tk_step=0,
                key_index=1,
            ),
        ),
    )
    machine = ServerCompletion(
        server_id=SERVER_ID,
        requester=GW_ID,
        pending=pending,
        lookups=world.lookups(),
        now=world.now,
    )
    events = machine.receive(
        AuthenticateResponse(
            txid=b"\x01" * 16,
            src=GW_ID,
            dst=SERVER_ID,
            pn_id=PN_ID,
            est_id=EST_ID,
            entries=(AuthProof(pne_id="pne-t", status=ErrorCode.STALE_CREDENTIAL),),
        )
    )
    (established,) = [e for e in events if isinstance(e, PNEstablished)]
    (reply,) = machine.messages_to_send()
    assert isinstance(reply, PNEstablishResponse)
    return reply, established


@pytest.mark.parametrize(("moved", "reassign"), [(True, False), (False, True)])
def test_a_stale_verdict_on_a_superseded_challenge_asks_no_reassignment(
    moved: bool, reassign: bool
) -> None:
    """N1 / 000 §7.5 (simulator seed 298 with overlapping establishments): the PN GW
    refuses a challenge older than its TK step (another establishment of the same PNE
    finished first) with STALE_CREDENTIAL; the server records STALE_CREDENTIAL for that
    run but asks for a 003 re-assignment only if the challenge is still the current one
    (the PNE then really lost track). It used to ask for one in both cases."""
    reply, established = _stale_verdict(World(3), moved=moved)
    (result,) = established.results
    assert result.status is ErrorCode.STALE_CREDENTIAL
    assert result.reassign is reassign
    (wire,) = reply.entries
    assert wire.status is ErrorCode.STALE_CREDENTIAL
    assert wire.reassign is reassign


def test_overlapping_establishments_schedule_298() -> None:
    """N1 (simulator seed 298, every chaotic round with an overlapping establishment): two
    PNs established at once through one PN GW with a TK PNE in both end without a
    re-assignment request, and every PNE joins afterwards."""
    Simulation(298, concurrency=1.0).run()


@pytest.mark.parametrize("seed", [69, 143, 146, 147])
def test_two_establishment_machines_of_one_pne_never_move_its_state_back(seed: int) -> None:
    """N1 (simulator, overlapping establishments, a PNE running one machine per
    invitation): each PNE machine answers and confirms from the TK state as stored when
    it does so (``tk_lookup``), so a machine built before another establishment of the same
    PNE finished cannot store an older state over a newer one (losing the pending
    EUKey_{j+1} the server already moved to: locked out until a re-assignment). These
    seeds failed while the machines answered from the copy they were built with."""
    Simulation(seed, concurrency=1.0, exclusive=False).run()
