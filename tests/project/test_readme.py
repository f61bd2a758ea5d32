"""The README's examples run as written (fresh process: default JAX settings), and every code block is run.

A Python block is named by the heading above it (``python_block_after``) and run by one test here or in
the test file of its feature (``RUN_ELSEWHERE``). A block that starts ``# fragment: continues the example in
"HEADING"`` runs after that heading's block, in the same process. Shell blocks: every ``purebp`` command
line is parsed by purebp's own argument parser, every ``python -m experiments.NAME`` names a module that
exists, and every ``pip install -e ".[...]"`` names extras that ``pyproject.toml`` declares.
"""

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
FRAGMENT = re.compile(r'\A# fragment: continues the example in "([^"]+)"')
ADD_TO_MY_BACKPROP = "# fragment: add to test_my_backprop.py above"

# headings whose first Python block another test file runs (as test_registry, test_precision, test_distributed do)
RUN_ELSEWHERE = {"### Your own cost", "### Mixed precision", "## Scaling out"}


def python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def code_blocks() -> list[tuple[str, str, str]]:
    """Every fenced block as (the heading above it, its language, its code), in README order."""
    text, blocks, heading, start = README.read_text(), [], "", 0
    for match in FENCE.finditer(text):
        headings = [line for line in text[start : match.start()].splitlines() if line.startswith("#")]
        heading = headings[-1] if headings else heading
        blocks.append((heading, match.group(1), match.group(2)))
        start = match.end()
    return blocks


def fragments_continuing(heading_text: str) -> list[str]:
    return [code for _, lang, code in code_blocks() if lang == "python" and FRAGMENT.match(code)
            and FRAGMENT.match(code).group(1) == heading_text]  # fmt: skip


def fresh(heading: str) -> dict:
    """``python -c <the block after heading>``: the run a ``background`` mark starts with the session (conftest.py)."""
    return dict(command=[sys.executable, "-c", python_block_after(heading)], timeout=300)


def in_background(heading: str) -> pytest.MarkDecorator:
    return pytest.mark.background(f"README: {heading}", **fresh(heading))


def run_block(background, heading: str) -> subprocess.CompletedProcess:
    return background.result(f"README: {heading}", **fresh(heading)).process


# ---------------------------------------------------------------- every block has a runner


def named_runs() -> set[str]:
    """Headings whose first Python block a test runs: the ones below (found by their marks) and RUN_ELSEWHERE."""
    names = set(RUN_ELSEWHERE)
    for test in list(globals().values()):
        for mark in getattr(test, "pytestmark", []):
            if mark.name == "background" and mark.args[0].startswith("README: "):
                names.add(mark.args[0].removeprefix("README: "))
    return names


def test_every_python_block_is_run_by_a_test():
    """Each Python block is the first after a heading a test runs, or a fragment of such a block."""
    runs, first_after = named_runs(), {}
    for heading, lang, code in code_blocks():
        if lang == "python":
            first_after.setdefault(heading, code)
    covered = {first_after[h] for h in runs if h in first_after} | {
        first_after[h] for h in first_after if any(h.startswith(run) for run in runs)
    }
    for heading, lang, code in code_blocks():
        if lang != "python" or code in covered:
            continue
        if code.startswith(ADD_TO_MY_BACKPROP):
            assert "## Testing your own backprop" in runs
            continue  # appended to test_my_backprop.py by the test of "## Testing your own backprop"
        fragment = FRAGMENT.match(code)
        assert fragment, f"a Python block under {heading!r} is neither run by a test nor marked as a fragment"
        assert "## " + fragment.group(1) in runs, f"the fragment under {heading!r} continues an unrun block"


def test_every_block_is_python_shell_or_output():
    for heading, lang, code in code_blocks():
        assert lang in {"python", "bash", ""}, f"a {lang!r} block under {heading!r}: no test knows how to run it"
        if lang == "":  # plain blocks are printed output; they say so in the text
            assert code.startswith("check_backprop FAILED"), heading


