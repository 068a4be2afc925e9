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

from hypothesis import event, given, settings
from hypothesis import strategies as st
from tests.tk_sim import Hop, World

from cpns.protocol.tk_auth import TK_WINDOW

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
