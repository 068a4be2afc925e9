"""The PN GW's typed PNE records (cpns.gateway.records): they encode to the key store's
map format earlier releases wrote, decode it back unchanged, and refuse stored maps of
the wrong shape with a StoreError naming what is wrong."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from cpns.errors import StoreError
from cpns.gateway.records import (
    Enrolment,
    KeySet,
    MalformedRecord,
    Membership,
    PendingRequest,
    PNERecord,
    TKHolding,
    pn_routes,
    status_view,
)

TXID = bytes(range(16))


def _request_map() -> dict[str, Any]:
    """A request as the pre-typed daemon stored it."""
    return {"txid": TXID, "encoded": b"\xa1cbor", "user_id": "alice", "created_at": 1_700_000_000}


def _set_map(**changes: Any) -> dict[str, Any]:
    """A key set as the pre-typed daemon stored it (before delivery)."""
    data: dict[str, Any] = {
        "txid": TXID,
        "user_id": "alice",
        "tk": b"t" * 32,
        "eukeys": [b"a" * 32, b"b" * 32],
        "key_index": 1,
        "epoch": 2,
        "delivered": False,
        "stored_at": 1_700_000_001,
        "flow": b"f" * 8,
    }
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "stored",
    [
        {},
        {"request": _request_map()},
        {"set": _set_map(), "last_status": "OK"},
        {"set": _set_map(delivered=True, delivered_at=1_700_000_002), "last_status": "OK"},
        {"request": _request_map(), "set": _set_map(), "last_status": "CLAIM_CONFLICT"},
        {"last_status": "WRONG_PASSWORD"},
        {"set": _set_map(tk_step=7), "last_status": "OK"},
    ],
    ids=["empty", "requested", "stored", "delivered", "re-requested", "refused", "at-step"],
)
def test_stored_maps_round_trip_unchanged(stored: dict[str, Any]) -> None:
    """Compatibility both ways: a map the earlier daemon wrote decodes, and encodes back
    to the very same map (same keys, same types), so either release reads the other's."""
    assert PNERecord.decode(stored).encode() == stored


def test_typed_records_round_trip() -> None:
    """A record built in memory survives encode and decode as an equal value."""
    record = PNERecord(
        request=PendingRequest(txid=TXID, encoded=b"x", user_id="bob", created_at=5),
        key_set=KeySet(txid=TXID, user_id="bob", tk=b"t" * 32, eukeys=(b"k" * 32,), key_index=1),
        last_status="OK",
    )
    assert PNERecord.decode(record.encode()) == record


def test_records_from_before_epochs_and_flows_get_defaults() -> None:
    """A key set stored before epochs, store times and flow IDs were kept is read with
    epoch 1 and no time or flow (what the daemon assumed for them before)."""
    old = _set_map()
    for key in ("epoch", "stored_at", "flow"):
        del old[key]
    key_set = KeySet.decode(old)
    assert (key_set.epoch, key_set.stored_at, key_set.flow) == (1, None, None)


def test_a_key_set_at_a_tk_step_round_trips_and_old_sets_are_step_zero() -> None:
    """Rule 7 (re-assignment after TK-based authentications): the PN GW keeps the TK step
    of the set's TK; a set stored before steps were kept (no "tk_step") reads as step 0,
    the manufacturer TK, and a step-0 set is written without the key as before."""
    at_step = KeySet(
        txid=TXID, user_id="bob", tk=b"t" * 32, eukeys=(b"k" * 32,), key_index=1, tk_step=12
    )
    assert KeySet.decode(at_step.encode()) == at_step
    assert at_step.encode()["tk_step"] == 12
    old = KeySet.decode(_set_map())
    assert old.tk_step == 0
    assert "tk_step" not in old.encode()


def test_stage_follows_the_procedure() -> None:
    """requested while a request is outstanding, then stored, then delivered; none when
    only a refusal is on record. Only an undelivered set is pending."""
    key_set = KeySet.decode(_set_map())
    request = PendingRequest.decode(_request_map())
    assert PNERecord(last_status="REPLAY").stage == "none"
    assert PNERecord(request=request, key_set=key_set).stage == "requested"
    assert PNERecord(key_set=key_set).stage == "stored"
    assert PNERecord(key_set=key_set).pending_set is key_set
    delivered = PNERecord(key_set=dataclasses.replace(key_set, delivered=True))
    assert delivered.stage == "delivered"
    assert delivered.pending_set is None


def test_records_are_frozen_and_keep_keys_out_of_repr() -> None:
    """Records are values (a change is a new record); their repr shows no TK or EUKey."""
    key_set = KeySet.decode(_set_map())
    with pytest.raises(dataclasses.FrozenInstanceError):
        key_set.delivered = True  # type: ignore[misc]
    assert "tttt" not in repr(PNERecord(key_set=key_set))
    assert "aaaa" not in repr(key_set)


