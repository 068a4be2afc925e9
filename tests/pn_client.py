"""The test-side PN GW and its PNEs: one implementation, in benchmarks/pn_client.py, shared
by the tests and ``benchmarks/server_load.py``; re-exported here under the name the tests
import."""

from __future__ import annotations

from benchmarks.pn_client import (
    Exchange,
    PNEDevice,
    PNGateway,
    Run,
    Tamper,
    service_exchange,
)

__all__ = ["Exchange", "PNEDevice", "PNGateway", "Run", "Tamper", "service_exchange"]
