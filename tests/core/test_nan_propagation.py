"""NaN never disappears: a non-finite input comes out non-finite wherever the mathematical forward makes it so.

A ``where``-based rule can turn NaN into a number: ``where(z > 0, z, 0)`` is 0 at NaN (relu, before this test),
and XLA rewrites ``g * (a > 0)`` into ``select(a > 0, g, 0)``, so a G' of 0 at NaN turns a NaN dC/da into a
finite delta. Each check here compares the non-finite pattern of purebp's output with that of a reference:

- every loss (``losses.names()``): C^n of an example whose z^L holds a NaN is NaN, and delta^L is
  non-finite where jax.grad of the cost is;
- every activation (``activations.names()``), jitted, against jax's own (``jax.nn``) on the same z, with NaN,
  +inf and -inf in one example; its ``chain`` keeps a NaN dC/da of a NaN example;
- every layer kind (the table, ``kinds.all_kinds()``) on its row's example: the forward against the kind's math
  written with lax/jnp ops, the backward against autodiff (``jax.vjp``) of the layer's own forward; a kind
  without a reference here (a user's) must at least not make an all-NaN example finite;
- end to end, every public function that takes data, on one small network holding every built-in kind: the
  NaN example's outputs and per-example quantities are non-finite, the batch's loss and gradients are, the
  other examples' results are those of the clean batch; ``fit`` and ``check_gradients`` refuse it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kind_examples import example_layer

import purebp as pb
from purebp import activations, losses
from purebp.layers import kinds as _kinds
from purebp.layers.base import example_keys

POISONS = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}
ROW = 1  # the poisoned example

# jax's own activations: the forward that autodiff users get
REFERENCE_ACTIVATIONS = {
    "identity": lambda z: z,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "leaky_relu": lambda z: jax.nn.leaky_relu(z, activations.LEAKY_RELU_SLOPE),
    "elu": jax.nn.elu,
    "softplus": jax.nn.softplus,
    "gelu": lambda z: jax.nn.gelu(z, approximate=False),
    "softmax": lambda z: jax.nn.softmax(z, axis=-1),
}


def _poisoned(shape: tuple[int, ...], value: float, seed: int = 0, *, everywhere: bool = False) -> np.ndarray:
    """Standard normal data of ``shape`` (batch first) with ``value`` at one entry of example ROW (or all of it)."""
    x = np.random.default_rng(seed).standard_normal(shape)
    if everywhere:
        x[ROW] = value
    else:
        x[ROW].flat[x[ROW].size // 2] = value
    return x


def _assert_same_non_finite(actual, expected, what: str) -> None:
    """Non-finite exactly where ``expected`` is, and equal (to rounding) where both are finite."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), finite, err_msg=f"{what}: finite in one, not the other")
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-10, atol=1e-12, err_msg=what)


def _assert_other_rows_unchanged(actual, clean, what: str) -> None:
    """Every example but ROW gives what the clean batch gives, and is finite."""
    actual, clean = np.delete(np.asarray(actual), ROW, axis=0), np.delete(np.asarray(clean), ROW, axis=0)
    assert np.all(np.isfinite(actual)), f"{what}: a NaN in example {ROW} leaked into other examples"
    np.testing.assert_allclose(actual, clean, rtol=1e-12, atol=1e-14, err_msg=what)


# ---------------------------------------------------------------- activations


def test_every_builtin_activation_has_a_reference():
    assert set(activations.BUILTIN_NAMES) <= set(REFERENCE_ACTIVATIONS)


@pytest.mark.parametrize("poison", POISONS, ids=list(POISONS))
@pytest.mark.parametrize("name", activations.names())
def test_activation_forward_keeps_non_finite_input(name, poison):
    z = _poisoned((3, 4), POISONS[poison])
    a = np.asarray(jax.jit(activations.get(name).forward)(z))
    clean = np.asarray(jax.jit(activations.get(name).forward)(_poisoned((3, 4), 0.5)))
    _assert_other_rows_unchanged(a, clean, name)
    reference = REFERENCE_ACTIVATIONS.get(name)
    if reference is not None:
        _assert_same_non_finite(a[ROW], jax.jit(reference)(z)[ROW], f"{name}({poison})")
    elif poison == "nan":  # a user's activation: G(NaN) is no number
        assert not np.all(np.isfinite(a[ROW])), f"{name} turns NaN into {a[ROW]}"


