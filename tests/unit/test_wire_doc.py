"""docs/wire.md is true to the code: its generated blocks are regenerated and compared
(issue 5 item 16). Regenerate: ``PYTHONPATH=src python tests/vectors/make_protocol_vectors.py``."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from cpns.errors import ErrorCode
from cpns.messages.constants import HeaderKey, MessageType

ROOT = Path(__file__).resolve().parents[2]
WIRE = ROOT / "docs" / "wire.md"


def _generator() -> ModuleType:
    path = ROOT / "tests" / "vectors" / "make_protocol_vectors.py"
    spec = importlib.util.spec_from_file_location("make_protocol_vectors", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_blocks_match_the_code() -> None:
    """Issue 5 item 16: the CDDL, the Entity ID rules, the status table and the worked
    example in docs/wire.md are exactly what the model, the constants, ErrorCode and the
    vectors give today; a model change without regeneration fails here."""
    text = WIRE.read_text(encoding="utf-8")
    names = re.findall(r"<!-- generated: ([\w-]+) -->", text)
    assert sorted(names) == ["cddl", "entity-ids", "example", "status-codes"]
    assert _generator().render_wire(text) == text, "run tests/vectors/make_protocol_vectors.py"


def test_drift_is_detected() -> None:
    """The comparison above can fail: a stale CDDL block differs from its regeneration."""
    stale = "<!-- generated: cddl -->\n```cddl\nold = 1\n```\n<!-- end generated -->\n"
    fresh = _generator().render_wire(stale)
    assert fresh != stale
    assert "eukey-assignment-request-body = {" in fresh


def test_every_wire_number_is_documented() -> None:
    """Every header key, message type and status code appears in the specification."""
    text = WIRE.read_text(encoding="utf-8")
    for key in HeaderKey:
        assert f"\n| {int(key)} | {key.name.lower().replace('destination', 'dst')}" in text or (
            f"| {int(key)} |" in text
        ), key
    for mtype in MessageType:
        assert f"1 => {int(mtype)},  ; {mtype.name}" in text, mtype
    for code in ErrorCode:
        assert f"| {int(code)} | `{code.name}` |" in text, code


def test_the_specification_stands_alone_and_is_linked() -> None:
    """Issue 5 item 16: the docs cite no design note outside the repository, and the
    README and the architecture page link to the wire specification."""
    text = WIRE.read_text(encoding="utf-8")
    assert "../shared" not in text
    assert "DESIGN" not in text
    assert "STYLE" not in text
    for page in (ROOT / "README.md", ROOT / "docs" / "architecture.md"):
        assert "wire.md" in page.read_text(encoding="utf-8"), page.name