def shell_commands() -> list[list[str]]:
    commands = []
    for _, lang, code in code_blocks():
        if lang != "bash":
            continue
        for line in code.splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv:
                    commands.append(argv)
    return commands


def test_every_shell_command_parses():
    """purebp lines parse with purebp's parser; experiments exist; pip extras are declared."""
    from purebp.cli.main import build_parser

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    seen = set()
    for argv in shell_commands():
        seen.add(argv[0])
        if argv[0] == "purebp" and argv[1] != "check-backprop":  # check-backprop has its own parser
            try:
                args = build_parser().parse_args(argv[1:])
                if argv[1] == "launch":
                    build_parser().parse_args([a for a in args.worker if a != "--"])
            except SystemExit as error:
                pytest.fail(f"README command does not parse (exit {error.code}): {' '.join(argv)}")
        elif argv[:2] == ["python", "-m"] and argv[2].startswith("experiments."):
            assert (ROOT / (argv[2].replace(".", "/") + ".py")).exists(), argv
        elif argv[:3] == ["pip", "install", "-e"]:
            named = re.fullmatch(r"\.\[(.*)\]", argv[3]).group(1).split(",")
            assert set(named) <= extras, (argv, extras)
        else:
            assert argv[:3] == ["python", "-m", "pytest"] or argv[0] == "purebp", argv
    assert {"purebp", "python", "pip"} <= seen


# ---------------------------------------------------------------- the blocks, run


@in_background("# purebp")
def test_first_screen_example_runs(background):
    result = run_block(background, "# purebp")
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout and "'accuracy'" in result.stdout


def use_it_from_python_with_fragments() -> dict:
    """The block of "Use it from Python", then every fragment that continues it, in one fresh process."""
    code = "\n".join([python_block_after("## Use it from Python"), *fragments_continuing("Use it from Python")])
    return dict(command=[sys.executable, "-c", code], timeout=300)


@pytest.mark.background("README: ## Use it from Python", **use_it_from_python_with_fragments())
def test_use_it_from_python_example_runs(background):
    """The example, then the per-example and DP-SGD fragments that continue it."""
    result = background.result("README: ## Use it from Python", **use_it_from_python_with_fragments()).process
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout  # the printed check_gradients report
    assert len(fragments_continuing("Use it from Python")) == 2
    assert "(32, 128, 64)" in result.stdout and "(32,)" in result.stdout and "DP-SGD loss:" in result.stdout


@in_background("## Layers and your own layers")
@pytest.mark.slow
def test_layers_example_runs(background):
    """The residual + layer norm + dropout network: gradient check passes, fit trains, evaluate runs."""
    result = run_block(background, "## Layers and your own layers")
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout and "'accuracy'" in result.stdout


def conv_block() -> str:
    """MNIST-1D's CNN block, with 40 of its 6000 steps (its accuracy is experiments/train_results.py's)."""
    code = python_block_after("### 1-D convolution and pooling")
    assert "steps=6000" in code
    return code.replace("steps=6000", "steps=40")


CONV_RUN = dict(command=[sys.executable, "-c", conv_block()], timeout=300)


@pytest.mark.background("README: ### 1-D convolution and pooling", **CONV_RUN)
@pytest.mark.slow
def test_conv_example_runs(background):
    result = background.result("README: ### 1-D convolution and pooling", **CONV_RUN).process
    assert result.returncode == 0, result.stderr
    assert "'accuracy'" in result.stdout


@in_background("### Your own layer")
def test_custom_layer_example_runs(background):
    result = run_block(background, "### Your own layer")
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout


@in_background("### Training from Python")
def test_training_from_python_example_runs(background):
    """fit on digits with Adam for 30 epochs, then evaluate: a trained network (accuracy well above chance)."""
    result = run_block(background, "### Training from Python")
    assert result.returncode == 0, result.stderr
    accuracy = float(re.search(r"'accuracy': (?:Array\()?([0-9.]+)", result.stdout).group(1))
    assert accuracy > 0.9, result.stdout


