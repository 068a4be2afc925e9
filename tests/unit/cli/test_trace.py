"""``cpns trace``: reading the parties' log lines (JSON and text), pairing each message's
two ends into a hop, drawing the diagram, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpns.cli.diagram import LIFELINE
from cpns.cli.main import main
from cpns.cli.trace_cmd import draw, hops, read_lines

FLOW = "0123456789abcdef"
TXID = "ab" * 16


def hop_line(
    party: str,
    direction: str,
    mtype: str,
    peer: str,
    ms: int,
    *,
    status: str | None = None,
    flow: str = FLOW,
    src: str = "",
    dst: str = "",
) -> str:
    fields: dict[str, object] = {
        "ts": f"2026-12-02T04:00:00.{ms:03d}Z",
        "level": "info",
        "party": party,
        "logger": f"cpns.{party}",
        "msg": f"{direction} {mtype}",
        "flow": flow,
        "event": "message",
        "dir": direction,
        "type": mtype,
        "peer": peer,
        "txid": TXID,
        "src": src,
        "dst": dst,
    }
    if status is not None:
        fields["status"] = status
    return json.dumps(fields)


def write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def logs(tmp_path: Path) -> list[Path]:
    """The three parties' JSON logs of one 003 flow, plus noise of another flow."""
    pne = write(
        tmp_path / "pne.log",
        hop_line("pne", "sent", "PNE_HELLO", "gateway", 0, src="pne-1", dst="pan"),
        hop_line("pne", "received", "EUKEY_ASSIGNMENT_NOTIFICATION", "gateway", 90, status="OK"),
        hop_line("pne", "sent", "EUKEY_ASSIGNMENT_ACK", "gateway", 95, status="OK"),
        "Traceback (most recent call last):",  # not a log line: skipped
    )
    gw = write(
        tmp_path / "gw.log",
        hop_line("gateway", "received", "PNE_HELLO", "pne", 2),
        hop_line(
            "gateway", "sent", "EUKEY_ASSIGNMENT_REQUEST", "server", 10, src="gw-1", dst="srv"
        ),
        hop_line("gateway", "received", "EUKEY_ASSIGNMENT_RESPONSE", "server", 80, status="OK"),
        hop_line("gateway", "sent", "EUKEY_ASSIGNMENT_NOTIFICATION", "pne", 85, status="OK"),
        hop_line("gateway", "received", "EUKEY_ASSIGNMENT_ACK", "pne", 97, status="OK"),
        hop_line("gateway", "sent", "PNE_HELLO", "pne", 50, flow="f" * 16),
    )
    srv = write(
        tmp_path / "server.log",
        hop_line("server", "received", "EUKEY_ASSIGNMENT_REQUEST", "gateway", 30),
        json.dumps(
            {
                "ts": "2026-12-02T04:00:00.040Z",
                "level": "warning",
                "party": "server",
                "logger": "cpns.server",
                "msg": "something odd",
                "flow": FLOW,
            }
        ),
        hop_line(
            "server", "sent", "EUKEY_ASSIGNMENT_RESPONSE", "gateway", 70, status="OK", src="srv"
        ),
    )
    return [pne, gw, srv]


def arrows(diagram: str) -> list[str]:
    return [
        row[: LIFELINE["SRV"] + 1]
        for row in diagram.splitlines()
        if ">" in row[: LIFELINE["SRV"] + 1] or "<" in row[: LIFELINE["SRV"] + 1]
    ]


def test_hops_pair_both_ends_in_order(logs: list[Path]) -> None:
    """Each message's sent and received lines form one hop (other flows' lines ignored),
    the hops ordered by when they were sent."""
    found = hops(read_lines(logs, FLOW))
    assert [(h.src, h.dst, h.type, h.outcome) for h in found] == [
        ("pne", "gateway", "PNE_HELLO", "delivered"),
        ("gateway", "server", "EUKEY_ASSIGNMENT_REQUEST", "delivered"),
        ("server", "gateway", "EUKEY_ASSIGNMENT_RESPONSE", "OK"),
        ("gateway", "pne", "EUKEY_ASSIGNMENT_NOTIFICATION", "OK"),
        ("pne", "gateway", "EUKEY_ASSIGNMENT_ACK", "OK"),
    ]


