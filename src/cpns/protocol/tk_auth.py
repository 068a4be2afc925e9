"""TK-based mutual authentication of a PNE and the CPNS Server (000 §7.5.1-7.5.3).

Theory of operation
-------------------
Parties: the CPNS Server and the PN GW hold the PNE's Temporary Key (TK) and the EUKey
chain of its 003 assignment; the PNE holds the TK and one EUKey of that chain. The
server's AUTHENTICATE Request carries RANDSVR, AN and the PN ID (000 §7.5.3); the PN GW
adds the next EUKey of the set sealed under the TK (000 §7.5.2); the PNE checks AN, seals
its current EUKey under the TK and answers (000 §7.5.1); the server opens and checks that
EUKey (000 §7.5.3); both ends derive the session key SK. Every step moves the TK one
ratchet step and the chain one key forward.

This module holds only the derivations and the three roles' rules as *pure* state
transitions over frozen records: no machine, no messages, no I/O, no RNG (nonces are
arguments). The establishment machines call these functions for the entries whose flow is
TK, persist the returned state before sending what depends on it, and build the messages.

Derivations (docs/procedures/tk-authentication.md; every MAC binds the run)::

    run     = (pn_id, gw_id, server_id, pne_id, est_id, rand_pne, rand_server)
    TK_{t+1} = Hash("cpns/v1/tk-ratchet", TK_t)
    AN      = MAC(TK_t, "cpns/v1/an", server_id, gw_id, pn_id, pne_id, est_id,
                  rand_pne, rand_server, t, i)
    next    = Seal(TK_t, EUKey_{i+1}, "tk-next-eukey", (gw_id, pne_id, est_id, t, i+1))
    proof   = Seal(TK_t, EUKey_k, "tk-current-eukey", (pne_id, server_id, est_id, t, k))
    SK      = HKDF(EUKey_k || TK_t, salt = rand_pne || rand_server,
                   "cpns/v1/tk-session-key", (pn_id, gw_id, server_id, pne_id, est_id, t, k))
    confirm = MAC(SK, "cpns/v1/tk-confirm", pn_id, gw_id, server_id, pne_id, est_id,
                  rand_pne, rand_server, t, k)

The resynchronisation rule (N1): each party keeps its *oldest unproven* state and computes
forward; a TK step is accepted in ``[step, step + TK_WINDOW]``; a key is dropped only once
its successor is proven.

* Server (:func:`server_challenge`, :func:`server_verify`): stores ``(TK_s, s, i_s)``,
  challenges at ``(s, i_s)``; on a valid proof of EUKey_k at ``(t, k)`` the caller commits
  ``TKVerified`` (``t+1``, ``k+1`` or ``k`` when the chain is exhausted) in the same
  transaction as the reply. A challenge superseded by another run, an older key (PNE
  restored from a backup, or an old key replayed) -> :class:`StaleCredential`.
* PN GW (:func:`gateway_prepare`, :func:`gateway_confirmed`): keeps ``(TK_g, g)``; verifies
  AN (it holds the TK), which proves the server is at ``t``, so it adopts ``TK_t``; seals
  EUKey_{i+1}; adopts ``t+1`` only when the server says OK for that PNE.
* PNE (:func:`pne_answer`, :func:`pne_confirmed`): keeps its confirmed ``(TK_c, c, EUKey_j,
  j)`` plus, after answering, a pending ``(t+1, EUKey_{j+1})``; accepts a challenge at
  ``t`` in ``[c, c+W]`` and index ``j`` or ``j+1`` (the latter proves the server moved, so
  the pending key becomes current); a verified ``confirm`` makes the pending state current.
* Chain exhausted (``k == n``): the server authenticates with EUKey_n, keeps the index and
  sets ``reassign``; the PNE keeps working with EUKey_n until the 003 re-assignment
  (:func:`pne_tk_at`, :func:`pne_reassigned`).

API
---
Constants ``TK_WINDOW`` (8), ``REASSIGN_WINDOW``; exception :class:`StaleCredential`
(``code`` STALE_CREDENTIAL, ``reassign``); records :class:`TKRun`, :class:`TKChallenge`,
:class:`PNETKState`, :class:`PNETKPending`, :class:`PNEAnswer`, :class:`GatewayTKState`,
:class:`GatewayTKPending`, :class:`GatewayPrepared`, :class:`TKVerified`.

* ``ratchet(tk, n=1)``, ``tk_forward(tk, step, target, window=TK_WINDOW)``
* ``compute_an(tk_t, run, tk_step, key_index)`` / ``verify_an(..., an)``
* ``seal_next_eukey(tk_t, eukey, run, tk_step, next_index, nonce)`` / ``open_next_eukey``
* ``seal_current_eukey(tk_t, eukey, run, tk_step, key_index, nonce)`` / ``open_current_eukey``
* ``tk_session_key(eukey, tk_t, run, tk_step, key_index)``
* ``compute_confirm(sk, run, tk_step, key_index)`` / ``verify_confirm(..., tag)``
* ``server_challenge(tk, tk_step, key_index, run) -> TKChallenge``
* ``server_verify(tk, tk_step, eukeys, key_index, run, challenge_step, challenge_index,
  sealed_eukey, proof_index) -> TKVerified``
* ``gateway_prepare(state, eukeys, run, challenge, nonce) -> GatewayPrepared``,
  ``gateway_confirmed(state, pending) -> GatewayTKState``
* ``pne_answer(state, run, challenge, sealed_next, nonce) -> PNEAnswer``,
  ``pne_confirmed(state, run, answer, confirm) -> PNETKState``,
  ``pne_tk_at(state, step, window=REASSIGN_WINDOW)``,
  ``pne_reassigned(state, tk, tk_step, eukey, key_index=1) -> PNETKState``

Every failed verification is one opaque :class:`~cpns.errors.AuthenticationFailed`; keys
never appear in a ``repr``.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from cpns.crypto.hashchain import MAX_CHAIN_LEN, verify_chain_step
from cpns.crypto.hashing import KEY_LEN, Part, hash_values, mac, verify_mac
from cpns.crypto.kdf import derive_key
from cpns.crypto.keywrap import open_sealed, seal
from cpns.errors import AuthenticationFailed, ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "AN_LABEL",
    "CONFIRM_LABEL",
    "CURRENT_EUKEY_PURPOSE",
    "NEXT_EUKEY_PURPOSE",
    "RATCHET_LABEL",
    "REASSIGN_WINDOW",
    "SESSION_KEY_LABEL",
    "TK_WINDOW",
    "GatewayPrepared",
    "GatewayTKPending",
    "GatewayTKState",
    "PNEAnswer",
    "PNETKPending",
    "PNETKState",
    "StaleCredential",
    "TKChallenge",
    "TKRun",
    "TKVerified",
    "compute_an",
    "compute_confirm",
    "gateway_confirmed",
    "gateway_prepare",
    "open_current_eukey",
    "open_next_eukey",
    "pne_answer",
    "pne_confirmed",
    "pne_reassigned",
    "pne_tk_at",
    "ratchet",
    "seal_current_eukey",
    "seal_next_eukey",
    "server_challenge",
    "server_verify",
    "tk_forward",
    "tk_session_key",
    "verify_an",
    "verify_confirm",
]

#: Look-ahead window of TK steps a receiver computes forward (resync rule N1).
TK_WINDOW: Final = 8
#: Look-ahead a PNE accepts for the TK step of a 003 re-assignment (a PNE restored from an
#: old backup may be many steps behind; the sealed notification authenticates the step).
REASSIGN_WINDOW: Final = 1 << 16

RATCHET_LABEL: Final = "cpns/v1/tk-ratchet"
AN_LABEL: Final = "cpns/v1/an"
SESSION_KEY_LABEL: Final = "cpns/v1/tk-session-key"
CONFIRM_LABEL: Final = "cpns/v1/tk-confirm"
NEXT_EUKEY_PURPOSE: Final = "tk-next-eukey"
CURRENT_EUKEY_PURPOSE: Final = "tk-current-eukey"

_EST_ID_LEN: Final = 16
_RAND_LEN: Final = 32
_MAX_STEP: Final = 2**64 - 1 - REASSIGN_WINDOW


class StaleCredential(RemoteProtocolError):
    """A TK step or EUKey index outside the receiver's window (STALE_CREDENTIAL).

    ``reassign`` tells the caller whether the PNE needs a 003 re-assignment (restored from
    a backup, chain or TK beyond the window) or whether the run was merely superseded by
    another run of the same PNE (retry with a fresh establishment).
    """

    error_code = ErrorCode.STALE_CREDENTIAL

    def __init__(self, reason: str, *, reassign: bool = True) -> None:
        super().__init__(reason)
        self.reassign = reassign


# -- records -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TKRun:
    """What names one run for one PNE: the identities, the establishment and both nonces."""

    #: PN ID (header field of the establishment).
    pn_id: str
    #: PN GW Entity ID.
    gw_id: str
    #: CPNS Server ID.
    server_id: str
    #: PNE Entity ID.
    pne_id: str
    #: Establishment ID chosen by the server (16 bytes).
    est_id: bytes
    #: The PNE's random (32 bytes), from its SETUP Request / SETUP Response.
    rand_pne: bytes
    #: RANDSVR (32 bytes), one per establishment.
    rand_server: bytes

    def __post_init__(self) -> None:
        if len(self.est_id) != _EST_ID_LEN:
            raise LocalProtocolError("est_id is 16 bytes")
        if len(self.rand_pne) != _RAND_LEN or len(self.rand_server) != _RAND_LEN:
            raise LocalProtocolError("rand_pne and rand_server are 32 bytes")

    def ids(self) -> tuple[Part, ...]:
        """``(pn_id, gw_id, server_id, pne_id, est_id)``."""
        return (self.pn_id, self.gw_id, self.server_id, self.pne_id, self.est_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class TKChallenge:
    """The TK part of the server's AUTHENTICATE Request for one PNE (000 §7.5.3)."""

    #: TK step t the AN is computed at.
    tk_step: int
    #: Index i of the EUKey the PNE must prove.
    key_index: int
    #: AN = MAC(TK_t, ...), 32 bytes.
    an: bytes
    # No range checks here: the PN GW and the PNE build it from received fields, and the
    # rules (window, index) refuse what is out of range with the right code.


