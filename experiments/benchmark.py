"""Hand-written backward pass vs jax.grad and CPU peers: writes experiments/results/benchmark.{md,json,csv}.

Run from the repository root (needs the ``bench`` extra: pip install -e ".[bench]")::

    python -m experiments.benchmark            # all configurations, about 3-5 minutes on 2 cores
    python -m experiments.benchmark --quick    # tiny only, a few rounds: a smoke run

The same benchmark is ``purebp bench`` (it prints the table and writes nothing
unless given --out). See purebp/bench.py for what is timed and how.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from purebp.cli import main as purebp_main

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``purebp bench`` with its output written to experiments/results/; return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out" not in argv:
        argv += ["--out", str(RESULTS / "benchmark")]
    return purebp_main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(main())
