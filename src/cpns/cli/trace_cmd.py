"""``cpns trace ID LOGFILE...``: one flow across the three parties, as a sequence diagram.

Reads the log files of the PNE agent, the PN GW daemon and the CPNS Server (JSON lines,
or the text format; both written by :mod:`cpns.logs`), keeps the lines of flow ``ID``
and draws its messages between the lifelines PNE | PN GW | CPNS Server: one arrow per
message hop, named after the message, with the hop's outcome under it and, on the right,
the time since the flow's first line and the time the hop took (sent -> received).

A hop is the pair of lines the two ends write for one message (:func:`cpns.flow.log_hop`:
``event=message``, ``dir``, ``type``, ``peer``, ``txid``): the sender's ``sent`` line and
the receiver's ``received`` line, matched by sender, receiver, type and txid, in order.
A hop seen from one end only is drawn too, and says so.

Exit codes: 0 drawn; 2 a file is missing or unreadable, or ID is not a flow ID;
3 no line of the files carries the flow.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

from cpns.cli.diagram import Column, arrow, header, lifelines, under

__all__ = ["Hop", "LogLine", "draw", "hops", "read_lines", "register"]

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_NOT_FOUND: Final = 3

#: Lifeline of each party name the logs use.
_COLUMN: Final[dict[str, Column]] = {"pne": "PNE", "gateway": "GW", "server": "SRV"}

#: ``ts LEVEL party logger: msg [k=v ...]`` (cpns.logs.TextFormatter).
_TEXT_LINE: Final = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z) (?P<level>[A-Z]+) (?P<party>\S+) "
    r"(?P<logger>\S+): (?P<msg>.*?)(?: \[(?P<pairs>[^\[\]]*)\])?$"
)
_FLOW_ID: Final = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True, slots=True)
class LogLine:
    """One parsed log line."""

    #: When it was written.
    ts: datetime
    #: Who wrote it: server, gateway, pne (or cli).
    party: str
    #: Level name, lowercase.
    level: str
    #: The message text.
    msg: str
    #: Every structured field (flow, event, dir, type, peer, status, txid, ...).
    fields: dict[str, str]
    #: Where it was read: file and line number, for ordering ties.
    where: tuple[int, int] = (0, 0)


def _parse_ts(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _parse(raw: str, where: tuple[int, int]) -> LogLine | None:
    """A line of either format; None for anything else (a traceback, another program)."""
    raw = raw.rstrip("\r\n")
    if raw.startswith("{"):
        try:
            obj = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("ts"), str):
            return None
        ts = _parse_ts(obj["ts"])
        if ts is None:
            return None
        fields = {k: str(v) for k, v in obj.items() if v is not None}
        return LogLine(
            ts=ts,
            party=fields.get("party", "?"),
            level=fields.get("level", "info"),
            msg=fields.get("msg", ""),
            fields=fields,
            where=where,
        )
    match = _TEXT_LINE.match(raw)
    if match is None:
        return None
    ts = _parse_ts(match["ts"])
    if ts is None:
        return None
    fields = dict(pair.split("=", 1) for pair in (match["pairs"] or "").split(" ") if "=" in pair)
    return LogLine(
        ts=ts,
        party=match["party"],
        level=match["level"].lower(),
        msg=match["msg"],
        fields=fields,
        where=where,
    )


def read_lines(paths: Iterable[Path], flow: str) -> Iterator[LogLine]:
    """The lines of ``flow`` in ``paths``, file by file.

    Raises:
        OSError: a file cannot be read.
    """
    for number, path in enumerate(paths):
        with path.open(encoding="utf-8", errors="replace") as handle:
            for lineno, raw in enumerate(handle):
                if flow not in raw:  # cheap filter before parsing
                    continue
                line = _parse(raw, (number, lineno))
                if line is not None and line.fields.get("flow") == flow:
                    yield line


@dataclass(slots=True)
class Hop:
    """One message from one party to another, as its two ends logged it."""

    #: Sender and receiver parties (server, gateway, pne).
    src: str
    dst: str
    #: MessageType name, e.g. EUKEY_ASSIGNMENT_REQUEST.
    type: str
    #: Transaction ID (hex).
    txid: str
    #: The sender's and the receiver's line (either may be missing).
    sent: LogLine | None = None
    received: LogLine | None = None
    #: Entity IDs of sender and receiver, as the message header said.
    ids: tuple[str, str] = field(default=("", ""))

    @property
    def at(self) -> datetime:
        """When the hop began (sent, else received)."""
        line = self.sent or self.received
        assert line is not None
        return line.ts

    @property
    def status(self) -> str | None:
        """The message's status, if it has one."""
        line = self.sent or self.received
        assert line is not None
        return line.fields.get("status")

    @property
    def outcome(self) -> str:
        """What became of the message: its status, and whether both ends saw it."""
        status = self.status
        if self.sent is not None and self.received is not None:
            return status or "delivered"
        if self.sent is not None:
            return f"{status + ', ' if status else ''}sent; no receipt logged"
        return f"{status + ', ' if status else ''}received; send not logged"