@dataclass(frozen=True, slots=True, kw_only=True)
class PNETKPending:
    """What a PNE adopts once the server has proven it moved past its answer."""

    #: The TK step after the answered run (t + 1).
    tk_step: int
    #: Index of the next EUKey (j + 1; j when the chain was exhausted).
    key_index: int
    #: The next EUKey, or None when the chain was exhausted (keep the current one).
    eukey: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class PNETKState:
    """A PNE's TK-flow state: its confirmed TK and EUKey, plus the pending ones."""

    #: TK_c.
    tk: bytes = field(repr=False)
    #: Confirmed TK step c.
    tk_step: int
    #: EUKey_j, the current key.
    eukey: bytes = field(repr=False)
    #: j.
    key_index: int
    #: Set after answering, until the server is proven to have moved.
    pending: PNETKPending | None = None

    def __post_init__(self) -> None:
        _check_key(self.tk, "TK")
        _check_key(self.eukey, "EUKey")
        _check_step(self.tk_step)
        _check_index(self.key_index)


@dataclass(frozen=True, slots=True, kw_only=True)
class PNEAnswer:
    """What :func:`pne_answer` returns: the state to persist, then the response's fields."""

    #: New state; persist it before sending the response.
    state: PNETKState
    #: Seal(TK_t, EUKey_k) for the AUTHENTICATE Response.
    sealed_eukey: bytes
    #: k, the index of the proven EUKey (less than the challenge's when stale).
    key_index: int
    #: t, the TK step used.
    tk_step: int
    #: The session key SK (valid once the server's ``confirm`` verifies).
    sk: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayTKState:
    """A PN GW's TK state for one PNE: TK_g and g."""

    #: TK_g.
    tk: bytes = field(repr=False)
    #: g.
    tk_step: int

    def __post_init__(self) -> None:
        _check_key(self.tk, "TK")
        _check_step(self.tk_step)


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayTKPending:
    """The TK step the PN GW adopts when the server says OK for this PNE (t + 1)."""

    #: t + 1.
    tk_step: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayPrepared:
    """What :func:`gateway_prepare` returns."""

    #: New state (TK_t, t: the verified AN proves the server is at t); persist it.
    state: GatewayTKState
    #: Seal(TK_t, EUKey_{i+1}), or None when the chain is exhausted.
    sealed_next: bytes | None
    #: Adopt with :func:`gateway_confirmed` on the server's OK.
    pending: GatewayTKPending


