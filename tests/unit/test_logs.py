"""cpns.logs: the JSON and text formats, the context filter (party, flow) and flow_scope."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from cpns.logs import (
    ContextFilter,
    JSONFormatter,
    LogBudget,
    TextFormatter,
    current_flow,
    flow_scope,
)
from cpns.logs import setup_logging as setup

FLOW = "0123456789abcdef"


def record(msg: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("cpns.test", logging.INFO, __file__, 1, msg, args or ("x",), None)
    rec.created = 1_700_000_000.25
    rec.msecs = 250.0
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The cpns loggers written to a buffer; the previous handlers put back afterwards."""
    root = logging.getLogger("cpns")
    saved = (list(root.handlers), root.level, root.propagate)
    out = io.StringIO()
    yield out
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def test_json_line_has_the_documented_fields() -> None:
    """docs/logging.md: one JSON object per line with ts (RFC 3339 UTC, milliseconds),
    level, party, logger, msg, flow when known, and the structured extras."""
    rec = record(dir="sent", type="PNE_HELLO", status="OK", count=3)
    ContextFilter("gateway").filter(rec)
    with flow_scope(FLOW):
        rec2 = record()
        ContextFilter("pne").filter(rec2)
    line = json.loads(JSONFormatter().format(rec))
    assert line == {
        "ts": "2023-11-14T22:13:20.250Z",
        "level": "info",
        "party": "gateway",
        "logger": "cpns.test",
        "msg": "hello x",
        "dir": "sent",
        "type": "PNE_HELLO",
        "status": "OK",
        "count": 3,
    }
    other = json.loads(JSONFormatter().format(rec2))
    assert (other["party"], other["flow"]) == ("pne", FLOW)


def test_json_line_is_one_line_whatever_the_message() -> None:
    """A message with a line break, and a traceback, stay inside one JSON line."""
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = record("two\nlines %s", "x")
        rec.exc_info = sys.exc_info()
    text = JSONFormatter().format(rec)
    assert "\n" not in text
    assert "ValueError: boom" in json.loads(text)["exc"]


def test_json_extras_that_are_not_json_become_text() -> None:
    """A structured extra of another type (bytes, an object) is written as its str, never
    breaks the line."""
    rec = record(thing=object(), raw=b"\x00")
    line = json.loads(JSONFormatter().format(rec))
    assert isinstance(line["thing"], str)
    assert line["raw"] == "b'\\x00'"


def test_text_line_has_ts_level_party_and_a_key_value_tail() -> None:
    """The text format: ts LEVEL party logger: msg [flow=... key=value ...]; no tail when
    there is nothing structured."""
    rec = record(dir="received", peer="server")
    rec.flow = FLOW
    ContextFilter("gateway").filter(rec)
    assert TextFormatter().format(rec) == (
        "2023-11-14T22:13:20.250Z INFO gateway cpns.test: hello x "
        f"[flow={FLOW} dir=received peer=server]"
    )
    plain = record()
    ContextFilter("server").filter(plain)
    assert TextFormatter().format(plain) == (
        "2023-11-14T22:13:20.250Z INFO server cpns.test: hello x"
    )


def test_filter_takes_the_context_flow_but_keeps_an_explicit_one() -> None:
    """ContextFilter sets party, and flow from flow_scope unless the record names its own
    (a received message's flow); outside any scope there is no flow."""
    flt = ContextFilter("server")
    with flow_scope(FLOW):
        inherited = record()
        own = record(flow="fedcba9876543210")
        assert flt.filter(inherited)
        assert flt.filter(own)
    outside = record()
    flt.filter(outside)
    assert (inherited.flow, own.flow, outside.flow) == (FLOW, "fedcba9876543210", None)
    assert inherited.party == "server"


def test_flow_scope_nests_and_is_per_task() -> None:
    """flow_scope restores the outer flow on exit, and concurrent asyncio tasks each keep
    their own (one request's flow never leaks into another's lines)."""
    assert current_flow() is None
    with flow_scope("a" * 16):
        with flow_scope("b" * 16):
            assert current_flow() == "b" * 16
        assert current_flow() == "a" * 16
    assert current_flow() is None

    async def task(flow: str) -> list[str | None]:
        seen = []
        with flow_scope(flow):
            for _ in range(3):
                await asyncio.sleep(0)
                seen.append(current_flow())
        return seen

    async def both() -> list[list[str | None]]:
        return list(await asyncio.gather(task("1" * 16), task("2" * 16)))

    assert asyncio.run(both()) == [["1" * 16] * 3, ["2" * 16] * 3]


def test_setup_logging_writes_json_lines_with_the_party(captured: io.StringIO) -> None:
    """setup_logging(json_lines=True, party=...) makes every cpns logger write JSON lines
    naming the party and the flow of the scope."""
    setup(json_lines=True, party="pne", stream=captured)
    with flow_scope(FLOW):
        logging.getLogger("cpns.device").info("attached", extra={"peer": "gateway"})
    logging.getLogger("cpns.device").debug("not at INFO")
    [line] = captured.getvalue().splitlines()
    obj = json.loads(line)
    assert (obj["party"], obj["flow"], obj["peer"], obj["msg"]) == (
        "pne",
        FLOW,
        "gateway",
        "attached",
    )


def test_setup_logging_text_is_the_default(captured: io.StringIO) -> None:
    """Without json_lines the lines are text, starting with the RFC 3339 UTC time."""
    setup(party="server", stream=captured)
    logging.getLogger("cpns.server").warning("careful")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING server cpns.server: careful\n",
        captured.getvalue(),
    )


def test_the_log_budget_allows_a_burst_then_a_rate_and_counts_what_it_left_out() -> None:
    """Peer-caused lines: a burst at once, then ``rate`` per second; the next allowed line
    learns how many were refused."""
    budget = LogBudget(rate=1.0, burst=3)
    assert [budget.take(0.0)[0] for _ in range(5)] == [True, True, True, False, False]
    assert budget.take(1.0) == (True, 2)
    assert budget.take(1.0) == (False, 0)