def test_a_receipt_logged_before_its_send_still_pairs(tmp_path: Path) -> None:
    """Two hosts' clocks may disagree: a received line stamped before its sent line is
    still the same hop, not two."""
    path = write(
        tmp_path / "x.log",
        hop_line("server", "received", "EUKEY_ASSIGNMENT_REQUEST", "gateway", 5),
        hop_line("gateway", "sent", "EUKEY_ASSIGNMENT_REQUEST", "server", 9),
    )
    [hop] = hops(read_lines([path], FLOW))
    assert hop.sent is not None
    assert hop.received is not None


def test_a_hop_seen_from_one_end_says_so(tmp_path: Path) -> None:
    """Only the sender's line (the peer's log not given, or the message lost): the hop is
    drawn with 'no receipt logged'; only the receiver's: 'send not logged'."""
    path = write(
        tmp_path / "x.log",
        hop_line("gateway", "sent", "EUKEY_ASSIGNMENT_REQUEST", "server", 1),
        hop_line("gateway", "received", "EUKEY_ASSIGNMENT_RESPONSE", "server", 3, status="REPLAY"),
    )
    assert [h.outcome for h in hops(read_lines([path], FLOW))] == [
        "sent; no receipt logged",
        "REPLAY, received; send not logged",
    ]


def test_text_lines_are_read_too(tmp_path: Path) -> None:
    """The text format (ts LEVEL party logger: msg [k=v ...]) gives the same hops."""
    path = write(
        tmp_path / "x.log",
        f"2026-12-02T04:00:00.001Z INFO gateway cpns.gateway: sent PNE_HELLO to pne "
        f"[flow={FLOW} event=message dir=sent type=EUKEY_ASSIGNMENT_NOTIFICATION peer=pne "
        f"txid={TXID} status=OK]",
        f"2026-12-02T04:00:00.004Z INFO pne cpns.device: received [x] "
        f"[flow={FLOW} event=message dir=received type=EUKEY_ASSIGNMENT_NOTIFICATION "
        f"peer=gateway txid={TXID} status=OK]",
        "2026-12-02T04:00:00.004Z INFO pne cpns.device: unrelated",
    )
    [hop] = hops(read_lines([path], FLOW))
    assert (hop.src, hop.dst, hop.outcome) == ("gateway", "pne", "OK")


def test_draw_shows_arrows_outcomes_timing_and_warnings(logs: list[Path]) -> None:
    """The diagram: one arrow per hop between the right lifelines, in order, named after
    the message, its outcome under it, +ms since the flow began and the hop's own ms; the
    flow's warnings listed after it; the parties' Entity IDs in the header."""
    text = draw(FLOW, list(read_lines(logs, FLOW)))
    rows = arrows(text)
    assert len(rows) == 5
    assert "PNEHello" in rows[0]
    assert rows[0].index(">") > LIFELINE["PNE"]
    assert "EUKeyAssignmentRequest" in rows[1]
    assert rows[1].rstrip().endswith(">|")
    assert "EUKeyAssignmentResponse" in rows[2]
    assert rows[2][LIFELINE["GW"] + 1] == "<"
    assert "EUKeyAssignmentNotification" in rows[3]
    assert rows[3][LIFELINE["PNE"] + 1] == "<"
    assert "EUKeyAssignmentAck" in rows[4]
    assert "+10 ms  (hop 20 ms)" in text  # request sent at 10 ms, received at 30 ms
    assert "+95 ms  (hop 2 ms)" in text
    assert "server warning: something odd" in text
    for entity in ("pne-1", "gw-1", "srv"):
        assert entity in text.splitlines()[3]


def test_cli_draws_and_exits_0(logs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    """``cpns trace ID FILES`` prints the diagram, exit 0; the ID may be upper case."""
    assert main(["trace", FLOW.upper(), *map(str, logs)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"flow {FLOW}: 5 message(s)")


def test_cli_errors(logs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing log file or a malformed ID: exit 2; a flow no line carries: exit 3; each
    with a one-line message and no traceback."""
    assert main(["trace", FLOW, str(tmp_path / "missing.log")]) == 2
    assert "no such log file" in capsys.readouterr().err
    assert main(["trace", "xyz", str(logs[0])]) == 2
    assert "not a flow ID" in capsys.readouterr().err
    assert main(["trace", "9" * 16, *map(str, logs)]) == 3
    err = capsys.readouterr().err
    assert "appears in none of the 3 log file(s)" in err
    assert "Traceback" not in err
