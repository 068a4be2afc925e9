"""docs/conformance.md cannot drift: every SHALL of 000 §7.5, 002 §7.5.4 and 003 and every rule of
004 §5.x.1 has a row, every row quotes the seed verbatim, names code that exists and a test
that exists."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT.parent / "shared" / "seeds"
DOC = ROOT / "docs" / "conformance.md"

_ROW = re.compile(r"^\| *(?P<id>[0-9]{3}-R[0-9]+) *\|(?P<cells>.*)\|\s*$")
_TICKED = re.compile(r"`([^`]+)`")
_CODE = re.compile(r"cpns(\.\w+)+(:[\w.]+)?")


def _norm(text: str) -> str:
    return " ".join(text.replace("\u2019", "'").split())


def rows(doc: str) -> list[dict[str, str]]:
    """The requirement rows: id, seed (file prefix), quote, code, tests."""
    out = []
    for line in doc.splitlines():
        match = _ROW.match(line)
        if match:
            cells = [c.strip() for c in match.group("cells").split("|")]
            assert len(cells) == 4, f"{match.group('id')}: expected 5 columns"
            out.append(
                {
                    "id": match.group("id"),
                    "quote": cells[1].strip('"'),
                    "code": cells[2],
                    "tests": cells[3],
                }
            )
    return out


def _seed(prefix: str) -> str:
    [path] = SEEDS.glob(f"{prefix}_*.txt")
    return _norm(path.read_text(encoding="utf-8"))


def requirement_lines(prefix: str) -> list[str]:
    """The seed lines that state a requirement: the SHALL sentences of 000 §7.5 and 002 §7.5.4;
    numbered steps and SHALL sentences of 003 §7.4.2.2; the rules of 004 §5.x.1-§5.x.4."""
    [path] = SEEDS.glob(f"{prefix}_*.txt")
    lines = path.read_text(encoding="utf-8").splitlines()
    if prefix == "000":
        start = next(i for i, line in enumerate(lines) if line.startswith("7.5 Mutual"))
        wanted = [line for line in lines[start:] if "SHALL" in line]
    elif prefix == "002":
        start = next(i for i, line in enumerate(lines) if line.startswith("7.5.4 PNE"))
        wanted = [line for line in lines[start:] if "SHALL" in line]
    elif prefix == "003":
        start = next(i for i, line in enumerate(lines) if line.startswith("7.4.2.2 Without"))
        wanted = [
            line
            for line in lines[start:]
            if (re.match(r"^\d+\. ", line) or "SHALL" in line)
            and "SHALL perform the following procedure" not in line
        ]
    else:
        start = next(i for i, line in enumerate(lines) if line.startswith("5.x.1"))
        wanted = [
            line
            for line in lines[start:]
            if line.startswith(("CPNS Server", "Assigned", "If both"))
        ]
    return [_norm(line) for line in wanted]


DOC_ROWS = rows(DOC.read_text(encoding="utf-8")) if DOC.exists() else []


def test_doc_has_rows() -> None:
    """The conformance page exists and lists requirements."""
    assert len(DOC_ROWS) >= 20


@pytest.mark.skipif(not SEEDS.exists(), reason="../shared/seeds not beside the checkout")
@pytest.mark.parametrize("prefix", ["000", "002", "003", "004"])
def test_every_requirement_has_a_row(prefix: str) -> None:
    """Every SHALL of 000 §7.5, 002 §7.5.4 and 003 §7.4.2.2 and every rule of 004 §5.x is
    quoted by a row."""
    quotes = [_norm(r["quote"]) for r in DOC_ROWS if r["id"].startswith(prefix)]
    missing = [
        line for line in requirement_lines(prefix) if not any(q and q in line for q in quotes)
    ]
    assert not missing, "no conformance row for:\n" + "\n".join(missing)


@pytest.mark.skipif(not SEEDS.exists(), reason="../shared/seeds not beside the checkout")
@pytest.mark.parametrize("row", DOC_ROWS, ids=lambda r: r["id"])
def test_row_quotes_the_seed(row: dict[str, str]) -> None:
    """Each row's quote is verbatim seed text (so rows cannot invent requirements)."""
    assert len(row["quote"]) >= 15
    assert _norm(row["quote"]) in _seed(row["id"][:3])


@pytest.mark.parametrize("row", DOC_ROWS, ids=lambda r: r["id"])
def test_row_code_exists(row: dict[str, str]) -> None:
    """Each row names code that exists: `module:attribute.path`."""
    refs = [r for r in _TICKED.findall(row["code"]) if _CODE.fullmatch(r)]
    assert refs, "no code reference"
    for ref in refs:
        module, _, attr = ref.partition(":")
        obj = importlib.import_module(module)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        n.name
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test")
    }


@pytest.mark.parametrize("row", DOC_ROWS, ids=lambda r: r["id"])
def test_row_tests_exist(row: dict[str, str]) -> None:
    """Each row names at least one test that exists: `tests/...py::test_name`."""
    refs = _TICKED.findall(row["tests"])
    assert refs, "no test reference"
    for ref in refs:
        file, _, name = ref.partition("::")
        path = ROOT / file
        assert path.exists(), ref
        assert name in _test_names(path), ref


def test_checker_can_fail() -> None:
    """The checks above can fail: a row quoting text absent from the seed is caught."""
    fake = rows('| 003-R99 | x | "text that no seed contains" | `cpns.errors:Nope` | `t.py::t` |')
    assert _norm(fake[0]["quote"]) not in _seed("003")
    with pytest.raises(AttributeError):
        test_row_code_exists(fake[0])
