"""Per-example gradients, their norms and DP-SGD from the deltas, against jax.vmap(jax.grad) and optax.

Tolerances are the core's (purebp.check): relative L2 error 1e-10 in float64 and
1e-5 in float32, per example and per leaf, with the core's floor (a leaf smaller
than FLOOR * the norm of that example's whole gradient is compared against that
floor), so one wrong example cannot hide behind the others.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from jax._src.interpreters import ad

import purebp as pb
from purebp import check
from purebp.testing import CaseSpec, cases, make_case, random_spec

# ---------------------------------------------------------------- the autodiff witnesses (tests only)


def _cost_of_one(net, x_n, y_n, loss):
    """C^n for one example: purebp's forward pass and cost on a batch of one, summed (not divided by N)."""
    return check.loss_function(net, x_n[None], y_n[None], loss, "sum")


_autodiff_per_example = jax.jit(
    jax.vmap(jax.grad(_cost_of_one), in_axes=(None, 0, 0, None)), static_argnums=3
)  # jax.vmap(jax.grad(per-example cost)), jitted like purebp's side


def autodiff_per_example(net, x, y, loss):
    with jax.default_matmul_precision("highest"):
        return _autodiff_per_example(net, x, y, loss)


def _tolerances(net):
    dtype = np.dtype(net.dtype)
    return check.TOLERANCE[dtype], check.FLOOR[dtype]


def per_example_errors(handwritten, autodiff, floor) -> np.ndarray:
    """Return the (N, leaves) relative L2 errors ||h_n - g_n|| / max(||g_n||, floor * ||g_all_n||)."""
    h_leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(handwritten)]
    g_leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(autodiff)]
    n = g_leaves[0].shape[0]
    g_norms = np.stack([np.linalg.norm(g.reshape(n, -1), axis=1) for g in g_leaves], axis=1)
    d_norms = np.stack([np.linalg.norm((h - g).reshape(n, -1), axis=1) for h, g in zip(h_leaves, g_leaves)], axis=1)
    total = np.sqrt(np.sum(g_norms**2, axis=1, keepdims=True))
    scale = np.maximum(g_norms, floor * total)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d_norms == 0.0, 0.0, d_norms / scale)


def assert_tree_close(actual, expected, tolerance, floor, what):
    comparisons = check.compare_gradients(actual, expected, tolerance=tolerance, floor=floor)
    worst = max(leaf.relative_error for leaf in comparisons)
    assert all(leaf.passed for leaf in comparisons), f"{what}: worst relative L2 error {worst:.2e} > {tolerance:.0e}"


# ---------------------------------------------------------------- per-example gradients and norms


@pytest.mark.slow
@settings(max_examples=10)
@given(case=cases(dtypes=("float32", "float64"), max_depth=4, max_width=12, max_batch=12))
def test_per_example_grads_and_norms_match_vmap_of_grad(case):
    net, x, y, loss = case.net, case.x, case.y, case.loss
    tolerance, floor = _tolerances(net)
    with jax.default_matmul_precision("highest"):
        grads = pb.per_example_grads(net, x, y, loss=loss)
        norms, leaf_norms = pb.per_example_grad_norms(net, x, y, loss=loss, per_layer=True)
        summed = pb.grad(net, x, y, loss=loss, reduction="sum")
    expected = autodiff_per_example(net, x, y, loss)
    n = x.shape[0]

    # 1. leaf n is dC^n/dtheta: equal to jax.vmap(jax.grad(C^n)), example by example, leaf by leaf
    assert jax.tree.structure(grads) == jax.tree.structure(expected), case
    for leaf, reference in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        assert leaf.shape == reference.shape and leaf.shape[0] == n and leaf.dtype == net.dtype, case
    errors = per_example_errors(grads, expected, floor)
    assert errors.max() <= tolerance, f"{case}: worst per-example relative error {errors.max():.2e}"

    # 2. summing over n gives the batch gradient of L = sum_n C^n
    total = jax.tree.map(lambda leaf: np.sum(np.asarray(leaf, np.float64), axis=0), grads)
    assert_tree_close(total, summed, tolerance, floor, f"{case}: sum over n vs purebp.grad(reduction='sum')")

    # 3. the factorised norms equal the norms of the materialised autodiff gradients
    flat = np.concatenate([np.asarray(g, np.float64).reshape(n, -1) for g in jax.tree.leaves(expected)], axis=1)
    expected_norms = np.linalg.norm(flat, axis=1)
    assert norms.shape == (n,) and norms.dtype == net.dtype, case
    norm_scale = np.maximum(expected_norms, floor * expected_norms.max())
    with np.errstate(divide="ignore", invalid="ignore"):
        norm_errors = np.where(norm_scale > 0, np.abs(np.asarray(norms, np.float64) - expected_norms) / norm_scale, 0)
    assert norm_errors.max() <= tolerance, f"{case}: worst norm relative error {norm_errors.max():.2e}"

    # 4. per-leaf norms: the norm of each leaf's per-example gradient, and they add up to the global norm
    expected_leaf_norms = jax.tree.map(
        lambda g: np.linalg.norm(np.asarray(g, np.float64).reshape(n, -1), axis=1), expected
    )
    leaf_scale = floor * max(expected_norms.max(), np.finfo(np.float64).tiny)
    for leaf, reference in zip(jax.tree.leaves(leaf_norms), jax.tree.leaves(expected_leaf_norms)):
        assert leaf.shape == (n,), case
        error = np.abs(np.asarray(leaf, np.float64) - reference) / np.maximum(reference, leaf_scale)
        assert error.max() <= tolerance, f"{case}: per-leaf norm relative error {error.max():.2e}"
    squares = sum(np.asarray(leaf, np.float64) ** 2 for leaf in jax.tree.leaves(leaf_norms))
    np.testing.assert_allclose(np.sqrt(squares), np.asarray(norms, np.float64), rtol=10 * tolerance)