def hops(lines: Iterable[LogLine]) -> list[Hop]:
    """Pair the ``sent`` and ``received`` lines of each message; hops in time order.

    The n-th ``received`` line of a (sender, receiver, type, txid) goes with the n-th
    ``sent`` one, whatever the clocks say (two hosts' clocks may disagree).
    """
    out: list[Hop] = []
    queues: dict[tuple[str, str, str, str], list[Hop]] = {}
    messages = [
        line
        for line in sorted(lines, key=lambda ln: (ln.ts, ln.where))
        if line.fields.get("event") == "message" and line.fields.get("dir") in ("sent", "received")
    ]
    for line in messages:
        f = line.fields
        if f["dir"] == "sent":
            hop = Hop(
                line.party,
                f.get("peer", "?"),
                f.get("type", "?"),
                f.get("txid", ""),
                sent=line,
                ids=(f.get("src", ""), f.get("dst", "")),
            )
            queues.setdefault((hop.src, hop.dst, hop.type, hop.txid), []).append(hop)
            out.append(hop)
    for line in messages:
        f = line.fields
        if f["dir"] == "received":
            key = (f.get("peer", "?"), line.party, f.get("type", "?"), f.get("txid", ""))
            waiting = queues.get(key)
            if waiting:
                waiting.pop(0).received = line
            else:
                out.append(Hop(*key, received=line, ids=(f.get("src", ""), f.get("dst", ""))))
    out.sort(key=lambda h: h.at)
    return out


def _title(type_name: str) -> str:
    """EUKEY_ASSIGNMENT_REQUEST -> EUKeyAssignmentRequest (the class name, if known)."""
    from cpns.messages.constants import MessageType
    from cpns.messages.model import MESSAGE_CLASSES

    try:
        return MESSAGE_CLASSES[MessageType[type_name]].__name__
    except KeyError:
        return type_name


def _ms(delta: float) -> str:
    return f"{delta * 1000:.0f} ms"


def draw(flow: str, lines: list[LogLine]) -> str:
    """The flow's sequence diagram, with a one-line summary."""
    found = hops(lines)
    start = min(line.ts for line in lines)
    end = max(line.ts for line in lines)
    names: dict[Column, str] = {}
    for hop in found:
        for party, entity in zip((hop.src, hop.dst), hop.ids, strict=True):
            column = _COLUMN.get(party)
            if column is not None and entity and entity not in ("pan", "unknown"):
                names.setdefault(column, entity)
    parties = sorted({line.party for line in lines})
    rows = [
        f"flow {flow}: {len(found)} message(s), {len(lines)} log line(s) from "
        f"{', '.join(parties)}, {_ms((end - start).total_seconds())} in all",
        "",
        *header(names),
        lifelines(),
    ]
    for hop in found:
        src, dst = _COLUMN.get(hop.src), _COLUMN.get(hop.dst)
        if src is None or dst is None or src == dst:
            continue
        since = _ms((hop.at - start).total_seconds())
        took = (
            _ms((hop.received.ts - hop.sent.ts).total_seconds())
            if hop.sent is not None and hop.received is not None
            else "-"
        )
        rows.append(arrow(src, dst, _title(hop.type), f"+{since}  (hop {took})"))
        rows.append(under(src, dst, hop.outcome, f"txid {hop.txid[:12]}"))
    problems = [ln for ln in lines if ln.level in ("warning", "error", "critical")]
    if problems:
        rows += ["", "warnings and errors of this flow:"]
        rows += [
            f"  +{_ms((ln.ts - start).total_seconds())} {ln.party} {ln.level}: {ln.msg}"
            for ln in sorted(problems, key=lambda ln: (ln.ts, ln.where))
        ]
    return "\n".join(rows)


def _run(args: argparse.Namespace) -> int:
    flow = args.flow.strip().lower()
    if _FLOW_ID.fullmatch(flow) is None:
        print(f"cpns trace: not a flow ID (16 hex digits): {args.flow!r}", file=sys.stderr)
        return EXIT_USAGE
    paths = [Path(p) for p in args.logfiles]
    for path in paths:
        if not path.is_file():
            print(f"cpns trace: no such log file: {path}", file=sys.stderr)
            return EXIT_USAGE
    try:
        lines = list(read_lines(paths, flow))
    except OSError as exc:
        print(f"cpns trace: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if not lines:
        print(
            f"cpns trace: flow {flow} appears in none of the {len(paths)} log file(s) "
            "(the flow ID is printed by 'cpns gateway assign' and shown by "
            "'cpns admin audit')",
            file=sys.stderr,
        )
        return EXIT_NOT_FOUND
    print(draw(flow, lines))
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``trace`` command."""
    p = sub.add_parser(
        "trace",
        help="draw one flow from the parties' log files as a sequence diagram",
        description="Read the log files of the PNE agent, the PN GW daemon and the CPNS "
        "Server (JSON lines or text), keep the lines of flow ID and draw its messages "
        "between PNE | PN GW | CPNS Server: one arrow per message, its outcome, the time "
        "since the flow began and the time each hop took. Exit 0 when drawn, 2 when a file "
        "is missing or ID is not a flow ID, 3 when no line carries the flow.",
    )
    p.add_argument("flow", metavar="ID", help="the flow ID (16 hex digits)")
    p.add_argument("logfiles", metavar="LOGFILE", nargs="+", help="log files to read")
    p.set_defaults(func=_run)
