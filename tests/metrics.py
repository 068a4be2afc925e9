"""Reading operator metrics in tests, through prometheus_client's own APIs (no mocks).

In-process tests read this process's default registry (every cpns metric counts into it)
and compare values before and after the step under test, since other tests of the
session count into the same registry. End-to-end tests scrape a real ``/metrics`` over
HTTP and parse it with :mod:`prometheus_client.parser`.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

type Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def sample(name: str, **labels: str) -> float:
    """Current value of one sample of this process (0.0 if it was never recorded)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def parse(text: str) -> Samples:
    """Every sample of a text exposition, keyed by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample of a parsed exposition (0.0 if absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """GET ``url`` over plain HTTP: (status, body); an HTTP error status is returned too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(url: str) -> Samples:
    """GET and parse ``url`` (a /metrics endpoint); AssertionError unless 200."""
    status, body = get(url)
    assert status == 200, body
    return parse(body)


def free_port() -> int:
    """A TCP port free on loopback now (for a listener whose port must be configured)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
