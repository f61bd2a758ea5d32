"""`purebp verify`: rows stream as they are checked, cells are never cut, and the fast compile still catches errors."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import purebp as pb
from purebp import activations
from purebp.cli import main
from purebp.testing import cases, random_spec, random_stack_spec

ROOT = Path(__file__).resolve().parents[2]

# Every check but the first architecture's blocks until the parent closes stdin, so the run cannot
# end, and flush its buffered output at exit, before the parent has seen the first row: that row
# must have been written to the pipe while the run was still going.
STREAMING_DRIVER = """
import sys

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)  # as `purebp verify` does before it draws a float64 case

import purebp.check
from purebp.cli import main
from purebp.testing import make_case, random_spec

first = make_case(random_spec(np.random.default_rng(0), max_depth=2, max_width=4, max_batch=4)).x
check_gradients = purebp.check.check_gradients


def wait_unless_first(net, x, y, **kwargs):
    if x.shape != first.shape or not np.array_equal(np.asarray(x), np.asarray(first)):
        sys.stdin.readline()
    return check_gradients(net, x, y, **kwargs)


purebp.check.check_gradients = wait_unless_first
sys.exit(main(["verify", "--trials", "3", "--max-depth", "2", "--max-width", "4", "--max-batch", "4"]))
"""


def test_rows_reach_a_pipe_while_the_run_is_still_going():
    # as a user's shell runs it: default JAX settings, and stdout block-buffered as Python makes a pipe
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("JAX_") and name != "PYTHONUNBUFFERED"
    }
    child = subprocess.Popen(
        [sys.executable, "-c", STREAMING_DRIVER],
        cwd=ROOT,
        env=environment,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in child.stdout], daemon=True).start()
    seen = []
    try:
        while not any(line.lstrip().startswith("0 ") for line in seen):
            try:
                seen.append(lines.get(timeout=180))
            except queue.Empty:
                pytest.fail(f"no row for architecture 0 reached the pipe while the run was blocked; got {seen}")
        assert seen[0].split()[:2] == ["#", "sizes"]
        child.stdin.close()  # every waiting check goes on
        assert child.wait(timeout=300) == 0, child.stderr.read()
    finally:
        child.kill()
        child.wait()


def test_no_cell_is_cut_however_long_the_sizes_and_activation_lists(capsys):
    arguments = dict(max_depth=8, max_width=999, max_batch=4)
    rng = np.random.default_rng(0)
    specs = [random_spec(rng, **arguments) for _ in range(5)]  # the draws of `purebp verify --seed 0`
    sizes = [",".join(map(str, spec.sizes)) for spec in specs]
    names = [",".join(spec.activations) for spec in specs]
    # the old fixed-width columns cut these at 28 and 44 characters without a mark
    assert max(map(len, sizes)) > 28 and max(map(len, names)) > 44
    code = main(["verify", "--trials", "5", "--seed", "0", "--max-depth", "8", "--max-width", "999",
                     "--max-batch", "4"])  # fmt: skip
    assert code == 0
    rows = capsys.readouterr().out.splitlines()[1:6]
    for trial, (row, size, name) in enumerate(zip(rows, sizes, names)):
        cells = row.split()
        assert cells[0] == str(trial) and cells[1] == size, row
        assert cells[-1] == name and cells[-2] == "ok", row


def test_the_fast_compile_still_catches_a_slightly_wrong_derivative(capsys, monkeypatch):
    """sigma' off by a relative 1e-7, far below what training would notice: every architecture whose
    gradient uses sigma' (a hidden sigmoid layer, or a sigmoid output under mse) is flagged, no other."""
    rng = np.random.default_rng(0)
    specs = [random_spec(rng, max_depth=3) for _ in range(12)]
    uses_derivative = [
        "sigmoid" in spec.activations[:-1] or (spec.activations[-1] == "sigmoid" and spec.loss == "mse")
        for spec in specs
    ]
    assert any(uses_derivative) and not all(uses_derivative)
    broken = activations.Activation("sigmoid", activations._sigmoid, lambda z, a: a * (1.0 - a) * (1.0 + 1e-7))
    jax.clear_caches()
    monkeypatch.setitem(activations._REGISTRY, "sigmoid", broken)
    try:
        code = main(["verify", "--trials", "12", "--seed", "0", "--max-depth", "3", "--quiet"])
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    out = capsys.readouterr().out
    assert code == 1
    flagged = [int(line.split()[0]) for line in out.splitlines() if line.split()[-2:-1] == ["MISMATCH"]]
    assert flagged == [trial for trial, uses in enumerate(uses_derivative) if uses], out
    assert f"{len(flagged)} mismatches" in out
    assert out.count("replay: purebp.testing.make_case(CaseSpec(") == len(flagged)


@settings(max_examples=6)
@given(cases(max_depth=4, max_width=12, max_batch=6))
def test_fast_compile_agrees_with_the_default_compile(case):
    fast = pb.check_gradients(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction, fast_compile=True)
    default = pb.check_gradients(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction)
    assert fast.passed and default.passed, f"{fast}\n{default}"
    assert fast.tolerance == default.tolerance and len(fast.leaves) == len(default.leaves)
    # the same functions, differently optimised kernels: equal to the checker's own tolerance
    loss_gap = abs(fast.loss_handwritten - default.loss_handwritten)
    assert loss_gap <= default.tolerance * max(abs(default.loss_handwritten), 1.0), (fast, default)


