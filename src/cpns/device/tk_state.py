"""A PNE's stored TK-flow state (000 ratchet, 003 re-assignment) in its key store's map.

The device key store's map keeps the manufacturer TK under ``"tk"`` (never changed: it is
what the label's claim code derives from) and, under ``"tk_auth"``, the TK-flow state
(:class:`~cpns.protocol.tk_auth.PNETKState`) of the 003 assignment it belongs to (its
``txid``)::

    "tk_auth": {"txid", "tk", "tk_step", "eukey", "key_index",
                "pending": None | {"tk_step", "key_index", "eukey"}}

A 003 (re-)assignment writes it with the TK at the Notification's step; TK-based
authentications advance it. A store without it (written before steps were kept), or whose
state belongs to another assignment, is read as the assignment's start: the manufacturer
TK at step 0 with the EUKey held.

Nothing here does I/O.
"""

from __future__ import annotations

from typing import Any

from cpns.crypto.hashing import KEY_LEN
from cpns.protocol import tk_auth

__all__ = ["encode_tk_state", "tk_state_of"]


def tk_state_of(data: dict[str, Any]) -> tk_auth.PNETKState | None:
    """The PNE's TK-flow state: the stored one if it belongs to the 003 assignment held
    (same txid), else the assignment's start (its TK at step 0, EUKey_i). None for a PNE
    without a 003 chain (credential ``ui``, or no key yet), or whose manufacturer TK is not
    of 32 bytes (the TK flow's keys are)."""
    if data.get("credential") == "ui":
        return None
    eukey, tk, txid = data.get("eukey"), data.get("tk"), data.get("txid")
    if not isinstance(eukey, bytes) or not isinstance(tk, bytes):
        return None
    stored = data.get("tk_auth")
    if isinstance(stored, dict) and stored.get("txid") == txid:
        pending = stored.get("pending")
        return tk_auth.PNETKState(
            tk=stored["tk"],
            tk_step=int(stored["tk_step"]),
            eukey=stored["eukey"],
            key_index=int(stored["key_index"]),
            pending=None
            if not isinstance(pending, dict)
            else tk_auth.PNETKPending(
                tk_step=int(pending["tk_step"]),
                key_index=int(pending["key_index"]),
                eukey=pending.get("eukey"),
            ),
        )
    if len(tk) != KEY_LEN:  # a manufacturer TK that cannot serve the TK flow
        return None
    return tk_auth.PNETKState(tk=tk, tk_step=0, eukey=eukey, key_index=int(data["key_index"]))


def encode_tk_state(state: tk_auth.PNETKState, txid: object) -> dict[str, Any]:
    """The ``"tk_auth"`` map of ``state``, for the assignment ``txid``."""
    pending = state.pending
    return {
        "txid": txid,
        "tk": state.tk,
        "tk_step": state.tk_step,
        "eukey": state.eukey,
        "key_index": state.key_index,
        "pending": None
        if pending is None
        else {"tk_step": pending.tk_step, "key_index": pending.key_index, "eukey": pending.eukey},
    }
