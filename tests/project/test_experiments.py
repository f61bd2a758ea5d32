"""Every experiment script runs in --quick mode and writes well-formed CSV, Markdown and PNG.

Each script runs in its own process (as a user would run it: ``python -m
experiments.NAME --quick --out DIR``), so the test suite's JAX settings do not
leak into it; the runs start with the session, beside the in-process tests
(tests/conftest.py, ``Background``). The numbers are not checked here (the scripts' results are);
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

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("equivalence", "training_curves", "vanishing_gradients", "learning_rate", "template")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TABLE_RULE = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+$")


def quick_run(name: str, out: str = "{out}") -> dict:
    """The command ``python -m experiments.<name> --quick --out <out>``, from the repository root."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", f"experiments.{name}", "--quick", "--out", out]
    return dict(command=command, cwd=ROOT, env=env, timeout=600)


def quick(name: str) -> pytest.MarkDecorator:
    """Mark a test that reads this script's run: it goes beside the in-process tests (conftest.Background)."""
    return pytest.mark.background(f"experiments.{name} --quick", **quick_run(name))


def finished(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail with the command's output unless it exited with 0."""
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited with {result.returncode}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def outputs(background):
    """Each script's run, once per test session (in the background when a test is marked with it):
    a function name -> its output directory."""

    def get(name: str) -> Path:
        run = background.result(f"experiments.{name} --quick", **quick_run(name))
        finished(run.process)
        return run.out

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


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(name, marks=quick(name)) for name in SCRIPTS])
def test_quick_run_writes_well_formed_outputs(name, outputs):
    out = outputs(name)
    written = sorted(p.name for p in out.iterdir())
    expected = [f"{name}_quick.{suffix}" for suffix in ("csv", "md", "png")]
    assert written == expected, f"experiments.{name} --quick wrote {written}, expected {expected}"
    check_csv(out / f"{name}_quick.csv")
    check_markdown(out / f"{name}_quick.md")
    check_png(out / f"{name}_quick.png")


AGAIN = "experiments.learning_rate --quick, a second time"


@pytest.mark.slow
@quick("learning_rate")
@pytest.mark.background(AGAIN, **quick_run("learning_rate"))
def test_same_seed_same_results(outputs, background):
    """learning_rate --quick twice, in two processes: the CSV (every loss of every step) is identical byte for byte."""
    first = (outputs("learning_rate") / "learning_rate_quick.csv").read_bytes()
    again = background.result(AGAIN, **quick_run("learning_rate"))
    finished(again.process)
    assert again.out != outputs("learning_rate")
    assert (again.out / "learning_rate_quick.csv").read_bytes() == first


def test_template_is_short():
    """The issue's promise: a new experiment with the public API in under 40 lines."""
    lines = (ROOT / "experiments" / "template.py").read_text().splitlines()
    assert len(lines) < 40, f"experiments/template.py has {len(lines)} lines"


# ---------------------------------------------------------------- residual and layer-norm studies (issue 12)


@pytest.mark.slow
@quick("mnist1d_residual")
def test_mnist1d_residual_quick_writes_well_formed_outputs(outputs):
    """mnist1d_residual --quick: CSV, Markdown, PNG and JSON, one purebp run of the authors' MLP that learned."""
    import json

    out = outputs("mnist1d_residual")
    written = sorted(p.name for p in out.iterdir())
    expected = [f"mnist1d_residual_quick.{suffix}" for suffix in ("csv", "json", "md", "png")]
    assert written == expected, f"experiments.mnist1d_residual --quick wrote {written}, expected {expected}"
    check_csv(out / "mnist1d_residual_quick.csv")
    check_markdown(out / "mnist1d_residual_quick.md")
    check_png(out / "mnist1d_residual_quick.png")
    record = json.loads((out / "mnist1d_residual_quick.json").read_text())
    assert record["command"] == "python -m experiments.mnist1d_residual --quick"
    runs = [(r["trainer"], r["model"], r["init"], r["steps"]) for r in record["runs"]]
    assert runs == [("purebp", "residual", "pytorch", 40)], runs
    accuracy = record["runs"][0]["test_accuracy"]
    assert 0.2 < accuracy <= 1.0, f"after 40 Adam steps the test accuracy is {accuracy} (chance is 0.1)"
    assert record["published"]["mlp_test_accuracy"] == 0.68


