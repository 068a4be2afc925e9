"""The CDDL of docs/wire.md is generated from the message model (issue 5 item 16)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest

from cpns.errors import ErrorCode
from cpns.messages.cddl import (
    RECORD_CLASSES,
    enum_comments,
    render_cddl,
    render_status_table,
    rule_name,
)
from cpns.messages.constants import ID_PATTERN, HeaderKey, MessageType
from cpns.messages.model import MESSAGE_CLASSES, KeyBundle, Record, f_bytes, f_int, specs

VECTORS = Path(__file__).resolve().parents[2] / "vectors" / "protocol_v1.json"


def _rule(cddl: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)} = \{{\n(.*?)^\}}", cddl, re.S | re.M)
    assert match is not None, name
    return match.group(1)


def test_every_message_type_field_key_and_bound_is_in_the_cddl() -> None:
    """Issue 5 item 16: every message type number, field key, type and size is in the CDDL,
    taken from the model's FieldSpec (so a new field or a changed bound shows up)."""
    cddl = render_cddl()
    assert set(MESSAGE_CLASSES) == set(MessageType)
    for mtype, cls in MESSAGE_CLASSES.items():
        name = rule_name(cls)
        top = _rule(cddl, name)
        assert f"{int(HeaderKey.TYPE)} => {int(mtype)}," in top
        assert f"{int(HeaderKey.BODY)} => {name}-body," in top
        body = _rule(cddl, name + "-body")
        for field_name, spec in specs(cls):
            line = next(ln for ln in body.splitlines() if ln.endswith(f"; {field_name}"))
            assert line.strip().startswith(f"{'? ' if spec.optional else ''}{spec.key} => ")
            if spec.kind == "bytes":
                size = str(spec.lo) if spec.lo == spec.hi else f"({spec.lo}..{spec.hi})"
                assert f"bstr .size {size}," in line
            if spec.kind == "int":
                assert f"{spec.lo}..{spec.hi}," in line
    for record in RECORD_CLASSES:
        body = _rule(cddl, rule_name(record))
        assert len(body.splitlines()) == len(specs(record))
    for code in ErrorCode:
        assert f": {int(code)},\n" in cddl


def test_rule_names() -> None:
    """CDDL rule names are the class names in kebab case."""
    assert rule_name(MESSAGE_CLASSES[MessageType.EUKEY_ASSIGNMENT_REQUEST]) == (
        "eukey-assignment-request"
    )
    assert rule_name(MESSAGE_CLASSES[MessageType.PNE_HELLO]) == "pne-hello"
    assert rule_name(KeyBundle) == "key-bundle"
    assert rule_name(ErrorCode) == "error-code"


def test_id_rule_is_the_code_pattern() -> None:
    """The cpns-id rule is ID_PATTERN itself, escaped as an RFC 8610 text string."""
    line = next(ln for ln in render_cddl().splitlines() if ln.startswith("cpns-id = "))
    literal = line.split(".regexp ", 1)[1]
    assert json.loads(literal) == ID_PATTERN.pattern  # CDDL and JSON escape alike here


def test_a_model_change_changes_the_cddl() -> None:
    """The generator reads the FieldSpecs: a record with another field renders differently."""

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Probe(Record):
        a: bytes = f_bytes(1, size=8)
        b: int | None = f_int(2, lo=3, hi=9, optional=True)

    from cpns.messages.cddl import _body_lines

    assert _body_lines(Probe, "") == ["1 => bstr .size 8,  ; a", "? 2 => 3..9,        ; b"]


def test_status_table_lists_every_code_with_its_meaning() -> None:
    """Issue 5 item 15/16: every status code is documented, from ErrorCode's comments, and
    the published text cites no design note outside the repository."""
    table = render_status_table()
    comments = enum_comments(ErrorCode)
    for code in ErrorCode:
        assert comments[code.name], code
        assert f"| {int(code)} | `{code.name}` |" in table
    assert "DESIGN" not in table


def test_vectors_validate_against_the_cddl() -> None:
    """Every message of the published vectors is valid under the CDDL (checked with an
    independent CDDL validator, cddl-rs via pycddl, where installed), and structural
    faults are not: an unknown body key, a wrong type number, a short txid."""
    pycddl = pytest.importorskip("pycddl")
    cddl = render_cddl()
    schema = pycddl.Schema(cddl)
    vectors = json.loads(VECTORS.read_text(encoding="ascii"))
    for vector in vectors["messages"]:
        schema.validate_cbor(bytes.fromhex(vector["cbor"]))
    bundle = pycddl.Schema(
        cddl.replace("cpns-message = ", "start = key-bundle\ncpns-message = ", 1)
    )
    bundle.validate_cbor(bytes.fromhex(vectors["assignment_003"]["key_bundle"]["cbor"]))
    hello = cbor2.loads(bytes.fromhex(vectors["messages"][-6]["cbor"]))
    assert hello[1] == MessageType.PNE_HELLO
    for bad in (
        {**hello, 6: {**hello[6], 9: 1}},
        {**hello, 1: 99},
        {**hello, 2: b"\x00" * 15},
    ):
        with pytest.raises(Exception, match=r"\w"):
            schema.validate_cbor(cbor2.dumps(bad, canonical=True))