def test_per_example_grads_are_the_outer_products_of_the_trace():
    # the documented identity, on the public trace: dC^n/dW^l = delta^l_n (a^{l-1}_n)^T with sum-reduction deltas
    case = make_case(CaseSpec(sizes=(4, 6, 3), activations=("tanh", "identity"), loss="mse", batch=5, seed=3))
    trace = pb.backprop_trace(case.net, case.x, case.y, loss="mse", reduction="sum")
    grads = pb.per_example_grads(case.net, case.x, case.y, loss="mse")
    inputs = (case.x, trace.activations[0])
    for l, layer in enumerate(grads.layers):
        np.testing.assert_array_equal(layer.b, trace.deltas[l])
        outer = np.asarray(trace.deltas[l])[:, :, None] * np.asarray(inputs[l])[:, None, :]
        np.testing.assert_allclose(layer.w, outer, rtol=1e-14, atol=0)


def test_norms_work_under_a_users_jit_and_are_deterministic():
    case = make_case(CaseSpec(sizes=(5, 8, 4), activations=("relu", "softmax"), loss="cross_entropy", batch=7))
    direct = pb.per_example_grad_norms(case.net, case.x, case.y, loss="cross_entropy")
    jitted = jax.jit(lambda net, x, y: pb.per_example_grad_norms(net, x, y, loss="cross_entropy"))(
        case.net, case.x, case.y
    )
    np.testing.assert_array_equal(direct, jitted)
    np.testing.assert_array_equal(direct, pb.per_example_grad_norms(case.net, case.x, case.y, loss="cross_entropy"))


def test_norms_compile_without_per_example_gradients_in_memory():
    # O(N * sum of widths), not O(N * parameters): the compiled temporaries stay far below N * P numbers
    net = pb.init_mlp(jax.random.key(0), (200, 100, 100, 10), ("relu", "relu", "identity"), dtype=jnp.float64)
    n = 64
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, 200)))
    y = jnp.asarray(np.arange(n) % 10)
    compiled = (
        jax.jit(lambda net, x, y: pb.per_example_grad_norms(net, x, y, loss="softmax_cross_entropy"))
        .lower(net, x, y)
        .compile()
    )
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    per_example_bytes = n * sum(leaf.size for leaf in jax.tree.leaves(net)) * 8
    assert analysis.temp_size_in_bytes < per_example_bytes / 50, (analysis.temp_size_in_bytes, per_example_bytes)


def _raise(*args, **kwargs):
    raise AssertionError("autodiff was called")


@pytest.mark.slow
def test_no_autodiff_anywhere(monkeypatch):
    # JAX's autodiff entry points and internals replaced by functions that raise: a fresh architecture
    # still gets its per-example gradients, norms and DP step (and the patch is live)
    for name in ("grad", "value_and_grad", "vjp", "jvp", "linearize", "jacfwd", "jacrev", "vmap"):
        monkeypatch.setattr(jax, name, _raise)
    for name in ("jvp", "jvp_jaxpr", "linearize", "linearize_jaxpr", "backward_pass"):
        monkeypatch.setattr(ad, name, _raise)
    jax.clear_caches()
    try:
        case = make_case(CaseSpec(sizes=(7, 6, 5, 4), activations=("gelu", "softplus", "softmax"), loss="mse"))
        args = (case.net, case.x, case.y)
        grads = pb.per_example_grads(*args, loss="mse")
        norms = pb.per_example_grad_norms(*args, loss="mse")
        _, dp_grads, _ = pb.dp_value_and_grad(
            *args, jax.random.key(0), loss="mse", l2_norm_clip=0.1, noise_multiplier=1.0
        )
        for leaf in jax.tree.leaves((grads, norms, dp_grads)):
            assert bool(jnp.all(jnp.isfinite(leaf)))
        with pytest.raises(AssertionError, match="autodiff was called"):
            jax.grad(lambda w: w)(1.0)
    finally:
        jax.clear_caches()


