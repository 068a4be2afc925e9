"""Sequence diagrams in the terminal, drawn the way the seeds draw their figures.

Three lifelines, PNE | PN GW | CPNS Server, one arrow per message with its name on it and
what it carries (or its outcome) underneath. ``cpns demo`` draws the flow it just ran
with these, ``cpns trace`` a flow read back from the parties' logs. Plain text only: every
row is one line, the lifelines stay in their columns whatever the labels.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = ["LIFELINE", "WIDTH", "Column", "arrow", "header", "lifelines", "under"]

type Column = Literal["PNE", "GW", "SRV"]

#: Column of each party's lifeline.
LIFELINE: Final[dict[Column, int]] = {"PNE": 6, "GW": 38, "SRV": 72}
#: Width of the diagram proper (notes go to the right of it).
WIDTH: Final = LIFELINE["SRV"] + 1


def _blank() -> list[str]:
    line = [" "] * WIDTH
    for x in LIFELINE.values():
        line[x] = "|"
    return line


def lifelines() -> str:
    """A row of the three lifelines and nothing else."""
    return "".join(_blank()).rstrip()


def _fit(text: str, room: int) -> str:
    return text if len(text) <= room else text[: max(0, room - 1)] + "~"


def arrow(src: Column, dst: Column, label: str, note: str = "") -> str:
    """One message: an arrow from ``src`` to ``dst`` with ``label`` on it (cut to fit)."""
    left, right = sorted((LIFELINE[src], LIFELINE[dst]))
    room = right - left - 1
    body = f" {_fit(label, room - 2)} ".center(room, "-")
    body = body[:-1] + ">" if LIFELINE[src] < LIFELINE[dst] else "<" + body[1:]
    line = _blank()
    line[left + 1 : right] = body
    return ("".join(line) + ("  " + note if note else "")).rstrip()


def under(src: Column, dst: Column, text: str, note: str = "") -> str:
    """Text under the arrow between ``src`` and ``dst`` (what it carries, its outcome)."""
    left, right = sorted((LIFELINE[src], LIFELINE[dst]))
    text = _fit(text, right - left - 3)
    line = _blank()
    line[left + 2 : left + 2 + len(text)] = text
    return ("".join(line) + ("  " + note if note else "")).rstrip()


def header(names: dict[Column, str]) -> list[str]:
    """Two rows: the parties' roles, and ``names`` (their Entity IDs) under them."""
    rows = []
    for texts in (("PNE", "PN GW", "CPNS Server"), tuple(names.get(c, "") for c in LIFELINE)):
        line = [" "] * (WIDTH + 12)
        for x, text in zip(LIFELINE.values(), texts, strict=True):
            start = max(0, x - len(text) // 2)
            line[start : start + len(text)] = text
        rows.append("".join(line).rstrip())
    return rows