@dataclass(frozen=True, slots=True, kw_only=True)
class TKVerified:
    """The server's verdict on a valid proof; commit it with the reply."""

    #: TK_{t+1}, the TK to store.
    tk: bytes = field(repr=False)
    #: t + 1.
    tk_step: int
    #: The index to store (k + 1, or k when the chain is exhausted).
    key_index: int
    #: k, the proven index.
    proven_index: int
    #: True when the chain is exhausted: the PN GW triggers a 003 re-assignment.
    reassign: bool
    #: The session key SK.
    sk: bytes = field(repr=False)
    #: The key confirmation for the PNE (PN Setup Response / PNEstablishmentNotify).
    confirm: bytes


# -- checks ------------------------------------------------------------------------------


def _check_key(key: bytes, what: str) -> None:
    if len(key) != KEY_LEN:
        raise LocalProtocolError(f"{what} is {KEY_LEN} bytes")


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not 0 <= step <= _MAX_STEP:
        raise LocalProtocolError("TK step out of range")


def _check_index(index: int) -> None:
    if isinstance(index, bool) or not 1 <= index <= MAX_CHAIN_LEN:
        raise LocalProtocolError(f"key index must be 1..{MAX_CHAIN_LEN}")


# -- ratchet -----------------------------------------------------------------------------


