"""Shared plumbing for the experiment scripts: arguments, progress bars, CSV/Markdown/PNG output.

Every study is ``python -m experiments.NAME [--quick] [--seed S] [--out DIR]``
and writes ``NAME.csv``, ``NAME.md`` and ``NAME.png`` into ``DIR`` (default
experiments/results/); ``--quick`` runs a tiny version for the test suite and
writes ``NAME_quick.*`` so it never overwrites the committed results.
Nothing here is needed to use purebp: it only keeps each study short.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the three flags every study takes: --quick, --seed and --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds), for the test suite")
    parser.add_argument("--seed", type=int, default=0, help="every random draw derives from this seed")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output directory (default experiments/results)")
    return parser.parse_args(argv)


def output_stem(args: argparse.Namespace, name: str) -> Path:
    """Return DIR/NAME (or DIR/NAME_quick), creating DIR: the path that .csv, .md and .png are appended to."""
    args.out.mkdir(parents=True, exist_ok=True)
    return args.out / (f"{name}_quick" if args.quick else name)


def progress(iterable: Iterable, **options) -> Iterable:
    """Wrap ``iterable`` in a tqdm progress bar (silent when stderr is not a terminal), or return it as is."""
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is a nicety, not a requirement
        return iterable
    return tqdm(iterable, disable=None, **options)


def machine() -> str:
    """One line naming the machine, for the 'measured on' sentence of every table."""
    import jax

    cores = os.cpu_count()
    device = jax.devices()[0]
    return (
        f"{cores}-core {platform.machine()} CPU, Python {platform.python_version()}, jax {jax.__version__} "
        f"on {device.platform}"
    )


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """Write ``rows`` (dicts with the same keys, in order) as a CSV file with a header line."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def fmt(value: object, spec: str = ".3g") -> str:
    """Format one table cell: floats with ``spec`` (NaN as '—'), everything else with str()."""
    if isinstance(value, float):
        return "—" if math.isnan(value) else format(value, spec)
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], specs: dict[str, str] | None = None) -> list[str]:
    """Return the lines of a Markdown table of ``rows`` restricted to ``columns`` (header, rule, one line per row)."""
    specs = specs or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row[c], specs.get(c, ".3g")) for c in columns) + " |")
    return lines


def write_markdown(path: Path, lines: Sequence[str]) -> None:
    """Write ``lines`` as a Markdown file."""
    path.write_text("\n".join(lines) + "\n")


def pyplot():
    """Return matplotlib.pyplot on the non-interactive Agg backend (scripts run headless and in tests)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
