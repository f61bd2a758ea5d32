"""Smoke run of the benchmark (``purebp bench --quick``): the tables are well-formed and every contender
computes the same gradient. Timings are never asserted."""

from __future__ import annotations

import json

import pytest

from purebp import bench
from purebp.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "benchmark"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    return out, json.loads(out.with_suffix(".json").read_text())


def _tables(markdown: str) -> list[list[list[str]]]:
    """Split markdown into tables: lists of rows, each a list of cell texts."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_quick_run_writes_well_formed_tables(quick_run):
    out, _ = quick_run
    markdown = out.with_suffix(".md").read_text()
    tables = _tables(markdown)
    assert len(tables) == 4, markdown  # value_and_grad, training, compile, targets
    for table in tables:
        header, separator, *rows = table
        assert all(cell == "---" for cell in separator) and len(separator) == len(header), table
        assert rows and all(len(row) == len(header) for row in rows), table
    gradient = tables[0]
    assert gradient[0][:4] == ["config", "contender", "median µs", "ratio"]
    contenders = [row[1] for row in gradient[2:]]
    assert contenders[:2] == ["purebp", "jax.grad"]
    assert set(contenders) == {"purebp", "jax.grad", *bench.available_peers()}
    for row in gradient[2:]:
        assert float(row[2]) > 0, row
    assert "Machine:" in markdown and "cores" in markdown
    assert out.with_suffix(".csv").read_text().splitlines()[0].startswith("table,config,contender")


def test_every_contender_computes_the_same_gradient(quick_run):
    # float32: per-leaf relative L2 error against purebp's gradient within 1e-4 (a wrong peer is ~1)
    _, result = quick_run
    rows = {row["contender"]: row for row in result["gradient"]}
    assert rows["jax.grad"]["ratio"] == 1.0
    for name, row in rows.items():
        assert row["max_rel_error_vs_purebp"] <= 1e-4, (name, row)
    assert {row["contender"] for row in result["training"]} >= {"purebp", "jax.grad"}
    assert all(row["samples_per_s"] > 0 for row in result["training"])
    assert {row["contender"] for row in result["compile"]} == {"purebp", "jax.grad"}
    assert all(isinstance(target["passed"], bool) for target in result["targets"])


def test_flop_count_of_a_small_network():
    # forward 2N(3*4 + 4*2) = 160, weight gradients the same, input gradient of layer 2 only 2N*4*2 = 64
    config = bench.Config("t", (3, 4, 2), "tanh", 4)
    assert config.flops == 160 + 160 + 64


def test_unknown_configuration_is_refused_before_running():
    with pytest.raises(SystemExit, match="unknown configuration"):
        main(["bench", "--configs", "tiny,huge"])
    with pytest.raises(ValueError, match="rounds"):
        bench.run(["tiny"], rounds=0)