def ratchet(tk: bytes, n: int = 1) -> bytes:
    """TK_{t+n} from TK_t: ``n`` applications of Hash("cpns/v1/tk-ratchet", TK)."""
    if n < 0:
        raise LocalProtocolError("the TK ratchet only goes forward")
    for _ in range(n):
        tk = hash_values(RATCHET_LABEL, tk)
    return tk


def tk_forward(tk: bytes, step: int, target: int, *, window: int = TK_WINDOW) -> bytes:
    """TK_target from TK_step, if ``step <= target <= step + window``.

    Raises :class:`StaleCredential` otherwise. A target behind the held step cannot be
    computed (the ratchet is one-way): with honest parties that is an old message
    delivered late, so ``reassign`` is false. One beyond the window is refused so that a
    forged step cannot make the receiver hash without end; ``reassign`` is true (the
    receiver has lost track and needs a 003 re-assignment).
    """
    if target < step:
        raise StaleCredential(f"TK step {target} is behind the held step {step}", reassign=False)
    if target > step + window:
        raise StaleCredential(f"TK step {target} is beyond the window {step}+{window}")
    return ratchet(tk, target - step)


# -- derivations -------------------------------------------------------------------------


def next_index_of(key_index: int, chain_length: int) -> int:
    """The ``next_index`` bound into AN: i + 1 when the chain holds a key after EUKey_i
    (the PN GW must then deliver it sealed), 0 when EUKey_i is the last one."""
    return key_index + 1 if 1 <= key_index < chain_length else 0


def compute_an(tk_t: bytes, run: TKRun, tk_step: int, key_index: int, next_index: int) -> bytes:
    """AN of 000 §7.5.3 step 2: MAC under TK_t over the run, t, i and ``next_index``
    (:func:`next_index_of`), so nobody on the way can strip the next EUKey from a
    challenge and leave the PNE behind the server's index."""
    return mac(
        tk_t,
        AN_LABEL,
        run.server_id,
        run.gw_id,
        run.pn_id,
        run.pne_id,
        run.est_id,
        run.rand_pne,
        run.rand_server,
        tk_step,
        key_index,
        next_index,
    )


def verify_an(
    tk_t: bytes, run: TKRun, tk_step: int, key_index: int, next_index: int, an: bytes
) -> None:
    """Check AN (000 §7.5.1 step 1) in constant time; opaque failure."""
    if not hmac.compare_digest(compute_an(tk_t, run, tk_step, key_index, next_index), an):
        raise AuthenticationFailed("AN mismatch")


def _next_context(run: TKRun, tk_step: int, next_index: int) -> tuple[Part, ...]:
    return (run.gw_id, run.pne_id, run.est_id, tk_step, next_index)


def _current_context(run: TKRun, tk_step: int, key_index: int) -> tuple[Part, ...]:
    return (run.pne_id, run.server_id, run.est_id, tk_step, key_index)


def seal_next_eukey(
    tk_t: bytes, eukey: bytes, run: TKRun, tk_step: int, next_index: int, *, nonce: bytes
) -> bytes:
    """000 §7.5.2 step 2: the PN GW seals EUKey_{i+1} under TK_t."""
    return seal(
        tk_t,
        eukey,
        purpose=NEXT_EUKEY_PURPOSE,
        context=_next_context(run, tk_step, next_index),
        nonce=nonce,
    )


