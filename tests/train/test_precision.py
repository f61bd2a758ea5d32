"""bfloat16 and float16: check_gradients' stated tolerances, accuracy against float64, and the mixed step.

Error measure as everywhere (purebp.check): per leaf ||h - g||_2 / max(||g||_2, floor * ||g_all||_2),
in float64 on the host, floor = FLOOR[dtype] (1e-2 for both 16-bit dtypes). Tolerances, chosen from
experiments/mixed_precision.py (see the README's "Mixed precision"):

- hand-written vs jax.grad, both in the 16-bit dtype: TOLERANCE, 1e-1 bfloat16, 3e-2 float16;
- hand-written in the 16-bit dtype vs jax.grad in float64 of the same parameters: 1e-1 bfloat16, 1e-2
  float16, with smooth activations (at a relu/leaky_relu kink, rounding can move z across 0 and change
  G' from 1 to 0 or 0.01: no bound holds there);
- the mixed gradient (float32 master, 16-bit compute) vs the float32 gradient: TOLERANCE again.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import purebp as pb
from purebp import activations as _activations
from purebp.check import FLOOR, TOLERANCE, compare_gradients
from purebp.testing import CaseSpec, cases, make_case

LOW = ("bfloat16", "float16")
SMOOTH = ("identity", "sigmoid", "tanh", "softplus", "gelu", "elu")  # no kink for rounding to cross
# stated tolerances of the tests below (see the module docstring)
REFERENCE_TOLERANCE = {"bfloat16": 1e-1, "float16": 1e-2}
MIXED_TOLERANCE = {dtype: TOLERANCE[np.dtype(dtype)] for dtype in LOW}


def upcast(tree, dtype=jnp.float64):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def leaves64(tree) -> list[np.ndarray]:
    return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]


def assert_leaves_close(actual, expected, *, tolerance: float, floor: float, context: object) -> None:
    failed = [leaf for leaf in compare_gradients(actual, expected, tolerance=tolerance, floor=floor) if not leaf.passed]
    assert not failed, f"{context}\n" + "\n".join(map(str, failed))


# ---------------------------------------------------------------- parameters


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW)
def test_init_mlp_draws_in_float32_and_rounds_once(dtype):
    """16-bit weights are the float32 draw rounded: full normal tails (a direct bfloat16 draw stops at 2.9 s)."""
    key, sizes, activations = jax.random.key(3), (784, 256, 10), ("relu", "identity")
    net = pb.init_mlp(key, sizes, activations, dtype=jnp.dtype(dtype))
    assert net.dtype == np.dtype(dtype) and all(leaf.dtype == np.dtype(dtype) for leaf in jax.tree.leaves(net))
    expected = pb.cast_network(pb.init_mlp(key, sizes, activations, dtype=jnp.float32), dtype)
    for got, want in zip(leaves64(net), leaves64(expected)):
        np.testing.assert_array_equal(got, want)
    w = leaves64(net)[0] / np.sqrt(2.0 / 784)  # He: s = sqrt(2 / n_in)
    assert abs(w.std() - 1.0) < 0.01 and np.abs(w).max() > 4.0, (w.std(), np.abs(w).max())


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float8_e4m3fn, "complex64"])
def test_init_mlp_names_the_supported_dtypes(dtype):
    with pytest.raises(TypeError, match="float16, bfloat16, float32, float64"):
        pb.init_mlp(jax.random.key(0), (3, 2), ("identity",), dtype=dtype)


def test_a_float8_network_is_refused_before_compiling():
    net = pb.cast_network(make_case(CaseSpec((3, 2), ("identity",), "mse", dtype="float32")).net, "float32")
    net = jax.tree.map(lambda a: a.astype(jnp.float8_e4m3fn), net)
    with pytest.raises(TypeError, match="supported dtypes: float16, bfloat16, float32, float64"):
        pb.value_and_grad(net, jnp.ones((2, 3), jnp.float8_e4m3fn), jnp.ones((2, 2), jnp.float8_e4m3fn), loss="mse")


# ---------------------------------------------------------------- check_gradients in 16 bits


@pytest.mark.slow
@settings(max_examples=4)
@given(cases(dtypes=LOW, max_depth=4, max_width=32, max_batch=32))
def test_check_gradients_passes_at_the_stated_16_bit_tolerance(case):
    """Random architectures (the bounds of the sweep the tolerances come from): hand-written == jax.grad."""
    report = pb.check_gradients(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction)
    dtype = np.dtype(case.spec.dtype)
    assert report.tolerance == TOLERANCE[dtype] and report.dtype == case.spec.dtype
    assert report.passed, f"{case}\n{report}"
    assert report.reference_dtype == "float64"
    for leaf in report.leaves:  # both passes are also measured against float64 of the same parameters
        assert np.isfinite(leaf.handwritten_vs_reference) and np.isfinite(leaf.autodiff_vs_reference), report
    assert "relative distance from the float64 truth" in str(report)


def test_check_gradients_when_the_16_bit_losses_differ():
    """mean = sum * bfloat16(1/N) by hand, sum / N by autodiff: different roundings, no np.finfo crash."""
    case = make_case(CaseSpec((4, 3), ("identity",), "mse", dtype="bfloat16", batch=3, seed=0))
    report = pb.check_gradients(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction)
    assert 0.0 < report.loss_relative_error <= report.tolerance, report
    assert report.passed, report


def _broken(monkeypatch, name: str, forward, derivative) -> str:
    # a fresh name, so no compiled function of the real activation is reused
    monkeypatch.setitem(_activations._REGISTRY, name, _activations.Activation(name, forward, derivative))
    return name


BROKEN = {
    # tanh' written as 1 - a instead of 1 - a^2
    "tanh 1-a": (jnp.tanh, lambda z, a: 1.0 - a),
    # sigmoid' 25% too large: a leaf 25% off is caught in both 16-bit dtypes (tolerances 1e-1, 3e-2)
    "sigmoid x1.25": (jax.lax.logistic, lambda z, a: 1.25 * (a * (1.0 - a))),
}


@pytest.mark.slow
@pytest.mark.parametrize("bug", BROKEN)
@pytest.mark.parametrize("dtype", LOW)
def test_a_wrong_derivative_is_caught_at_the_16_bit_tolerance(monkeypatch, bug, dtype):
    """The same case passes with the right G' and fails, at layer 0 only, with the wrong one."""
    forward, derivative = BROKEN[bug]
    right = "tanh" if forward is jnp.tanh else "sigmoid"
    wrong = _broken(monkeypatch, f"broken_{right}", forward, derivative)
    spec = CaseSpec(sizes=(8, 16, 4), activations=(right, "identity"), loss="mse", dtype=dtype, batch=32, seed=5)
    good = make_case(spec)
    assert pb.check_gradients(good.net, good.x, good.y, loss="mse").passed
    bad = make_case(dataclasses.replace(spec, activations=(wrong, "identity")))
    report = pb.check_gradients(bad.net, bad.x, bad.y, loss="mse")
    assert not report.passed and report.first_failing_layer == 0, report
    assert all(leaf.passed for leaf in report.leaves if leaf.layer == 1), report
    # the bug is in the hand-written pass: it is also the one far from float64
    worst = max(leaf.handwritten_vs_reference for leaf in report.leaves)
    assert worst > 2 * TOLERANCE[np.dtype(dtype)], report


