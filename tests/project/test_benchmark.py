"""Smoke run of the benchmark (``python -m experiments.benchmark --quick``): the tables are well formed and every
contender, the idiomatic JAX baseline included, computes the same gradient. Timings are never asserted.

The smoke run is a subprocess, as a user runs it, so the suite's JAX settings do not leak into it. Also: the
idiomatic baseline is the same function as purebp's in float64, and a wrong baseline shows in the error column.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purebp
from experiments import benchmark

ROOT = Path(__file__).resolve().parents[2]
OWN_RATIO = "time / jax.grad of purebp's forward"


# the run goes beside the in-process tests (conftest.Background): the tests that read it are marked with it
QUICK_RUN = dict(
    command=[sys.executable, "-m", "experiments.benchmark", "--quick", "--out", "{out}/benchmark"],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=600,
)
uses_quick_run = pytest.mark.background("experiments.benchmark --quick", **QUICK_RUN)


@pytest.fixture(scope="module")
def quick_run(background):
    run = background.result("experiments.benchmark --quick", **QUICK_RUN)
    done, out = run.process, run.out / "benchmark"
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return out, json.loads(out.with_suffix(".json").read_text())


@pytest.fixture
def broadcasting():
    # the idiomatic baseline writes x @ w + b, as JAX users do; the suite's rank_promotion="raise" forbids that
    with jax.numpy_rank_promotion("allow"):
        yield


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


@pytest.mark.slow
@uses_quick_run
def test_quick_run_writes_well_formed_tables(quick_run):
    out, _ = quick_run
    markdown = out.with_suffix(".md").read_text()
    tables = _tables(markdown)
    assert len(tables) == 4, markdown  # value_and_grad, training, compile, targets
    for table in tables:
        header, separator, *rows = table
        assert all(cell == "---" for cell in separator) and len(separator) == len(header), table
        assert rows and all(len(row) == len(header) for row in rows), table
    gradient, training = tables[0], tables[1]
    assert gradient[0][:5] == ["config", "contender", "median µs", "time / idiomatic JAX", OWN_RATIO]
    assert training[0][:6] == ["config", "contender", "epoch ms", "samples/s", "time / idiomatic JAX", OWN_RATIO]
    for table in (gradient, training):
        header, _, *rows = table
        contenders = [row[1] for row in rows]
        assert contenders[:3] == ["purebp", "idiomatic JAX", "jax.grad of purebp's forward"], contenders
        assert "rel. err vs purebp" in header, header
        for row in rows:
            assert float(row[2]) > 0, row
            # the second ratio belongs to the phase where jax.grad of purebp's forward ran: JAX contenders only
            assert (row[header.index(OWN_RATIO)] != "") == (row[1] in benchmark.JAX_CONTENDERS), row
    contenders = [row[1] for row in gradient[2:]]
    assert set(contenders) == {*benchmark.JAX_CONTENDERS, *benchmark.available_peers()}
    assert "Machine:" in markdown and "cores" in markdown
    assert out.with_suffix(".csv").read_text().splitlines()[0].startswith("table,config,contender")


@pytest.mark.slow
@uses_quick_run
def test_every_contender_computes_the_same_gradient(quick_run):
    # float32: per-leaf relative L2 error against purebp's gradient within 1e-4 (a wrong contender is ~1)
    _, result = quick_run
    rows = {row["contender"]: row for row in result["gradient"]}
    assert set(benchmark.JAX_CONTENDERS) <= set(rows)
    assert rows[benchmark.IDIOMATIC]["ratio"] == 1.0
    assert rows[benchmark.OWN_FORWARD]["ratio_to_own_forward"] == 1.0
    for name, row in rows.items():
        assert row["max_rel_error_vs_purebp"] <= 1e-4, (name, row)
    # after the epoch every contender's parameters match purebp's to float32 rounding
    training = {row["contender"]: row for row in result["training"]}
    assert set(training) >= set(benchmark.JAX_CONTENDERS)
    for name, row in training.items():
        assert row["samples_per_s"] > 0, (name, row)
        assert row["max_rel_error_vs_purebp"] <= 1e-4, (name, row)
    assert {row["contender"] for row in result["compile"]} == set(benchmark.JAX_CONTENDERS)
    assert all(isinstance(target["passed"], bool) for target in result["targets"])


@pytest.mark.slow
@pytest.mark.parametrize("hidden", ["tanh", "relu", "sigmoid"])
def test_idiomatic_baseline_is_purebps_function(hidden, broadcasting):
    # float64: the idiomatic loss and its jax.grad equal purebp's value_and_grad, relative L2 1e-10 per leaf
    rng = np.random.default_rng(0)
    sizes = (7, 5, 4, 3)
    net = purebp.init_mlp(jax.random.key(1), sizes, (hidden, hidden, "identity"), dtype=jnp.float64)
    x = jnp.asarray(rng.normal(size=(6, sizes[0])))
    y = jnp.asarray(rng.integers(0, sizes[-1], size=6))
    loss, grads = purebp.value_and_grad(net, x, y, loss="softmax_cross_entropy")
    params = benchmark.idiomatic_params(net)
    idiomatic_loss, idiomatic_grads = jax.value_and_grad(benchmark.idiomatic_loss(hidden))(params, x, y)
    assert abs(float(idiomatic_loss) - float(loss)) <= 1e-10 * abs(float(loss))
    for (w, b), layer in zip(params, net.layers):
        np.testing.assert_array_equal(np.asarray(w).T, np.asarray(layer.w))  # the same weights, transposed
        np.testing.assert_array_equal(np.asarray(b), np.asarray(layer.b))
    pairs = [(np.asarray(layer.w), np.asarray(layer.b)) for layer in grads.layers]
    error = benchmark.max_relative_error(benchmark.pairs_from_idiomatic(idiomatic_grads), pairs)
    assert error <= 1e-10, (hidden, error)


@pytest.mark.slow
def test_a_wrong_baseline_shows_in_the_error_column(monkeypatch, broadcasting):
    # the error column is what would catch a baseline that computes another function: here tanh swapped for sigmoid
    config = benchmark.CONFIGS["tiny"]
    _, errors = benchmark.gradient_contenders(config, peers=())
    assert errors[benchmark.IDIOMATIC] <= 1e-4, errors
    monkeypatch.setitem(benchmark.IDIOMATIC_ACTIVATIONS, "tanh", jax.nn.sigmoid)
    _, errors = benchmark.gradient_contenders(config, peers=())
    assert errors[benchmark.IDIOMATIC] > 1e-2, errors
    assert errors[benchmark.OWN_FORWARD] <= 1e-4, errors


def test_flop_count_of_a_small_network():
    # forward 2N(3*4 + 4*2) = 160, weight gradients the same, input gradient of layer 2 only 2N*4*2 = 64
    config = benchmark.Config("t", (3, 4, 2), "tanh", 4)
    assert config.flops == 160 + 160 + 64


def test_bad_arguments_are_refused_before_running():
    with pytest.raises(SystemExit, match="unknown configuration"):
        benchmark.main(["--configs", "tiny,huge"])
    with pytest.raises(ValueError, match="rounds"):
        benchmark.run(["tiny"], rounds=0)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        benchmark.run(["tiny"], threads=0)
    with pytest.raises(ValueError, match="unknown peer"):
        benchmark.run(["tiny"], peers=["tensorflow"])
