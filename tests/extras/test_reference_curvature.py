"""purebp's curvature sweeps against the NumPy oracle of explicit Jacobians (reference/numpy_curvature.py).

The oracle shares nothing with purebp's column sweeps: it multiplies out every
example's Jacobians dz^L/dz^l and reads each quantity off its definition. It is
itself checked against jax.hessian / jax.vmap(jax.grad) once, so that the two
independent routes (the oracle, and the autodiff witnesses of tests/extras/test_curvature.py)
agree with each other and with purebp. Tolerance: relative L2 error 1e-10 per
quantity over all parameters, float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import purebp as pb
from reference import numpy_curvature

TOLERANCE = 1e-10

# (sizes, hidden activations, loss, reduction): every activation with G'' != 0 the oracle knows, both losses
ARCHITECTURES = [
    ((5, 6, 4, 3), ("tanh", "sigmoid"), "softmax_cross_entropy", "mean"),
    ((4, 7, 3), ("softplus",), "mse", "sum"),
    ((6, 5, 5, 4), ("relu", "tanh"), "mse", "mean"),
]


def relative(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64).ravel(), np.asarray(expected, np.float64).ravel()
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def problem(sizes, hidden, loss, seed=0, batch=6):
    rng = np.random.default_rng(seed)
    net = pb.init_mlp(jax.random.key(seed), list(sizes), [*hidden, "identity"], dtype=jnp.float64)
    x = rng.normal(size=(batch, sizes[0]))
    if loss == "softmax_cross_entropy":
        labels = rng.integers(0, sizes[-1], batch)
        y, targets = jnp.asarray(labels), np.eye(sizes[-1])[labels]
    else:
        targets = rng.normal(size=(batch, sizes[-1]))
        y = jnp.asarray(targets)
    return net, jnp.asarray(x), y, x, targets


def oracle(net, x, targets, hidden, loss, reduction):
    weights = [np.asarray(layer.w) for layer in net.layers]
    biases = [np.asarray(layer.b) for layer in net.layers]
    return numpy_curvature.quantities(
        weights, biases, [*hidden, "identity"], x, targets, loss=loss, reduction=reduction
    )


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


@pytest.mark.slow
@pytest.mark.parametrize("sizes, hidden, loss, reduction", ARCHITECTURES)
def test_every_quantity_matches_the_explicit_jacobian_oracle(sizes, hidden, loss, reduction):
    net, x, y, x_np, targets = problem(sizes, hidden, loss)
    expected = oracle(net, x_np, targets, hidden, loss, reduction)
    case = f"sizes {sizes}, hidden {hidden}, {loss}, reduction {reduction}"
    options = dict(loss=loss, reduction=reduction)
    for name, function in [
        ("diag_ggn", pb.diag_ggn),
        ("diag_hessian", pb.diag_hessian),
        ("sum_grad_squared", pb.sum_grad_squared),
        ("grad_variance", pb.grad_variance),
    ]:
        error = relative(flat(function(net, x, y, **options)), expected[name])
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e} ({case})"
    v = jax.tree.map(lambda leaf: jnp.asarray(np.random.default_rng(1).normal(size=leaf.shape)), net)
    error = relative(flat(pb.ggn_vector_product(net, x, y, v, **options)), expected["ggn"] @ flat(v))
    assert error <= TOLERANCE, f"ggn_vector_product: relative error {error:.2e} ({case})"
    for index, (factors, (g, a)) in enumerate(zip(pb.kflr(net, x, y, **options), expected["kflr"])):
        assert relative(factors.g, g) <= TOLERANCE, f"kflr layer {index} g ({case})"
        assert relative(factors.a, a) <= TOLERANCE, f"kflr layer {index} a ({case})"
    if "tanh" in hidden or "sigmoid" in hidden or "softplus" in hidden:
        # the oracle's own second-derivative terms are not zero here, so a sweep that dropped them would fail
        assert relative(expected["diag_hessian"], expected["diag_ggn"]) > 1e-3


@pytest.mark.slow
def test_the_oracle_agrees_with_autodiff():
    """The oracle is checked once against jax.hessian and jax.vmap(jax.grad) of purebp's forward pass."""
    sizes, hidden, loss, reduction = ARCHITECTURES[0]
    net, x, y, x_np, targets = problem(sizes, hidden, loss, batch=3)
    expected = oracle(net, x_np, targets, hidden, loss, reduction)
    theta, unravel = ravel_pytree(net)

    def per_example_cost(theta, xn, yn):
        return pb.value_and_grad(unravel(theta), xn[None], yn[None], loss=loss, reduction="sum")[0]

    def loss_of(theta):
        return jnp.mean(jax.vmap(per_example_cost, in_axes=(None, 0, 0))(theta, x, y))

    hessian = jax.hessian(loss_of)(theta)
    assert relative(expected["diag_hessian"], jnp.diag(hessian)) <= TOLERANCE
    grads = jax.vmap(jax.grad(per_example_cost), in_axes=(None, 0, 0))(theta, x, y) / x.shape[0]
    assert relative(expected["sum_grad_squared"], jnp.sum(grads**2, axis=0)) <= TOLERANCE