@pytest.mark.parametrize("name", activations.names())
def test_activation_chain_keeps_a_nan_upstream(name):
    """delta = dC/da (.) G'(z) for an example whose z and dC/da are NaN stays NaN (even where G' would be 0)."""
    act = activations.get(name)
    z = _poisoned((3, 4), np.nan, everywhere=True)
    upstream = _poisoned((3, 4), np.nan, seed=1, everywhere=True)
    delta = jax.jit(lambda u, z: act.chain(u, z, act.forward(z)))(upstream, z)
    assert np.all(np.isnan(np.asarray(delta)[ROW])), f"{name}: delta of a NaN example is {delta[ROW]}"
    if act.second_derivative is not None and not act.piecewise_linear:
        assert np.all(np.isnan(np.asarray(act.second_derivative(z, act.forward(z)))[ROW]))


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("name", losses.names())
def test_loss_of_a_nan_example_is_nan(name):
    """C^n of an example whose z^L holds a NaN is NaN, delta^L non-finite where autodiff's is; others unchanged."""
    entry = losses.get(name)
    output = activations.get(entry.output_activation or "identity")
    if entry.classification:
        y = jnp.asarray(np.eye(4)[[0, 2, 3]])
    elif entry.targets_in_unit_interval:
        y = jnp.full((3, 4), 0.25)
    else:
        y = jnp.asarray(np.random.default_rng(3).standard_normal((3, 4)))

    def cost_and_delta(z):
        a = output.forward(z)
        return losses.per_example_cost(z, a, y, name), losses.output_delta(z, a, y, name, output)

    def autodiff(z):  # dC^n/dz^L by jax.grad of the cost: its non-finite entries are the reference for delta^L
        return jax.grad(lambda z: jnp.sum(losses.per_example_cost(z, output.forward(z), y, name)))(z)

    program = jax.jit(cost_and_delta)
    (cost, delta), (clean_cost, clean_delta) = program(_poisoned((3, 4), np.nan)), program(_poisoned((3, 4), 0.5))
    assert np.isnan(cost[ROW]) and not np.all(np.isfinite(np.asarray(delta)[ROW])), f"{name}: {cost}, {delta}"
    _assert_same_non_finite(delta[ROW], jax.jit(autodiff)(_poisoned((3, 4), np.nan))[ROW], f"{name} delta")
    _assert_other_rows_unchanged(cost, clean_cost, f"{name} cost")
    _assert_other_rows_unchanged(delta, clean_delta, f"{name} delta")


# ---------------------------------------------------------------- layer kinds


def _reference_forward(layer, x):
    """The layer's forward written with lax/jnp ops, or None for a kind this file does not know."""
    kind = _kinds.kind_of(layer)
    name = None if kind is None else kind.name
    if name == "dense":
        return REFERENCE_ACTIVATIONS[layer.activation](x @ layer.w.T + layer.b[None, :])
    if name == "conv1d":
        z = jax.lax.conv_general_dilated(
            x, layer.w, (layer.stride,), [(layer.padding, layer.padding)], dimension_numbers=("NCH", "OIH", "NCH")
        )
        return REFERENCE_ACTIVATIONS[layer.activation](z + layer.b[None, :, None])
    if name in ("max_pool1d", "avg_pool1d"):
        window, strides = (1, 1, layer.kernel), (1, 1, layer.stride)
        if name == "max_pool1d":
            return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, "VALID")
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, "VALID") / layer.kernel
    if name == "layer_norm":
        mean, variance = jnp.mean(x, -1, keepdims=True), jnp.var(x, -1, keepdims=True)
        along = (1,) * (x.ndim - 1) + layer.scale.shape
        return (x - mean) / jnp.sqrt(variance + layer.eps) * jnp.reshape(layer.scale, along) + jnp.reshape(
            layer.offset, along
        )
    if name in ("dropout", "flatten"):  # dropout at inference is the identity
        return jnp.reshape(x, (x.shape[0], -1)) if name == "flatten" else x
    if name == "residual":
        hidden = x
        for inner in layer.layers:
            hidden = _reference_forward(inner, hidden)
            if hidden is None:
                return None
        return x + hidden
    return None


