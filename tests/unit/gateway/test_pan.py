"""The PN GW's PAN side (cpns.gateway.pan): its parts that need no network. The links
themselves are exercised end to end in test_daemon.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpns.gateway.config import GatewayConfig
from cpns.gateway.connections import Connections
from cpns.gateway.pan import LogBudget, PANLink, PANSide
from cpns.messages.model import EUKeyAssignmentAck, Message, PNEHello


def _pan(tmp_path: Path) -> PANSide:
    config = GatewayConfig(
        data_dir=tmp_path / "gw",
        entity_id="gw-1",
        server_url="https://cpns.invalid:8443",
        ca_file=tmp_path / "ca.pem",
        pan_port=0,
    )
    return PANSide(config, Connections())


async def _handler(link: PANLink, message: Message) -> bool:
    return True


def test_one_procedure_per_message_type(tmp_path: Path) -> None:
    """Procedures subscribe the PAN messages they handle; a second handler for a type, or
    one for PNEHello (the PAN side's own), is refused."""
    pan = _pan(tmp_path)
    pan.subscribe(handlers={EUKeyAssignmentAck: _handler})
    with pytest.raises(ValueError, match="EUKeyAssignmentAck"):
        pan.subscribe(handlers={EUKeyAssignmentAck: _handler})
    with pytest.raises(ValueError, match="PNEHello"):
        pan.subscribe(handlers={PNEHello: _handler})


def test_nobody_is_attached_before_a_hello(tmp_path: Path) -> None:
    """No links, no hello flow, and no port before the listener is started."""
    pan = _pan(tmp_path)
    assert pan.links("pne-1") == []
    assert pan.hello_flow("pne-1") is None
    assert not pan.listening
    with pytest.raises(RuntimeError):
        _ = pan.port


def test_the_log_budget_allows_a_burst_then_a_rate_and_counts_what_it_left_out() -> None:
    """Peer-caused lines: a burst at once, then ``rate`` per second; the next allowed line
    learns how many were refused."""
    budget = LogBudget(rate=1.0, burst=3)
    assert [budget.take(0.0)[0] for _ in range(5)] == [True, True, True, False, False]
    assert budget.take(1.0) == (True, 2)
    assert budget.take(1.0) == (False, 0)
