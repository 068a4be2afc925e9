"""The "re-assignment" edge of the TK resynchronisation rule (000 with 003), over the real
003 machines (docs/procedures/tk-authentication.md rule 7, eukey-assignment.md
"Re-assignment after TK-based authentications", deviations D-003-13).

The three-party TK model of tests/tk_sim.py runs TK-based authentications; each
re-assignment is the real 003 exchange (tests/reassign_sim.py) against the server's
ratcheted TK record.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.reassign_sim import reassign_by_003
from tests.tk_sim import Hop, World

from cpns.errors import ErrorCode
from cpns.protocol.key_assignment import EUKeyChainAssigned, EUKeySetReceived
from cpns.protocol.tk_auth import TK_WINDOW, ratchet

type KeyOf = Callable[[str, str], bytes]


def _ok(world: World) -> None:
    outcome = world.run()
    assert outcome.result == "ok", outcome
    assert outcome.pne_sk is not None
    assert outcome.pne_sk == outcome.server_sk


def _in_sync(world: World) -> None:
    s = world.server
    assert (world.gateway.tk, world.gateway.tk_step) == (s.tk, s.tk_step)
    assert (world.pne.tk, world.pne.tk_step) == (s.tk, s.tk_step)
    assert world.pne.key_index == s.key_index
    assert world.pne.eukey == s.eukeys[s.key_index - 1]
    assert world.pne.pending is None


@pytest.mark.parametrize("k", [0, 1, 2, 3, TK_WINDOW + 3, 40])
def test_reassignment_after_k_ratchets_then_authentication_succeeds(
    k: int, password_key: KeyOf
) -> None:
    """000 + 003 (rule 7, D-003-13): after k TK-based authentications on a chain of 2 (the
    chain is exhausted after the first), 003 seals the new EUKey_1 under the server's TK_k
    and names k; the server's step stays k, its index restarts at 1; the PN GW restarts at
    (TK_k, k); the PNE computes TK_k forward and installs (TK_k, k, EUKey_1, 1); the next
    authentication succeeds and everyone is in step."""
    world = World.new(chain_len=2)
    factory = world.pne.tk
    for _ in range(k):
        _ok(world)
    assert world.server.tk_step == k
    assert world.reassign_due == (k >= 2)
    old_chain = world.server.eukeys
    result = reassign_by_003(world, factory_tk=factory, password_key=password_key)
    assert result.failure is None, result.failure
    key_set = result.of(EUKeySetReceived)
    assert key_set is not None
    assert (key_set.tk_step, key_set.tk) == (k, ratchet(factory, k))
    chain = result.of(EUKeyChainAssigned)
    assert chain is not None
    assert chain.eukeys != old_chain
    assert (world.server.tk_step, world.server.key_index) == (k, 1)
    _in_sync(world)
    _ok(world)
    _ok(world)  # the new chain's end: reassign asked again, EUKey_2 keeps working
    assert world.reassign_due
    assert world.server.tk_step == k + 2


def test_reassignment_of_a_pne_restored_from_an_old_backup(password_key: KeyOf) -> None:
    """N1 (backup edge): a PNE restored from a backup taken before several runs proves an
    old key (STALE_CREDENTIAL, reassign); 003 reaches it at the server's step, computed
    forward from the backup's older TK step; then it authenticates."""
    world = World.new(chain_len=6)
    factory = world.pne.tk
    _ok(world)
    backup = world.pne
    for _ in range(3):
        _ok(world)
    world.pne = backup
    stale = world.run()
    assert stale.result == "STALE_CREDENTIAL"
    assert world.reassign_due
    # The Notification reaches the PNE as restored (its TK still at the backup's step).
    assert backup.tk_step < world.server.tk_step
    result = reassign_by_003(world, factory_tk=factory, password_key=password_key, pne_state=backup)
    assert result.failure is None, result.failure
    _in_sync(world)
    _ok(world)
    _in_sync(world)


def test_reassignment_of_a_pne_restored_past_the_tk_window(password_key: KeyOf) -> None:
    """N1: a backup more than TK_WINDOW steps old cannot verify AN; 003 still reaches it
    (REASSIGN_WINDOW), and it authenticates again."""
    world = World.new(chain_len=30)
    factory = world.pne.tk
    backup = world.pne
    for _ in range(TK_WINDOW + 4):
        _ok(world)
    world.pne = backup
    assert world.run().result == "STALE_CREDENTIAL"
    result = reassign_by_003(world, factory_tk=factory, password_key=password_key)
    assert result.failure is None, result.failure
    _ok(world)
    _in_sync(world)


def test_a_pne_ahead_of_the_notification_step_refuses_it_cleanly(password_key: KeyOf) -> None:
    """Rule 7: a Notification at a TK step behind the PNE's (it cannot compute a TK
    backwards) is refused with STALE_CREDENTIAL in the Ack; nothing is applied, the PNE
    keeps its state and keeps authenticating."""
    world = World.new(chain_len=6)
    factory = world.pne.tk
    _ok(world)
    _ok(world)
    ahead = world.pne
    world2 = World.new(chain_len=6)  # the same seed: the same TK and chain, server at step 0
    refused = reassign_by_003(
        world2, factory_tk=factory, password_key=password_key, pne_state=ahead
    )
    assert refused.failure is not None
    assert refused.failure.code is ErrorCode.STALE_CREDENTIAL
    assert world2.pne is not ahead
    assert world2.server.tk_step == 0
    world.pne = ahead
    _ok(world)


_STEP = st.one_of(
    st.just("ok"),
    st.just("reassign"),
    st.sampled_from(list(Hop)),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedule=st.lists(_STEP, min_size=1, max_size=14), chain_len=st.integers(2, 4))
def test_any_schedule_of_runs_losses_and_reassignments_ends_in_step(
    schedule: list[str | Hop], chain_len: int, password_key: KeyOf
) -> None:
    """N1 with 003 in the loop: any sequence of runs, runs cut at any hop, and real 003
    re-assignments (at any point, due or not) leaves a PNE that a retry authenticates,
    with every party in step; each re-assignment keeps the server's TK step and succeeds."""
    world = World.new(chain_len=chain_len)
    factory = world.pne.tk
    epoch = 1
    for step in schedule:
        if step == "reassign":
            before = world.server.tk_step
            result = reassign_by_003(
                world, factory_tk=factory, password_key=password_key, epoch=epoch
            )
            assert result.failure is None, (schedule, result.failure)
            assert world.server.tk_step == before
            epoch += 1
        elif step == "ok":
            world.run()
        else:
            assert isinstance(step, Hop)
            world.run(cut=step)
    outcome = world.run()
    if outcome.result != "ok":  # a stale PNE (lost track): re-assignment brings it back
        assert outcome.result == "STALE_CREDENTIAL", outcome
        result = reassign_by_003(world, factory_tk=factory, password_key=password_key, epoch=epoch)
        assert result.failure is None
        _ok(world)
    _in_sync(world)