def _drawn(kind: _kinds.Kind):
    """The row's example layer, float64 parameters drawn by its own ``draw``, and its input shape."""
    return example_layer(kind)


@functools.cache
def _jitted_forward():
    return jax.jit(lambda layer, x, keys: layer.forward(x, keys)[0])


@functools.cache
def _jitted_backward():
    # the hand-written backward and autodiff of the layer's own forward, for one grad_out
    def both(layer, x, grad_out):
        _, cache = layer.forward(x)
        grad_in, grads = layer.backward(cache, grad_out)
        _, pullback = jax.vjp(lambda layer, x: layer.forward(x)[0], layer, x)
        auto_grads, auto_in = pullback(grad_out)
        return (grad_in, grads), (auto_in, auto_grads)

    return jax.jit(both)


KINDS = _kinds.all_kinds()
KIND_IDS = [kind.name for kind in KINDS]


def _has_activation(node) -> bool:
    return dataclasses.is_dataclass(node) and "activation" in {field.name for field in dataclasses.fields(node)}


def _variants(kind: _kinds.Kind):
    """The row's example layer, and the same layer with relu wherever it has an activation."""
    layer, shape = _drawn(kind)
    yield layer, shape
    if any(_has_activation(node) for node in jax.tree.leaves(layer, is_leaf=_has_activation)):
        relu = lambda node: dataclasses.replace(node, activation="relu") if _has_activation(node) else node  # noqa: E731
        yield jax.tree.map(relu, layer, is_leaf=_has_activation), shape


@pytest.mark.parametrize("poison", POISONS, ids=list(POISONS))
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_layer_forward_keeps_non_finite_input(kind, poison):
    for layer, shape in _variants(kind):
        x = _poisoned((3, *shape), POISONS[poison])
        out = np.asarray(_jitted_forward()(layer, x, None))
        _assert_other_rows_unchanged(out, _jitted_forward()(layer, _poisoned((3, *shape), 0.5), None), repr(layer))
        reference = _reference_forward(layer, x)
        if reference is not None:
            _assert_same_non_finite(out[ROW], np.asarray(reference)[ROW], f"{layer!r} on {poison}")
        elif poison == "nan":  # a kind without a reference here: an all-NaN example must not come out finite
            everywhere = np.asarray(_jitted_forward()(layer, _poisoned((3, *shape), np.nan, everywhere=True), None))
            assert not np.all(np.isfinite(everywhere[ROW])), f"{layer!r} turns an all-NaN example finite"


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_layer_forward_in_training_keeps_nan(kind):
    """With per-example keys (dropout on): a NaN example still has NaN outputs, a dropped NaN is 0 (.) NaN."""
    layer, shape = _drawn(kind)
    x = _poisoned((3, *shape), np.nan, everywhere=True)
    out = np.asarray(_jitted_forward()(layer, x, example_keys(jax.random.key(5), 3)))
    if _reference_forward(layer, x) is None:  # a kind this file does not know
        assert not np.all(np.isfinite(out[ROW])), f"{layer!r} turns an all-NaN example finite"
    else:
        assert np.all(np.isnan(out[ROW])), f"{layer!r}: an all-NaN example gives {out[ROW]}"


