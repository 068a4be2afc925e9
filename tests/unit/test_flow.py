"""cpns.flow: flow IDs on messages (stamp, message_scope) and the one line per hop."""

from __future__ import annotations

import logging

import pytest

from cpns.errors import ErrorCode
from cpns.flow import flow_bytes, flow_hex, log_hop, message_scope, new_flow, stamp
from cpns.logs import current_flow, flow_scope
from cpns.messages.model import ErrorMessage, PNEHello

FLOW = "0123456789abcdef"


def hello(flow: bytes | None = None) -> PNEHello:
    return PNEHello(txid=bytes(16), src="pne-1", dst="pan", flow=flow, has_ui=False, key_index=0)


def test_new_flow_is_16_hex_digits_and_fresh() -> None:
    """A flow ID is 8 random bytes shown as 16 lowercase hex digits; two differ."""
    a, b = new_flow(), new_flow()
    assert a != b
    assert flow_bytes(a) is not None
    assert len(a) == 16
    assert a == a.lower()


@pytest.mark.parametrize("text", [None, "", "0123", "0123456789abcdeg", "0" * 17, "0" * 32])
def test_flow_bytes_refuses_anything_but_16_hex_digits(text: str | None) -> None:
    """flow_bytes gives None for a missing or malformed logged flow ID (never raises)."""
    assert flow_bytes(text) is None


def test_flow_hex_and_bytes_round_trip() -> None:
    """The logged form and the wire form convert both ways."""
    assert flow_hex(flow_bytes(FLOW)) == FLOW
    assert flow_hex(None) is None


def test_stamp_adds_the_current_flow_and_keeps_an_existing_one() -> None:
    """stamp: outside a flow a message is unchanged; inside, one without a flow ID gets the
    current one; one that has a flow ID keeps it (a reply stays in its request's flow)."""
    assert stamp(hello()).flow is None
    with flow_scope(FLOW):
        assert stamp(hello()).flow == bytes.fromhex(FLOW)
        assert stamp(hello(b"\xff" * 8)).flow == b"\xff" * 8


def test_message_scope_uses_the_message_flow_or_keeps_the_current() -> None:
    """message_scope handles a message in its own flow; a message without one leaves the
    current flow in place."""
    with flow_scope(FLOW):
        with message_scope(hello(b"\x11" * 8)):
            assert current_flow() == "11" * 8
        with message_scope(hello()):
            assert current_flow() == FLOW


def test_log_hop_writes_the_structured_fields(caplog: pytest.LogCaptureFixture) -> None:
    """log_hop: one INFO line with event, dir, type, peer, txid, src, dst, the status when
    the message has one and the message's own flow; nothing of the body besides."""
    caplog.set_level(logging.INFO, logger="cpns")
    log = logging.getLogger("cpns.test")
    log_hop(log, "sent", hello(b"\x22" * 8), "gateway")
    error = ErrorMessage(
        txid=b"\x01" * 16, src="gw-1", dst="pne-1", status=ErrorCode.UNEXPECTED_MESSAGE
    )
    log_hop(log, "received", error, "gateway")
    first, second = caplog.records
    assert first.getMessage() == "sent PNE_HELLO to gateway"
    assert (first.event, first.dir, first.type, first.peer, first.flow) == (  # type: ignore[attr-defined]
        "message",
        "sent",
        "PNE_HELLO",
        "gateway",
        "22" * 8,
    )
    assert (first.txid, first.src, first.dst) == ("00" * 16, "pne-1", "pan")  # type: ignore[attr-defined]
    assert not hasattr(first, "status")
    assert second.getMessage() == "received ERROR from gateway (UNEXPECTED_MESSAGE)"
    assert second.status == "UNEXPECTED_MESSAGE"  # type: ignore[attr-defined]
    assert getattr(second, "flow", None) is None
