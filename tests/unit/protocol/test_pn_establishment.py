"""cpns.protocol.pn_establishment: every role's machine, wired in memory (tests/pn_world.py).

Seeds: 002 §7.5.4 (rand/hash, LocalEUKey), 000 §7.5 (TK flow, through tk_auth), and our
documented rules (docs/wire.md section 3.4): a PNE that fails, fails alone; any proof that
does not verify is one opaque AUTHENTICATION_FAILED.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from tests.helpers import FixedRandom
from tests.pn_world import GW_ID, OWNER, PN_ID, SERVER_ID, Outcome, World

from cpns.errors import ErrorCode, LocalProtocolError
from cpns.messages.constants import AuthFlow
from cpns.messages.model import (
    AuthChallenge,
    AuthenticateRequest,
    AuthenticateResponse,
    AuthProof,
    Message,
    PNEAuthenticateRequest,
    PNEAuthenticateResponse,
    PNEstablishmentNotify,
    PNEstablishRequest,
    PNEstablishResponse,
    PNInvite,
    PNInviteResponse,
    PNSetupRequest,
    PNSetupResponse,
    SetupEntry,
)
from cpns.protocol._machine import ProcedureFailed, render_transitions
from cpns.protocol.pn_establishment import (
    EstablishmentPending,
    GatewayEstablishment,
    GatewayState,
    InvitedPNE,
    OriginatingPNE,
    PendingPNE,
    PNEState,
    ReassignmentRequested,
    ServerCompletion,
    ServerSetup,
    flow_name,
)

OK, AF = ErrorCode.OK, ErrorCode.AUTHENTICATION_FAILED
RAND_HASH = ["pne-r1", "pne-r2", "pne-r3", "pne-r4"]
TK = ["pne-t1", "pne-t2", "pne-t3", "pne-t4"]


def eight(seed: int = 0) -> World:
    """A PN GW with four PNEs enrolled with UI and four with a 003 chain and TK."""
    world = World(seed)
    for pne_id in RAND_HASH:
        world.add_rand_hash_pne(pne_id)
    for pne_id in TK:
        world.add_tk_pne(pne_id)
    return world


def run_eight(world: World, **kw: object) -> Outcome:
    invited = RAND_HASH[1:] + TK
    return world.establish("pne-r1", invited, **kw)  # type: ignore[arg-type]


def check_joined(world: World, outcome: Outcome, pne_ids: list[str]) -> None:
    """Each PNE verified the server and holds the server's SK for it."""
    results = {r.pne_id: r for r in outcome.established().results}
    for pne_id in pne_ids:
        joined = outcome.joined(pne_id)
        assert joined is not None, pne_id
        assert results[pne_id].status is OK
        assert results[pne_id].sk == joined.sk
        assert joined.est_id == outcome.established().est_id


# -- the happy path ------------------------------------------------------------------------


def test_eight_pnes_of_both_kinds_establish_one_pn() -> None:
    """002 §7.5.4 and 000 §7.5, whole: 8 PNEs (4 rand/hash, 4 TK) in one establishment; each
    PNE and the server share a fresh SK; the originator sees every member; the inventory
    lists all 8 with their flow; the LocalEUKey asked for reaches both holders; the TK
    state of each TK PNE moved one step at the server, the PN GW and the PNE alike."""
    world = eight()
    outcome = run_eight(world, local={"pne-r1", "pne-t2"})
    all_ids = RAND_HASH + TK
    check_joined(world, outcome, all_ids)
    assert outcome.server_status() == dict.fromkeys(all_ids, OK)
    assert world.inventory[PN_ID] == dict.fromkeys(all_ids, OK)
    assert not world.pending  # the pending establishment is gone with the reply
    flows = {r.pne_id: r.flow for r in outcome.established().results}
    assert flows == {
        **dict.fromkeys(RAND_HASH, AuthFlow.RAND_HASH),
        **dict.fromkeys(TK, AuthFlow.TK),
    }
    members = outcome.joined("pne-r1").members  # type: ignore[union-attr]
    assert [(m.pne_id, m.status) for m in members] == [(p, OK) for p in all_ids]
    sks = {outcome.joined(p).sk for p in all_ids}  # type: ignore[union-attr]
    assert len(sks) == 8  # one key per PNE
    for pne_id in ("pne-r1", "pne-t2"):
        local = world.pnes[pne_id].local_eukey
        assert local is not None
        assert world.gw_local[(pne_id, PN_ID)] == local
    assert world.pnes["pne-r2"].local_eukey is None
    for pne_id in TK:
        tk, step = world.server_tk[pne_id]
        assert step == 1
        assert world.entities[pne_id].key_index == 2
        assert world.gw_tk[pne_id].state.tk_step == 1
        assert world.gw_tk[pne_id].state.tk == tk
        state = world.pnes[pne_id].tk_state
        assert state is not None
        assert (state.tk_step, state.key_index, state.tk) == (1, 2, tk)
    finished = outcome.finished()
    assert finished is not None
    assert finished.members == members


