"""Resync rule N1 of the TK flow (000 §7.5) under random loss and duplication.

Random sequences of establishments for one PNE, each cut at a random hop (that message is
lost) or delivered with one message duplicated, always followed by further runs (the
retry); the 003 re-assignment asked for by an exhausted chain happens after a random delay.
The model is :mod:`tests.tk_sim` over the pure functions of :mod:`cpns.protocol.tk_auth`.

Invariants (docs/procedures/tk-authentication.md, "Resynchronisation"):

* no run of honest parties ends in a failure or a stale credential: only "ok" or "lost";
* a completed run gives the PNE and the server the same session key;
* the server's state is never behind a party's, and at most one step ahead of the PNE's
  confirmed state (the PNE never falls out of its window);
* at the end, one clean retry (after the pending re-assignment, if any) succeeds and
  leaves the three parties in step: nobody is locked out.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import event, given, settings
from hypothesis import strategies as st
from tests.tk_sim import Hop, ServerSide, World

from cpns.errors import AuthenticationFailed, ErrorCode
from cpns.protocol.tk_auth import (
    TK_WINDOW,
    GatewayPrepared,
    PNEAnswer,
    StaleCredential,
    TKChallenge,
    TKRun,
    TKVerified,
    gateway_confirmed,
    gateway_prepare,
    pne_answer,
    pne_confirmed,
    server_verify,
)

HOPS = list(Hop)

step = st.tuples(
    st.one_of(st.none(), st.sampled_from(HOPS)),  # cut after this hop
    st.one_of(
        st.none(), st.sampled_from([Hop.CHALLENGE_PAN, Hop.RESPONSE_UPSTREAM, Hop.CONFIRM_PAN])
    ),
    st.booleans(),  # perform a due re-assignment now
)


def check_invariants(world: World) -> None:
    s, g, p = world.server, world.gateway, world.pne
    assert g.tk_step <= s.tk_step
    assert p.tk_step <= s.tk_step <= p.tk_step + 1 <= p.tk_step + TK_WINDOW
    assert p.key_index <= s.key_index <= p.key_index + 1
    if p.pending is not None:
        assert p.pending.tk_step == p.tk_step + 1


@settings(max_examples=300)
@given(
    seed=st.integers(0, 2**16),
    chain_len=st.integers(2, 5),
    steps=st.lists(step, min_size=1, max_size=25),
)
def test_random_loss_and_retries_never_lock_a_pne_out(
    seed: int, chain_len: int, steps: list[tuple[Hop | None, Hop | None, bool]]
) -> None:
    """N1: lost or duplicated messages at any of the hops, always followed by a retry,
    end with the server, the PN GW and the PNE able to authenticate; a PNE is never
    locked out and never needs a re-assignment other than for an exhausted chain."""
    world = World.new(seed=seed, chain_len=chain_len)
    for cut, duplicate, reassign_now in steps:
        outcome = world.run(cut=cut, duplicate=None if cut is not None else duplicate)
        event(f"cut={cut.value if cut else None}")
        assert outcome.result in ("ok", "lost"), outcome
        if outcome.result == "ok":
            assert outcome.pne_sk == outcome.server_sk
        check_invariants(world)
        if world.reassign_due and reassign_now:
            world.reassign()
            check_invariants(world)
    if world.reassign_due:
        world.reassign()
    final = world.run()
    assert final.result == "ok", final
    assert final.pne_sk == final.server_sk
    s = world.server
    assert (world.gateway.tk, world.gateway.tk_step) == (s.tk, s.tk_step)
    assert (world.pne.tk, world.pne.tk_step) == (s.tk, s.tk_step)
    assert world.pne.eukey == s.eukeys[s.key_index - 1]


# -- any order: delays, reordering, duplicates, overlapping establishments -----------------


@dataclass
class InFlight:
    """One establishment for the PNE and what each hop has produced so far."""

    run: TKRun
    challenge: TKChallenge
    #: Re-assignments done before this run started (runs of an older chain may fail).
    epoch: int
    prepared: GatewayPrepared | None = None
    answer: PNEAnswer | None = None
    verified: TKVerified | None = None


#: The hops a message can be waiting at: (name, run number).
type Delivery = tuple[str, int]


def _allowed_failure(exc: Exception, flight: InFlight, epoch: int) -> bool:
    """What an honest run may end with: a superseded (or late) run, or a run of a chain
    replaced since it started."""
    if isinstance(exc, StaleCredential) and not exc.reassign:
        return True
    return flight.epoch < epoch and isinstance(exc, AuthenticationFailed)


@settings(max_examples=300)
@given(seed=st.integers(0, 2**16), chain_len=st.integers(2, 5), data=st.data())
def test_any_order_of_deliveries_keeps_the_parties_in_step(
    seed: int, chain_len: int, data: st.DataObject
) -> None:
    """N1 under delay, reordering, duplication and loss, with overlapping establishments:
    no honest run fails other than as superseded, the server is never more than one step
    ahead of the PNE's confirmed state nor behind the PN GW, and once the messages in
    flight are gone a retry succeeds with all three parties in step."""
    world = World.new(seed=seed, chain_len=chain_len)
    flights: list[InFlight] = []
    waiting: list[Delivery] = []
    epoch = 0
    for _ in range(data.draw(st.integers(1, 60), label="operations")):
        choice = data.draw(
            st.sampled_from(["start", "deliver", "deliver", "deliver", "drop", "reassign"])
        )
        if choice == "start" or not waiting:
            run = world.new_run()
            flights.append(InFlight(run=run, challenge=world.challenge(run), epoch=epoch))
            waiting.append(("gateway-challenge", len(flights) - 1))
            continue
        if choice == "reassign":
            if world.reassign_due:
                world.reassign()
                epoch += 1
            continue
        at = data.draw(st.integers(0, len(waiting) - 1), label="which message")
        hop, number = waiting[at]
        keep = choice == "deliver" and data.draw(st.booleans(), label="duplicate")
        if not keep:
            del waiting[at]
        if choice == "drop":
            continue
        flight = flights[number]
        failure: Exception | None = None
        try:
            following = _deliver(world, flight, hop)
        except (StaleCredential, AuthenticationFailed) as exc:
            failure = exc
        if failure is not None:
            assert _allowed_failure(failure, flight, epoch), (hop, failure)
            event(f"refused at {hop}: {type(failure).__name__}")
            continue
        if following is not None:
            waiting.append((following, number))
        check_invariants(world)
    event(f"server steps before the final retry: {min(world.server.tk_step, 5)}")
    event(f"re-assignments: {min(epoch, 2)}")
    if world.reassign_due:
        world.reassign()
    final = world.run()
    assert final.result == "ok", final
    assert final.pne_sk == final.server_sk
    check_invariants(world)


def _deliver(world: World, flight: InFlight, hop: str) -> str | None:
    """Deliver the message waiting at ``hop``; return the hop of the message it causes."""
    if hop == "gateway-challenge":
        flight.prepared = gateway_prepare(
            world.gateway,
            eukeys=world.gateway_eukeys,
            run=flight.run,
            challenge=flight.challenge,
            nonce=world.rng.token_bytes(12),
        )
        world.gateway = flight.prepared.state
        return "pne-challenge"
    if hop == "pne-challenge":
        assert flight.prepared is not None
        flight.answer = pne_answer(
            world.pne,
            run=flight.run,
            challenge=flight.challenge,
            sealed_next=flight.prepared.sealed_next,
            nonce=world.rng.token_bytes(12),
        )
        world.pne = flight.answer.state
        return "server-answer"
    if hop == "server-answer":
        assert flight.answer is not None
        s = world.server
        if flight.verified is not None:
            return "gateway-confirm"  # a repeated answer gets the stored reply
        flight.verified = server_verify(
            tk=s.tk,
            tk_step=s.tk_step,
            eukeys=s.eukeys,
            key_index=s.key_index,
            run=flight.run,
            challenge_step=flight.challenge.tk_step,
            challenge_index=flight.challenge.key_index,
            sealed_eukey=flight.answer.sealed_eukey,
            proof_index=flight.answer.key_index,
        )
        world.server = ServerSide(
            tk=flight.verified.tk,
            tk_step=flight.verified.tk_step,
            key_index=flight.verified.key_index,
            eukeys=s.eukeys,
        )
        return "gateway-confirm"
    if hop == "gateway-confirm":
        assert flight.prepared is not None
        assert flight.verified is not None
        world.gateway = gateway_confirmed(world.gateway, flight.prepared.pending)
        if flight.verified.reassign:
            world.reassign_due = True
        return "pne-confirm"
    assert hop == "pne-confirm"
    assert flight.answer is not None
    assert flight.verified is not None
    world.pne = pne_confirmed(
        world.pne, run=flight.run, answer=flight.answer, confirm=flight.verified.confirm
    )
    return None


# -- tampering -------------------------------------------------------------------------------


@settings(max_examples=200)
@given(
    target=st.sampled_from(["an", "sealed_next", "sealed_eukey", "confirm"]),
    position=st.integers(0, 200),
    bit=st.integers(0, 7),
)
def test_any_altered_byte_is_one_opaque_failure(target: str, position: int, bit: int) -> None:
    """One opaque failure per verification (000 §7.5.1 step 1, §7.5.3 step 1, D-000-2,
    D-000-4): one flipped bit anywhere in AN, a sealed EUKey or the confirmation gives
    AuthenticationFailed with AUTHENTICATION_FAILED, never another error, and the
    refusing party's state is what it was."""
    world = World.new()
    run = world.new_run()
    challenge = world.challenge(run)

    def flip(blob: bytes) -> bytes:
        out = bytearray(blob)
        out[position % len(out)] ^= 1 << bit
        return bytes(out)

    if target == "an":
        challenge = TKChallenge(
            tk_step=challenge.tk_step, key_index=challenge.key_index, an=flip(challenge.an)
        )
    prepared = None
    failure: Exception | None = None
    try:
        prepared = gateway_prepare(
            world.gateway,
            eukeys=world.gateway_eukeys,
            run=run,
            challenge=challenge,
            nonce=bytes(12),
        )
        sealed_next = prepared.sealed_next
        assert sealed_next is not None
        if target == "sealed_next":
            sealed_next = flip(sealed_next)
        answer = pne_answer(
            world.pne, run=run, challenge=challenge, sealed_next=sealed_next, nonce=bytes(12)
        )
        sealed = flip(answer.sealed_eukey) if target == "sealed_eukey" else answer.sealed_eukey
        s = world.server
        verified = server_verify(
            tk=s.tk,
            tk_step=s.tk_step,
            eukeys=s.eukeys,
            key_index=s.key_index,
            run=run,
            challenge_step=challenge.tk_step,
            challenge_index=challenge.key_index,
            sealed_eukey=sealed,
            proof_index=answer.key_index,
        )
        pne_confirmed(answer.state, run=run, answer=answer, confirm=flip(verified.confirm))
    except Exception as exc:  # the one failure expected, whatever the hop
        failure = exc
    assert type(failure) is AuthenticationFailed, failure
    assert failure.code is ErrorCode.AUTHENTICATION_FAILED
    event(f"refused: {target}")