@in_background("### Sweeps")
def test_sweep_example_runs(background):
    """The vmapped sweep: one loss per (seed, rate) pair (tests/train/test_sweeps.py: it equals the runs one by one)."""
    result = run_block(background, "### Sweeps")
    assert result.returncode == 0, result.stderr
    assert "(4,)" in result.stdout


def own_backprop_runs() -> dict:
    """The pytest file (its hypothesis fragment added) saved as a user saves it, run by pytest, then the CLI."""
    strategies = next(code for _, lang, code in code_blocks() if code.startswith(ADD_TO_MY_BACKPROP))
    files = {"test_my_backprop.py": python_block_after("## Testing your own backprop") + "\n" + strategies}
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
    "README: ## Testing your own backprop", **OWN_BACKPROP_RUNS["README: test_my_backprop.py under pytest"]
)
@pytest.mark.background(
    "README: test_my_backprop.py by the CLI", **OWN_BACKPROP_RUNS["README: test_my_backprop.py by the CLI"]
)
def test_testing_your_own_backprop_example_passes_under_pytest(background):
    """The pytest file of "Testing your own backprop" and its hypothesis fragment, as a user runs them; then the CLI."""
    runs = {
        "README: ## Testing your own backprop": OWN_BACKPROP_RUNS["README: test_my_backprop.py under pytest"],
        "README: test_my_backprop.py by the CLI": OWN_BACKPROP_RUNS["README: test_my_backprop.py by the CLI"],
    }
    result, cli = (background.result(name, **spec).process for name, spec in runs.items())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout  # test_my_backprop and test_my_backprop_on_my_shapes
    assert cli.returncode == 0, cli.stdout + cli.stderr


def own_networks_run() -> dict:
    files = {"test_my_networks.py": python_block_after("### Hand-written vs autodiff on purebp's own networks")}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "{out}/test_my_networks.py"]
    return dict(command=command, cwd="{out}", files=files, timeout=300)


@pytest.mark.slow
@pytest.mark.background("README: ### Hand-written vs autodiff on purebp's own networks", **own_networks_run())
def test_hypothesis_example_on_float64_cases_passes(background):
    """The hypothesis example as a user saves it: float64 cases (x64 on), no deadline; it asserts x is float64."""
    name = "README: ### Hand-written vs autodiff on purebp's own networks"
    result = background.result(name, **own_networks_run()).process
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


@in_background("## Learning rules other than backprop")
def test_learning_rules_example_runs(background):
    """The feedback-alignment example: a rule's update, fit with it, the angles (output layer 0, first layer NaN)."""
    result = run_block(background, "## Learning rules other than backprop")
    assert result.returncode == 0, result.stderr
    assert "update vs gradient, per layer (degrees):" in result.stdout and "accuracy" in result.stdout


@pytest.mark.slow
@in_background("## Curvature and gradient statistics")
def test_curvature_example_runs(background):
    """The three uses of the curvature quantities run as written and print what the comments say."""
    result = run_block(background, "## Curvature and gradient statistics")
    assert result.returncode == 0, result.stderr
    assert "W1 block ~ kron(g, a): (32, 32) (64, 64)" in result.stdout
    assert "median SNR of W1:" in result.stdout and "GGN-CG step norm:" in result.stdout


@in_background("## Preconditioning: curvature as an optax transformation")
@pytest.mark.slow
def test_preconditioner_example_runs(background):
    """The diagonal-GGN and K-FAC preconditioners as optax transformations: 20 K-FAC steps lower the loss."""
    result = run_block(background, "## Preconditioning: curvature as an optax transformation")
    assert result.returncode == 0, result.stderr
    assert "K-FAC, 20 steps: loss" in result.stdout


def test_every_link_resolves():
    """Relative links name files of the repository; #anchors name headings of the README (GitHub's slugs)."""
    text = README.read_text()
    slugs = set()
    for line in text.splitlines():
        if line.startswith("#") and not line.startswith("#!"):
            title = line.lstrip("#").strip().lower()
            slugs.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert (ROOT / path).exists(), target
        elif anchor:
            assert anchor in slugs, target
