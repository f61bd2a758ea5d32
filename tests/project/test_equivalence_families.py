"""``python -m experiments.equivalence --families ...``: rows per architecture, resumed without duplicates.

Each run is its own process (the script turns x64 on at import). A run is stopped three ways: by asking for
fewer trials first, by a partial architecture left at the end of the CSV (what a kill mid-write leaves), and
by SIGKILL while it runs; every rerun must continue after the last complete architecture, drop the partial
one, and end with each architecture's rows exactly once.
"""

from __future__ import annotations

import collections
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSV_NAME = "equivalence_families.csv"


def run(out: Path, trials: int, *families: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "experiments.equivalence", "--families", *families, "--trials", str(trials),
               "--quick", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"{command} exited {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )
    return result


def architectures(path: Path) -> dict[tuple[str, int], list[dict]]:
    """(family, index) -> its rows; checks each architecture's rows are all there, once."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    grouped = collections.defaultdict(list)
    for row in rows:
        grouped[(row["family"], int(row["index"]))].append(row)
    for key, members in grouped.items():
        assert len(members) == int(members[0]["rows"]), f"{key}: {len(members)} rows, it says {members[0]['rows']}"
        leaves = [(r["oracle"], r["layer"], r["param"]) for r in members]
        assert len(set(leaves)) == len(leaves), f"{key}: a leaf appears twice: {sorted(leaves)}"
        assert {r["oracle"] for r in members} == {"jax.grad", "numpy"}
        assert {r["dtype"] for r in members} == {("float64", "float32")[key[1] % 2]}
    return grouped


def cut_partial_architecture(path: Path, family: str, index: int) -> None:
    """Append what a kill during a write leaves: some rows of an architecture, the last one cut mid-line."""
    with open(path, newline="") as handle:
        lines = handle.readlines()
    rows = [line for line in lines[1:] if line.startswith(f"{family},0,")]
    partial = [line.replace(f"{family},0,", f"{family},{index},", 1) for line in rows[:2]]
    with open(path, "a") as handle:
        handle.write("".join(partial) + rows[2][: len(rows[2]) // 2])


@pytest.mark.slow  # each runs the experiment in a fresh process (seconds of imports and compiles)
def test_resume_continues_after_the_last_complete_architecture(tmp_path):
    first = run(tmp_path, 2, "mlp")
    assert "resuming" not in first.stderr
    path = tmp_path / CSV_NAME
    cut_partial_architecture(path, "mlp", 2)
    second = run(tmp_path, 3, "mlp")
    assert "mlp: resuming at architecture 2 of 3" in second.stderr
    assert sorted(architectures(path)) == [("mlp", 0), ("mlp", 1), ("mlp", 2)]
    table = (tmp_path / "equivalence_families.md").read_text()
    assert "| mlp | jax.grad | float64 | 2 |" in table and "| mlp | numpy | float32 | 1 |" in table
    assert "purebp.testing.make_case(CaseSpec(" in table


@pytest.mark.slow  # each runs the experiment in a fresh process (seconds of imports and compiles)
def test_a_resume_with_other_arguments_is_refused(tmp_path):
    run(tmp_path, 1, "mlp")
    command = [sys.executable, "-m", "experiments.equivalence", "--families", "mlp", "--trials", "2", "--quick",
               "--seed", "7", "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "use the --seed" in result.stderr


@pytest.mark.slow
def test_every_family_killed_and_resumed_has_each_architecture_once(tmp_path):
    run(tmp_path, 3, "mlp", "layers", "conv")
    path = tmp_path / CSV_NAME
    cut_partial_architecture(path, "conv", 3)
    command = [sys.executable, "-m", "experiments.equivalence", "--families", "mlp", "layers", "conv", "--trials",
               "6", "--quick", "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    size = path.stat().st_size
    deadline = time.monotonic() + 120
    while process.poll() is None and path.stat().st_size == size and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # after the first architecture of this run lands, or after it ended
    _, stderr = process.communicate(timeout=60)
    assert "resuming at architecture 3 of 6" in stderr
    resumed = run(tmp_path, 6, "mlp", "layers", "conv")
    assert "resuming at architecture" in resumed.stderr
    done = architectures(path)
    assert sorted(done) == [(family, index) for family in ("conv", "layers", "mlp") for index in range(6)]
    # the NumPy oracle gives every leaf check_gradients gives
    for key, members in done.items():
        by_oracle = collections.Counter(r["oracle"] for r in members)
        assert by_oracle["jax.grad"] == by_oracle["numpy"], key
    assert "| conv | numpy | float32 | 3 |" in (tmp_path / "equivalence_families.md").read_text()