# ---------------------------------------------------------------- DP-SGD against optax


@jax.jit
def _optax_dp_update(per_example, clip, sigma, key):
    transform = optax.contrib.differentially_private_aggregate(clip, sigma, key)
    return transform.update(per_example, transform.init(per_example))


def _optax_dp(net, x, y, loss, clip, sigma, key):
    """optax's DP aggregate applied to jax.vmap(jax.grad) per-example gradients; returns (update, next key).

    Built inside one jitted function (clip and sigma traced) so that each case compiles it once.
    """
    update, state = _optax_dp_update(autodiff_per_example(net, x, y, loss), clip, sigma, key)
    return update, state.rng_key


# few and shallow: each case compiles one normal draw per leaf (threefry), twice, which is slow on CPU
DP_SPECS = [
    random_spec(np.random.default_rng(seed), dtype=dtype, max_depth=3, max_width=16, max_batch=16)
    for seed, dtype in [(12, "float64"), (15, "float32"), (17, "float32")]
]
_loss_function = jax.jit(check.loss_function, static_argnames=("loss", "reduction"))


@pytest.mark.slow
@pytest.mark.parametrize("spec", DP_SPECS, ids=lambda spec: f"{spec.dtype}-{'-'.join(map(str, spec.sizes))}")
def test_dp_gradient_equals_optax_differentially_private_aggregate(spec):
    spec = CaseSpec(**{**spec.__dict__, "batch": max(spec.batch, 4)})
    case = make_case(spec)
    net, x, y, loss = case.net, case.x, case.y, case.loss
    tolerance, floor = _tolerances(net)
    norms = np.asarray(pb.per_example_grad_norms(net, x, y, loss=loss))
    clip = float(np.median(norms))  # about half the examples are clipped, half not
    assert np.any(norms > clip) and np.any(norms <= clip), (spec, norms)
    for sigma, seed in [(0.0, 7), (1.1, 7), (0.6, 8)]:  # noise off, then on with two keys
        key = jax.random.key(seed)
        with jax.default_matmul_precision("highest"):
            value, grads, next_key = pb.dp_value_and_grad(
                net, x, y, key, loss=loss, l2_norm_clip=clip, noise_multiplier=sigma
            )
        expected, expected_key = _optax_dp(net, x, y, loss, clip, sigma, key)
        assert_tree_close(grads, expected, tolerance, floor, f"{spec} sigma={sigma}: DP gradient vs optax")
        np.testing.assert_array_equal(jax.random.key_data(next_key), jax.random.key_data(expected_key))
    np.testing.assert_allclose(value, _loss_function(net, x, y, loss, "mean"), rtol=tolerance)


@pytest.mark.slow
def test_dp_reduction_sum_is_n_times_the_mean():
    # reduction="sum": the sum_n min(1, c/||g_n||) g_n + sigma c xi, without optax's / N
    case = make_case(DP_SPECS[0])
    dp = dict(loss=case.loss, l2_norm_clip=0.5, noise_multiplier=1.0)
    key = jax.random.key(4)
    _, mean, _ = pb.dp_value_and_grad(case.net, case.x, case.y, key, **dp)
    _, summed, _ = pb.dp_value_and_grad(case.net, case.x, case.y, key, reduction="sum", **dp)
    rescaled = jax.tree.map(lambda leaf: leaf / case.x.shape[0], summed)
    assert_tree_close(rescaled, mean, 1e-10, 1e-6, "reduction='sum' / N vs 'mean'")


@pytest.mark.slow
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_dp_zero_gradient_examples_are_handled_like_optax(clip):
    # an example whose output equals its target has g_n = 0: c / 0 = inf (and 0 / 0 = NaN) both mean "not clipped"
    case = make_case(CaseSpec(sizes=(3, 5, 2), activations=("sigmoid", "identity"), loss="mse", batch=4, seed=5))
    outputs = pb.forward(case.net, case.x)
    y = case.y.at[0].set(outputs[0])
    assert float(pb.per_example_grad_norms(case.net, case.x, y, loss="mse")[0]) == 0.0
    key = jax.random.key(1)
    _, grads, _ = pb.dp_value_and_grad(case.net, case.x, y, key, loss="mse", l2_norm_clip=clip, noise_multiplier=0.7)
    expected, _ = _optax_dp(case.net, case.x, y, "mse", clip, 0.7, key)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(grads))
    assert_tree_close(grads, expected, 1e-10, 1e-6, f"clip={clip}")