def open_next_eukey(tk_t: bytes, blob: bytes, run: TKRun, tk_step: int, next_index: int) -> bytes:
    """The PNE opens EUKey_{i+1}; opaque failure."""
    key = open_sealed(
        tk_t, blob, purpose=NEXT_EUKEY_PURPOSE, context=_next_context(run, tk_step, next_index)
    )
    if len(key) != KEY_LEN:
        raise AuthenticationFailed("sealed value rejected")
    return key


def seal_current_eukey(
    tk_t: bytes, eukey: bytes, run: TKRun, tk_step: int, key_index: int, *, nonce: bytes
) -> bytes:
    """000 §7.5.1 step 2: the PNE seals its current EUKey_k under TK_t."""
    return seal(
        tk_t,
        eukey,
        purpose=CURRENT_EUKEY_PURPOSE,
        context=_current_context(run, tk_step, key_index),
        nonce=nonce,
    )


def open_current_eukey(tk_t: bytes, blob: bytes, run: TKRun, tk_step: int, key_index: int) -> bytes:
    """000 §7.5.3: the server opens EUKey_k; opaque failure."""
    key = open_sealed(
        tk_t,
        blob,
        purpose=CURRENT_EUKEY_PURPOSE,
        context=_current_context(run, tk_step, key_index),
    )
    if len(key) != KEY_LEN:
        raise AuthenticationFailed("sealed value rejected")
    return key


def tk_session_key(eukey: bytes, tk_t: bytes, run: TKRun, tk_step: int, key_index: int) -> bytes:
    """SK = KEY_DERIVATION(EUKey_k || TK_t) with both fresh randoms as salt (D-000-3)."""
    return derive_key(
        eukey + tk_t,
        salt=run.rand_pne + run.rand_server,
        label=SESSION_KEY_LABEL,
        context=(*run.ids(), tk_step, key_index),
    )


def compute_confirm(sk: bytes, run: TKRun, tk_step: int, key_index: int) -> bytes:
    """The server's key confirmation to the PNE (D-000-4)."""
    return mac(sk, CONFIRM_LABEL, *run.ids(), run.rand_pne, run.rand_server, tk_step, key_index)


def verify_confirm(sk: bytes, run: TKRun, tk_step: int, key_index: int, tag: bytes) -> None:
    """Check the key confirmation; opaque failure."""
    verify_mac(
        sk, tag, CONFIRM_LABEL, *run.ids(), run.rand_pne, run.rand_server, tk_step, key_index
    )


# -- server (000 §7.5.3) -----------------------------------------------------------------


def server_challenge(
    *, tk: bytes, tk_step: int, key_index: int, chain_length: int, run: TKRun
) -> TKChallenge:
    """The challenge at the stored ``(TK_s, s, i_s)``: steps 1-2 of 000 §7.5.3.

    ``chain_length`` is n of the PNE's chain: AN says whether a next EUKey follows."""
    _check_key(tk, "TK")
    next_index = next_index_of(key_index, chain_length)
    return TKChallenge(
        tk_step=tk_step,
        key_index=key_index,
        an=compute_an(tk, run, tk_step, key_index, next_index),
    )


