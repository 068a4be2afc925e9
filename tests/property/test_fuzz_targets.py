"""Bounded fuzz run of every decoder, in CI (issue 5 item 17).

Each decoder that reads a peer's or a file's bytes gets a few thousand mutated inputs
from ``tests/fuzz`` (seed corpus of valid encodings, byte, CBOR-structure and text
mutations; deterministic seed): nothing may escape but the decoder's own error, and every
accepted input must re-encode byte for byte (messages, records, frames) or re-parse to
itself (Digest headers, CSV). ``scripts/fuzz`` runs the same targets for as long as asked
and prints inputs per second.
"""

from __future__ import annotations

import random

import pytest
from tests.fuzz.engine import fuzz, mutate
from tests.fuzz.targets import TARGETS, PropertyViolation, Target

from cpns.server.admin import TKImportError, parse_tk_csv

#: Inputs per target in CI: the targets together stay well under a minute.
CI_RUNS = {
    "keystore": 8000,
    "keystore-journal": 8000,
    "digest": 15000,
    "pn-establishment": 15000,
}
DEFAULT_RUNS = 30000


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_bounded_fuzz_run_finds_nothing(name: str) -> None:
    """Issue 5 item 17: every decoder raises only its own error on mutated input, and
    what it accepts re-encodes to the same bytes (or re-parses to the same value)."""
    target = TARGETS[name]()
    stats = fuzz(target, runs=CI_RUNS.get(name, DEFAULT_RUNS), seed=1)
    assert [f.error for f in stats.findings] == []
    seeds = len(target.seeds())
    assert stats.accepted >= seeds, "every seed is a valid input and must be accepted"
    assert stats.inputs - stats.accepted > 0, "the mutations must reach refusals too"


def test_the_engine_reports_a_foreign_exception_and_a_round_trip_failure() -> None:
    """A target that raises something else, or accepts what does not round-trip, is a
    finding (the fuzzer would not be worth running if it could not see one)."""

    def run(data: bytes) -> bool:
        if len(data) % 3 == 0:
            raise ValueError("boom")
        if len(data) % 3 == 1:
            raise PropertyViolation("differs")
        return True

    target = Target("probe", run, (KeyError,), lambda: [b"abcd", b"ab"])
    stats = fuzz(target, runs=200, seed=0, max_findings=1000)
    kinds = {f.error.split(":", 1)[0] for f in stats.findings}
    assert kinds == {"crash", "property"}


def test_mutations_are_deterministic_and_varied() -> None:
    """A run is repeatable from its seed, and the mutator produces many distinct inputs."""
    target = TARGETS["messages"]()
    corpus = target.seeds()
    first = [mutate(random.Random(7), target, corpus) for _ in range(1)]
    again = [mutate(random.Random(7), target, corpus) for _ in range(1)]
    assert first == again
    rng = random.Random(3)
    assert len({mutate(rng, target, corpus) for _ in range(500)}) > 400


@pytest.mark.parametrize(
    "text",
    [
        "entity_id,tk\npne-1\r2,00\n",  # a lone CR inside an unquoted field
        "entity_id,tk\n" + "a" * 200_000 + ",00\n",  # a field over csv's size limit
    ],
)
def test_tk_csv_syntax_errors_are_import_errors(text: str) -> None:
    """Issue 5 item 17 (found by the tk-csv target): csv.Error escaped parse_tk_csv; now
    every malformed file is a TKImportError naming its line."""
    with pytest.raises(TKImportError, match=r"line 2"):
        list(parse_tk_csv(text, source="fuzz.csv"))
