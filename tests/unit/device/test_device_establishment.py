"""The PNE agent's part of PN Establishment (cpns.device.establishment): its stored TK-flow
state, its status view, its control socket and what it refuses before sending anything.
The exchanges themselves run in tests/unit/gateway/test_gateway_pn_establishment.py (in
memory) and tests/integration/test_pn_establishment_e2e.py (real processes)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import FixedRandom

from cpns.device.agent import device_status, init_device
from cpns.device.establishment import AgentControl, PNEParticipant, pns_view, tk_state_of
from cpns.errors import ConfigurationError
from cpns.protocol import tk_auth
from cpns.store.keystore import LocalKeyStore

TK = b"t" * 32
EUKEY = b"e" * 32


class _Holder:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def save(self, data: dict[str, Any]) -> None:
        self.data = data


def _tk_data(**extra: Any) -> dict[str, Any]:
    return {
        "entity_id": "pne-1",
        "credential": "tk",
        "tk": TK,
        "eukey": EUKEY,
        "key_index": 1,
        "txid": b"x" * 16,
        **extra,
    }


def test_tk_state_starts_at_the_assignment_and_follows_what_was_stored() -> None:
    """000 with our resync rule: a PNE with a 003 key starts its TK flow at the TK's step 0
    with EUKey_i; once it answered, the stored state (pending key included) is used, as
    long as it belongs to the same 003 assignment (txid); a new assignment starts again."""
    assert tk_state_of(_tk_data()) == tk_auth.PNETKState(tk=TK, tk_step=0, eukey=EUKEY, key_index=1)
    stored = {
        "txid": b"x" * 16,
        "tk": b"u" * 32,
        "tk_step": 3,
        "eukey": b"f" * 32,
        "key_index": 2,
        "pending": {"tk_step": 4, "key_index": 3, "eukey": b"g" * 32},
    }
    state = tk_state_of(_tk_data(tk_auth=stored))
    assert state is not None
    assert (state.tk_step, state.key_index) == (3, 2)
    assert state.pending == tk_auth.PNETKPending(tk_step=4, key_index=3, eukey=b"g" * 32)
    reassigned = tk_state_of(_tk_data(tk_auth=stored, txid=b"y" * 16))
    assert reassigned is not None
    assert (reassigned.tk_step, reassigned.key_index) == (0, 1)


def test_a_pne_with_ui_or_without_key_has_no_tk_state() -> None:
    """A PNE enrolled with UI uses the rand/hash flow (002 §7.5.4); no key: nothing."""
    assert tk_state_of({"credential": "ui", "eukey": EUKEY, "tk": TK}) is None
    assert tk_state_of({"entity_id": "pne-1", "tk": TK, "eukey": None}) is None


def test_status_shows_pns_and_flags_never_keys(tmp_path: Path) -> None:
    """``cpns device status`` lists the PNs joined with flow and flags (session key,
    LocalEUKey, local session key held), and the TK flow's position; never a key."""
    init_device(tmp_path, "pne-1", TK)
    store = LocalKeyStore.open_or_create(tmp_path, "device")
    with store.lock():
        data = store.load()
        data.update(
            credential="tk",
            eukey=EUKEY,
            key_index=1,
            txid=b"x" * 16,
            pns={
                "pn-1": {
                    "status": "member",
                    "gw_id": "gw-1",
                    "est_id": "00" * 16,
                    "flow": "tk",
                    "at": 5,
                    "sk": b"s" * 32,
                    "local_eukey": b"l" * 32,
                    "local_sk": None,
                }
            },
        )
        store.save(data)
    view = device_status(tmp_path)
    assert view["tk_step"] == 0
    assert view["pns"] == [
        {
            "pn_id": "pn-1",
            "status": "member",
            "gateway_id": "gw-1",
            "est_id": "00" * 16,
            "flow": "tk",
            "at": 5,
            "session_key": True,
            "local_eukey": True,
            "local_session": False,
        }
    ]
    assert "sss" not in repr(view)
    assert "lll" not in repr(view)
    assert pns_view({}) == []


def test_establish_needs_a_link_a_gateway_id_and_a_key() -> None:
    """``cpns device establish`` on an agent that cannot originate is refused locally,
    with a reason, and sends nothing."""

    async def scenario() -> None:
        sent: list[object] = []

        async def send(message: object) -> None:
            sent.append(message)

        participant = PNEParticipant(
            _Holder({"entity_id": "pne-1", "credential": "ui", "eukey": EUKEY}),
            rng=FixedRandom(0),
            clock=lambda: 0,
        )
        with pytest.raises(ConfigurationError, match="not attached"):
            await participant.establish("pn-1")
        participant.attach(send)
        with pytest.raises(ConfigurationError, match="--gateway-id"):
            await participant.establish("pn-1")
        keyless = PNEParticipant(
            _Holder({"entity_id": "pne-1", "tk": TK, "eukey": None}),
            rng=FixedRandom(0),
            clock=lambda: 0,
            gateway_id="gw-1",
        )
        keyless.attach(send)
        with pytest.raises(ConfigurationError, match="no EUKey"):
            await keyless.establish("pn-1")
        assert sent == []

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"not json", "MALFORMED_MESSAGE"),
        (b"[1]", "MALFORMED_MESSAGE"),
        (b'{"op": "dance"}', "MALFORMED_MESSAGE"),
        (b'{"op": "establish"}', "MALFORMED_MESSAGE"),
        (b'{"op": "establish", "pn_id": "pn-1", "timeout": 0}', "MALFORMED_MESSAGE"),
        (b'{"op": "establish", "pn_id": "pn-1", "invite": "pne-2"}', "MALFORMED_MESSAGE"),
        (b'{"op": "establish", "pn_id": "pn-1"}', "NOT_READY"),
        (b'{"op": "status"}', "OK"),
    ],
)
def test_control_socket_requests(line: bytes, status: str) -> None:
    """The agent's control socket answers every line with one JSON object: a malformed
    request is MALFORMED_MESSAGE, an establish the agent cannot start is NOT_READY."""
    participant = PNEParticipant(
        _Holder({"entity_id": "pne-1"}), rng=FixedRandom(0), clock=lambda: 0
    )
    reply = asyncio.run(AgentControl(participant).op(line))
    assert reply["status"] == status
    json.dumps(reply)