def test_a_second_establishment_works_after_the_first() -> None:
    """N1 liveness: after one establishment every PNE, of both kinds, authenticates again
    (the TK and the chain moved on in step at all three parties)."""
    world = eight(1)
    run_eight(world)
    outcome = run_eight(world)
    check_joined(world, outcome, RAND_HASH + TK)
    assert all(world.server_tk[p][1] == 2 for p in TK)


def test_a_single_pne_without_invitations() -> None:
    """002 §7.5.4.1: an originating PNE alone; the PN GW goes straight to the server."""
    world = World(2)
    world.add_tk_pne("pne-1")
    outcome = world.establish("pne-1")
    check_joined(world, outcome, ["pne-1"])
    assert [type(m).__name__ for m in outcome.delivered][:2] == [
        "PNSetupRequest",
        "PNEstablishRequest",
    ]


# -- a PNE fails alone ---------------------------------------------------------------------


def _tamper_field(
    cls: type[Message], pne_id: str, **changes: object
) -> Callable[[Message], Message]:
    def tamper(message: Message) -> Message:
        if isinstance(message, cls) and pne_id in (message.src, message.dst):
            return dataclasses.replace(message, **changes)  # type: ignore[arg-type]
        return message

    return tamper


def _tamper_entry(
    cls: type[Message], pne_id: str, **changes: object
) -> Callable[[Message], Message]:
    """Change one PNE's entry in an aggregated message (AuthenticateRequest/Response, 48)."""

    def tamper(message: Message) -> Message:
        if isinstance(message, cls):
            entries = tuple(
                dataclasses.replace(e, **changes) if e.pne_id == pne_id else e  # type: ignore[attr-defined]
                for e in message.entries  # type: ignore[attr-defined]
            )
            return dataclasses.replace(message, entries=entries)  # type: ignore[call-arg]
        return message

    return tamper


def _swap_hash_server(a: str, b: str) -> Callable[[Message], Message]:
    """A PN GW that swaps the hash_server of two invited PNEs."""
    seen: dict[str, bytes | None] = {}

    def tamper(message: Message) -> Message:
        if isinstance(message, PNEstablishResponse):
            for entry in message.entries:
                seen[entry.pne_id] = entry.hash_server
        if isinstance(message, PNEstablishmentNotify) and message.dst in (a, b):
            other = b if message.dst == a else a
            return dataclasses.replace(message, hash_server=seen[other])
        return message

    return tamper


FLIP = b"\x5a" * 32

FAILURES: list[tuple[str, str, Callable[[Message], Message]]] = [
    # the server checks hash_PNE (002 §7.5.4.3)
    ("wrong-hash-pne", "pne-r3", _tamper_field(PNEAuthenticateResponse, "pne-r3", hash_pne=FLIP)),
    # the server opens and checks the sealed EUKey (000 §7.5.3)
    (
        "wrong-tk-proof",
        "pne-t1",
        _tamper_entry(AuthenticateResponse, "pne-t1", sealed_eukey=b"\x01" + FLIP + bytes(28)),
    ),
    # the PN GW forges rand_server for one PNE: its hash_PNE no longer verifies
    (
        "forged-rand-server",
        "pne-r2",
        _tamper_field(PNEAuthenticateRequest, "pne-r2", rand_server=FLIP),
    ),
    # the PNE checks AN (000 §7.5.1 step 1) and refuses: the PN GW reports its refusal
    ("tampered-an", "pne-t3", _tamper_field(PNEAuthenticateRequest, "pne-t3", an=FLIP)),
    # the PNE's LocalEUKey copy does not open
    (
        "tampered-local-copy-pne",
        "pne-r4",
        _tamper_entry(AuthenticateRequest, "pne-r4", sealed_local_pne=b"\x01" + bytes(60)),
    ),
    # the PN GW's LocalEUKey copy does not open: the PN GW's verdict for that PNE
    (
        "tampered-local-copy-gw",
        "pne-t2",
        _tamper_entry(AuthenticateRequest, "pne-t2", sealed_local_gw=b"\x01" + bytes(60)),
    ),
]


