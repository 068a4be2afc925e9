"""The HTTPS listener's bookkeeping (cpns.server.http): caps, the descriptor bound, knobs.

Behaviour on real sockets and TLS is in tests/integration/test_server_limits.py.
"""

from __future__ import annotations

import resource

import pytest
from tests.metrics import sample

from cpns.errors import ConfigurationError
from cpns.server.config import ServerConfig
from cpns.server.http import (
    FD_RESERVE,
    ConnectionTracker,
    ListenerLimits,
    effective_limits,
    listener_protocol,
)
from cpns.server.main import listener_limits


def test_the_tracker_caps_in_total_and_per_source() -> None:
    """Issue 5 item 11: a source over max_connections_per_source, or anyone over
    max_connections, is refused; releasing makes room again; nothing is counted for a
    refused connection."""
    tracker = ConnectionTracker(ListenerLimits(max_connections=3, max_connections_per_source=2))
    assert tracker.admit("10.0.0.1")
    assert tracker.admit("10.0.0.1")
    assert not tracker.admit("10.0.0.1")
    assert tracker.admit("10.0.0.2")
    assert not tracker.admit("10.0.0.3")  # total cap
    assert tracker.total == 3
    tracker.release("10.0.0.1")
    assert tracker.admit("10.0.0.3")
    for source in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        tracker.release(source)
    assert tracker.total == 0
    assert tracker.by_source == {}


def test_the_total_cap_stays_below_the_descriptor_limit() -> None:
    """Issue 5 item 11 (the 256-descriptor case): the total cap is lowered to the open-file
    limit minus a reserve, so accepting never runs the process out of descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        limits = effective_limits(ListenerLimits(max_connections=1024))
        assert limits.max_connections == 256 - FD_RESERVE
        assert limits.max_connections_per_source <= limits.max_connections
        small = ListenerLimits(max_connections=10)
        assert effective_limits(small) is small
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_server_toml_knobs_reach_the_listener() -> None:
    """Issue 5 item 11: the server.toml knobs set the listener's limits, and a bad value is
    a configuration error."""
    config = ServerConfig(
        request_timeout=7,
        keep_alive_timeout=9,
        max_header_bytes=4096,
        max_connections=50,
        max_connections_per_source=5,
    )
    limits = listener_limits(config)
    assert (limits.request_timeout, limits.keep_alive_timeout) == (7, 9)
    assert (limits.max_header_bytes, limits.max_connections_per_source) == (4096, 5)
    with pytest.raises(ConfigurationError):
        listener_limits(ServerConfig(max_header_bytes=10))
    protocol = listener_protocol(limits, None)
    assert protocol.limits is limits
    assert protocol.tracker is not listener_protocol(limits, None).tracker  # one per listener


def test_the_tracker_counts_open_and_refused_connections() -> None:
    """docs/metrics.md: cpns_server_connections follows admitted and released
    connections; each refusal counts under the cap that refused it."""
    open_before = sample("cpns_server_connections")
    refused = "cpns_server_connections_refused_total"
    per_source = sample(refused, reason="max_connections_per_source")
    total = sample(refused, reason="max_connections")
    tracker = ConnectionTracker(ListenerLimits(max_connections=2, max_connections_per_source=1))
    assert tracker.admit("10.0.0.1")
    assert not tracker.admit("10.0.0.1")
    assert tracker.admit("10.0.0.2")
    assert not tracker.admit("10.0.0.3")
    assert sample("cpns_server_connections") == open_before + 2
    assert sample(refused, reason="max_connections_per_source") == per_source + 1
    assert sample(refused, reason="max_connections") == total + 1
    tracker.release("10.0.0.1")
    tracker.release("10.0.0.2")
    assert sample("cpns_server_connections") == open_before
