"""The adversarial table of PN Establishment (issue 6 item 9): each row one attack on the
machines of cpns.protocol.pn_establishment wired in memory (tests/pn_world.py), and the
EXACT outcome: who refuses, with which status, what the server records, who still joins.

The PN: a PN GW of alice, the originating PNE ``pne-r0`` and the invited ``pne-r1`` (both
enrolled with UI: rand/hash, 002 §7.5.4) and ``pne-t2``, ``pne-t3`` (003 chain and TK:
000 §7.5). The rule under every row (docs/procedures/pn-establishment.md): a PNE that
fails, fails alone; any proof that does not verify is one opaque AUTHENTICATION_FAILED;
a PNE counts itself a member only after verifying the server's hash_server (or TK key
confirmation). Rows that need the server's stored replies (a replayed AUTHENTICATE
Response) run the server over a real store (tests/pn_sim.py: the store API, the way the
service persists the machines' events).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from tests.pn_sim import CLEAN, Simulation
from tests.pn_world import GW_ID, PN_ID, SERVER_ID, Outcome, Tamper, World

from cpns.errors import ErrorCode
from cpns.messages.codec import encode
from cpns.messages.model import (
    AuthenticateResponse,
    Message,
    PNEAuthenticateRequest,
    PNEAuthenticateResponse,
    PNEstablishmentNotify,
    PNEstablishRequest,
    PNEstablishResponse,
    PNInviteResponse,
    PNSetupResponse,
    SetupEntry,
)
from cpns.protocol import tk_auth
from cpns.protocol.pn_establishment import ReassignmentRequested

OK, AF = ErrorCode.OK, ErrorCode.AUTHENTICATION_FAILED
ORIGINATOR = "pne-r0"
INVITED = ["pne-r1", "pne-t2", "pne-t3"]
ALL = [ORIGINATOR, *INVITED]
BOB = "pne-bob"


def _world() -> World:
    world = World(2024)
    world.add_rand_hash_pne("pne-r0")
    world.add_rand_hash_pne("pne-r1")
    world.add_tk_pne("pne-t2")
    world.add_tk_pne("pne-t3")
    world.add_rand_hash_pne(BOB, owner="bob")
    return world


def _flip(value: bytes) -> bytes:
    return bytes([value[0] ^ 1]) + value[1:]


def _flipped(name: str) -> Callable[[Message], object]:
    """The message's ``name`` field with one bit flipped."""
    return lambda m: _flip(getattr(m, name))


def _to(pne_id: str, kind: type[Message], **change: Callable[[Message], object]) -> Tamper:
    """A tamper hook changing fields of the ``kind`` message sent to ``pne_id``."""

    def tamper(message: Message) -> Message:
        if isinstance(message, kind) and message.dst == pne_id:
            return dataclasses.replace(message, **{k: f(message) for k, f in change.items()})
        return message

    return tamper


def _from(pne_id: str, kind: type[Message], **change: Callable[[Message], object]) -> Tamper:
    """A tamper hook changing fields of the ``kind`` message ``pne_id`` sends."""

    def tamper(message: Message) -> Message:
        if isinstance(message, kind) and message.src == pne_id:
            return dataclasses.replace(message, **{k: f(message) for k, f in change.items()})
        return message

    return tamper


@dataclass(frozen=True)
class Row:
    """One attack and its exact outcome for the ``target`` PNE."""

    #: The PNE under attack.
    target: str
    #: The server's result for it (None: the server never heard of it).
    server: ErrorCode | None
    #: The code of the target PNE's own failure (None: it never learnt of the run).
    pne: ErrorCode | None
    #: Which party refused: "server", "pne", or "gateway".
    refuses: str
    #: Runs the attack on a fresh world (after a clean establishment if ``warm``).
    attack: Callable[[World, Outcome | None], Outcome]
    #: Run one clean establishment first (replays need an earlier run).
    warm: bool = False
    #: The PNEs that still join.
    joins: tuple[str, ...] = field(default=tuple(p for p in ALL))
    #: Extra checks on the attacked run.
    extra: Callable[[World, Outcome], None] | None = None


def _run(tamper: Tamper | None = None, **kw: object) -> Callable[[World, Outcome | None], Outcome]:
    def attack(world: World, _: Outcome | None) -> Outcome:
        return world.establish(ORIGINATOR, INVITED, tamper=tamper, **kw)  # type: ignore[arg-type]

    return attack


def _others(target: str) -> tuple[str, ...]:
    return tuple(p for p in ALL if p != target)


# -- attacks that need a first establishment ------------------------------------------------