@pytest.mark.parametrize("grad_poison", ["finite", "nan"])
@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_layer_backward_is_non_finite_where_autodiff_is(kind, grad_poison):
    """A NaN example (and a NaN dC/d(out) for it, as a NaN loss gives): the backward rule's non-finite entries,
    in dC/da and in each parameter's gradient, are autodiff's of the same forward."""
    for layer, shape in _variants(kind):
        x = _poisoned((3, *shape), np.nan)
        out = _jitted_forward()(layer, x, None)
        grad_out = _poisoned(out.shape, np.nan if grad_poison == "nan" else 0.5, seed=2, everywhere=True)
        (grad_in, grads), (auto_in, auto_grads) = _jitted_backward()(layer, x, grad_out)
        _assert_same_non_finite(grad_in, auto_in, f"{layer!r}: dC/da")
        for ours, autodiff in zip(jax.tree.leaves(grads), jax.tree.leaves(auto_grads), strict=True):
            _assert_same_non_finite(ours, autodiff, f"{layer!r}: a parameter's gradient")


# ---------------------------------------------------------------- every public function that takes data

LOSS = "softmax_cross_entropy"
BATCH = 4


def _body(curvature: bool) -> list:
    """Every built-in kind (layer norm only without ``curvature``: it has no Hessian or Kronecker rule)."""
    block = (pb.dense(6, "relu"),) if curvature else (pb.dense(6, "relu"), pb.layer_norm())
    return [
        pb.conv1d(3, 3, padding=1, activation="relu"),
        pb.max_pool1d(2, 1),
        pb.avg_pool1d(2),
        pb.flatten(),
        pb.dense(6, "relu"),
        pb.residual(*block),
        pb.dropout(0.25),
        pb.dense(3),
    ]


@functools.cache
def _case(curvature: bool = False):
    """(net, x with a NaN in example ROW, the same x clean, labels): one small network, built once."""
    net = pb.init_network(jax.random.key(0), (2, 7), _body(curvature), dtype=jnp.float64)
    clean = _poisoned((BATCH, 2, 7), 0.5)
    return net, _poisoned((BATCH, 2, 7), np.nan), clean, jnp.asarray([0, 1, 2, 0])


def _every_leaf_non_finite(tree, what: str) -> None:
    leaves = jax.tree.leaves(tree)
    assert leaves, what
    for index, leaf in enumerate(leaves):
        assert not np.all(np.isfinite(np.asarray(leaf))), f"{what}: leaf {index} is finite with a NaN example"


def _per_example_rows(tree, clean_tree, what: str) -> None:
    """Each leaf's example ROW is non-finite, its other examples are the clean batch's."""
    for ours, clean in zip(jax.tree.leaves(tree), jax.tree.leaves(clean_tree), strict=True):
        assert not np.all(np.isfinite(np.asarray(ours)[ROW])), f"{what}: the NaN example's entry is finite"
        _assert_other_rows_unchanged(ours, clean, what)


def test_forward_gives_the_nan_example_nan_outputs():
    net, x, clean, _ = _case()
    out = np.asarray(pb.forward(net, x))
    assert np.all(np.isnan(out[ROW]))
    _assert_other_rows_unchanged(out, pb.forward(net, clean), "forward")
    train = np.asarray(pb.forward(net, x, key=jax.random.key(1)))  # dropout on
    assert np.all(np.isnan(train[ROW])) and np.all(np.isfinite(np.delete(train, ROW, axis=0)))


@pytest.mark.parametrize("key", [None, pytest.param(1, marks=pytest.mark.slow)], ids=["inference", "dropout"])
def test_value_and_grad_is_nan_where_autodiff_is(key):
    net, x, _, y = _case()
    key = None if key is None else jax.random.key(key)
    value, grads = pb.value_and_grad(net, x, y, loss=LOSS, key=key)
    auto_value, auto_grads = pb.autodiff_value_and_grad(net, x, y, loss=LOSS, key=key)
    assert np.isnan(value) and np.isnan(auto_value)
    _every_leaf_non_finite(grads, "value_and_grad")
    for ours, autodiff in zip(jax.tree.leaves(grads), jax.tree.leaves(auto_grads), strict=True):
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(autodiff))
    _every_leaf_non_finite(pb.grad(net, x, y, loss=LOSS, key=key), "grad")


