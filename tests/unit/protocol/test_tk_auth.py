"""TK-based mutual authentication (000 §7.5.1-7.5.3) and the resync rule N1.

Every test drives the pure functions of :mod:`cpns.protocol.tk_auth`, mostly through the
three-party model in :mod:`tests.tk_sim` (each hop a call; a lost message is a run cut
after that hop; a retry is a new establishment). The rule checked is stated in each
docstring; "N1" is the resynchronisation rule of docs/procedures/tk-authentication.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tests.helpers import ref_hkdf, ref_parts, ref_seal_ad, ref_seal_key
from tests.tk_sim import IDS, Hop, ServerSide, World

from cpns.crypto.hashchain import build_chain
from cpns.errors import AuthenticationFailed, ErrorCode
from cpns.protocol import tk_auth
from cpns.protocol.tk_auth import (
    TK_WINDOW,
    GatewayTKState,
    PNETKState,
    StaleCredential,
    TKChallenge,
    TKRun,
    TKVerified,
    compute_an,
    gateway_prepare,
    pne_answer,
    pne_confirmed,
    ratchet,
    seal_current_eukey,
    seal_next_eukey,
    server_verify,
    tk_forward,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[2] / "vectors" / "crypto_v1.json").read_text(encoding="ascii")
)


def sha(label: str, *parts: bytes | str | int) -> bytes:
    return hashlib.sha256(ref_parts(label, *parts)).digest()


def hm(key: bytes, label: str, *parts: bytes | str | int) -> bytes:
    return hmac.new(key, ref_parts(label, *parts), hashlib.sha256).digest()


def verify(
    s: ServerSide, run: TKRun, challenge: TKChallenge, sealed: bytes, index: int
) -> TKVerified:
    """The server's check of a proof against its stored state ``s``."""
    return server_verify(
        tk=s.tk,
        tk_step=s.tk_step,
        eukeys=s.eukeys,
        key_index=s.key_index,
        run=run,
        challenge_step=challenge.tk_step,
        challenge_index=challenge.key_index,
        sealed_eukey=sealed,
        proof_index=index,
    )


def ok(world: World, **kwargs: Any) -> None:
    """One run that must complete with both ends holding the same SK."""
    outcome = world.run(**kwargs)
    assert outcome.result == "ok", outcome
    assert outcome.pne_sk is not None
    assert outcome.pne_sk == outcome.server_sk


def in_sync(world: World) -> None:
    """After a completed run every party holds what the server proved (N1)."""
    s = world.server
    assert world.gateway.tk_step == s.tk_step
    assert world.gateway.tk == s.tk
    assert world.pne.tk_step == s.tk_step
    assert world.pne.tk == s.tk
    assert world.pne.key_index == s.key_index
    assert world.pne.eukey == s.eukeys[s.key_index - 1]
    assert world.pne.pending is None


# -- known-answer vectors ------------------------------------------------------------------