@pytest.mark.parametrize(("name", "victim", "tamper"), FAILURES, ids=[f[0] for f in FAILURES])
def test_a_failed_verification_fails_that_pne_alone(
    name: str, victim: str, tamper: Callable[[Message], Message]
) -> None:
    """Our rule (docs/wire.md 3.4): any proof that does not verify, at any hop, is one opaque
    AUTHENTICATION_FAILED for that PNE only; the seven others join, the PN exists, and the
    failed PNE is told (its machine ends in FAILED with the same code) and recorded as
    failed in the inventory."""
    world = eight(3)
    outcome = run_eight(world, tamper=tamper, local={"pne-r4", "pne-t2"})
    status = outcome.server_status()
    assert status[victim] is AF
    others = [p for p in RAND_HASH + TK if p != victim]
    assert all(status[p] is OK for p in others)
    check_joined(world, outcome, others)
    assert outcome.joined(victim) is None
    failure = outcome.pne_failure(victim)
    assert failure is not None
    assert failure.code is AF
    assert world.inventory[PN_ID][victim] is AF
    assert [e for e in outcome.server if type(e).__name__ == "PNEstablished"]


@pytest.mark.parametrize(
    ("name", "victims", "tamper"),
    [
        (
            "tampered-hash-server",
            ["pne-r2"],
            _tamper_field(PNEstablishmentNotify, "pne-r2", hash_server=FLIP),
        ),
        (
            "tampered-confirm",
            ["pne-t4"],
            _tamper_field(PNEstablishmentNotify, "pne-t4", confirm=FLIP),
        ),
        (
            "originator-hash-server",
            ["pne-r1"],
            _tamper_field(PNSetupResponse, "pne-r1", hash_server=FLIP),
        ),
        ("swapped-hash-server", ["pne-r2", "pne-r3"], _swap_hash_server("pne-r2", "pne-r3")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_pne_refuses_a_forged_server(
    name: str, victims: list[str], tamper: Callable[[Message], Message]
) -> None:
    """002 §7.5.4.1 last paragraph (000: the key confirmation): a PNE counts itself a member
    only if hash_server verifies; a tampered or swapped value ends its machine with one
    AUTHENTICATION_FAILED and no session key; the other PNEs are unaffected."""
    world = eight(4)
    outcome = run_eight(world, tamper=tamper)
    for victim in victims:
        assert outcome.joined(victim) is None
        failure = outcome.pne_failure(victim)
        assert failure is not None
        assert failure.code is AF
    check_joined(world, outcome, [p for p in RAND_HASH + TK if p not in victims])


def test_a_tk_pne_that_missed_its_confirmation_authenticates_next_time() -> None:
    """N1 (000 resync rule): the server moved, the PNE kept its pending state because the
    confirmation was forged; the next establishment's challenge at j+1 proves the server
    moved and the PNE joins."""
    world = eight(5)
    run_eight(world, tamper=_tamper_field(PNEstablishmentNotify, "pne-t4", confirm=FLIP))
    state = world.pnes["pne-t4"].tk_state
    assert state is not None
    assert state.pending is not None
    outcome = run_eight(world)
    check_joined(world, outcome, RAND_HASH + TK)


def test_nobody_joins_then_the_setup_response_says_authentication_failed() -> None:
    """Our rule: the server's SETUP Response is OK when at least one PNE joined; here no
    proof verifies, so it is AUTHENTICATION_FAILED and every PNE is told so."""
    world = World(6)
    world.add_rand_hash_pne("pne-1")
    world.add_rand_hash_pne("pne-2")

    def tamper(message: Message) -> Message:
        if isinstance(message, PNEAuthenticateResponse):
            return dataclasses.replace(message, hash_pne=FLIP)
        return message

    outcome = world.establish("pne-1", ["pne-2"], tamper=tamper)
    (reply,) = [m for m in outcome.delivered if isinstance(m, PNEstablishResponse)]
    assert reply.status is AF
    for pne_id in ("pne-1", "pne-2"):
        failure = outcome.pne_failure(pne_id)
        assert failure is not None
        assert failure.code is AF


# -- refusals at the server ------------------------------------------------------------------


def test_refused_pnes_fail_alone_with_their_reason() -> None:
    """Our rules (docs/wire.md 3.4): an unknown PNE is UNKNOWN_ENTITY, a revoked one
    ENTITY_REVOKED, another user's POLICY_DENIED (and not a member); the others join."""
    world = eight(7)
    world.add_rand_hash_pne("pne-bob", owner="bob")
    world.add_rand_hash_pne("pne-revoked", revoked=True)
    ghost = world.add_rand_hash_pne("pne-ghost")
    del world.entities[ghost.pne_id]  # holds a key the server never issued
    invited = RAND_HASH[1:] + TK + ["pne-bob", "pne-revoked", "pne-ghost"]
    outcome = world.establish("pne-r1", invited)
    status = outcome.server_status()
    expected = {
        "pne-bob": ErrorCode.POLICY_DENIED,
        "pne-revoked": ErrorCode.ENTITY_REVOKED,
        "pne-ghost": ErrorCode.UNKNOWN_ENTITY,
    }
    for pne_id, code in expected.items():
        assert status[pne_id] is code
        failure = outcome.pne_failure(pne_id)
        assert failure is not None
        assert failure.code is code
        assert world.inventory[PN_ID][pne_id] is code
        # refused before any challenge: no AUTHENTICATE Request reached it
        assert not [
            m
            for m in outcome.delivered
            if isinstance(m, PNEAuthenticateRequest) and m.dst == pne_id
        ]
    check_joined(world, outcome, RAND_HASH + TK)
    members = {m.pne_id: m for m in outcome.joined("pne-r1").members}  # type: ignore[union-attr]
    assert members["pne-bob"].status is ErrorCode.POLICY_DENIED
    assert members["pne-bob"].flow is None


def test_a_pne_listed_twice_is_refused_once_and_the_first_stands() -> None:
    """Our rule: a PNE listed twice in the PN GW's SETUP Request: the later entry is
    DUPLICATE_PNE in the AUTHENTICATE Request, the first one goes on and joins; the
    pending state and the inventory hold it once."""
    world = eight(8)

    def duplicate(request: PNEstablishRequest) -> PNEstablishRequest:
        return dataclasses.replace(request, entries=(*request.entries, request.entries[1]))

    outcome = run_eight(world, setup_tamper=duplicate)
    (challenge,) = [m for m in outcome.delivered if isinstance(m, AuthenticateRequest)]
    assert [e.status for e in challenge.entries].count(ErrorCode.DUPLICATE_PNE) == 1
    assert challenge.entries[-1].status is ErrorCode.DUPLICATE_PNE
    assert [r.pne_id for r in outcome.established().results] == RAND_HASH + TK
    check_joined(world, outcome, RAND_HASH + TK)


def test_a_three_003_chain_without_tk_record_is_unknown() -> None:
    """Flow selection: a 003 chain without TK record at the server gives no usable
    credential: UNKNOWN_ENTITY for that PNE."""
    world = World(9)
    world.add_rand_hash_pne("pne-1")
    world.add_tk_pne("pne-2")
    del world.server_tk["pne-2"]
    outcome = world.establish("pne-1", ["pne-2"])
    assert outcome.server_status() == {"pne-1": OK, "pne-2": ErrorCode.UNKNOWN_ENTITY}


# -- timeouts and an unreachable server -----------------------------------------------------


def _drop(cls: type[Message], pne_id: str) -> Callable[[Message], Message | None]:
    def tamper(message: Message) -> Message | None:
        if isinstance(message, cls) and message.src == pne_id:
            return None
        return message

    return tamper


def test_an_invited_pne_that_does_not_answer_is_left_out_with_timeout() -> None:
    """002 §7.5.4.2 with our timeout rule: a PNE that does not answer its invitation is
    reported TIMEOUT to the originator, is not in the SETUP Request to the server, and
    hears the outcome in its PNEstablishmentNotify; the others join."""
    world = eight(10)
    outcome = run_eight(world, tamper=_drop(PNInviteResponse, "pne-t3"))
    (request,) = [m for m in outcome.delivered if isinstance(m, PNEstablishRequest)]
    assert "pne-t3" not in [e.pne_id for e in request.entries]
    members = {m.pne_id: m.status for m in outcome.joined("pne-r1").members}  # type: ignore[union-attr]
    assert members["pne-t3"] is ErrorCode.TIMEOUT
    check_joined(world, outcome, [p for p in RAND_HASH + TK if p != "pne-t3"])
    failure = outcome.pne_failure("pne-t3")
    assert failure is not None
    assert failure.code is ErrorCode.TIMEOUT


def test_a_pne_that_does_not_answer_its_challenge_is_timeout_at_the_server() -> None:
    """Our rule: a PNE that does not answer the AUTHENTICATE Request in time is reported by
    the PN GW as TIMEOUT; the server records it as failed; its TK state does not move."""
    world = eight(11)
    outcome = run_eight(world, tamper=_drop(PNEAuthenticateResponse, "pne-t1"))
    (response,) = [m for m in outcome.delivered if isinstance(m, AuthenticateResponse)]
    assert {e.pne_id: e.status for e in response.entries}["pne-t1"] is ErrorCode.TIMEOUT
    assert outcome.server_status()["pne-t1"] is ErrorCode.TIMEOUT
    assert world.server_tk["pne-t1"][1] == 0
    check_joined(world, outcome, [p for p in RAND_HASH + TK if p != "pne-t1"])
    # and it authenticates next time (the PNE answered: it holds a pending state)
    again = run_eight(world)
    check_joined(world, again, RAND_HASH + TK)


def test_an_unreachable_server_fails_the_establishment_for_everyone() -> None:
    """The PN GW cannot reach the server (the I/O layer calls fail(UPSTREAM_UNAVAILABLE)):
    the originator's SETUP Response and every PNEstablishmentNotify carry that status."""
    world = eight(12)

    def tamper(message: Message) -> Message | None:
        return None if isinstance(message, PNEstablishRequest) else message

    outcome = run_eight(world, tamper=tamper)
    for pne_id in RAND_HASH + TK:
        failure = outcome.pne_failure(pne_id)
        assert failure is not None
        assert failure.code is ErrorCode.UPSTREAM_UNAVAILABLE
    assert [type(e).__name__ for e in outcome.gateway] == ["ProcedureFailed"]


# -- the TK chain's ends --------------------------------------------------------------------


def test_an_exhausted_chain_still_authenticates_and_asks_for_reassignment() -> None:
    """000 + N1: a PNE on the last key of its chain authenticates with it; the server sets
    reassign, the PN GW reports ReassignmentRequested(CHAIN_EXHAUSTED); the PNE keeps
    working with EUKey_n (a second establishment works too)."""
    world = World(13)
    world.add_rand_hash_pne("pne-1")
    world.add_tk_pne("pne-2", chain_length=1)
    outcome = world.establish("pne-1", ["pne-2"])
    check_joined(world, outcome, ["pne-1", "pne-2"])
    assert [r.reassign for r in outcome.established().results] == [False, True]
    assert (
        ReassignmentRequested(pne_id="pne-2", reason=ErrorCode.CHAIN_EXHAUSTED) in outcome.gateway
    )
    again = world.establish("pne-1", ["pne-2"])
    check_joined(world, again, ["pne-1", "pne-2"])


def test_a_pne_restored_from_an_old_backup_is_stale_and_reassigned() -> None:
    """N1: a PNE restored from a backup older than the server's index proves an old EUKey:
    STALE_CREDENTIAL with reassign, the PN GW asks for a 003 re-assignment; the others
    join."""
    world = eight(14)
    backup = world.pnes["pne-t2"].tk_state
    run_eight(world)
    world.pnes["pne-t2"].tk_state = backup
    outcome = run_eight(world)
    assert outcome.server_status()["pne-t2"] is ErrorCode.STALE_CREDENTIAL
    assert [r.reassign for r in outcome.established().results if r.pne_id == "pne-t2"] == [True]
    assert (
        ReassignmentRequested(pne_id="pne-t2", reason=ErrorCode.STALE_CREDENTIAL) in outcome.gateway
    )
    check_joined(world, outcome, [p for p in RAND_HASH + TK if p != "pne-t2"])


# -- the server's second half, alone ---------------------------------------------------------


def _pending(world: World, *, expires_at: int | None = None) -> EstablishmentPending:
    return EstablishmentPending(
        gw_id=GW_ID,
        est_id=b"\x01" * 16,
        pn_id=PN_ID,
        rand_server=b"\x02" * 32,
        created_at=world.now,
        expires_at=world.now + 300 if expires_at is None else expires_at,
        entries=(
            PendingPNE(pne_id="pne-1", rand_pne=b"\x03" * 32, status=OK, flow=AuthFlow.RAND_HASH),
        ),
    )


def _response(est_id: bytes = b"\x01" * 16, src: str = GW_ID) -> AuthenticateResponse:
    return AuthenticateResponse(
        txid=b"\x09" * 16,
        src=src,
        dst=SERVER_ID,
        est_id=est_id,
        entries=(AuthProof(pne_id="pne-1", status=OK, hash_pne=FLIP),),
    )


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("none", ErrorCode.UNKNOWN_ESTABLISHMENT),
        ("expired", ErrorCode.UNKNOWN_ESTABLISHMENT),
        ("other-est-id", ErrorCode.UNKNOWN_ESTABLISHMENT),
        ("other-gateway", ErrorCode.UNKNOWN_ESTABLISHMENT),
        ("other-pn", ErrorCode.UNKNOWN_ESTABLISHMENT),
        ("wrong-src", ErrorCode.NOT_AUTHORIZED),
    ],
)
def test_the_second_half_refuses_what_it_has_no_pending_state_for(
    case: str, code: ErrorCode
) -> None:
    """Our rules (docs/wire.md 3.4): an AUTHENTICATE Response for an unknown, expired or
    finished establishment, one of another PN GW, or one whose header names another PN
    than the establishment's, is UNKNOWN_ESTABLISHMENT (no entries);
    a message from another PN GW than the authenticated one is NOT_AUTHORIZED."""
    world = World(15)
    world.add_rand_hash_pne("pne-1")
    pending: EstablishmentPending | None = _pending(world)
    message = _response()
    requester = GW_ID
    if case == "none":
        pending = None
    elif case == "expired":
        pending = _pending(world, expires_at=world.now - 1)
    elif case == "other-est-id":
        message = _response(est_id=b"\x07" * 16)
    elif case == "other-gateway":
        assert pending is not None
        pending = dataclasses.replace(pending, gw_id="gw-bob")
    elif case == "other-pn":
        message = dataclasses.replace(message, pn_id="pn-elsewhere")
    else:
        message = _response(src="gw-bob")
    machine = ServerCompletion(
        server_id=SERVER_ID,
        requester=requester,
        pending=pending,
        lookups=world.lookups(),
        now=world.now,
    )
    events = machine.receive(message)
    assert [type(e) for e in events] == [ProcedureFailed]
    assert events[0].code is code  # type: ignore[attr-defined]
    (reply,) = machine.messages_to_send()
    assert isinstance(reply, PNEstablishResponse)
    assert reply.status is code
    assert reply.entries == ()
    with pytest.raises(LocalProtocolError):
        machine.receive(message)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"revoked": True}, ErrorCode.ENTITY_REVOKED),
        ({"kind": 1}, ErrorCode.NOT_AUTHORIZED),
        ({"eukeys": ()}, ErrorCode.NOT_AUTHORIZED),
    ],
)
def test_the_first_half_refuses_a_gateway_it_cannot_serve(
    change: dict[str, object], code: ErrorCode
) -> None:
    """A PN GW that is revoked, not a PN GW, or without EUKey gets the whole SETUP Request
    refused (AUTHENTICATE Request with that status and no entries), and nothing pending."""
    from cpns.types import EntityKind

    world = World(16)
    world.add_rand_hash_pne("pne-1")
    if "kind" in change:
        change = {"kind": EntityKind.PNE}
    world.entities[GW_ID] = dataclasses.replace(world.entities[GW_ID], **change)  # type: ignore[arg-type]
    machine = ServerSetup(
        server_id=SERVER_ID,
        requester=GW_ID,
        lookups=world.lookups(),
        rng=FixedRandom(),
        now=world.now,
    )
    request = PNEstablishRequest(
        txid=b"\x08" * 16,
        src=GW_ID,
        dst=SERVER_ID,
        pn_id=PN_ID,
        entries=(SetupEntry(pne_id="pne-1", rand_pne=b"\x03" * 32, local_eukey=False),),
    )
    events = machine.receive(request)
    assert [type(e) for e in events] == [ProcedureFailed]
    (reply,) = machine.messages_to_send()
    assert isinstance(reply, AuthenticateRequest)
    assert (reply.status, reply.entries, reply.est_id) == (code, (), None)


