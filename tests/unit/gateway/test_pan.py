"""The PN GW's PAN side (cpns.gateway.pan): its parts that need no network. The links
themselves are exercised end to end in test_daemon.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpns.gateway.config import GatewayConfig
from cpns.gateway.connections import Connections
from cpns.gateway.pan import PANLink, PANSide
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
