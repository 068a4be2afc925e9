"""Long fuzz runs: ``python -m tests.fuzz [--runs N] [--seed S] [TARGET ...]``.

Runs each target (all by default) one after another in this one process, on one core,
prints inputs per second for each, and writes every finding to ``--out`` (one file per
input, with the traceback beside it). Exit status 1 if anything was found.
``scripts/fuzz`` is the usual way in.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.fuzz.engine import RunStats, fuzz
from tests.fuzz.targets import TARGETS


def _progress(stats: RunStats) -> None:
    print(
        f"  {stats.target}: {stats.inputs:,} inputs, {stats.rate:,.0f}/s, "
        f"{len(stats.findings)} findings",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the targets, print the table; 1 if anything was found."""
    parser = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__)
    parser.add_argument("targets", nargs="*", choices=[*TARGETS, []], metavar="TARGET")
    parser.add_argument("--runs", type=int, default=100_000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=0, help="random seed (runs are repeatable)")
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"), help="findings dir")
    args = parser.parse_args(argv)
    names = args.targets or list(TARGETS)
    print(f"fuzzing {', '.join(names)}: {args.runs:,} inputs each, seed {args.seed}", flush=True)
    results: list[RunStats] = []
    for name in names:
        stats = fuzz(TARGETS[name](), runs=args.runs, seed=args.seed, progress=_progress)
        results.append(stats)
        for i, finding in enumerate(stats.findings):
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}-{i}.bin").write_bytes(finding.data)
            (args.out / f"{name}-{i}.txt").write_text(finding.error + "\n\n" + finding.trace)
        _progress(stats)
    print()
    print(
        f"{'target':<12} {'inputs':>12} {'accepted':>10} {'seconds':>9} {'inputs/s':>10}  findings"
    )
    for s in results:
        print(
            f"{s.target:<12} {s.inputs:>12,} {s.accepted:>10,} {s.seconds:>9.1f} "
            f"{s.rate:>10,.0f}  {len(s.findings)}"
        )
        for finding in s.findings[:3]:
            print(f"    {finding.error}")
    return 1 if any(s.findings for s in results) else 0


if __name__ == "__main__":
    sys.exit(main())