# -- duplicates, retries and the tables ------------------------------------------------------


def test_a_repeated_invitation_or_challenge_gets_the_same_answer() -> None:
    """Retries (N1): an invited PNE answers a repeated PNInvite, and a repeated AUTHENTICATE
    Request, with the same bytes (its first answer was lost); a different second challenge
    is UNEXPECTED_MESSAGE."""
    world = eight(17)
    sent: list[Message] = []

    def tamper(message: Message) -> Message:
        sent.append(message)
        return message

    run_eight(world, tamper=tamper)
    invite = next(m for m in sent if isinstance(m, PNInvite) and m.dst == "pne-r2")
    challenge = next(m for m in sent if isinstance(m, PNEAuthenticateRequest) and m.dst == "pne-r2")
    pne = InvitedPNE(
        pne_id="pne-r2",
        gw_id=GW_ID,
        server_id=SERVER_ID,
        eukey=world.pnes["pne-r2"].eukey,
        tk_state=None,
        rng=FixedRandom(1),
    )
    pne.receive(invite)
    (first,) = pne.messages_to_send()
    pne.receive(invite)
    assert pne.messages_to_send() == [first]
    assert pne.state is PNEState.EXPECT_AUTHENTICATE_REQUEST
    pne.receive(challenge)
    (answer,) = pne.messages_to_send()
    pne.receive(challenge)
    assert pne.messages_to_send() == [answer]
    assert pne.state is PNEState.EXPECT_RESULT
    events = pne.receive(dataclasses.replace(challenge, rand_server=FLIP))
    assert [e.code for e in events] == [ErrorCode.UNEXPECTED_MESSAGE]  # type: ignore[attr-defined]