@pytest.mark.slow
def test_dp_sgd_step_reproduces_optax_chain_over_several_steps():
    case = make_case(
        CaseSpec(sizes=(6, 10, 4), activations=("tanh", "identity"), loss="softmax_cross_entropy", batch=9, seed=2)
    )
    loss, clip, sigma, key = "softmax_cross_entropy", 0.8, 0.9, jax.random.key(42)
    optimizer = optax.adam(0.05)  # Adam's int32 step counter: works under the suite's strict promotion
    reference = optax.chain(optax.contrib.differentially_private_aggregate(clip, sigma, key), optimizer)

    net, state, step_key = case.net, optimizer.init(case.net), key
    expected_net, expected_state = case.net, reference.init(case.net)
    reference_update = jax.jit(reference.update)
    for _ in range(3):
        net, state, _, step_key = pb.dp_sgd_step(
            net,
            state,
            case.x,
            case.y,
            step_key,
            optimizer=optimizer,
            loss=loss,
            l2_norm_clip=clip,
            noise_multiplier=sigma,
        )
        with jax.numpy_dtype_promotion("standard"):  # optax's own code needs the standard rules
            updates, expected_state = reference_update(
                autodiff_per_example(expected_net, case.x, case.y, loss), expected_state, expected_net
            )
            expected_net = optax.apply_updates(expected_net, updates)
    assert_tree_close(net, expected_net, 1e-10, 1e-6, "parameters after 3 DP-SGD steps")
    np.testing.assert_array_equal(jax.random.key_data(step_key), jax.random.key_data(expected_state[0].rng_key))


def test_dp_is_reproducible_bit_for_bit():
    case = make_case(CaseSpec(sizes=(4, 6, 3), activations=("elu", "identity"), loss="mse", batch=6, seed=8))
    run = lambda: pb.dp_value_and_grad(  # noqa: E731
        case.net, case.x, case.y, jax.random.key(3), loss="mse", l2_norm_clip=0.3, noise_multiplier=1.0
    )
    first, second = run(), run()
    for a, b in zip(jax.tree.leaves(first[:2]), jax.tree.leaves(second[:2])):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small():
    return make_case(CaseSpec(sizes=(3, 4, 2), activations=("relu", "identity"), loss="softmax_cross_entropy"))


def test_bad_inputs_raise_clear_errors(small):
    net, x, y = small.net, small.x, small.y
    loss = "softmax_cross_entropy"
    with pytest.raises(ValueError, match="x has 5 features per example but the network expects 3"):
        pb.per_example_grads(net, jnp.zeros((8, 5)), y, loss=loss)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        pb.per_example_grad_norms(net, x, y, loss="hinge")
    with pytest.raises(ValueError, match="class label 7 at index 0 is outside"):
        pb.per_example_grads(net, x, y.at[0].set(7), loss=loss)
    with pytest.raises(TypeError, match="per_layer must be True or False"):
        pb.per_example_grad_norms(net, x, y, loss=loss, per_layer="yes")
    key = jax.random.key(0)
    dp = dict(loss=loss, l2_norm_clip=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"l2_norm_clip must be >= 0, got -1\.0"):
        pb.dp_value_and_grad(net, x, y, key, **{**dp, "l2_norm_clip": -1.0})
    with pytest.raises(ValueError, match="noise_multiplier must be finite"):
        pb.dp_value_and_grad(net, x, y, key, **{**dp, "noise_multiplier": float("nan")})
    with pytest.raises(ValueError, match="l2_norm_clip must be a scalar"):
        pb.dp_value_and_grad(net, x, y, key, **{**dp, "l2_norm_clip": jnp.ones(2)})
    with pytest.raises(TypeError, match="noise_multiplier must be a real number"):
        pb.dp_value_and_grad(net, x, y, key, **{**dp, "noise_multiplier": True})
    with pytest.raises(TypeError, match="key must be one JAX random key such as"):
        pb.dp_value_and_grad(net, x, y, 0, **dp)
    with pytest.raises(ValueError, match=r"key must be one JAX random key \(shape \(\)\)"):
        pb.dp_value_and_grad(net, x, y, jax.random.split(key, 2), **dp)
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        pb.dp_value_and_grad(net, x, y, key, reduction="max", **dp)
    with pytest.raises(TypeError, match=r"optimizer must be an optax\.GradientTransformation"):
        pb.dp_sgd_step(net, (), x, y, key, optimizer="sgd", **dp)