# ---------------------------------------------------------------- accuracy against float64


@pytest.mark.slow
@settings(max_examples=4)
@given(
    cases(
        dtypes=LOW,
        max_depth=4,
        max_width=32,
        max_batch=32,
        losses=("cross_entropy", "softmax_cross_entropy", "binary_cross_entropy"),  # smooth outputs
        hidden_activations=SMOOTH,
    )
)
def test_value_and_grad_in_16_bits_is_close_to_float64(case):
    """pb.value_and_grad in bfloat16/float16 vs jax.grad in float64 of the same (exactly upcast) parameters."""
    dtype = case.spec.dtype
    value, grads = pb.value_and_grad(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction)
    assert value.dtype == np.dtype(dtype) and all(g.dtype == np.dtype(dtype) for g in jax.tree.leaves(grads))
    value64, grads64 = pb.autodiff_value_and_grad(
        upcast(case.net), upcast(case.x), upcast(case.y), loss=case.loss, reduction=case.reduction
    )
    tolerance = REFERENCE_TOLERANCE[dtype]
    assert_leaves_close(grads, grads64, tolerance=tolerance, floor=FLOOR[np.dtype(dtype)], context=case)
    assert abs(float(value) - float(value64)) <= tolerance * abs(float(value64)), (case, float(value), float(value64))


# ---------------------------------------------------------------- the mixed gradient