def test_gateway_ignores_answers_it_does_not_wait_for() -> None:
    """One PNE's stray or repeated answer changes nothing at the PN GW."""
    gateway = GatewayEstablishment(
        gw_id=GW_ID,
        gw_eukey=bytes(32),
        server_id=SERVER_ID,
        rng=FixedRandom(),
        tk_lookup=lambda _: None,
    )
    setup = PNSetupRequest(
        txid=b"\x01" * 16,
        src="pne-1",
        dst=GW_ID,
        pn_id=PN_ID,
        rand_pne=b"\x02" * 32,
        local_eukey=False,
        invite=("pne-2",),
    )
    gateway.receive(setup)
    (invite,) = gateway.messages_to_send()
    assert isinstance(invite, PNInvite)
    stray = PNInviteResponse(
        txid=b"\x07" * 16,
        src="pne-2",
        dst=GW_ID,
        status=OK,
        rand_pne=b"\x03" * 32,
        local_eukey=False,
    )
    assert gateway.receive(stray) == []
    assert gateway.state is GatewayState.EXPECT_INVITE_RESPONSES
    assert gateway.awaiting() == ["pne-2"]
    good = dataclasses.replace(stray, txid=invite.txid)
    gateway.receive(good)
    assert gateway.state is GatewayState.EXPECT_AUTHENTICATE_REQUEST
    (upstream,) = gateway.messages_to_send()
    assert isinstance(upstream, PNEstablishRequest)
    assert [e.pne_id for e in upstream.entries] == ["pne-1", "pne-2"]
    assert gateway.timeout("pne-2") == []  # a late timer