@pytest.mark.slow
def test_backprop_trace_carries_the_nan():
    net, x, _, y = _case()
    trace = pb.backprop_trace(net, x, y, loss=LOSS)
    assert np.isnan(trace.loss)
    _every_leaf_non_finite(trace.grads, "backprop_trace grads")
    for name in ("activations", "deltas"):
        for layer, values in enumerate(getattr(trace, name)):
            assert not np.all(np.isfinite(np.asarray(values)[ROW])), f"{name}[{layer}] of the NaN example is finite"


def test_evaluate_loss_is_nan():
    net, x, _, y = _case()
    assert np.isnan(pb.evaluate(net, x, y, loss=LOSS)["loss"])


def test_evaluate_does_not_score_a_nan_example():
    net, x, _, _ = _case()
    y = jnp.asarray([0, 0, 0, 0])  # argmax of an all-NaN row is 0: the NaN example would count as correct
    try:
        metrics = pb.evaluate(net, x, y, loss=LOSS)
    except ValueError as error:
        assert "not finite" in str(error)
    else:
        assert np.isnan(metrics["accuracy"]), f"the NaN example was scored: {metrics}"


def test_fit_and_check_gradients_refuse_non_finite_data():
    net, x, _, y = _case()
    with pytest.raises(ValueError, match=r"not finite: x\[1, "):
        pb.check_gradients(net, x, y, loss=LOSS)
    with pytest.raises(ValueError, match=r"not finite: x\[1, "):
        pb.fit(net, (x, y), loss=LOSS, epochs=1, batch_size=BATCH, key=jax.random.key(0))


def test_per_example_quantities_are_nan_for_the_nan_example_only():
    net, x, clean, y = _case()
    _per_example_rows(
        pb.per_example_grads(net, x, y, loss=LOSS), pb.per_example_grads(net, clean, y, loss=LOSS), "per_example_grads"
    )
    norms = pb.per_example_grad_norms(net, x, y, loss=LOSS)
    assert np.isnan(norms[ROW])
    _assert_other_rows_unchanged(norms, pb.per_example_grad_norms(net, clean, y, loss=LOSS), "per_example_grad_norms")


@pytest.mark.slow
def test_dp_value_and_grad_carries_the_nan():
    """Clipping multiplies a NaN example's gradient by 1 (optax's nan_to_num), so the clipped sum stays NaN."""
    net, x, _, y = _case()
    value, grads, _ = pb.dp_value_and_grad(
        net, x, y, jax.random.key(2), loss=LOSS, l2_norm_clip=1.0, noise_multiplier=0.0
    )
    assert np.isnan(value)
    _every_leaf_non_finite(grads, "dp_value_and_grad")


CURVATURE = ("diag_ggn", "diag_ggn_mc", "diag_hessian", "sum_grad_squared", "grad_variance", "kflr", "kfac", "ggnvp")


@pytest.mark.slow  # a program each, about 1.5 s
@pytest.mark.parametrize("quantity", CURVATURE)
def test_curvature_quantities_carry_the_nan(quantity):
    net, x, _, y = _case(curvature=True)
    calls = {
        "diag_ggn": lambda: pb.diag_ggn(net, x, y, loss=LOSS),
        "diag_ggn_mc": lambda: pb.diag_ggn(net, x, y, loss=LOSS, mc_samples=2, key=jax.random.key(3)),
        "diag_hessian": lambda: pb.diag_hessian(net, x, y, loss=LOSS),
        "sum_grad_squared": lambda: pb.sum_grad_squared(net, x, y, loss=LOSS),
        "grad_variance": lambda: pb.grad_variance(net, x, y, loss=LOSS),
        "kflr": lambda: pb.kflr(net, x, y, loss=LOSS),
        "kfac": lambda: pb.kfac(net, x, y, loss=LOSS, key=jax.random.key(4)),
        "ggnvp": lambda: pb.ggn_vector_product(net, x, y, net, loss=LOSS),
    }
    _every_leaf_non_finite(calls[quantity](), quantity)


def test_check_layer_refuses_a_non_finite_input():
    net, x, _, _ = _case()
    with pytest.raises(ValueError, match=r"not finite: x\[1, "):
        pb.check_layer(net.layers[0], x)