def server_verify(
    *,
    tk: bytes,
    tk_step: int,
    eukeys: Sequence[bytes],
    key_index: int,
    run: TKRun,
    challenge_step: int,
    challenge_index: int,
    sealed_eukey: bytes,
    proof_index: int,
) -> TKVerified:
    """000 §7.5.3, on the AUTHENTICATE Response: open and check EUKey_k, ratchet, SK.

    ``tk``/``tk_step``/``key_index`` are the stored state *now* (``TK_s, s, i_s``),
    ``eukeys`` the PNE's chain (list index 0 holds EUKey_1), ``challenge_step`` and
    ``challenge_index`` the ``(t, i)`` of this run's challenge (kept in the pending
    establishment) and ``proof_index`` the index k the PNE says it proved.

    Raises :class:`~cpns.errors.AuthenticationFailed` (one opaque failure) if the proof
    does not open or is not EUKey_k of the chain; :class:`StaleCredential` with
    ``reassign=False`` if another run moved the state since this challenge, and with
    ``reassign=True`` for a valid proof of a key older than the stored index (a PNE
    restored from a backup, or an old key replayed by a TK holder).
    """
    t, i = challenge_step, challenge_index
    if t < tk_step or (t == tk_step and i != key_index):
        raise StaleCredential("challenge superseded by another run", reassign=False)
    tk_t = tk_forward(tk, tk_step, t)
    n = len(eukeys)
    valid_index = not isinstance(proof_index, bool) and 1 <= proof_index <= min(i, n)
    k = proof_index if valid_index else min(i, n)
    try:
        eukey = open_current_eukey(tk_t, sealed_eukey, run, t, k)
    except AuthenticationFailed:
        eukey = b""
    expected = eukeys[k - 1] if 1 <= k <= n else bytes(KEY_LEN)
    # One comparison whatever failed, so the time does not tell which check it was.
    if not (hmac.compare_digest(eukey, expected) and valid_index):
        raise AuthenticationFailed("TK proof rejected")
    if k < key_index or k < i:
        raise StaleCredential(f"EUKey {k} is older than the stored index {key_index}")
    sk = tk_session_key(eukey, tk_t, run, t, k)
    exhausted = k >= n
    return TKVerified(
        tk=ratchet(tk_t),
        tk_step=t + 1,
        key_index=k if exhausted else k + 1,
        proven_index=k,
        reassign=exhausted,
        sk=sk,
        confirm=compute_confirm(sk, run, t, k),
    )


# -- PN GW (000 §7.5.2) ------------------------------------------------------------------


def gateway_prepare(
    state: GatewayTKState,
    *,
    eukeys: Sequence[bytes],
    run: TKRun,
    challenge: TKChallenge,
    nonce: bytes,
) -> GatewayPrepared:
    """000 §7.5.2 steps 1-3: check AN, select and seal EUKey_{i+1}, ratchet.

    The PN GW holds the TK, so it checks AN before touching the PNE's set (ours). A
    verified AN at ``t`` proves the server is at ``t``: the returned state holds TK_t. The
    ratcheted TK_{t+1} becomes the state only through :func:`gateway_confirmed`.

    Raises :class:`StaleCredential` for a step outside ``[g, g + TK_WINDOW]`` (behind:
    ``reassign`` false, an old challenge; beyond: true, the PN GW lost track),
    :class:`~cpns.errors.AuthenticationFailed` for a wrong AN or an index not in the set.
    """
    if challenge.tk_step < state.tk_step:
        # The server never goes back: this is an old challenge delivered late.
        raise StaleCredential("challenge older than the held TK step", reassign=False)
    tk_t = tk_forward(state.tk, state.tk_step, challenge.tk_step)
    i = challenge.key_index
    verify_an(tk_t, run, challenge.tk_step, i, next_index_of(i, len(eukeys)), challenge.an)
    if not 1 <= i <= len(eukeys):
        raise AuthenticationFailed("key index outside the held set")
    sealed_next = None
    if i < len(eukeys):
        sealed_next = seal_next_eukey(tk_t, eukeys[i], run, challenge.tk_step, i + 1, nonce=nonce)
    return GatewayPrepared(
        state=GatewayTKState(tk=tk_t, tk_step=challenge.tk_step),
        sealed_next=sealed_next,
        pending=GatewayTKPending(tk_step=challenge.tk_step + 1),
    )


def gateway_confirmed(state: GatewayTKState, pending: GatewayTKPending) -> GatewayTKState:
    """The server said OK for this PNE: adopt TK_{t+1} (never move backwards)."""
    if pending.tk_step <= state.tk_step:
        return state
    return GatewayTKState(
        tk=tk_forward(state.tk, state.tk_step, pending.tk_step), tk_step=pending.tk_step
    )


# -- PNE (000 §7.5.1) --------------------------------------------------------------------


