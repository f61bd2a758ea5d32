"""The README's examples run as written (fresh process: default JAX settings)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_use_it_from_python_example_runs():
    code = python_block_after("## Use it from Python")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout  # the printed check_gradients report


def test_layers_example_runs():
    """The residual + layer norm + dropout network: gradient check passes, fit trains, evaluate runs."""
    code = python_block_after("## Layers: residual, layer norm, dropout, your own")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout and "'accuracy'" in result.stdout


def test_conv_example_runs():
    """MNIST-1D's CNN in init_network; run here with 40 of its 6000 steps (the accuracy is train_results.py's)."""
    code = python_block_after("### 1-D convolution and pooling")
    assert "steps=6000" in code
    code = code.replace("steps=6000", "steps=40")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "'accuracy'" in result.stdout


def test_custom_layer_example_runs():
    code = python_block_after("### Your own layer")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout


def test_testing_your_own_backprop_example_passes_under_pytest(tmp_path):
    """The pytest file of "Testing your own backprop", as a user saves and runs it; then via the CLI."""
    (tmp_path / "test_my_backprop.py").write_text(python_block_after("## Testing your own backprop"))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_my_backprop.py")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    cli = subprocess.run(
        [sys.executable, "-m", "purebp.cli", "check-backprop", str(tmp_path / "test_my_backprop.py") + ":my_backprop",
         "--activation", "sigmoid", "--loss", "mse", "--layout", "columns", "--trials", "5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stdout + cli.stderr


def test_learning_rules_example_runs():
    """The feedback-alignment example: a rule's update, fit with it, the angles (output layer 0, first layer NaN)."""
    code = python_block_after("## Learning rules other than backprop")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "update vs gradient, per layer (degrees):" in result.stdout and "accuracy" in result.stdout