def _swap_rand_server(world: World, first: Outcome | None) -> Outcome:
    """The PN GW gives pne-r1 the rand_server of another establishment (the first)."""
    assert first is not None
    old = next(
        m.rand_server
        for m in first.delivered
        if isinstance(m, PNEAuthenticateRequest) and m.dst == "pne-r1"
    )
    tamper = _to("pne-r1", PNEAuthenticateRequest, rand_server=lambda m: old)
    return world.establish(ORIGINATOR, INVITED, tamper=tamper)


def _swap_proofs(world: World, _: Outcome | None) -> Outcome:
    """The PN GW swaps the hash_PNE of pne-r0 and pne-r1 in its AUTHENTICATE Response."""

    def tamper(message: Message) -> Message:
        if not isinstance(message, AuthenticateResponse):
            return message
        proofs = {p.pne_id: p for p in message.entries}
        a, b = proofs["pne-r0"], proofs["pne-r1"]
        proofs["pne-r0"] = dataclasses.replace(a, hash_pne=b.hash_pne)
        proofs["pne-r1"] = dataclasses.replace(b, hash_pne=a.hash_pne)
        return dataclasses.replace(message, entries=tuple(proofs.values()))

    return world.establish(ORIGINATOR, INVITED, tamper=tamper)


def _replayed_old_proof(world: World, first: Outcome | None) -> Outcome:
    """A TK holder replays pne-t2's sealed EUKey_1 of the first establishment."""
    assert first is not None
    old = next(
        m for m in first.delivered if isinstance(m, PNEAuthenticateResponse) and m.src == "pne-t2"
    )
    tamper = _from(
        "pne-t2",
        PNEAuthenticateResponse,
        sealed_eukey=lambda m: old.sealed_eukey,
        key_index=lambda m: old.key_index,
        tk_step=lambda m: old.tk_step,
    )
    return world.establish(ORIGINATOR, INVITED, tamper=tamper)


def _fresh_proof_of_old_key(world: World, first: Outcome | None) -> Outcome:
    """The PN GW (it holds pne-t2's TK and chain) seals EUKey_1 afresh for the new run."""
    chain = world.entities["pne-t2"].eukeys
    seen: dict[str, Message] = {}

    def tamper(message: Message) -> Message:
        if isinstance(message, PNInviteResponse) and message.src == "pne-t2":
            seen["invite"] = message
        if isinstance(message, PNEAuthenticateRequest) and message.dst == "pne-t2":
            seen["challenge"] = message
        if isinstance(message, PNEAuthenticateResponse) and message.src == "pne-t2":
            invite, challenge = seen["invite"], seen["challenge"]
            assert isinstance(invite, PNInviteResponse)
            assert isinstance(challenge, PNEAuthenticateRequest)
            assert invite.rand_pne is not None
            assert challenge.tk_step is not None
            run = tk_auth.TKRun(
                pn_id=PN_ID,
                gw_id=GW_ID,
                server_id=SERVER_ID,
                pne_id="pne-t2",
                est_id=challenge.est_id,
                rand_pne=invite.rand_pne,
                rand_server=challenge.rand_server,
            )
            tk_t = world.gw_tk["pne-t2"].state.tk  # adopted at the challenge's step
            sealed = tk_auth.seal_current_eukey(
                tk_t, chain[0], run, challenge.tk_step, 1, nonce=bytes(12)
            )
            return dataclasses.replace(message, sealed_eukey=sealed, key_index=1)
        return message

    return world.establish(ORIGINATOR, INVITED, tamper=tamper)


def _replayed_notify(rewrite: str) -> Callable[[World, Outcome | None], Outcome]:
    """pne-r1 gets the PNEstablishmentNotify of the first establishment instead of its
    own: as it was, re-addressed to the new invitation, or with its est_id rewritten too."""

    def attack(world: World, first: Outcome | None) -> Outcome:
        assert first is not None
        old = next(
            m for m in first.delivered if isinstance(m, PNEstablishmentNotify) and m.dst == "pne-r1"
        )

        def tamper(message: Message) -> Message:
            if not (isinstance(message, PNEstablishmentNotify) and message.dst == "pne-r1"):
                return message
            if rewrite == "none":
                return old
            if rewrite == "txid":
                return dataclasses.replace(old, txid=message.txid)
            return dataclasses.replace(old, txid=message.txid, est_id=message.est_id)

        return world.establish(ORIGINATOR, INVITED, tamper=tamper)

    return attack


