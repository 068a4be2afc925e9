"""The documentation stays true: state tables in docs/procedures/ are the code's tables."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from cpns.protocol._machine import render_transitions

DOCS = Path(__file__).resolve().parents[2] / "docs"
_BLOCK = re.compile(r"<!-- transitions: ([\w.]+) -->\n(.*?)<!-- end -->", re.S)


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(text)]


def render_docs(text: str) -> str:
    """Replace each transitions block with the table rendered from the code."""

    def fill(match: re.Match[str]) -> str:
        module, _, name = match.group(1).rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return f"<!-- transitions: {match.group(1)} -->\n{render_transitions(cls)}\n<!-- end -->"

    return _BLOCK.sub(fill, text)


def test_procedure_state_tables_match_the_code() -> None:
    """STYLE §9: the state tables of docs/procedures/ are generated from TRANSITIONS; run
    `python tests/unit/test_docs.py` to regenerate them after changing a machine."""
    pages = sorted((DOCS / "procedures").glob("*.md"))
    assert pages
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert render_docs(text) == text, f"{page.name}: regenerate the state tables"


def test_drift_is_detected() -> None:
    """The check above can fail: a stale table is not equal to its regeneration."""
    stale = (
        "<!-- transitions: cpns.protocol.key_assignment.EUKeyAssignmentDevice -->\n"
        "| old |\n<!-- end -->"
    )
    assert render_docs(stale) != stale


def test_readme_library_example_runs() -> None:
    """STYLE §9: the README's in-memory example runs one procedure end to end, as printed
    (it ends with an assert that the PN GW saw the PNE's acknowledgement)."""
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Using the library") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    exec(compile(match.group(1), "README.md", "exec"), {})  # our own README, as printed


def _metric_names() -> list[str]:
    """The exposed name of every metric cpns defines (counters with their ``_total``)."""
    from prometheus_client import Counter

    from cpns.metrics import ALL_METRICS

    names = []
    for metric in ALL_METRICS:
        [family] = metric.describe()
        names.append(family.name + ("_total" if isinstance(metric, Counter) else ""))
    return names


def test_every_metric_is_documented() -> None:
    """docs/metrics.md is the metrics reference: every metric cpns registers has a row
    there (its exposed name in backquotes), and every cpns_ name there is a metric."""
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    names = _metric_names()
    assert len(names) == len(set(names)) >= 20
    missing = [name for name in names if f"| `{name}` |" not in text]
    assert missing == []
    mentioned = set(re.findall(r"`(cpns_[a-z_]+)`", text))
    assert mentioned <= set(names)


def test_metrics_doc_is_linked() -> None:
    """A newcomer finds the metrics reference from the README and the deployment guide."""
    assert "docs/metrics.md" in (DOCS.parent / "README.md").read_text(encoding="utf-8")
    assert "(metrics.md)" in (DOCS / "deployment.md").read_text(encoding="utf-8")


if __name__ == "__main__":
    for page in sorted((DOCS / "procedures").glob("*.md")):
        page.write_text(render_docs(page.read_text(encoding="utf-8")), encoding="utf-8")