def test_full_compile_runs_the_default_programs(capsys, monkeypatch):
    seen = []
    check_gradients = pb.check.check_gradients

    def spy(*args, **kwargs):
        seen.append(kwargs["fast_compile"])
        return check_gradients(*args, **kwargs)

    monkeypatch.setattr(pb.check, "check_gradients", spy)
    assert main(["verify", "--trials", "2", "--max-depth", "2", "--full-compile", "--quiet"]) == 0
    assert main(["verify", "--trials", "2", "--max-depth", "2", "--quiet"]) == 0
    assert seen == [False, False, True, True]
    assert "2 architectures, 0 mismatches" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--trials", "--max-depth", "--max-width", "--max-batch"])
def test_verify_rejects_a_bound_below_one(flag):
    with pytest.raises(SystemExit, match=f"{flag} must be at least 1, got 0"):
        main(["verify", flag, "0"])


STACK_ARGS = ["--trials", "8", "--seed", "0", "--max-depth", "4", "--max-width", "6", "--max-batch", "4", "--dtype",
              "both"]  # fmt: skip


def stack_specs_drawn(trials: int = 8) -> list:
    """The stacks `purebp verify --layers all` draws with STACK_ARGS, float32 and float64 alternating."""
    rng = np.random.default_rng(0)
    return [
        random_stack_spec(
            rng, dtype=("float32", "float64")[trial % 2], max_depth=4, max_width=6, max_batch=4, conv=None
        )
        for trial in range(trials)
    ]


@pytest.mark.slow
def test_layers_all_checks_stacks_and_prints_each_architecture_last(capsys):
    specs = stack_specs_drawn()
    assert any("r(" in spec.notation for spec in specs) and any("ln" in spec.notation for spec in specs)
    assert any(">c" in spec.notation for spec in specs) and any(">c" not in spec.notation for spec in specs)
    assert main(["verify", "--layers", "all", *STACK_ARGS]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["#", "loss", "red", "dtype", "N", "key", "hand", "autodiff", "verdict", "architecture"]
    for trial, (row, spec) in enumerate(zip(lines[1:9], specs)):
        cells = row.split()
        assert cells[:6] == [str(trial), spec.loss, spec.reduction, spec.dtype, str(spec.batch),
                             "yes" if spec.with_key else "no"], row  # fmt: skip
        assert cells[-2:] == ["ok", spec.notation], row
    assert "purebp verify: 8 architectures, 0 mismatches" in lines[9]


def flat_kinds(descriptions) -> list[str]:
    kinds = []
    for description in descriptions:
        kinds += flat_kinds(description[1]) if description[0] == "residual" else [description[0]]
    return kinds


def dense_upstream_of_layer_norm(spec) -> bool:
    kinds = flat_kinds(spec.layers)  # depth-first: a dense or conv layer before the last layer norm feeds it
    upstream = kinds[: len(kinds) - 1 - kinds[::-1].index("layer_norm")] if "layer_norm" in kinds else []
    return "dense" in upstream or "conv1d" in upstream


@pytest.mark.slow
def test_layers_all_flags_a_layer_norm_backward_without_its_mean_term(capsys, monkeypatch):
    """Exactly the stacks with a dense layer upstream of a layer norm are flagged (there the dropped term
    reaches a parameter), with a line that rebuilds each one; the exit code is 1."""
    specs = stack_specs_drawn()
    upstream = [dense_upstream_of_layer_norm(spec) for spec in specs]
    assert any(upstream) and not all(upstream)

    def without_mean_term(self, cache, grad_out):
        leading = tuple(range(grad_out.ndim - 1))
        xhat, grad_xhat = cache.normalized, grad_out * jnp.reshape(self.scale, (1,) * len(leading) + self.scale.shape)
        grad_in = cache.inverse_std * (grad_xhat - xhat * jnp.mean(grad_xhat * xhat, axis=-1, keepdims=True))
        return grad_in, pb.LayerNorm(jnp.sum(grad_out * xhat, axis=leading), jnp.sum(grad_out, axis=leading), self.eps)

    jax.clear_caches()
    monkeypatch.setattr(pb.LayerNorm, "backward", without_mean_term)
    try:
        code = main(["verify", "--layers", "all", *STACK_ARGS, "--quiet"])
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    out = capsys.readouterr().out
    assert code == 1
    flagged = [int(line.split()[0]) for line in out.splitlines() if line.split()[-2:-1] == ["MISMATCH"]]
    assert flagged == [trial for trial, found in enumerate(upstream) if found], out
    assert out.count("replay: purebp.testing.make_stack_case(StackSpec(") == len(flagged)


@pytest.mark.parametrize(
    ("mode", "trials", "bounds"),
    [
        ([], 40, "depth <= 8, width <= 64, batch <= 64"),
        pytest.param(["--layers", "all"], 5, "depth <= 4, width <= 16, batch <= 16", marks=pytest.mark.slow),
    ],
)
def test_the_defaults_are_a_quick_check_that_passes_and_says_how_to_run_more(capsys, mode, trials, bounds):
    """`purebp verify` and `purebp verify --layers all` as a user first runs them: exit 0, every row ok, and
    an opening line (stderr) that says how many architectures of which bounds, and how to run more."""
    assert main(["verify", *mode]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == trials + 2 and all(line.split()[-2] == "ok" for line in lines[1:-1]), captured.out
    assert f"purebp verify: {trials} architectures, 0 mismatches" in lines[-1]
    opening = captured.err.splitlines()[0]
    assert f"purebp verify: {trials} random" in opening and f"(seed 0, {bounds})" in opening, captured.err
    assert "more with --trials N" in opening


def test_help_says_what_the_defaults_check_and_how_to_run_more(capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "40 architectures of depth <= 8, width <= 64, batch <= 64 with --layers mlp" in text
    assert "5 architectures of depth <= 4, width <= 16, batch <= 16 with --layers all" in text
    assert "purebp verify --trials 1000 --dtype both" in text