def pne_answer(
    state: PNETKState,
    *,
    run: TKRun,
    challenge: TKChallenge,
    sealed_next: bytes | None,
    nonce: bytes,
) -> PNEAnswer:
    """000 §7.5.1 steps 1-5: check AN, seal the current EUKey, move to the next one.

    Rules (docs/procedures/tk-authentication.md, "Resynchronisation"):

    * the challenge's step ``t`` must be in ``[c, c + TK_WINDOW]``, else
      :class:`StaleCredential` (behind: a late challenge, ``reassign`` false; beyond:
      ``reassign`` true); a wrong AN is an opaque failure; a verified AN at ``t`` proves
      the server is at ``t``, so the returned state holds TK_t;
    * index ``j``: prove EUKey_j, the pending state becomes (t+1, EUKey_{j+1}) where
      EUKey_{j+1} is the opened ``sealed_next``, checked against the chain (none when the
      PN GW sends none: the chain is exhausted and EUKey_j stays);
    * index ``j+1`` with a pending EUKey_{j+1}: the server moved, so it becomes current
      first; then as above;
    * an index beyond what the PNE holds (restored from a backup): prove EUKey_j anyway,
      so the server can answer STALE_CREDENTIAL and trigger a re-assignment;
    * an index below ``j``: the PNE's chain was replaced and it missed the new one (or
      the server went back); :class:`StaleCredential` with ``reassign`` true.

    Persist ``PNEAnswer.state`` (pending key included) before sending the answer.
    """
    t, i = challenge.tk_step, challenge.key_index
    tk_t = tk_forward(state.tk, state.tk_step, t)
    # AN says whether a next EUKey must come with the challenge: one that was stripped
    # on the way fails here, before the PNE answers (and before the server moves on).
    verify_an(tk_t, run, t, i, i + 1 if sealed_next is not None else 0, challenge.an)
    eukey, j = state.eukey, state.key_index
    pending = state.pending
    if i == j + 1 and pending is not None and pending.eukey is not None:
        if pending.key_index == i:
            eukey, j = pending.eukey, i
    if i < j:
        raise StaleCredential(f"server asks for EUKey {i}, the PNE holds {j}")
    new_pending: PNETKPending | None = None
    if i == j:
        next_key: bytes | None = None
        if sealed_next is not None:
            next_key = open_next_eukey(tk_t, sealed_next, run, t, j + 1)
            verify_chain_step(eukey, next_key)
        new_pending = PNETKPending(
            tk_step=t + 1,
            key_index=j if next_key is None else j + 1,
            eukey=next_key,
        )
    sealed = seal_current_eukey(tk_t, eukey, run, t, j, nonce=nonce)
    return PNEAnswer(
        state=PNETKState(tk=tk_t, tk_step=t, eukey=eukey, key_index=j, pending=new_pending),
        sealed_eukey=sealed,
        key_index=j,
        tk_step=t,
        sk=tk_session_key(eukey, tk_t, run, t, j),
    )


def pne_confirmed(
    state: PNETKState, *, run: TKRun, answer: PNEAnswer, confirm: bytes
) -> PNETKState:
    """000 §7.5.1, on the PN Setup Response: verify ``confirm``, adopt the pending state.

    ``answer`` is what :func:`pne_answer` returned for this run. A confirmation of an
    older run (the PNE has answered another one since) verifies but changes nothing,
    so a late confirmation can never move the PNE past what the server has proven.
    """
    verify_confirm(answer.sk, run, answer.tk_step, answer.key_index, confirm)
    pending = state.pending
    if (
        pending is None
        or state.key_index != answer.key_index
        or pending.tk_step != answer.tk_step + 1
    ):
        return state
    return PNETKState(
        tk=tk_forward(state.tk, state.tk_step, pending.tk_step),
        tk_step=pending.tk_step,
        eukey=pending.eukey if pending.eukey is not None else state.eukey,
        key_index=pending.key_index,
        pending=None,
    )


def pne_tk_at(state: PNETKState, step: int, *, window: int = REASSIGN_WINDOW) -> bytes:
    """TK at ``step`` computed forward from the confirmed TK (to open a 003 re-assignment).

    Raises :class:`StaleCredential` if ``step`` is behind the confirmed step or more than
    ``window`` ahead.
    """
    return tk_forward(state.tk, state.tk_step, step, window=window)


def pne_reassigned(
    state: PNETKState | None,
    *,
    tk: bytes,
    tk_step: int,
    eukey: bytes,
    key_index: int = 1,
) -> PNETKState:
    """The PNE installed the first key of a new 003 chain, opened with TK at ``tk_step``.

    ``tk`` is that TK (from :func:`pne_tk_at`, or the manufacturer TK at step 0 for a
    first assignment). The old chain, and any pending state, are dropped.
    """
    if state is not None and tk_step < state.tk_step:
        raise StaleCredential("re-assignment at a TK step behind the PNE's")
    return PNETKState(tk=tk, tk_step=tk_step, eukey=eukey, key_index=key_index, pending=None)
