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
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers import field_strategy
from tests.pn_world import PN_ID, SERVER_ID, Outcome, World

from cpns.errors import ErrorCode
from cpns.messages.codec import encode
from cpns.messages.model import Message, Record, specs
from cpns.protocol.pn_establishment import PNEJoined

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