def test_every_role_has_a_transition_table_and_refuses_other_pairs() -> None:
    """STYLE §5: transitions are data; any pair not in the table is UNEXPECTED_MESSAGE and
    FAILED (here: a PNE that gets an invitation while it waits for its result)."""
    for cls in (ServerSetup, ServerCompletion, GatewayEstablishment, OriginatingPNE, InvitedPNE):
        table = render_transitions(cls)
        assert "UNEXPECTED_MESSAGE" in table
    pne = OriginatingPNE(
        pne_id="pne-1",
        gw_id=GW_ID,
        server_id=SERVER_ID,
        eukey=bytes(32),
        tk_state=None,
        rng=FixedRandom(),
    )
    pne.start(pn_id=PN_ID)
    pne.messages_to_send()
    events = pne.receive(
        PNInvite(txid=b"\x01" * 16, src=GW_ID, dst="pne-1", pn_id=PN_ID, originator="x")
    )
    assert [type(e) for e in events] == [ProcedureFailed]
    assert events[0].code is ErrorCode.UNEXPECTED_MESSAGE  # type: ignore[attr-defined]
    assert pne.state is PNEState.FAILED


def test_a_pne_without_the_credential_of_its_flow_refuses() -> None:
    """A PNE asked for a flow it holds no credential for answers AUTHENTICATION_FAILED (one
    opaque code) and the server records the PNE as failed."""
    world = World(18)
    world.add_rand_hash_pne("pne-1")
    world.add_tk_pne("pne-2")
    world.pnes["pne-2"].tk_state = None
    world.pnes["pne-2"].eukey = b"\x01" * 32  # it can be invited, but has no TK state
    outcome = world.establish("pne-1", ["pne-2"])
    assert outcome.server_status() == {"pne-1": OK, "pne-2": AF}