MIXED_SPECS = [
    CaseSpec((6, 32, 32, 3), ("tanh", "relu", "identity"), "softmax_cross_entropy", dtype="float32", batch=64),
    CaseSpec((10, 24, 24, 24, 5), ("sigmoid", "gelu", "elu", "identity"), "mse", dtype="float32", batch=48, seed=1),
    CaseSpec((12, 16, 4), ("softplus", "softmax"), "cross_entropy", "sum", dtype="float32", batch=16, seed=2),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec", MIXED_SPECS, ids=lambda spec: "-".join(map(str, spec.sizes)))
@pytest.mark.parametrize("compute", LOW)
def test_mixed_gradient_is_float32_and_close_to_the_float32_gradient(spec, compute):
    case = make_case(spec)
    value, grads = pb.mixed_value_and_grad(compute)(case.net, case.x, case.y, case.loss, case.reduction)
    assert value.dtype == np.float32 and all(g.dtype == np.float32 for g in jax.tree.leaves(grads))
    assert jax.tree.structure(grads) == jax.tree.structure(case.net)
    value32, grads32 = pb.value_and_grad(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction)
    tolerance = MIXED_TOLERANCE[compute]
    assert_leaves_close(grads, grads32, tolerance=tolerance, floor=FLOOR[np.dtype(compute)], context=(spec, compute))
    assert abs(float(value) - float(value32)) <= tolerance * abs(float(value32))
    # and it is a 16-bit computation, not float32 in disguise
    assert any(not np.array_equal(a, b) for a, b in zip(leaves64(grads), leaves64(grads32)))


@pytest.mark.slow
@pytest.mark.parametrize("compute", LOW)
def test_mixed_gradient_at_its_own_dtype_is_purebps_pass(compute):
    """Master already 16-bit: nothing to cast, the result is pb.value_and_grad's bit for bit."""
    case = make_case(dataclasses.replace(MIXED_SPECS[0], dtype=compute))
    value, grads = pb.mixed_value_and_grad(compute)(case.net, case.x, case.y, case.loss, case.reduction)
    expected_value, expected = pb.value_and_grad(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction)
    assert float(value) == float(expected_value)
    for got, want in zip(leaves64(grads), leaves64(expected)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_a_power_of_two_loss_scale_is_exact():
    """float64 master, float32 compute (nothing under- or overflows): grads with S = 2^12 equal S = 1 bit for bit."""
    case = make_case(dataclasses.replace(MIXED_SPECS[1], dtype="float64"))
    args = (case.net, case.x, case.y, case.loss, case.reduction)
    value1, grads1 = pb.mixed_value_and_grad("float32")(*args)
    value2, grads2 = pb.mixed_value_and_grad("float32", loss_scale=4096.0)(*args)
    assert grads2.layers[0].w.dtype == np.float64 and float(value1) == float(value2)
    for a, b in zip(leaves64(grads1), leaves64(grads2)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves64(grads1), leaves64(pb.grad(*args[:3], loss="mse"))))


def test_float16_loss_scaling_recovers_underflowing_gradients():
    """Deep sigmoid, mean over 256: float16 deltas of the first layers are subnormal; S = 2^12 brings them back.

    Layer 0's w is measured against its own norm (floor 0): it is ~1e-5, far below the floor of the
    whole gradient, which is exactly where underflow hides.
    """
    spec = CaseSpec((16,) + (32,) * 6 + (4,), ("sigmoid",) * 6 + ("identity",), "mse", dtype="float32", batch=256)
    case = make_case(spec)
    args = (case.net, case.x, case.y, case.loss, case.reduction)
    _, grads32 = pb.value_and_grad(*args[:3], loss="mse")
    plain = pb.mixed_value_and_grad("float16")(*args)[1]
    scaled = pb.mixed_value_and_grad("float16", loss_scale=4096.0)(*args)[1]
    plain0, scaled0 = (compare_gradients(g, grads32, tolerance=1, floor=0.0)[0] for g in (plain, scaled))
    assert plain0.relative_error > 3e-2, plain0
    assert scaled0.relative_error < 3e-3, scaled0
    assert_leaves_close(
        scaled, grads32, tolerance=MIXED_TOLERANCE["float16"], floor=FLOOR[np.dtype("float16")], context=spec
    )


def test_float16_overflow_gives_non_finite_gradients_and_apply_if_finite_skips_them():
    """An S too large for the gradients: inf/NaN come back (nothing clamped); optax.apply_if_finite skips the step."""
    case = make_case(CaseSpec((8, 16, 4), ("tanh", "identity"), "mse", "sum", dtype="float32", batch=64))
    value, grads = pb.mixed_value_and_grad("float16", loss_scale=32768.0)(case.net, case.x, case.y, "mse", "sum")
    assert np.isfinite(float(value))  # the loss is not scaled
    assert not all(np.all(np.isfinite(g)) for g in leaves64(grads))
    optimizer = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3)
    updates, _ = optimizer.update(grads, optimizer.init(case.net), case.net)
    with jax.numpy_dtype_promotion("standard"):
        new_net = optax.apply_updates(case.net, updates)
    for before, after in zip(leaves64(case.net), leaves64(new_net)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize(
    "loss_scale,error,match",
    [
        (0.0, ValueError, "finite number > 0"),
        (-2.0, ValueError, "finite number > 0"),
        (float("inf"), ValueError, "finite number > 0"),
        (float("nan"), ValueError, "finite number > 0"),
        (True, TypeError, "must be a number"),
        ("1024", TypeError, "must be a number"),
    ],
)
def test_bad_loss_scales_are_refused(loss_scale, error, match):
    with pytest.raises(error, match=match):
        pb.mixed_value_and_grad("float16", loss_scale=loss_scale)


def test_a_loss_scale_that_overflows_delta_is_refused_before_compiling():
    case = make_case(CaseSpec((8, 4), ("identity",), "mse", "sum", dtype="float32", batch=4))
    with pytest.raises(ValueError, match=r"131072.*inf in float16.*65504"):
        pb.mixed_value_and_grad("float16", loss_scale=2.0**17)(case.net, case.x, case.y, "mse", "sum")


def test_mixed_inputs_are_checked_in_the_master_dtype():
    """float32 x for a float32 master is right; float32 x for a bfloat16 net is the usual clear TypeError."""
    case = make_case(CaseSpec((5, 3), ("identity",), "mse", dtype="float32", batch=4))
    mixed = pb.mixed_value_and_grad("bfloat16")
    mixed(case.net, case.x, case.y, "mse", "mean")
    with pytest.raises(TypeError, match="x has dtype float32 but the network's parameters are bfloat16"):
        mixed(pb.cast_network(case.net, "bfloat16"), case.x, case.y, "mse", "mean")
    with pytest.raises(TypeError, match="x has dtype bfloat16 but the network's parameters are float32"):
        mixed(case.net, case.x.astype(jnp.bfloat16), case.y, "mse", "mean")
    with pytest.raises(TypeError, match="float16, bfloat16, float32, float64"):
        pb.mixed_value_and_grad("int8")
    with pytest.raises(TypeError, match="expected a purebp.Sequential"):
        pb.cast_network({"w": case.x}, "bfloat16")


# ---------------------------------------------------------------- training


def test_make_train_step_refuses_what_it_cannot_mix():
    with pytest.raises(TypeError, match="float16, bfloat16, float32, float64"):
        pb.make_train_step(optax.sgd(0.1), loss="mse", compute_dtype="float8")
    with pytest.raises(ValueError, match="compute_dtype needs gradient='handwritten'"):
        pb.make_train_step(optax.sgd(0.1), loss="mse", compute_dtype="bfloat16", gradient="autodiff")
    with pytest.raises(ValueError, match="compute_dtype cannot be combined with a mesh"):
        pb.make_train_step(optax.sgd(0.1), loss="mse", compute_dtype="bfloat16", mesh=pb.make_data_mesh())


@pytest.mark.slow
@pytest.mark.parametrize("compute", LOW)
def test_mixed_training_under_jit_and_scan_reduces_the_loss(compute):
    """60 Adam steps of one jitted lax.scan on a small classification problem, float32 master, 16-bit compute."""
    case = make_case(CaseSpec((8, 32, 4), ("tanh", "identity"), "softmax_cross_entropy", dtype="float32", batch=64))
    optimizer = optax.adam(1e-2)
    step = pb.make_train_step(optimizer, loss=case.loss, compute_dtype=compute)

    @jax.jit
    def train(net, opt_state):
        def body(carry, _):
            net, opt_state = carry
            net, opt_state, metrics = step(net, opt_state, (case.x, case.y))
            return (net, opt_state), metrics["loss"]

        return jax.lax.scan(body, (net, opt_state), None, length=60)

    (net, _), losses = train(case.net, optimizer.init(case.net))
    assert losses.dtype == np.float32 and net.dtype == np.float32
    losses = np.asarray(losses, np.float64)
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
    first, _ = pb.mixed_value_and_grad(compute)(case.net, case.x, case.y, case.loss, "mean")
    assert losses[0] == float(first)  # the step's loss is the mixed loss at the parameters before the update


def readme_mixed_precision() -> dict:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("### Mixed precision") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code += "\nassert metrics['loss'].dtype == net.dtype == grads.layers[0].w.dtype == jnp.float32\n"
    return dict(command=[sys.executable, "-c", code], timeout=300)


@pytest.mark.slow
@pytest.mark.background("README: Mixed precision", **readme_mixed_precision())  # beside the in-process tests
def test_readme_mixed_precision_example_runs(background):
    """The README's example, in a fresh process (default JAX settings: no x64; the truth is float64 all the same)."""
    result = background.result("README: Mixed precision", **readme_mixed_precision()).process
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout and "from the float64 truth" in result.stdout, result.stdout