def test_vectors_match_the_code() -> None:
    """Derivations of docs/procedures/tk-authentication.md ("Derivations"): the committed
    crypto_v1.json "tk_000" section equals what tk_auth computes today."""
    path = Path(__file__).parents[2] / "vectors" / "make_vectors.py"
    spec = importlib.util.spec_from_file_location("make_vectors", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert VECTORS["tk_000"] == module.tk_vectors()


def test_vectors_match_an_independent_computation() -> None:
    """The same derivations written out with hashlib, hmac, a reference HKDF and the raw
    AES-GCM primitive: TK ratchet, AN (000 §7.5.3 step 2), the sealed next and current
    EUKeys (000 §7.5.2 step 2, §7.5.1 step 2), SK (D-000-3) and confirm (D-000-4)."""
    v = VECTORS["tk_000"]
    tk = bytes.fromhex(v["tk"])
    ids = v["run"]
    est_id, rand_pne, rand_server = (
        bytes.fromhex(ids[k]) for k in ("est_id", "rand_pne", "rand_server")
    )
    pn, gw, srv, pne = ids["pn_id"], ids["gw_id"], ids["server_id"], ids["pne_id"]
    t, i = v["tk_step"], v["key_index"]
    chain = [bytes.fromhex(k) for k in v["eukeys"]]
    # TK_{t+1} = SHA-256(P("cpns/v1/tk-ratchet", TK_t)); the vector's TK_t is TK_0 ratcheted
    # t times.
    tk_t = tk
    for _ in range(t):
        tk_t = sha("cpns/v1/tk-ratchet", tk_t)
    assert tk_t.hex() == v["tk_t"]
    assert sha("cpns/v1/tk-ratchet", tk_t).hex() == v["tk_next"]
    # next = i + 1 while the chain holds a key after EUKey_i, else 0 (D-000-1).
    nxt = i + 1 if i < len(chain) else 0
    assert v["next_index"] == nxt
    an = hm(tk_t, "cpns/v1/an", srv, gw, pn, pne, est_id, rand_pne, rand_server, t, i, nxt)
    assert an.hex() == v["an"]
    nonce = bytes.fromhex(v["nonce"])

    def ref_seal(purpose: str, plain: bytes, *ctx: bytes | str | int) -> bytes:
        aead = AESGCM(ref_seal_key(tk_t, purpose))
        return b"\x01" + nonce + aead.encrypt(nonce, plain, ref_seal_ad(purpose, *ctx))

    assert ref_seal("tk-next-eukey", chain[i], gw, pne, est_id, t, i + 1).hex() == v["sealed_next"]
    sealed = ref_seal("tk-current-eukey", chain[i - 1], pne, srv, est_id, t, i)
    assert sealed.hex() == v["sealed_current"]
    sk = ref_hkdf(
        chain[i - 1] + tk_t,
        salt=rand_pne + rand_server,
        info=ref_parts("cpns/v1/tk-session-key", pn, gw, srv, pne, est_id, t, i),
        length=32,
    )
    assert sk.hex() == v["sk"]
    confirm = hm(sk, "cpns/v1/tk-confirm", pn, gw, srv, pne, est_id, rand_pne, rand_server, t, i)
    assert confirm.hex() == v["confirm"]


# -- ratchet and window --------------------------------------------------------------------


def test_tk_forward_accepts_exactly_the_window() -> None:
    """N1: a receiver computes the TK forward for a step in [held, held + TK_WINDOW]; one
    behind (the ratchet is one-way) or one past the window is STALE_CREDENTIAL."""
    tk = bytes(range(32))
    assert tk_forward(tk, 5, 5) == tk
    assert tk_forward(tk, 5, 5 + TK_WINDOW) == ratchet(tk, TK_WINDOW)
    assert ratchet(ratchet(tk, 3), 2) == ratchet(tk, 5)
    for target in (4, 5 + TK_WINDOW + 1):
        with pytest.raises(StaleCredential) as info:
            tk_forward(tk, 5, target)
        assert info.value.code is ErrorCode.STALE_CREDENTIAL
        assert ErrorCode.STALE_CREDENTIAL == 311


# -- the procedure ---------------------------------------------------------------------------


def test_one_run_authenticates_both_ends_and_moves_every_party_one_step() -> None:
    """000 §7.5.1-7.5.3: AN checked, EUKey_1 proven, EUKey_2 delivered (checked against the
    chain), every TK ratcheted once, the same SK at both ends."""
    world = World.new()
    ok(world)
    assert (world.server.tk_step, world.server.key_index) == (1, 2)
    in_sync(world)


def test_many_runs_walk_the_chain() -> None:
    """000: each run uses the next EUKey of the set (EUKey_{i-1} = H(EUKey_i), 003 §7.4.2.1.1.2)."""
    world = World.new(chain_len=6)
    sks = set()
    for n in range(1, 6):
        outcome = world.run()
        assert outcome.result == "ok"
        assert outcome.verified is not None
        assert outcome.verified.proven_index == n
        sks.add(outcome.pne_sk)
        in_sync(world)
    assert len(sks) == 5


@pytest.mark.parametrize("hop", list(Hop))
def test_a_lost_message_at_any_hop_then_a_retry_succeeds(hop: Hop) -> None:
    """N1: a message lost at any hop, then a retry (new establishment), ends in success
    and in step; the server moved at most once per proven key."""
    world = World.new()
    assert world.run(cut=hop).result == "lost"
    ok(world)
    in_sync(world)
    moved = hop in (Hop.CONFIRM_UPSTREAM, Hop.CONFIRM_PAN)
    assert world.server.key_index == (3 if moved else 2)


def test_lost_pne_response_keeps_the_old_key_and_the_retry_proves_it_again() -> None:
    """N1: after answering, the PNE keeps its confirmed (TK_c, EUKey_j) beside the pending
    state; the server did not move, so the retry challenges at the same (c, j)."""
    world = World.new()
    world.run(cut=Hop.RESPONSE_PAN)
    assert world.pne.key_index == 1
    assert world.pne.pending is not None
    assert world.pne.pending.key_index == 2
    assert (world.server.tk_step, world.server.key_index) == (0, 1)
    outcome = world.run()
    assert outcome.verified is not None
    assert outcome.verified.proven_index == 1
    in_sync(world)


def test_lost_server_confirmation_then_retry_promotes_the_pending_key() -> None:
    """N1: the server moved but neither the PN GW nor the PNE heard it; the next challenge
    at (c+1, j+1) proves the move, so the PNE's pending key becomes current."""
    world = World.new()
    world.run(cut=Hop.CONFIRM_UPSTREAM)
    assert (world.server.tk_step, world.server.key_index) == (1, 2)
    assert world.gateway.tk_step == 0
    assert world.pne.key_index == 1
    outcome = world.run()
    assert outcome.verified is not None
    assert outcome.verified.proven_index == 2
    in_sync(world)


def test_duplicated_challenge_gives_the_same_state() -> None:
    """N1: a duplicated AUTHENTICATE Request is answered twice from the same confirmed
    state; the pending state is the same and the run completes."""
    world = World.new()
    ok(world, duplicate=Hop.CHALLENGE_PAN)
    in_sync(world)
    ok(world, duplicate=Hop.RESPONSE_UPSTREAM)
    ok(world, duplicate=Hop.CONFIRM_PAN)
    in_sync(world)


def test_repeated_loss_well_past_the_window_never_locks_the_pne_out() -> None:
    """N1: TK_WINDOW + 2 runs in a row, each losing a message at the same hop, then a
    retry: the verified AN tells the PN GW and the PNE where the server is, so losses do
    not accumulate and the retry succeeds without re-assignment."""
    for hop in Hop:
        world = World.new(chain_len=40)
        for _ in range(TK_WINDOW + 2):
            assert world.run(cut=hop).result == "lost"
        ok(world)
        in_sync(world)
        assert not world.reassign_due


def _server_ahead(world: World, steps: int) -> None:
    """Move the server ``steps`` runs ahead without the PNE or PN GW: runs completed by a
    holder of the TK and the set on the PNE's behalf (the PN GW can do that, see the
    procedure page), or a PNE state lost with its device."""
    s = world.server
    world.server = dataclasses.replace(
        s, tk=ratchet(s.tk, steps), tk_step=s.tk_step + steps, key_index=s.key_index + steps
    )
    world.gateway = GatewayTKState(tk=world.server.tk, tk_step=world.server.tk_step)


def test_pne_window_edge_accepts_w_steps_behind() -> None:
    """N1: a PNE TK_WINDOW steps behind the server still verifies AN (computing forward);
    its old EUKey is then refused as stale (reassign), and after the 003 re-assignment
    it authenticates again."""
    world = World.new(chain_len=20)
    _server_ahead(world, TK_WINDOW)
    outcome = world.run()
    assert outcome.result == "STALE_CREDENTIAL"
    assert isinstance(outcome.error, StaleCredential)
    assert outcome.error.reassign
    assert world.pne.tk_step == TK_WINDOW  # AN proved the server's step
    world.reassign()
    ok(world)
    in_sync(world)


def test_pne_one_past_the_window_is_stale_then_recovers_by_reassignment() -> None:
    """N1: one step past TK_WINDOW the PNE refuses (STALE_CREDENTIAL, reassign); the
    re-assignment is opened with the TK computed forward up to REASSIGN_WINDOW."""
    world = World.new(chain_len=20)
    _server_ahead(world, TK_WINDOW + 1)
    before = world.pne
    outcome = world.run()
    assert outcome.result == "STALE_CREDENTIAL"
    assert world.reassign_due
    assert world.pne == before
    world.reassign()
    ok(world)
    in_sync(world)


def test_old_key_replayed_is_refused() -> None:
    """N1 / 000 §7.5.3 step 1: a valid proof of an EUKey older than the stored index (a TK
    holder replaying EUKey_1 after EUKey_2 is current) is STALE_CREDENTIAL and moves
    nothing; the recorded sealed proof of the old run is bound to its est_id and is an
    opaque AUTHENTICATION_FAILED in a new run."""
    world = World.new()
    old_run = world.new_run()
    old_challenge = world.challenge(old_run)
    relayed = gateway_prepare(
        world.gateway,
        eukeys=world.gateway_eukeys,
        run=old_run,
        challenge=old_challenge,
        nonce=bytes(12),
    )
    old_answer = pne_answer(
        world.pne,
        run=old_run,
        challenge=old_challenge,
        sealed_next=relayed.sealed_next,
        nonce=bytes(12),
    )
    ok(world)
    run = world.new_run()
    challenge = world.challenge(run)
    s = world.server
    tk_t = s.tk
    forged = seal_current_eukey(tk_t, s.eukeys[0], run, s.tk_step, 1, nonce=bytes(12))
    with pytest.raises(StaleCredential) as info:
        verify(s, run, challenge, forged, 1)
    assert info.value.reassign
    with pytest.raises(AuthenticationFailed):
        verify(s, run, challenge, old_answer.sealed_eukey, 1)
    assert world.server == s


def test_pne_restored_from_an_old_backup() -> None:
    """N1: a PNE restored from a backup taken three runs ago holds an older EUKey; it
    proves it, the server answers STALE_CREDENTIAL with reassign, and after the 003
    re-assignment the PNE authenticates again."""
    world = World.new()
    backup = world.pne
    for _ in range(3):
        ok(world)
    world.pne = backup
    outcome = world.run()
    assert outcome.result == "STALE_CREDENTIAL"
    assert isinstance(outcome.error, StaleCredential)
    assert outcome.error.reassign
    assert (world.server.tk_step, world.server.key_index) == (3, 4)
    world.reassign()
    ok(world)
    in_sync(world)


def test_pne_restored_from_a_backup_older_than_the_window() -> None:
    """N1: a PNE restored from a backup more than TK_WINDOW runs old cannot verify AN
    (STALE_CREDENTIAL at the PNE, reassign); the re-assignment brings it back."""
    world = World.new(chain_len=20)
    backup = world.pne
    for _ in range(TK_WINDOW + 2):
        ok(world)
    world.pne = backup
    assert world.run().result == "STALE_CREDENTIAL"
    assert world.reassign_due
    world.reassign()
    ok(world)
    in_sync(world)


def test_chain_exhaustion_asks_for_reassignment_and_keeps_working() -> None:
    """Chain exhausted (i_s == n): the server still authenticates with EUKey_n and sets
    reassign; the PNE keeps working with EUKey_n until the re-assignment, then uses the
    new chain from EUKey_1."""
    world = World.new(chain_len=3)
    ok(world)
    ok(world)
    outcome = world.run()
    assert outcome.verified is not None
    assert outcome.verified.proven_index == 3
    assert outcome.verified.reassign
    assert world.reassign_due
    for _ in range(3):  # the re-assignment is late: EUKey_3 keeps working
        ok(world)
        assert world.pne.key_index == 3
        assert world.server.key_index == 3
    world.reassign()
    outcome = world.run()
    assert outcome.verified is not None
    assert outcome.verified.proven_index == 1
    assert not outcome.verified.reassign
    in_sync(world)


def test_a_late_confirmation_of_an_older_run_does_not_move_the_pne() -> None:
    """N1: the PNE adopts its pending state only on the confirmation of the run that made
    it; a delayed confirmation of an earlier run verifies but changes nothing."""
    world = World.new()
    first = world.new_run()
    ch1 = world.challenge(first)
    prep1 = gateway_prepare(
        world.gateway, eukeys=world.gateway_eukeys, run=first, challenge=ch1, nonce=bytes(12)
    )
    ans1 = pne_answer(
        world.pne, run=first, challenge=ch1, sealed_next=prep1.sealed_next, nonce=bytes(12)
    )
    s = world.server
    v1 = verify(s, first, ch1, ans1.sealed_eukey, ans1.key_index)
    world.server = dataclasses.replace(s, tk=v1.tk, tk_step=v1.tk_step, key_index=v1.key_index)
    world.pne = ans1.state
    # The confirmation of run 1 is delayed; run 2 is answered (its proof then lost).
    world.run(cut=Hop.RESPONSE_PAN)
    assert world.pne.key_index == 2
    assert world.pne.pending is not None
    late = pne_confirmed(world.pne, run=first, answer=ans1, confirm=v1.confirm)
    assert late == world.pne
    ok(world)
    in_sync(world)


def test_concurrent_runs_one_wins_the_other_is_superseded() -> None:
    """N1: two establishments challenge the same state; the first proof commits, the
    second is STALE_CREDENTIAL without reassign (retry), and the PNE is not harmed."""
    world = World.new()
    runs = [world.new_run(), world.new_run()]
    chs = [world.challenge(r) for r in runs]
    answers = []
    for r, ch in zip(runs, chs, strict=True):
        prep = gateway_prepare(
            world.gateway, eukeys=world.gateway_eukeys, run=r, challenge=ch, nonce=bytes(12)
        )
        world.gateway = prep.state
        answers.append(
            pne_answer(
                world.pne, run=r, challenge=ch, sealed_next=prep.sealed_next, nonce=bytes(12)
            )
        )
        world.pne = answers[-1].state
    s = world.server
    v = verify(s, runs[0], chs[0], answers[0].sealed_eukey, 1)
    world.server = dataclasses.replace(s, tk=v.tk, tk_step=v.tk_step, key_index=v.key_index)
    s = world.server
    with pytest.raises(StaleCredential) as info:
        verify(s, runs[1], chs[1], answers[1].sealed_eukey, 1)
    assert not info.value.reassign
    ok(world)
    in_sync(world)


# -- tampering: one opaque failure ---------------------------------------------------------


def _flip(blob: bytes, at: int = -1) -> bytes:
    b = bytearray(blob)
    b[at] ^= 0x01
    return bytes(b)


def _setup() -> tuple[World, TKRun, TKChallenge]:
    world = World.new()
    run = world.new_run()
    return world, run, world.challenge(run)


def test_tampered_an_fails_opaquely_at_the_gateway_and_the_pne() -> None:
    """000 §7.5.1 step 1: a wrong AN is refused, by the PNE and (ours) by the PN GW, with
    the one opaque AUTHENTICATION_FAILED."""
    world, run, challenge = _setup()
    bad = dataclasses.replace(challenge, an=_flip(challenge.an))
    with pytest.raises(AuthenticationFailed) as info:
        gateway_prepare(
            world.gateway, eukeys=world.gateway_eukeys, run=run, challenge=bad, nonce=bytes(12)
        )
    assert info.value.code is ErrorCode.AUTHENTICATION_FAILED
    with pytest.raises(AuthenticationFailed):
        pne_answer(world.pne, run=run, challenge=bad, sealed_next=None, nonce=bytes(12))
    other_run = dataclasses.replace(run, rand_pne=bytes(32))  # AN bound to the PNE's random
    with pytest.raises(AuthenticationFailed):
        pne_answer(world.pne, run=other_run, challenge=challenge, sealed_next=None, nonce=bytes(12))


def test_tampered_or_wrong_next_eukey_fails_opaquely_at_the_pne() -> None:
    """000 §7.5.1 step 4 (checked against the chain): an altered sealed EUKey_{i+1}, or a
    well-sealed key that is not the chain's successor, is AUTHENTICATION_FAILED."""
    world, run, challenge = _setup()
    prep = gateway_prepare(
        world.gateway, eukeys=world.gateway_eukeys, run=run, challenge=challenge, nonce=bytes(12)
    )
    assert prep.sealed_next is not None
    not_next = seal_next_eukey(
        world.gateway.tk, world.gateway_eukeys[2], run, 0, 2, nonce=bytes(12)
    )
    for bad in (_flip(prep.sealed_next), _flip(prep.sealed_next, 5), not_next):
        with pytest.raises(AuthenticationFailed) as info:
            pne_answer(world.pne, run=run, challenge=challenge, sealed_next=bad, nonce=bytes(12))
        assert info.value.code is ErrorCode.AUTHENTICATION_FAILED


def _next_key(world: World, run: TKRun, challenge: TKChallenge) -> bytes | None:
    """The sealed next EUKey the PN GW relays with ``challenge`` (000 §7.5.2 step 2)."""
    return gateway_prepare(
        world.gateway, eukeys=world.gateway_eukeys, run=run, challenge=challenge, nonce=bytes(12)
    ).sealed_next


def test_a_stripped_next_eukey_fails_an_and_moves_nobody() -> None:
    """D-000-1 / N1: AN says whether the next EUKey comes with the challenge, so a next key
    stripped on the way (by the PAN or a faulty relay) fails AN at the PNE: the PNE does
    not answer, the server cannot move to EUKey_{i+1} without it, and the next clean run
    succeeds (without this, the server moved on while the PNE stayed at EUKey_i, and only
    a re-assignment could bring it back)."""
    world, run, challenge = _setup()
    assert _next_key(world, run, challenge) is not None
    before = world.pne
    with pytest.raises(AuthenticationFailed):
        pne_answer(world.pne, run=run, challenge=challenge, sealed_next=None, nonce=bytes(12))
    assert world.pne == before
    ok(world)
    in_sync(world)
    assert world.server.key_index == 2


def test_tampered_proof_or_index_fails_opaquely_at_the_server() -> None:
    """000 §7.5.3 step 1: an altered sealed EUKey, a wrong index, or a proof sealed under
    another run is one AUTHENTICATION_FAILED; the stored state is untouched."""
    world, run, challenge = _setup()
    ans = pne_answer(
        world.pne,
        run=run,
        challenge=challenge,
        sealed_next=_next_key(world, run, challenge),
        nonce=bytes(12),
    )
    s = world.server
    other = world.new_run()
    cases = [
        (_flip(ans.sealed_eukey), 1, run),
        (ans.sealed_eukey, 2, run),
        (ans.sealed_eukey, 0, run),
        (ans.sealed_eukey, 1, other),
        (b"", 1, run),
    ]
    for sealed, index, r in cases:
        with pytest.raises(AuthenticationFailed) as info:
            verify(s, r, challenge, sealed, index)
        assert type(info.value) is AuthenticationFailed
        assert info.value.code is ErrorCode.AUTHENTICATION_FAILED


def test_tampered_confirmation_fails_opaquely_at_the_pne() -> None:
    """D-000-4: the PNE adopts the new key only on a valid confirmation under SK."""
    world, run, challenge = _setup()
    ans = pne_answer(
        world.pne,
        run=run,
        challenge=challenge,
        sealed_next=_next_key(world, run, challenge),
        nonce=bytes(12),
    )
    with pytest.raises(AuthenticationFailed):
        pne_confirmed(ans.state, run=run, answer=ans, confirm=bytes(32))


def test_a_different_eukey_chain_gives_a_different_session_key() -> None:
    """D-000-3: SK depends on EUKey_k, TK_t and both randoms, so a PN GW's own SK guess from
    EUKey alone (the literal 000) differs from ours."""
    run = TKRun(**IDS, est_id=bytes(16), rand_pne=b"\x01" * 32, rand_server=b"\x02" * 32)
    keys = build_chain(bytes(32), 2)
    tk = bytes(range(32))
    base = tk_auth.tk_session_key(keys[0], tk, run, 0, 1)
    assert base != tk_auth.tk_session_key(keys[1], tk, run, 0, 1)
    assert base != tk_auth.tk_session_key(keys[0], ratchet(tk), run, 0, 1)
    assert base != tk_auth.tk_session_key(
        keys[0], tk, dataclasses.replace(run, rand_pne=b"\x03" * 32), 0, 1
    )


def test_keys_never_appear_in_repr() -> None:
    """Keys never in repr or logs: the state records hide TK, EUKeys and SK."""
    world = World.new()
    outcome = world.run()
    assert outcome.verified is not None
    for record in (world.pne, world.gateway, outcome.verified):
        text = repr(record)
        for secret in (world.server.tk, *world.server.eukeys, outcome.verified.sk):
            assert secret.hex() not in text
            assert repr(secret) not in text


def test_state_records_refuse_bad_values() -> None:
    """Records validate on construction: 32-byte keys, index 1..MAX_CHAIN_LEN, step >= 0."""
    from cpns.errors import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        PNETKState(tk=bytes(31), tk_step=0, eukey=bytes(32), key_index=1)
    with pytest.raises(LocalProtocolError):
        PNETKState(tk=bytes(32), tk_step=0, eukey=bytes(32), key_index=0)
    with pytest.raises(LocalProtocolError):
        GatewayTKState(tk=bytes(32), tk_step=-1)
    with pytest.raises(LocalProtocolError):
        TKRun(**IDS, est_id=bytes(15), rand_pne=bytes(32), rand_server=bytes(32))
    assert compute_an(
        bytes(32),
        TKRun(**IDS, est_id=bytes(16), rand_pne=bytes(32), rand_server=bytes(32)),
        0,
        1,
        2,
    )


def test_gateway_refuses_an_old_challenge_without_reassignment() -> None:
    """N1, PN GW: a challenge older than its step is an old one delivered late:
    STALE_CREDENTIAL without re-assignment."""
    world = World.new()
    run = world.new_run()
    old = world.challenge(run)
    ok(world)
    with pytest.raises(StaleCredential) as info:
        gateway_prepare(
            world.gateway, eukeys=world.gateway_eukeys, run=run, challenge=old, nonce=bytes(12)
        )
    assert not info.value.reassign


def test_gateway_restored_past_the_window_recovers_by_reassignment() -> None:
    """N1, PN GW: a PN GW restored from a backup more than TK_WINDOW runs old refuses the
    challenge (STALE_CREDENTIAL, reassign); the 003 re-assignment gives it the server's
    TK step and a new set, and the PNE authenticates again."""
    world = World.new(chain_len=20)
    backup = world.gateway
    for _ in range(TK_WINDOW + 1):
        ok(world)
    world.gateway = backup
    outcome = world.run()
    assert outcome.result == "STALE_CREDENTIAL"
    assert world.reassign_due
    world.reassign()
    ok(world)
    in_sync(world)


def test_pne_refuses_a_late_old_challenge_without_reassignment() -> None:
    """N1, PNE: a challenge whose step is behind the PNE's confirmed step cannot be
    checked (one-way ratchet) and is an old one: STALE_CREDENTIAL, no re-assignment."""
    world = World.new()
    run = world.new_run()
    old = world.challenge(run)
    ok(world)
    with pytest.raises(StaleCredential) as info:
        pne_answer(world.pne, run=run, challenge=old, sealed_next=None, nonce=bytes(12))
    assert not info.value.reassign


def test_pne_asked_for_an_older_key_than_its_own_needs_reassignment() -> None:
    """N1, PNE: a verified challenge naming a key older than the PNE's (its chain was
    replaced while it missed the new one) is STALE_CREDENTIAL with re-assignment."""
    world = World.new()
    ok(world)
    s = world.server
    world.server = dataclasses.replace(s, key_index=1)  # the server asks for EUKey_1 again
    run = world.new_run()
    challenge = world.challenge(run)
    with pytest.raises(StaleCredential) as info:
        pne_answer(
            world.pne,
            run=run,
            challenge=challenge,
            sealed_next=_next_key(world, run, challenge),
            nonce=bytes(12),
        )
    assert info.value.reassign


def test_gateway_refuses_an_index_outside_its_set() -> None:
    """000 §7.5.2 step 1: the PN GW selects EUKey_{i+1} among [EUKeyPNE]; a challenge for
    an index beyond the set is an opaque failure; at i = n it sends no next key."""
    world = World.new(chain_len=3)
    run = world.new_run()
    s = world.server
    far = tk_auth.server_challenge(tk=s.tk, tk_step=0, key_index=4, chain_length=5, run=run)
    with pytest.raises(AuthenticationFailed):
        gateway_prepare(
            world.gateway, eukeys=world.gateway_eukeys, run=run, challenge=far, nonce=bytes(12)
        )
    last = tk_auth.server_challenge(tk=s.tk, tk_step=0, key_index=3, chain_length=3, run=run)
    prepared = gateway_prepare(
        world.gateway, eukeys=world.gateway_eukeys, run=run, challenge=last, nonce=bytes(12)
    )
    assert prepared.sealed_next is None
    assert prepared.pending.tk_step == 1


def test_gateway_refuses_index_zero() -> None:
    """000 §7.5.2 step 1: index 0 names no key of [EUKeyPNE] (keys are numbered from 1)."""
    world = World.new()
    run = world.new_run()
    zero = tk_auth.server_challenge(
        tk=world.server.tk, tk_step=0, key_index=0, chain_length=3, run=run
    )
    with pytest.raises(AuthenticationFailed):
        gateway_prepare(
            world.gateway, eukeys=world.gateway_eukeys, run=run, challenge=zero, nonce=bytes(12)
        )