def test_events_and_records_hide_their_keys() -> None:
    """STYLE §4: keys never reach repr (SK, LocalEUKey, TK, rand_server of the pending state)."""
    world = eight(19)
    outcome = run_eight(world, local={"pne-r1"})
    text = repr(outcome.server) + repr(outcome.gateway) + repr(outcome.pnes)
    for result in outcome.established().results:
        assert result.sk is not None
        assert result.sk.hex() not in text
        assert repr(result.sk) not in text
    local = world.pnes["pne-r1"].local_eukey
    assert local is not None
    assert repr(local) not in text


def test_pending_state_and_inventory_convert_to_the_store_records() -> None:
    """The store keeps EstablishmentPending as cpns.records.PendingEstablishment and the
    inventory as PNMember rows: the conversion is exact both ways (refused entries, TK
    fields and the LocalEUKey included), failures keep their ErrorCode name."""
    world = eight(20)
    world.add_rand_hash_pne("pne-bob", owner="bob")
    outcome = world.establish("pne-r1", RAND_HASH[1:] + TK + ["pne-bob"], local={"pne-r1"})
    (pending,) = [e for e in outcome.server if isinstance(e, EstablishmentPending)]
    record = pending.to_record()
    assert EstablishmentPending.from_record(record) == pending
    entries = {e.pne_id: e for e in record.entries}
    assert entries["pne-bob"].status == "POLICY_DENIED"
    assert entries["pne-bob"].flow == ""
    assert entries["pne-t1"].flow == "tk"
    assert entries["pne-t1"].tk_step == 0
    assert entries["pne-r1"].local_eukey is not None
    members = world.members[PN_ID]
    assert members["pne-r1"].status == "member"
    assert members["pne-r1"].flow == "rand-hash"
    assert members["pne-bob"].status == "POLICY_DENIED"
    assert not members["pne-bob"].joined