def _replayed_setup_response(world: World, first: Outcome | None) -> Outcome:
    """The originator gets the SETUP Response of the first establishment, re-addressed."""
    assert first is not None
    old = next(m for m in first.delivered if isinstance(m, PNSetupResponse))

    def tamper(message: Message) -> Message:
        if isinstance(message, PNSetupResponse):
            return dataclasses.replace(old, txid=message.txid, est_id=message.est_id)
        return message

    return world.establish(ORIGINATOR, INVITED, tamper=tamper)


def _listed(
    entries: Callable[[PNEstablishRequest], tuple[SetupEntry, ...]],
) -> Callable[[World, Outcome | None], Outcome]:
    def attack(world: World, _: Outcome | None) -> Outcome:
        return world.establish(
            ORIGINATOR,
            INVITED,
            setup_tamper=lambda m: dataclasses.replace(m, entries=entries(m)),
        )

    return attack


def _ghost(m: PNEstablishRequest) -> tuple[SetupEntry, ...]:
    return (*m.entries, SetupEntry(pne_id="pne-ghost", rand_pne=b"g" * 32, local_eukey=False))


def _twice(m: PNEstablishRequest) -> tuple[SetupEntry, ...]:
    first = next(e for e in m.entries if e.pne_id == "pne-r1")
    return (*m.entries, dataclasses.replace(first, rand_pne=b"d" * 32))


def _bob(world: World, _: Outcome | None) -> Outcome:
    return world.establish(ORIGINATOR, [*INVITED, BOB])


def _ghost_invited(world: World, _: Outcome | None) -> Outcome:
    return world.establish(ORIGINATOR, [*INVITED, "pne-ghost"])


# -- extra checks -------------------------------------------------------------------------


def _no_local_key(world: World, outcome: Outcome) -> None:
    assert world.pnes["pne-r1"].local_eukey is None


def _stale_reassign(world: World, outcome: Outcome) -> None:
    asked = [e for e in outcome.gateway if isinstance(e, ReassignmentRequested)]
    assert [(e.pne_id, e.reason) for e in asked] == [("pne-t2", ErrorCode.STALE_CREDENTIAL)]
    assert world.entities["pne-t2"].key_index == 2  # the server did not move back


def _tk_unchanged(world: World, outcome: Outcome) -> None:
    assert world.server_tk["pne-t2"][1] == 0
    assert world.entities["pne-t2"].key_index == 1


def _duplicate_refused(world: World, outcome: Outcome) -> None:
    (request,) = [m for m in outcome.delivered if type(m).__name__ == "AuthenticateRequest"]
    statuses = [(c.pne_id, c.status) for c in request.entries]
    assert statuses.count(("pne-r1", ErrorCode.DUPLICATE_PNE)) == 1
    assert statuses.count(("pne-r1", OK)) == 1


def _both_refused(world: World, outcome: Outcome) -> None:
    status = outcome.server_status()
    assert status["pne-r0"] is AF
    assert status["pne-r1"] is AF


def _server_counts_it(world: World, outcome: Outcome) -> None:
    # The server verified the PNE (its inventory says member); the PNE does not count
    # itself one: a forged or lost hash_server costs that PNE this run, nothing more.
    assert world.inventory[PN_ID]["pne-r1"] is OK


