"""The PN Establishment simulator (tests/pn_sim.py) over a fixed budget of seeded schedules
(issue 6 item 9, N3; docs/procedures/pn-establishment.md, "Simulator").

CI runs ``CI_SEEDS`` schedules on the memory store and ``SQLITE_SEEDS`` on a SQLite store
that is closed and reopened at every server crash. Longer local runs::

    CPNS_SIM_SEEDS=50000 .venv/bin/python -bb -m pytest tests/property/test_pn_simulator.py -q

A failing schedule raises with its seed and the one-line command that replays it alone::

    CPNS_SIM_SEED=1234 .venv/bin/python -bb -m pytest tests/property/test_pn_simulator.py -q
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.pn_sim import Simulation, SimulationFailure, iter_seeds, replay_hint

from cpns.protocol import pne_auth

#: Schedules on the memory store per CI run (about 20 ms of CPU each).
CI_SEEDS = 1700
#: Schedules on a SQLite store per CI run (seeds after the memory ones).
SQLITE_SEEDS = 20
#: Schedules where every chaotic round overlaps two establishments.
OVERLAP_SEEDS = 300


def _run(seeds: list[int], store_dir: Path | None = None) -> None:
    for seed in seeds:
        Simulation(seed, store_dir=store_dir / str(seed) if store_dir else None).run()


def test_random_schedules_keep_safety_and_liveness() -> None:
    """Issue 6 item 9 / N1 / N3, 002 §7.5.4 and 000 §7.5: under loss, duplication, delay,
    reordering, crashes (restart from stored facts) and a PAN adversary, no PNE accepts a
    forged server, no key reaches a party outside its holders, the stored state of server,
    PN GW and PNE stays within the resync rule, every round ends, and afterwards one
    clean establishment makes every PNE a member."""
    _run(iter_seeds(CI_SEEDS))


def test_random_schedules_on_a_sqlite_store(tmp_path: Path) -> None:
    """Issue 6 item 2 (pending state in the store: a restarted server loses nothing): the
    same properties when the server's facts live in SQLite, sealed at rest, and each
    server crash closes and reopens the database."""
    if os.environ.get("CPNS_SIM_SEED"):
        seeds = iter_seeds(0)
    else:
        seeds = list(range(CI_SEEDS, CI_SEEDS + SQLITE_SEEDS))
    for seed in seeds:
        (tmp_path / str(seed)).mkdir()
    _run(seeds, tmp_path)


def test_overlapping_establishments() -> None:
    """N1 with two PNs established at once through one PN GW in every chaotic round (the
    same PNEs invited to both, TK challenges superseded by the other run): the same
    properties, and no 003 re-assignment is asked for a PNE that did not lose track."""
    if os.environ.get("CPNS_SIM_SEED"):
        seeds = iter_seeds(0)
    else:
        seeds = list(range(50_000, 50_000 + OVERLAP_SEEDS))
    for seed in seeds:
        Simulation(seed, concurrency=1.0).run()


def test_a_schedule_is_deterministic() -> None:
    """N3 (replay): the same seed gives the same schedule, step for step."""
    first, second = Simulation(7), Simulation(7)
    first.run()
    second.run()
    assert first.trace == second.trace
    assert len(first.trace) > 20


def test_a_failing_schedule_names_its_seed_and_replay_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """N3 (replay): with a PNE that accepts any hash_server (a broken 002 §7.5.4.1 last
    paragraph), some schedule fails, and the failure names its seed and the command that
    replays it."""

    def accept_anything(self: pne_auth.RandHashResponder, hash_server_value: bytes) -> bytes:
        proof = self._proof
        assert proof is not None
        return proof.sk

    monkeypatch.setattr(pne_auth.RandHashResponder, "accept", accept_anything)
    for seed in range(200):
        try:
            Simulation(seed).run()
        except SimulationFailure as exc:
            text = str(exc)
            assert f"seed {seed}:" in text
            assert replay_hint(seed) in text
            assert f"CPNS_SIM_SEED={seed} " in replay_hint(seed)
            assert "accepted a server" in text
            return
    pytest.fail("no schedule caught a PNE that accepts a forged server")