@pytest.mark.parametrize(
    ("stored", "named"),
    [
        ([], "must be a map"),
        ({"request": "abc"}, "request must be a map"),
        ({"request": {**_request_map(), "txid": "00"}}, "'txid' must be bytes"),
        ({"request": {**_request_map(), "created_at": True}}, "'created_at' must be int"),
        ({"request": {k: v for k, v in _request_map().items() if k != "encoded"}}, "'encoded'"),
        ({"set": _set_map(eukeys=[])}, "'eukeys' must be a non-empty list"),
        ({"set": _set_map(eukeys=[b"a" * 32, "b"])}, "'eukeys'"),
        ({"set": _set_map(key_index="1")}, "'key_index' must be int"),
        ({"set": _set_map(delivered=1)}, "'delivered' must be bool"),
        ({"set": _set_map(flow="ff")}, "'flow' must be bytes"),
        ({"set": _set_map(tk_step="3")}, "'tk_step' must be int"),
        ({"set": _set_map(tk_step=-1)}, "'tk_step' must not be negative"),
        ({"last_status": 0}, "'last_status' must be str"),
    ],
)
def test_malformed_stored_records_are_refused(stored: object, named: str) -> None:
    """A stored map of the wrong shape is refused as a whole with MalformedRecord (a
    StoreError), naming the part that is wrong; nothing is half-read."""
    with pytest.raises(MalformedRecord, match=named) as info:
        PNERecord.decode(stored, "record of 'pne-1'")
    assert isinstance(info.value, StoreError)
    assert "record of 'pne-1'" in str(info.value)


def test_status_view_shows_ids_and_flags_never_keys() -> None:
    """The status view lists each PNE's stage, user, index and txid, never key material."""
    records = {
        "pne-1": PNERecord.decode({"set": _set_map(), "last_status": "OK"}),
        "pne-2": PNERecord.decode({"request": _request_map()}),
    }
    view = status_view(
        Enrolment(entity_id="gw-1", user_id="alice", eukey=b"e" * 32),
        records,
        attached={"pne-2"},
    )
    assert view["enrolled"] is True
    assert view["attached"] == ["pne-2"]
    assert view["pnes"] == [
        {
            "pne_id": "pne-1",
            "stage": "stored",
            "user_id": "alice",
            "key_index": 1,
            "delivered": False,
            "txid": TXID.hex(),
            "connected": False,
            "last_status": "OK",
            "tk_step": 0,
            "reassign": None,
            "pns": [],
        },
        {
            "pne_id": "pne-2",
            "stage": "requested",
            "user_id": "alice",
            "key_index": 0,
            "delivered": False,
            "txid": None,
            "connected": True,
            "last_status": None,
            "tk_step": 0,
            "reassign": None,
            "pns": [],
        },
    ]
    assert "eeee" not in repr(view)


def _enrolment_map() -> dict[str, Any]:
    """The main map as the pre-typed enrolment wrote it."""
    return {
        "version": 1,
        "entity_id": "gw-1",
        "user_id": "alice",
        "eukey": b"e" * 32,
        "server_id": "cpns-server",
        "enrolled_at": 1_700_000_000,
    }


def test_the_enrolment_round_trips_and_an_unenrolled_store_has_none() -> None:
    """The main map written at enrolment decodes and encodes back unchanged; other keys
    of the map are not part of it; a map without an EUKey means "not enrolled"."""
    data = _enrolment_map()
    enrolment = Enrolment.decode({**data, "other": 1})
    assert enrolment is not None
    assert enrolment.encode() == data
    assert "eeee" not in repr(enrolment)
    assert Enrolment.decode({}) is None
    assert Enrolment.decode({"entity_id": "gw-1"}) is None
    assert status_view(None, {}, attached=())["enrolled"] is False


@pytest.mark.parametrize(("key", "value"), [("entity_id", None), ("user_id", 5), ("version", "1")])
def test_a_malformed_enrolment_is_refused(key: str, value: object) -> None:
    """A main map holding an EUKey but not a well-formed enrolment is refused."""
    with pytest.raises(MalformedRecord, match=key):
        Enrolment.decode({**_enrolment_map(), key: value})


def test_pn_establishment_parts_round_trip_and_give_the_routing_table() -> None:
    """002 §7.5.4 / 000 at the PN GW: a PNE record keeps its TK state (for the key set it
    belongs to), its PN memberships with the LocalEUKey and a queued re-assignment; the
    map round-trips exactly, and the routing table lists each PN's members."""
    key_set = KeySet.decode(_set_map())
    record = PNERecord(
        key_set=key_set,
        tk_state=TKHolding(tk=b"u" * 32, tk_step=3, set_txid=key_set.txid),
        pns=(
            Membership(
                pn_id="pn-1",
                est_id="00" * 16,
                status="member",
                flow="tk",
                at=5,
                local_eukey=b"l" * 32,
                local_sk=b"s" * 32,
                local_at=6,
            ),
            Membership(pn_id="pn-2", est_id=None, status="TIMEOUT", flow="", at=7),
        ),
        reassign="CHAIN_EXHAUSTED",
    )
    assert PNERecord.decode(record.encode()) == record
    assert record.tk_holding() == (b"u" * 32, 3)
    assert "uuuu" not in repr(record)
    assert "llll" not in repr(record)
    # A state of another (older) key set does not count: the new set starts at step 0.
    other = dataclasses.replace(record, tk_state=TKHolding(tk=b"u" * 32, tk_step=3, set_txid=b"o"))
    assert other.tk_holding() == (key_set.tk, 0)
    assert PNERecord().tk_holding() is None
    assert pn_routes({"pne-2": record, "pne-1": record, "pne-3": PNERecord()}) == {
        "pn-1": ("pne-1", "pne-2")
    }
    # Records written before PN Establishment load unchanged.
    assert PNERecord.decode({"set": _set_map()}).pns == ()


def test_malformed_membership_is_refused() -> None:
    """A stored membership of the wrong shape is refused as a whole (MalformedRecord)."""
    with pytest.raises(MalformedRecord, match="pns"):
        PNERecord.decode({"pns": {"pn-1": 1}})
    with pytest.raises(MalformedRecord, match=r"pns\[0\]"):
        PNERecord.decode({"pns": [{"pn_id": "pn-1"}]})