ROWS: dict[str, Row] = {
    "wrong hash_PNE": Row(
        target="pne-r1",
        server=AF,
        pne=AF,
        refuses="server",
        attack=_run(_from("pne-r1", PNEAuthenticateResponse, hash_pne=_flipped("hash_pne"))),
        joins=_others("pne-r1"),
    ),
    "tampered hash_server (PNEstablishmentNotify)": Row(
        target="pne-r1",
        server=OK,
        pne=AF,
        refuses="pne",
        attack=_run(_to("pne-r1", PNEstablishmentNotify, hash_server=_flipped("hash_server"))),
        joins=_others("pne-r1"),
        extra=_server_counts_it,
    ),
    "tampered hash_server (SETUP Response)": Row(
        target=ORIGINATOR,
        server=OK,
        pne=AF,
        refuses="pne",
        attack=_run(_to(ORIGINATOR, PNSetupResponse, hash_server=_flipped("hash_server"))),
        joins=_others(ORIGINATOR),
    ),
    "tampered TK key confirmation": Row(
        target="pne-t2",
        server=OK,
        pne=AF,
        refuses="pne",
        attack=_run(_to("pne-t2", PNEstablishmentNotify, confirm=_flipped("confirm"))),
        joins=_others("pne-t2"),
    ),
    "tampered AN": Row(
        target="pne-t2",
        server=AF,
        pne=AF,
        refuses="pne",
        attack=_run(_to("pne-t2", PNEAuthenticateRequest, an=_flipped("an"))),
        joins=_others("pne-t2"),
        extra=_tk_unchanged,
    ),
    "gateway forges rand_server (rand/hash)": Row(
        target="pne-r1",
        server=AF,
        pne=AF,
        refuses="server",
        attack=_run(_to("pne-r1", PNEAuthenticateRequest, rand_server=lambda m: b"f" * 32)),
        joins=_others("pne-r1"),
    ),
    "gateway forges rand_server (TK)": Row(
        target="pne-t2",
        server=AF,
        pne=AF,
        refuses="pne",
        attack=_run(_to("pne-t2", PNEAuthenticateRequest, rand_server=lambda m: b"f" * 32)),
        joins=_others("pne-t2"),
        extra=_tk_unchanged,
    ),
    "gateway swaps rand_server between establishments": Row(
        target="pne-r1",
        server=AF,
        pne=AF,
        refuses="server",
        attack=_swap_rand_server,
        warm=True,
        joins=_others("pne-r1"),
    ),
    "gateway swaps hash_PNE between PNEs": Row(
        target="pne-r1",
        server=AF,
        pne=AF,
        refuses="server",
        attack=_swap_proofs,
        joins=("pne-t2", "pne-t3"),
        extra=_both_refused,
    ),
    "unknown PNE ID": Row(
        target="pne-ghost",
        server=ErrorCode.UNKNOWN_ENTITY,
        pne=None,
        refuses="server",
        attack=_listed(_ghost),
    ),
    "unknown PNE invited (it never answers)": Row(
        target="pne-ghost",
        server=None,
        pne=None,
        refuses="gateway",
        attack=_ghost_invited,
    ),
    "PNE of another user": Row(
        target=BOB,
        server=ErrorCode.POLICY_DENIED,
        pne=ErrorCode.POLICY_DENIED,
        refuses="server",
        attack=_bob,
    ),
    "replayed old sealed EUKey (TK)": Row(
        target="pne-t2",
        server=AF,
        pne=AF,
        refuses="server",
        attack=_replayed_old_proof,
        warm=True,
        joins=_others("pne-t2"),
    ),
    "fresh proof of an old EUKey (TK)": Row(
        target="pne-t2",
        server=ErrorCode.STALE_CREDENTIAL,
        pne=ErrorCode.STALE_CREDENTIAL,
        refuses="server",
        attack=_fresh_proof_of_old_key,
        warm=True,
        joins=_others("pne-t2"),
        extra=_stale_reassign,
    ),
    "PNE listed twice": Row(
        target="pne-r1",
        server=OK,
        pne=None,
        refuses="server",
        attack=_listed(_twice),
        extra=_duplicate_refused,
    ),
    "tampered sealed LocalEUKey": Row(
        target="pne-r1",
        server=AF,
        pne=AF,
        refuses="pne",
        attack=_run(
            _to(
                "pne-r1",
                PNEAuthenticateRequest,
                sealed_local_eukey=_flipped("sealed_local_eukey"),
            ),
            local=["pne-r1"],
        ),
        joins=_others("pne-r1"),
        extra=_no_local_key,
    ),
    "replayed PNEstablishmentNotify": Row(
        target="pne-r1",
        server=OK,
        pne=ErrorCode.UNEXPECTED_MESSAGE,
        refuses="pne",
        attack=_replayed_notify("none"),
        warm=True,
        joins=_others("pne-r1"),
    ),
    "replayed PNEstablishmentNotify, re-addressed": Row(
        target="pne-r1",
        server=OK,
        pne=ErrorCode.UNEXPECTED_MESSAGE,
        refuses="pne",
        attack=_replayed_notify("txid"),
        warm=True,
        joins=_others("pne-r1"),
    ),
    "replayed PNEstablishmentNotify, re-addressed to the new est_id": Row(
        target="pne-r1",
        server=OK,
        pne=AF,
        refuses="pne",
        attack=_replayed_notify("est_id"),
        warm=True,
        joins=_others("pne-r1"),
    ),
    "replayed SETUP Response, re-addressed": Row(
        target=ORIGINATOR,
        server=OK,
        pne=AF,
        refuses="pne",
        attack=_replayed_setup_response,
        warm=True,
        joins=_others(ORIGINATOR),
    ),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_adversarial_row(name: str) -> None:
    """Issue 6 item 9 adversarial table; 002 §7.5.4.1 (a PNE verifies hash_server before it
    counts itself a member), §7.5.4.3 (the server verifies every hash_PNE), 000 §7.5.1/.3
    (AN, sealed EUKey, key confirmation), our rules (a PNE fails alone; one opaque
    AUTHENTICATION_FAILED; POLICY_DENIED / DUPLICATE_PNE / UNKNOWN_ENTITY refusals;
    STALE_CREDENTIAL with re-assignment for an old EUKey): the exact outcome of the row."""
    row = ROWS[name]
    world = _world()
    first = world.establish(ORIGINATOR, INVITED) if row.warm else None
    outcome = row.attack(world, first)
    status = outcome.server_status()
    # The server's verdict on the target, and on everyone else.
    assert status.get(row.target) == row.server, status
    for pne_id in ALL:
        if pne_id in row.joins:
            joined = outcome.joined(pne_id)
            assert joined is not None, pne_id
            assert status[pne_id] is OK
            assert world.inventory[PN_ID][pne_id] is OK
        elif pne_id != row.target:
            assert outcome.joined(pne_id) is None, pne_id
    # The target never counts itself a member; its own failure code is exact.
    assert outcome.joined(row.target) is None or row.target in row.joins
    failure = outcome.pne_failure(row.target)
    if row.pne is None:
        assert failure is None
    else:
        assert failure is not None
        assert failure.code == row.pne
    # Who refused. The PNE: it answered its challenge with a refusal, or it refused the
    # result of a server that had accepted it. The server: the PNE's own answer (if it got
    # a challenge) was OK and the server's verdict was not.
    answers = [
        m.status
        for m in outcome.delivered
        if isinstance(m, PNEAuthenticateResponse) and m.src == row.target
    ]
    if row.refuses == "pne":
        assert failure is not None
        assert failure.hop == "device"
        assert row.server is OK or (answers and answers[0] is not OK)
    elif row.refuses == "gateway":
        # The PN GW left it out (TIMEOUT) before the server heard of it.
        finished = outcome.finished()
        assert finished is not None
        statuses = {m.pne_id: m.status for m in finished.members}
        assert statuses[row.target] is ErrorCode.TIMEOUT
        assert row.target not in world.inventory[PN_ID]
    else:
        assert row.refuses == "server"
        assert all(a is OK for a in answers)
        assert row.server is not OK or row.target in row.joins
    if row.server is not None and row.server is not OK:
        # Not a member: the inventory records the failure under its name.
        assert world.inventory[PN_ID][row.target] == row.server
    if row.extra is not None:
        row.extra(world, outcome)
    # Afterwards, a clean establishment: every PNE of alice joins again (N1).
    again = world.establish(ORIGINATOR, INVITED)
    if name != "fresh proof of an old EUKey (TK)":  # that one waits for its re-assignment
        for pne_id in ALL:
            assert again.joined(pne_id) is not None, pne_id


# -- replayed AUTHENTICATE Response (47): the server's stored replies -----------------------


def _established() -> tuple[Simulation, AuthenticateResponse]:
    sim = Simulation(11, rounds=0, faults=CLEAN)
    sim.clean_round()
    (response,) = [m for m in sim.upstream_log if isinstance(m, AuthenticateResponse)]
    return sim, response


def _server_facts(sim: Simulation) -> object:
    return (
        [(r.entity_id, r.tk_step) for p in sim.pne_ids if (r := sim.store.get_tk(p)) is not None],
        [(p, e.key_index) for p in sim.pne_ids if (e := sim.store.get_entity(p)) is not None],
        sim.store.get_pn(PN_ID),
    )


@pytest.mark.parametrize(
    ("replay", "status"),
    [
        ("same txid, same bytes", OK),
        ("new txid", ErrorCode.UNKNOWN_ESTABLISHMENT),
        ("same txid, other content", ErrorCode.REPLAY),
    ],
)
def test_replayed_authenticate_response(replay: str, status: ErrorCode) -> None:
    """Our rules (docs/procedures/pn-establishment.md, "Server rules"): a retried
    AUTHENTICATE Response (same txid, same bytes) gets the stored reply; a replay under a
    new txid finds no pending establishment (UNKNOWN_ESTABLISHMENT); a reused txid with
    other content is REPLAY. None of them moves a TK, an index or the PN inventory."""
    sim, response = _established()
    before = _server_facts(sim)
    stored = sim.store.get_reply(response.src, response.txid)
    assert stored is not None
    if replay == "new txid":
        response = dataclasses.replace(response, txid=b"\x07" * 16)
    elif replay == "same txid, other content":
        response = dataclasses.replace(response, entries=response.entries[:1])
    reply, events = sim.server.handle(response, sim.now())
    assert events == []
    assert isinstance(reply, PNEstablishResponse)
    assert reply.status is status
    if replay == "same txid, same bytes":
        assert reply.entries
        assert encode(reply) == stored.reply  # the bytes sent the first time
    assert _server_facts(sim) == before
