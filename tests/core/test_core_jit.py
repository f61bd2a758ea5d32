"""Compilation behaviour, composition with jit/vmap/scan, and proof that no autodiff is used."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import ad

import purebp as pb
from purebp import engine as backprop
from purebp.testing import CaseSpec, make_case


def test_one_compile_per_architecture_shape_and_dtype():
    case = make_case(CaseSpec(sizes=(9, 8, 3), activations=("elu", "identity"), loss="softmax_cross_entropy", batch=5))
    compiled = backprop._value_and_grad_jit._cache_size()
    pb.value_and_grad(case.net, case.x, case.y, loss=case.loss)
    assert backprop._value_and_grad_jit._cache_size() == compiled + 1
    # new values, same shapes: no recompile
    other = make_case(
        CaseSpec(sizes=(9, 8, 3), activations=("elu", "identity"), loss="softmax_cross_entropy", batch=5, seed=1)
    )
    pb.value_and_grad(other.net, other.x, other.y, loss=other.loss)
    pb.value_and_grad(case.net, case.x * 2.0, case.y, loss=case.loss)
    assert backprop._value_and_grad_jit._cache_size() == compiled + 1
    # another batch size, activation or reduction is another program
    pb.value_and_grad(case.net, case.x[:4], case.y[:4], loss=case.loss)
    assert backprop._value_and_grad_jit._cache_size() == compiled + 2
    tanh_net = dataclasses.replace(case.net, layers=(dataclasses.replace(case.net.layers[0], activation="tanh"),
                                                     case.net.layers[1]))  # fmt: skip
    pb.value_and_grad(tanh_net, case.x, case.y, loss=case.loss)
    assert backprop._value_and_grad_jit._cache_size() == compiled + 3


def test_usable_inside_a_users_jit():
    case = make_case(CaseSpec(sizes=(5, 6, 4), activations=("tanh", "softmax"), loss="cross_entropy"))
    eager = pb.value_and_grad(case.net, case.x, case.y, loss=case.loss)
    jitted = jax.jit(lambda n, x, y: pb.value_and_grad(n, x, y, loss="cross_entropy"))(case.net, case.x, case.y)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_usable_under_vmap_over_an_ensemble_of_networks():
    cases = [
        make_case(CaseSpec(sizes=(5, 6, 2), activations=("gelu", "sigmoid"), loss="binary_cross_entropy", seed=s))
        for s in range(3)
    ]
    x, y = cases[0].x, cases[0].y
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[c.net for c in cases])
    losses, grads = jax.vmap(lambda n: pb.value_and_grad(n, x, y, loss="binary_cross_entropy"))(stacked)
    for i, case in enumerate(cases):
        loss_i, grads_i = pb.value_and_grad(case.net, x, y, loss="binary_cross_entropy")
        np.testing.assert_allclose(losses[i], loss_i, rtol=1e-12)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_i)):
            np.testing.assert_allclose(a[i], b, rtol=1e-12, atol=1e-15)


def test_usable_inside_lax_scan_as_gradient_descent():
    """theta^{t+1} = theta^t - eta grad L(theta^t), five steps in a scan equal five steps in Python."""
    case = make_case(CaseSpec(sizes=(4, 8, 3), activations=("relu", "identity"), loss="mse", batch=16))

    def step(net, _):
        loss, grads = pb.value_and_grad(net, case.x, case.y, loss="mse")
        return jax.tree.map(lambda p, g: p - 0.1 * g, net, grads), loss

    scanned, scan_losses = jax.jit(lambda n: jax.lax.scan(step, n, length=5))(case.net)
    net, python_losses = case.net, []
    for _ in range(5):
        net, loss = step(net, None)
        python_losses.append(loss)
    np.testing.assert_allclose(scan_losses, np.asarray(python_losses), rtol=1e-12)
    assert float(scan_losses[-1]) < float(scan_losses[0])
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(net)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def _raise(*args, **kwargs):
    raise AssertionError("autodiff was called")


@pytest.fixture
def autodiff_forbidden(monkeypatch):
    for name in ("grad", "value_and_grad", "vjp", "jvp", "linearize", "jacfwd", "jacrev", "hessian"):
        monkeypatch.setattr(jax, name, _raise)
    for name in ("jvp", "jvp_jaxpr", "linearize", "linearize_jaxpr", "backward_pass"):
        monkeypatch.setattr(ad, name, _raise)
    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.mark.parametrize(
    "loss,output",
    [
        ("mse", "softmax"),
        pytest.param("cross_entropy", "softmax", marks=pytest.mark.slow),
        ("softmax_cross_entropy", "identity"),
        pytest.param("binary_cross_entropy", "sigmoid", marks=pytest.mark.slow),
    ],
)
def test_no_autodiff_in_the_backward_pass(autodiff_forbidden, loss, output):
    """With JAX's autodiff entry points and internals replaced by functions that raise, a fresh
    architecture still gets its gradient, and its program contains no custom_jvp/custom_vjp rule."""
    hidden = ("relu", "leaky_relu", "elu", "softplus", "gelu", "tanh", "sigmoid", "identity")
    case = make_case(CaseSpec(sizes=(13, 12, 11, 10, 9, 8, 7, 6, 5, 4), activations=(*hidden, output), loss=loss))
    loss_value, _grads = pb.value_and_grad(case.net, case.x, case.y, loss=loss)
    trace = pb.backprop_trace(case.net, case.x, case.y, loss=loss)
    assert np.isfinite(float(loss_value)) and float(trace.loss) == float(loss_value)
    jaxpr = str(jax.make_jaxpr(backprop._trace, static_argnums=(3, 4))(case.net, case.x, case.y, loss, "mean"))
    for forbidden in ("custom_jvp_call", "custom_vjp_call", "custom_lin"):
        assert forbidden not in jaxpr
    with pytest.raises(AssertionError, match="autodiff was called"):  # the patch is live
        pb.check_gradients(case.net, case.x, case.y, loss=loss)
