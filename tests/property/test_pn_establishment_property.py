"""PN Establishment machines under an adversary on every link (STYLE §8; issue 6 item 9).

A random PN (1..6 PNEs of both credential kinds, some asking for a LocalEUKey) is
established in the in-memory world of tests/pn_world.py while an adversary drops,
duplicates, re-addresses and alters any message (any field, nested entries included).
Then the same PNEs establish again over clean links. Properties:

* no machine raises anything but LocalProtocolError on a terminal machine (the world does
  not feed those);
* safety (002 §7.5.4.1 last paragraph): a PNE that counts itself a member holds the SK the
  server derived for it, and the server recorded it as a member; no SK and no LocalEUKey
  ever appears in a message; a LocalEUKey the PNE stored is the one the PN GW stored;
* every establishment ends (the PN GW reaches DONE or FAILED) and the server keeps no
  pending state once it answered the AUTHENTICATE Response;
* liveness (N1): after the adversarial run, a clean establishment makes every PNE a
  member: nothing the adversary did locks a PNE out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers import ANY_MESSAGE, FixedRandom, field_strategy
from tests.pn_world import GW_ID, PN_ID, SERVER_ID, Outcome, World

from cpns.errors import ErrorCode, LocalProtocolError
from cpns.messages.codec import decode, encode
from cpns.messages.constants import AuthFlow
from cpns.messages.model import Message, PNSetupRequest, Record, specs
from cpns.protocol._machine import Machine, ProcedureFailed
from cpns.protocol.local_auth import LocalAuthGateway, LocalAuthPNE
from cpns.protocol.pn_establishment import (
    EstablishmentPending,
    GatewayEstablishment,
    OriginatingPNE,
    PendingPNE,
    PNEJoined,
    ServerCompletion,
    ServerSetup,
)

ACTIONS = st.sampled_from(["pass"] * 12 + ["drop", "duplicate", "alter", "alter-entry", "redirect"])


def _alter(draw: st.DrawFn, record: Record) -> Record:
    fields = specs(type(record))
    scalar = [(n, s) for n, s in fields if s.kind not in ("records",)]
    if not scalar:
        return record
    name, spec = draw(st.sampled_from(scalar))
    value = draw(field_strategy(spec))
    try:
        return dataclasses.replace(record, **{name: value})
    except ValueError:  # e.g. a required PN ID set to None
        return record


def _alter_entry(draw: st.DrawFn, message: Message) -> Message:
    lists = [n for n, s in specs(type(message)) if s.kind == "records"]
    if not lists:
        return message
    name = draw(st.sampled_from(lists))
    entries: tuple[Record, ...] = getattr(message, name)
    if not entries:
        return message
    i = draw(st.integers(0, len(entries) - 1))
    changed = (*entries[:i], _alter(draw, entries[i]), *entries[i + 1 :])
    try:
        return dataclasses.replace(message, **{name: changed})  # type: ignore[arg-type]
    except ValueError:
        return message


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 6))
    kinds = draw(st.lists(st.sampled_from(["rand-hash", "tk"]), min_size=n, max_size=n))
    local = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    chain = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    return {"kinds": kinds, "local": local, "chain": chain, "seed": draw(st.integers(0, 2**16))}


def _world(scenario: dict[str, Any]) -> tuple[World, list[str], set[str]]:
    world = World(scenario["seed"])
    ids = []
    for i, (kind, length) in enumerate(zip(scenario["kinds"], scenario["chain"], strict=True)):
        pne_id = f"pne-{i}"
        if kind == "tk":
            world.add_tk_pne(pne_id, chain_length=length)
        else:
            world.add_rand_hash_pne(pne_id)
        ids.append(pne_id)
    local = {p for p, wants in zip(ids, scenario["local"], strict=True) if wants}
    return world, ids, local


def _check_safety(world: World, outcome: Outcome, ids: list[str]) -> None:
    established = [e for e in outcome.server if type(e).__name__ == "PNEstablished"]
    results = {r.pne_id: r for e in established for r in e.results}  # type: ignore[attr-defined]
    wire = b"".join(encode(m) for m in outcome.delivered)
    for pne_id in ids:
        for event in outcome.pnes.get(pne_id, []):
            if isinstance(event, PNEJoined):
                result = results.get(pne_id)
                assert result is not None, "a PNE accepted a server that never answered for it"
                assert result.status is ErrorCode.OK
                assert result.sk == event.sk
                assert event.sk not in wire
        local = world.pnes[pne_id].local_eukey
        if local is not None:
            assert local not in wire
            gw_copy = world.gw_local.get((pne_id, PN_ID))
            assert gw_copy is None or gw_copy == local


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios(), data=st.data())
def test_adversarial_links_then_clean_links(scenario: dict[str, Any], data: st.DataObject) -> None:
    """Issue 6 item 9 / N1 (safety and liveness), 002 §7.5.4 and 000 §7.5: whatever the
    adversary does to the messages of one establishment, no PNE accepts a forged server or
    a key it does not share, the establishment ends, and a later clean establishment makes
    every PNE a member again."""
    world, ids, local = _world(scenario)
    ids_and_server = [*ids, SERVER_ID, "gw-alice"]

    def tamper(message: Message) -> Message | list[Message] | None:
        action = data.draw(ACTIONS, label="action")
        if action == "drop":
            # the HTTP link is reliable or reported down; a PAN message may vanish
            return None
        if action == "duplicate" and SERVER_ID not in (message.src, message.dst):
            return [message, message]
        if action == "alter":
            changed = _alter(data.draw, message)
            assert isinstance(changed, Message)
            return changed
        if action == "alter-entry":
            return _alter_entry(data.draw, message)
        if action == "redirect":
            dst = data.draw(st.sampled_from(ids_and_server), label="dst")
            return dataclasses.replace(message, dst=dst)
        return message

    first = world.establish(ids[0], ids[1:], local=local, tamper=tamper)
    _check_safety(world, first, ids)
    second = world.establish(ids[0], ids[1:])
    _check_safety(world, second, ids)
    finished = {e.est_id for e in second.server if type(e).__name__ == "PNEstablished"}  # type: ignore[attr-defined]
    assert not finished & {est_id for _, est_id in world.pending}
    status = second.server_status()
    for pne_id in ids:
        assert status[pne_id] is ErrorCode.OK, (pne_id, status)
        assert second.joined(pne_id) is not None, pne_id


# -- every role, any message ------------------------------------------------------------------


def _roles() -> dict[str, Callable[[], Machine[Any]]]:
    world = World(99)
    world.add_rand_hash_pne("pne-0")
    world.add_tk_pne("pne-1")
    gw_key = world.gw_eukey
    pending = EstablishmentPending(
        gw_id=GW_ID,
        est_id=b"\x01" * 16,
        pn_id=PN_ID,
        rand_server=b"\x02" * 32,
        created_at=world.now,
        expires_at=world.now + 300,
        entries=(
            PendingPNE(
                pne_id="pne-0", rand_pne=b"\x03" * 32, status=ErrorCode.OK, flow=AuthFlow.RAND_HASH
            ),
        ),
    )

    def gateway_after_setup() -> Machine[Any]:
        gateway = GatewayEstablishment(
            gw_id=GW_ID,
            gw_eukey=gw_key,
            server_id=SERVER_ID,
            rng=FixedRandom(1),
            tk_lookup=world.gw_tk.get,
        )
        gateway.receive(
            PNSetupRequest(
                txid=b"\x05" * 16,
                src="pne-0",
                dst=GW_ID,
                pn_id=PN_ID,
                rand_pne=b"\x06" * 32,
                local_eukey=True,
                invite=("pne-1",),
            )
        )
        gateway.messages_to_send()
        return gateway

    def originating() -> Machine[Any]:
        pne = world.pne_machine("pne-0", invited=False)
        assert isinstance(pne, OriginatingPNE)
        pne.start(pn_id=PN_ID)
        pne.messages_to_send()
        return pne

    def local_pne() -> Machine[Any]:
        pne = LocalAuthPNE(
            pne_id="pne-0", gw_id=GW_ID, pn_id=PN_ID, local_eukey=b"\x07" * 32, rng=FixedRandom(2)
        )
        pne.start()
        pne.messages_to_send()
        return pne

    return {
        "server-setup": lambda: ServerSetup(
            server_id=SERVER_ID,
            requester=GW_ID,
            lookups=world.lookups(),
            rng=FixedRandom(3),
            now=world.now,
        ),
        "server-completion": lambda: ServerCompletion(
            server_id=SERVER_ID,
            requester=GW_ID,
            pending=pending,
            lookups=world.lookups(),
            now=world.now,
        ),
        "gateway": lambda: GatewayEstablishment(
            gw_id=GW_ID,
            gw_eukey=gw_key,
            server_id=SERVER_ID,
            rng=FixedRandom(4),
            tk_lookup=world.gw_tk.get,
        ),
        "gateway-after-setup": gateway_after_setup,
        "originating-pne": originating,
        "invited-pne": lambda: world.pne_machine("pne-1", invited=True),
        "local-pne": local_pne,
        "local-gateway": lambda: LocalAuthGateway(
            gw_id=GW_ID, local_eukey=lambda _p, _n: b"\x07" * 32, rng=FixedRandom(5)
        ),
    }


ROLES = _roles()


@pytest.mark.parametrize("role", sorted(ROLES))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=ANY_MESSAGE)
def test_any_message_in_a_live_state(role: str, message: Message) -> None:
    """STYLE §5/§8: whatever valid message a role gets, receive() never raises; the role
    either moves on, ignores it (the PN GW, for a PAN message out of turn), or ends in FAILED
    with exactly one ProcedureFailed; whatever it queues round-trips through the codec."""
    machine = ROLES[role]()
    events = machine.receive(message)
    failures = [e for e in events if isinstance(e, ProcedureFailed)]
    assert len(failures) <= 1
    if machine.state.name == "FAILED":
        assert len(failures) == 1
    else:
        assert not failures
    for queued in machine.messages_to_send():
        assert decode(encode(queued)) == queued
    if machine.terminal:
        with pytest.raises(LocalProtocolError):
            machine.receive(message)
