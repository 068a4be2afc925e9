"""The wire format as CDDL (RFC 8610), generated from the message model (issue 5 item 16).

docs/wire.md embeds the text :func:`render_cddl` returns, between markers, and
``tests/unit/test_wire_doc.py`` fails when the two differ, so the specification cannot
drift from :mod:`cpns.messages.model`. Every rule comes from a :class:`FieldSpec` (key,
kind, bounds, optionality), from :class:`~cpns.messages.constants.HeaderKey` and
:class:`~cpns.messages.constants.MessageType`, and from the wire enums; nothing here is
written by hand except the rule names.

Also here: :func:`render_status_table`, the Markdown table of every
:class:`~cpns.errors.ErrorCode` with its meaning (from the enum's ``#:`` comments), for
the same page. Pure functions: no I/O.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from enum import IntEnum

from cpns.errors import ErrorCode
from cpns.messages.constants import (
    FLOW_LEN,
    ID_PATTERN,
    PROTOCOL_VERSION,
    TXID_LEN,
    HeaderKey,
    MessageType,
)
from cpns.messages.model import (
    MESSAGE_CLASSES,
    NESTED_RECORDS,
    FieldSpec,
    KeyBundle,
    Record,
    specs,
)

__all__ = ["RECORD_CLASSES", "enum_comments", "render_cddl", "render_status_table", "rule_name"]

#: Header-less records: those nested in messages, and those inside sealed values.
RECORD_CLASSES: tuple[type[Record], ...] = (*NESTED_RECORDS, KeyBundle)

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def rule_name(cls: type[object]) -> str:
    """``EUKeyAssignmentRequest`` -> ``eukey-assignment-request``; ``PNEHello`` -> ``pne-hello``."""
    name = cls.__name__.replace("EUKey", "Eukey")
    return _CAMEL.sub("-", name).lower()


def _enum_rule(enum: type[IntEnum]) -> str:
    return rule_name(enum)


def _text(value: str) -> str:
    """A CDDL text string literal (RFC 8610 Appendix B: ``\\`` escapes ``"`` and ``\\``)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _type_of(spec: FieldSpec) -> str:
    match spec.kind:
        case "bytes":
            size = str(spec.lo) if spec.lo == spec.hi else f"({spec.lo}..{spec.hi})"
            return f"bstr .size {size}"
        case "id":
            return "cpns-id"
        case "int":
            return f"{spec.lo}..{spec.hi}"
        case "enum":
            assert spec.enum is not None
            return _enum_rule(spec.enum)
        case "bool":
            return "bool"
        case "bytes_list":
            return f"[{spec.lo}*{spec.hi} bstr .size 32]"
        case "id_list":
            return f"[{spec.lo}*{spec.hi} cpns-id]"
        case "records":
            assert spec.record is not None
            return f"[{spec.lo}*{spec.hi} {rule_name(spec.record)}]"
    raise AssertionError(spec.kind)  # pragma: no cover - Kind is a closed Literal


def _body_lines(cls: type[Record], indent: str) -> list[str]:
    rows = []
    for name, spec in specs(cls):
        opt = "? " if spec.optional else ""
        rows.append((f"{indent}{opt}{spec.key} => {_type_of(spec)},", name))
    width = max((len(r[0]) for r in rows), default=0)
    return [f"{line.ljust(width)}  ; {name}" for line, name in rows]


def enum_comments(enum: type[IntEnum]) -> dict[str, str]:
    """The ``#:`` comment above each member of ``enum``, by member name (one line each)."""
    try:
        source = inspect.getsource(enum)
    except (OSError, TypeError):  # pragma: no cover - source always ships with the package
        return {}
    comments: dict[str, str] = {}
    pending: list[str] = []
    for raw in source.splitlines():
        line = raw.strip()
        if line.startswith("#:"):
            pending.append(line[2:].strip())
            continue
        found = re.match(r"([A-Z][A-Z0-9_]*)\s*=\s*\d+\s*(?:#:\s*(.*))?$", line)
        if found is not None:
            text = " ".join(pending) if pending else (found.group(2) or "")
            comments[found.group(1)] = text
        pending = []
    return comments


def _enum_block(enum: type[IntEnum]) -> list[str]:
    members = [(m.name.lower().replace("_", "-"), int(m.value)) for m in enum]
    lines = [f"{_enum_rule(enum)} = &("]
    lines += [f"  {name}: {value}," for name, value in members]
    lines.append(")")
    return lines


def _enums_used() -> list[type[IntEnum]]:
    seen: list[type[IntEnum]] = []
    for cls in (*MESSAGE_CLASSES.values(), *RECORD_CLASSES):
        for _, spec in specs(cls):
            if spec.enum is not None and spec.enum not in seen:
                seen.append(spec.enum)
    return seen


def _message_rule(mtype: MessageType) -> list[str]:
    cls = MESSAGE_CLASSES[mtype]
    name = rule_name(cls)
    return [
        f"{name} = {{",
        f"  {int(HeaderKey.VERSION)} => {PROTOCOL_VERSION},  ; version",
        f"  {int(HeaderKey.TYPE)} => {int(mtype)},  ; {mtype.name}",
        "  header-pn," if cls.PN_ID_REQUIRED else "  header,",
        f"  {int(HeaderKey.BODY)} => {name}-body,",
        "}",
        f"{name}-body = {{",
        *_body_lines(cls, "  "),
        "}",
    ]


def render_cddl() -> str:
    """The CDDL of every message and sealed record, as docs/wire.md embeds it."""
    types = sorted(MESSAGE_CLASSES)
    out: list[str] = [
        "; CPNS protocol version 1, generated from cpns.messages.model (do not edit).",
        "; Encoding: deterministic CBOR (RFC 8949 section 4.2.1); see 'Strictness'.",
        "",
        "cpns-message = " + "\n  / ".join(rule_name(MESSAGE_CLASSES[t]) for t in types),
        "",
        "header = (",
        f"  {int(HeaderKey.TXID)} => txid,",
        f"  {int(HeaderKey.SOURCE)} => cpns-id,  ; source Entity ID",
        f"  {int(HeaderKey.DESTINATION)} => cpns-id,  ; destination Entity ID",
        f"  ? {int(HeaderKey.PN_ID)} => cpns-id,  ; PN ID",
        f"  ? {int(HeaderKey.FLOW)} => flow-id,  ; flow (correlation) ID, not a security input",
        ")",
        "",
        "; the header of a message whose PN ID is mandatory (PN Establishment)",
        "header-pn = (",
        f"  {int(HeaderKey.TXID)} => txid,",
        f"  {int(HeaderKey.SOURCE)} => cpns-id,  ; source Entity ID",
        f"  {int(HeaderKey.DESTINATION)} => cpns-id,  ; destination Entity ID",
        f"  {int(HeaderKey.PN_ID)} => cpns-id,  ; PN ID",
        f"  ? {int(HeaderKey.FLOW)} => flow-id,  ; flow (correlation) ID, not a security input",
        ")",
        "",
        f"txid = bstr .size {TXID_LEN}",
        f"flow-id = bstr .size {FLOW_LEN}",
        f"cpns-id = tstr .regexp {_text(ID_PATTERN.pattern)}",
    ]
    for mtype in types:
        out.append("")
        out += _message_rule(mtype)
    for record in RECORD_CLASSES:
        out += ["", f"{rule_name(record)} = {{", *_body_lines(record, "  "), "}"]
    for enum in _enums_used():
        out.append("")
        out += _enum_block(enum)
    return "\n".join(out) + "\n"


#: References to design notes kept outside the repository; the published table drops them.
_DESIGN_REF = re.compile(r"\s*\(DESIGN §[^)]*\)")


def _cell(text: str) -> str:
    return _DESIGN_REF.sub("", text).replace("|", "\\|")


def render_status_table(codes: Iterable[ErrorCode] = ErrorCode) -> str:
    """The Markdown table of every status code: value, name, meaning."""
    meaning = enum_comments(ErrorCode)
    rows = ["| value | name | meaning |", "|---:|---|---|"]
    rows += [f"| {int(c)} | `{c.name}` | {_cell(meaning.get(c.name, ''))} |" for c in codes]
    return "\n".join(rows) + "\n"
