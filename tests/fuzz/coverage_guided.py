"""Coverage-guided runs with atheris (libFuzzer), when it is installed (optional).

``python -m tests.fuzz.coverage_guided TARGET RUNS [SEED]`` fuzzes one target with
libFuzzer's coverage feedback over the instrumented ``cpns`` code, starting from the same
seed corpus as the mutation engine. libFuzzer prints its own ``exec/s``; a crash (any
exception but the decoder's own error, or a round-trip violation) stops the run with the
input written to ``crash-*`` in the current directory. ``scripts/fuzz --atheris`` runs
every target this way, one after another. atheris is not a dependency of the project:
``pip install atheris`` (wheels exist for CPython 3.13 on Linux x86-64).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris  # type: ignore[import-not-found]

from tests.fuzz.targets import TARGETS


def main() -> None:
    """Set libFuzzer up for one target and run it (does not return)."""
    name, runs = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    target = TARGETS[name]()
    corpus = Path(tempfile.mkdtemp(prefix=f"cpns-fuzz-{name}-"))
    for i, data in enumerate(target.seeds()):
        (corpus / f"seed-{i}").write_bytes(data)
    atheris.instrument_all()

    def one_input(data: bytes) -> None:
        target.run(data)  # raises on a finding; the target catches its own error

    atheris.Setup(
        [sys.argv[0], f"-runs={runs}", f"-seed={seed}", "-max_len=70000", str(corpus)],
        one_input,
    )
    atheris.Fuzz()


if __name__ == "__main__":
    main()
