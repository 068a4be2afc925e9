"""The PNE's stored TK-flow state (cpns.device.tk_state): the key store's "tk_auth" map
(docs/procedures/eukey-assignment.md, re-assignment after TK-based authentications)."""

from __future__ import annotations

from typing import Any

from tests.helpers import TKS

from cpns.device.tk_state import encode_tk_state, tk_state_of
from cpns.protocol.tk_auth import PNETKPending, PNETKState, ratchet

TXID = b"\x07" * 16
EUKEY = b"\xe1" * 32


def _store(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "entity_id": "pne-1",
        "tk": TKS["pne-1"],
        "credential": "tk",
        "eukey": EUKEY,
        "key_index": 1,
        "txid": TXID,
    }
    data.update(changes)
    return data


def test_state_round_trips_with_and_without_pending() -> None:
    """The state stored for the assignment held (same txid) is read back as it was."""
    for pending in (None, PNETKPending(tk_step=8, key_index=3, eukey=b"\x02" * 32)):
        state = PNETKState(
            tk=ratchet(TKS["pne-1"], 7), tk_step=7, eukey=EUKEY, key_index=2, pending=pending
        )
        assert tk_state_of(_store(tk_auth=encode_tk_state(state, TXID))) == state


def test_no_state_or_another_assignments_state_is_the_manufacturer_tk_at_step_zero() -> None:
    """A store without "tk_auth" (written before steps were kept), or with the state of
    another assignment, reads as the held assignment's start: manufacturer TK, step 0."""
    start = PNETKState(tk=TKS["pne-1"], tk_step=0, eukey=EUKEY, key_index=1)
    assert tk_state_of(_store()) == start
    other = PNETKState(tk=ratchet(TKS["pne-1"], 4), tk_step=4, eukey=EUKEY, key_index=1)
    assert tk_state_of(_store(tk_auth=encode_tk_state(other, b"\x08" * 16))) == start


def test_no_tk_flow_state_without_a_003_chain_or_for_a_16_byte_tk() -> None:
    """No state for a PNE with UI, without a key yet, or whose manufacturer TK is not of
    32 bytes (the TK flow's keys are)."""
    assert tk_state_of(_store(credential="ui")) is None
    assert tk_state_of(_store(eukey=None)) is None
    assert tk_state_of(_store(tk=TKS["pne-2"])) is None