def test_flow_names_are_the_stores() -> None:
    """The PN inventory writes flows as "rand-hash", "tk", or "" when none was chosen."""
    assert [flow_name(f) for f in (AuthFlow.RAND_HASH, AuthFlow.TK, None)] == [
        "rand-hash",
        "tk",
        "",
    ]
    assert OWNER == "alice"
    assert AuthChallenge(pne_id="p", status=OK).flow is None


def test_a_replayed_authenticate_response_is_unknown_establishment() -> None:
    """Issue 6 adversarial table: the AUTHENTICATE Response of a finished establishment,
    replayed (the pending state was deleted with the reply), is UNKNOWN_ESTABLISHMENT and
    changes nothing: no TK or index moves, no inventory row changes."""
    world = eight(21)
    outcome = run_eight(world)
    (response,) = [m for m in outcome.delivered if isinstance(m, AuthenticateResponse)]
    before = (dict(world.server_tk), dict(world.inventory[PN_ID]))
    replay = ServerCompletion(
        server_id=SERVER_ID,
        requester=GW_ID,
        pending=None,  # what the store returns for a finished est_id
        lookups=world.lookups(),
        now=world.now,
    )
    events = replay.receive(response)
    assert [type(e) for e in events] == [ProcedureFailed]
    (reply,) = replay.messages_to_send()
    assert isinstance(reply, PNEstablishResponse)
    assert reply.status is ErrorCode.UNKNOWN_ESTABLISHMENT
    assert (dict(world.server_tk), dict(world.inventory[PN_ID])) == before


def test_a_rand_server_from_another_establishment_fails_that_pne() -> None:
    """Issue 6 adversarial table: a PN GW that hands a PNE the rand_server of another
    establishment (swapping challenges between runs) gets a hash_PNE the server refuses
    (AUTHENTICATION_FAILED for that PNE alone)."""
    world = eight(22)
    first = run_eight(world)
    (old,) = [m for m in first.delivered if isinstance(m, AuthenticateRequest)]
    assert old.rand_server is not None
    outcome = run_eight(
        world, tamper=_tamper_field(PNEAuthenticateRequest, "pne-r3", rand_server=old.rand_server)
    )
    assert outcome.server_status()["pne-r3"] is AF
    check_joined(world, outcome, [p for p in RAND_HASH + TK if p != "pne-r3"])


def test_a_forged_server_reply_from_the_pan_is_ignored() -> None:
    """One PNE cannot end the establishment of the others: a server reply that does not
    answer the PN GW's pending upstream request (another txid; or out of turn) is ignored,
    and the real reply is still acted on."""
    world = eight(23)
    forged_once: list[bool] = []

    def tamper(message: Message) -> Message | list[Message]:
        if isinstance(message, AuthenticateRequest) and not forged_once:
            forged_once.append(True)
            fake = dataclasses.replace(message, txid=b"\x66" * 16, rand_server=FLIP)
            late = dataclasses.replace(message, entries=())
            return [fake, message, late]  # a forgery first, the real one, then a copy
        return message

    outcome = run_eight(world, tamper=tamper)
    check_joined(world, outcome, RAND_HASH + TK)
    assert [e for e in outcome.gateway if isinstance(e, ProcedureFailed)] == []