def test_mnist1d_models_are_the_authors_mlp_and_its_plain_twin():
    """MLPBase: 15210 parameters, h = relu(W1 x + b1); h = h + relu(W2 h + b2); out = W3 h + b3 (float64).

    The plain model is the same without 'h +', from the same initial weights; the 'pytorch' init is
    nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    import purebp as pb
    from experiments import mnist1d_residual as study

    nets = {model: study.build(model, "pytorch", seed=3, dtype=jnp.float64) for model in study.MODELS}
    for model, net in nets.items():
        count = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(net))
        assert count == 15210, f"{model}: {count} parameters, MLPBase(40, 10) has 15210"
    for a, b in zip(jax.tree.leaves(nets["residual"]), jax.tree.leaves(nets["plain"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg="the two models start apart")
    dense = study.dense_layers(nets["plain"].layers)
    (w1, b1), (w2, b2), (w3, b3) = [(np.asarray(d.w), np.asarray(d.b)) for d in dense]
    for w, b in ((w1, b1), (w2, b2), (w3, b3)):
        bound = 1 / np.sqrt(w.shape[1])
        assert np.abs(w).max() <= bound and np.abs(b).max() <= bound, f"a draw outside ±{bound} (fan_in {w.shape[1]})"
        assert np.abs(b).max() > bound / 2, "the biases are not drawn (PyTorch draws them too)"
    std = float(np.std(w2))  # 10000 draws: the sample std is within ~0.5% of bound / sqrt(3)
    assert abs(std / (1 / np.sqrt(100) / np.sqrt(3)) - 1) < 0.03, f"W2 std {std}: not U(±1/sqrt(100))"

    x = np.random.default_rng(0).normal(size=(7, 40))
    h = np.maximum(x @ w1.T + b1, 0)
    expected = {
        "residual": (h + np.maximum(h @ w2.T + b2, 0)) @ w3.T + b3,
        "plain": np.maximum(h @ w2.T + b2, 0) @ w3.T + b3,
    }
    for model, net in nets.items():
        out = np.asarray(pb.forward(net, x))
        np.testing.assert_allclose(out, expected[model], rtol=1e-12, atol=1e-12, err_msg=model)


def test_vanishing_gradient_variants_are_the_stated_networks():
    """residual / layernorm / residual+layernorm: the layers the study's table says, depth hidden dense layers each."""
    import jax

    from experiments import vanishing_gradients as study

    depth, hidden, out = 4, "dense(8, sigmoid)", "dense(3, identity)"
    expected = {
        "residual": [hidden] + ["residual(dense(8, sigmoid))"] * (depth - 1) + [out],
        "layernorm": [hidden, "layer_norm"] * depth + [out],
        "residual+layernorm": [hidden] + ["residual(layer_norm, dense(8, sigmoid))"] * (depth - 1) + [out],
    }
    assert set(expected) == set(study.VARIANTS[1:])
    for variant, kinds in expected.items():
        net = study.build(variant, "sigmoid", depth, 8, 5, 3, jax.random.key(0))
        assert [study.describe(layer) for layer in net.layers] == kinds, variant
        assert net.input_shape == (5,)


@pytest.mark.slow  # default tier budget (5 minutes on 2 cores)
def test_vanishing_gradients_residual_ratio_uses_dense_deltas_and_does_not_vanish():
    """measure_stack's first and last delta norms are mean_n ||dC^n/dz^1|| and ||dC^n/dz^L|| (autodiff, float64).

    And the skip connections keep delta^1 from vanishing in a deep sigmoid network, where the plain MLP's
    ||delta^1|| / ||delta^L|| is ~1e-4 at this depth (each sigma' <= 1/4).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import vanishing_gradients as study

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 6)), rng.integers(0, 3, 16).astype(np.int32)
    net = study.build("residual", "sigmoid", 6, 8, 6, 3, jax.random.key(1))
    net = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), net)
    _, rows = study.measure_stack(net, jnp.asarray(x), jnp.asarray(y))
    assert [r["delta_of"] for r in (rows[0], rows[1], rows[-1])] == ["dC/dz", "dC/d(output)", "dC/dz"]

    def total_cost(shift_first, shift_out):  # sum_n C^n with z^1 and z^L shifted: d/dshift = delta per example
        first, last = net.layers[0], net.layers[-1]
        a = jax.nn.sigmoid(x @ first.w.T + first.b[None, :] + shift_first)
        for layer in net.layers[1:-1]:
            a, _ = layer.forward(a)
        z = a @ last.w.T + last.b[None, :] + shift_out
        return jnp.sum(jax.nn.logsumexp(z, axis=1) - z[jnp.arange(len(y)), y])

    delta_first, delta_out = jax.jit(jax.grad(total_cost, argnums=(0, 1)))(jnp.zeros((16, 8)), jnp.zeros((16, 3)))
    for row, delta in ((rows[0], delta_first), (rows[-1], delta_out)):
        reference = float(np.mean(np.linalg.norm(np.asarray(delta), axis=1)))
        assert abs(row["delta_norm"] - reference) <= 1e-10 * reference, (row["layer"], row["delta_norm"], reference)
    ratio = rows[0]["delta_norm"] / rows[-1]["delta_norm"]
    assert ratio > 0.05, f"residual sigmoid, 6 hidden layers: ||delta^1|| / ||delta^L|| = {ratio}"


# ---------------------------------------------------------------- learning rules (issue 16)


@pytest.mark.slow
def test_learning_rules_quick_writes_well_formed_outputs(outputs):
    """learning_rules --quick: CSV, Markdown, PNG; one row per rule, the output layer's update angle 0 under each."""
    out = outputs("learning_rules")
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"learning_rules_quick.{suffix}" for suffix in ("csv", "md", "png")], written
    check_csv(out / "learning_rules_quick.csv")
    check_markdown(out / "learning_rules_quick.md")
    check_png(out / "learning_rules_quick.png")
    with open(out / "learning_rules_quick.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["rule"] for row in rows] == [
        "backprop", "feedback_alignment", "direct_feedback_alignment", "sign_symmetry"
    ]  # fmt: skip
    assert all(float(row["update_angle_layer2"]) == 0.0 for row in rows)
    assert float(rows[0]["update_angle_layer0"]) == 0.0 and float(rows[1]["update_angle_layer0"]) > 0.0
