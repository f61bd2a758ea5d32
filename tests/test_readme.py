"""The README's examples run as written (fresh process: default JAX settings)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def fresh(heading: str) -> dict:
    """``python -c <the block after heading>``: the run a ``background`` mark starts with the session (conftest.py)."""
    return dict(command=[sys.executable, "-c", python_block_after(heading)], timeout=300)


def in_background(heading: str) -> pytest.MarkDecorator:
    return pytest.mark.background(f"README: {heading}", **fresh(heading))


def run_block(background, heading: str) -> subprocess.CompletedProcess:
    return background.result(f"README: {heading}", **fresh(heading)).process


@in_background("## Use it from Python")
def test_use_it_from_python_example_runs(background):
    result = run_block(background, "## Use it from Python")
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout  # the printed check_gradients report


@pytest.mark.slow
@in_background("## Layers: residual, layer norm, dropout, your own")
def test_layers_example_runs(background):
    """The residual + layer norm + dropout network: gradient check passes, fit trains, evaluate runs."""
    result = run_block(background, "## Layers: residual, layer norm, dropout, your own")
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout and "'accuracy'" in result.stdout


def conv_block() -> str:
    """MNIST-1D's CNN block, with 40 of its 6000 steps (its accuracy is experiments/train_results.py's)."""
    code = python_block_after("### 1-D convolution and pooling")
    assert "steps=6000" in code
    return code.replace("steps=6000", "steps=40")


CONV_RUN = dict(command=[sys.executable, "-c", conv_block()], timeout=300)


@pytest.mark.slow
@pytest.mark.background("README: 1-D convolution and pooling", **CONV_RUN)
def test_conv_example_runs(background):
    result = background.result("README: 1-D convolution and pooling", **CONV_RUN).process
    assert result.returncode == 0, result.stderr
    assert "'accuracy'" in result.stdout


@in_background("### Your own layer")
def test_custom_layer_example_runs(background):
    result = run_block(background, "### Your own layer")
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout


def own_backprop_runs() -> dict:
    """The README's pytest file saved as a user saves it, run by pytest there; then by the CLI."""
    files = {"test_my_backprop.py": python_block_after("## Testing your own backprop")}
    pytest_run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "{out}/test_my_backprop.py"]
    cli_run = [sys.executable, "-m", "purebp.cli", "check-backprop", "{out}/test_my_backprop.py:my_backprop",
               "--activation", "sigmoid", "--loss", "mse", "--layout", "columns", "--trials", "5"]  # fmt: skip
    return {
        "README: test_my_backprop.py under pytest": dict(command=pytest_run, cwd="{out}", files=files, timeout=300),
        "README: test_my_backprop.py by the CLI": dict(command=cli_run, files=files, timeout=300),
    }


OWN_BACKPROP_RUNS = own_backprop_runs()


@pytest.mark.slow
@pytest.mark.background(
    "README: test_my_backprop.py under pytest", **OWN_BACKPROP_RUNS["README: test_my_backprop.py under pytest"]
)
@pytest.mark.background(
    "README: test_my_backprop.py by the CLI", **OWN_BACKPROP_RUNS["README: test_my_backprop.py by the CLI"]
)
def test_testing_your_own_backprop_example_passes_under_pytest(background):
    """The pytest file of "Testing your own backprop", as a user saves and runs it; then via the CLI."""
    result, cli = (background.result(name, **spec).process for name, spec in OWN_BACKPROP_RUNS.items())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert cli.returncode == 0, cli.stdout + cli.stderr


@in_background("## Learning rules other than backprop")
def test_learning_rules_example_runs(background):
    """The feedback-alignment example: a rule's update, fit with it, the angles (output layer 0, first layer NaN)."""
    result = run_block(background, "## Learning rules other than backprop")
    assert result.returncode == 0, result.stderr
    assert "update vs gradient, per layer (degrees):" in result.stdout and "accuracy" in result.stdout


@in_background("## More from one backward pass: curvature and gradient statistics")
def test_curvature_example_runs(background):
    """The three uses of the curvature quantities run as written and print what the comments say."""
    result = run_block(background, "## More from one backward pass: curvature and gradient statistics")
    assert result.returncode == 0, result.stderr
    assert "W1 block ~ kron(g, a): (32, 32) (64, 64)" in result.stdout
    assert "median SNR of W1:" in result.stdout and "GGN-CG step norm:" in result.stdout


@pytest.mark.slow
@in_background("### One use that shows why: curvature as an optax preconditioner")
def test_preconditioner_example_runs(background):
    """The diagonal-GGN and K-FAC preconditioners as optax transformations: 20 K-FAC steps lower the loss."""
    result = run_block(background, "### One use that shows why: curvature as an optax preconditioner")
    assert result.returncode == 0, result.stderr
    assert "K-FAC, 20 steps: loss" in result.stdout
