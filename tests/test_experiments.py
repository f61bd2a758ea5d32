"""Every experiment script runs in --quick mode and writes well-formed CSV, Markdown and PNG.

Each script runs in its own process (as a user would run it: ``python -m
experiments.NAME --quick --out DIR``), so the test suite's JAX settings do not
leak into it. The numbers are not checked here (the scripts' results are);
the shape of the output is: a CSV with a header and consistent rows, a
Markdown page whose tables all have as many cells per row as header cells (a
stray '|' inside a cell breaks that), and a PNG that decodes to a non-empty
image. One script is also run twice to check it is deterministic by seed.
"""

from __future__ import annotations

import csv
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("equivalence", "training_curves", "vanishing_gradients", "learning_rate", "template")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TABLE_RULE = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+$")


def run_quick(name: str, out: Path) -> subprocess.CompletedProcess:
    """Run ``python -m experiments.<name> --quick --out <out>`` from the repository root; fail with its output."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", f"experiments.{name}", "--quick", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"{' '.join(command)} exited with {result.returncode}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Run each script at most once per test session; return a function name -> its output directory."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            run_quick(name, out)
            done[name] = out
        return done[name]

    return get


def check_csv(path: Path) -> None:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) >= 2, f"{path.name}: expected a header and at least one row, got {len(rows)} lines"
    header = rows[0]
    assert all(name.strip() for name in header), f"{path.name}: empty column name in {header}"
    assert len(set(header)) == len(header), f"{path.name}: duplicate column names in {header}"
    for number, row in enumerate(rows[1:], start=2):
        assert len(row) == len(header), f"{path.name} line {number}: {len(row)} fields, header has {len(header)}"


def table_cells(line: str) -> int:
    return len(line.strip().strip("|").split("|"))


def check_markdown(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines and lines[0].startswith("# "), f"{path.name}: should start with a '# ' title, got {lines[:1]}"
    rules = [i for i, line in enumerate(lines) if TABLE_RULE.match(line.strip())]
    assert rules, f"{path.name}: no Markdown table (no |---| rule line)"
    for rule in rules:
        assert rule > 0 and lines[rule - 1].startswith("|"), f"{path.name} line {rule + 1}: a table rule with no header"
        width = table_cells(lines[rule - 1])
        assert table_cells(lines[rule]) == width, f"{path.name} line {rule + 1}: rule and header differ in width"
        body = rule + 1
        assert body < len(lines) and lines[body].startswith("|"), f"{path.name} line {rule + 1}: a table with no rows"
        while body < len(lines) and lines[body].startswith("|"):
            cells = table_cells(lines[body])
            assert cells == width, f"{path.name} line {body + 1}: {cells} cells, header has {width}: {lines[body]!r}"
            body += 1


def check_png(path: Path) -> None:
    content = path.read_bytes()
    assert content[:8] == PNG_SIGNATURE, f"{path.name}: not a PNG file"
    width, height = struct.unpack(">II", content[16:24])  # the IHDR chunk comes first
    assert width > 0 and height > 0, f"{path.name}: empty image {width}x{height}"
    import matplotlib.image

    pixels = matplotlib.image.imread(path)  # decodes every chunk: a truncated file raises
    assert pixels.shape[:2] == (height, width)
    assert pixels.min() < pixels.max(), f"{path.name}: a blank image"


@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_run_writes_well_formed_outputs(name, outputs):
    out = outputs(name)
    written = sorted(p.name for p in out.iterdir())
    expected = [f"{name}_quick.{suffix}" for suffix in ("csv", "md", "png")]
    assert written == expected, f"experiments.{name} --quick wrote {written}, expected {expected}"
    check_csv(out / f"{name}_quick.csv")
    check_markdown(out / f"{name}_quick.md")
    check_png(out / f"{name}_quick.png")


def test_same_seed_same_results(outputs, tmp_path):
    """learning_rate --quick twice: the CSV (every loss of every step) is identical byte for byte."""
    first = (outputs("learning_rate") / "learning_rate_quick.csv").read_bytes()
    run_quick("learning_rate", tmp_path)
    assert (tmp_path / "learning_rate_quick.csv").read_bytes() == first


def test_template_is_short():
    """The issue's promise: a new experiment with the public API in under 40 lines."""
    lines = (ROOT / "experiments" / "template.py").read_text().splitlines()
    assert len(lines) < 40, f"experiments/template.py has {len(lines)} lines"
