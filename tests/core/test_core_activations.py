"""G' of every built-in activation, and user-registered activations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purebp as pb
from purebp import activations
from purebp.testing import assert_gradients_match

ELEMENTWISE = [name for name in activations.BUILTIN_NAMES if name != "softmax"]


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_builtin_derivative_equals_jax_grad(name, dtype):
    """G'(z) (from z or from a = G(z)) equals jax.grad(G) on [-30, 30] and at +-1e3, 0 included."""
    act = activations.get(name)
    z = jnp.concatenate(
        [jnp.linspace(-30.0, 30.0, 601, dtype=dtype), jnp.asarray([-1e3, -50.0, 0.0, 50.0, 1e3], dtype=dtype)]
    )
    a = act.forward(z)
    expected = jax.vmap(jax.grad(act.forward))(z)
    actual = act.derivative(z, a)
    assert bool(jnp.all(jnp.isfinite(actual))) and bool(jnp.all(jnp.isfinite(a)))
    rtol, atol = (1e-12, 1e-15) if dtype == jnp.float64 else (1e-5, 1e-7)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_softmax_chain_is_the_jacobian_transpose_product(dtype):
    act = activations.get("softmax")
    z = jax.random.normal(jax.random.key(0), (6, 5), dtype=dtype) * 3
    upstream = jax.random.normal(jax.random.key(1), (6, 5), dtype=dtype)
    a = act.forward(z)
    jacobians = jax.vmap(jax.jacobian(act.forward))(z)  # (N, out, in)
    expected = jnp.einsum("nij,ni->nj", jacobians, upstream)
    rtol = 1e-12 if dtype == jnp.float64 else 1e-5
    np.testing.assert_allclose(act.chain(upstream, z, a), expected, rtol=rtol, atol=rtol * 1e-2)
    assert not act.elementwise


def test_register_custom_activation_and_use_it():
    name = "test_swish"
    if name not in activations.names():
        pb.register_activation(
            name, lambda z: z * jax.lax.logistic(z), lambda z: jax.lax.logistic(z) * (1 + z * (1 - jax.lax.logistic(z)))
        )
    assert name in activations.names()
    net = pb.init_mlp(jax.random.key(0), (3, 5, 2), (name, "identity"), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (7, 3), dtype=jnp.float64)
    assert_gradients_match(net, x, jnp.arange(7) % 2, loss="softmax_cross_entropy")
    with pytest.raises(ValueError, match="already registered"):
        pb.register_activation(name, lambda z: z, lambda z: jnp.ones_like(z))


def test_register_rejects_a_wrong_derivative_with_the_worst_point():
    with pytest.raises(ValueError, match=r"does not match jax.grad of G.*worst at z="):
        pb.register_activation("test_bad_square", lambda z: z * z, lambda z: z)  # should be 2z
    assert "test_bad_square" not in activations.names()


def test_register_rejects_builtins_and_non_elementwise():
    with pytest.raises(ValueError, match="built-in"):
        pb.register_activation("relu", lambda z: z, lambda z: jnp.ones_like(z))
    with pytest.raises(ValueError, match="elementwise"):
        pb.register_activation("test_sum", lambda z: jnp.sum(z) * jnp.ones(3, dtype=z.dtype), lambda z: jnp.ones(3))
    with pytest.raises(TypeError, match="callables"):
        pb.register_activation("test_none", None, None)


def test_softmax_output_passes_the_fast_compile_check():
    """in1>d2sm with cross-entropy under check_gradients(fast_compile=True), the compile `purebp verify` uses.

    Seeds 1 and 2 gave NaN on jax.grad's side when the row-max shift of softmax was differentiated (the
    tie mask of jnp.max at XLA -O0): a false mismatch. The shift cancels, so it is held out of the gradient.
    """
    from purebp.testing import StackSpec, make_stack_case

    for seed in (1, 2):
        case = make_stack_case(StackSpec(1, (("dense", 2, "softmax"),), "cross_entropy", seed=seed, with_key=False))
        report = pb.check_gradients(case.net, case.x, case.y, loss=case.loss, fast_compile=True)
        assert report.passed, f"{case!r}\n{report}"
    z = jnp.asarray([[1.0, 1.0, -2.0], [0.5, 3.0, 3.0]])  # ties at the row max
    a = activations.softmax(z)
    jacobians = jax.jit(jax.vmap(jax.jacobian(activations.softmax)))(z)
    expected = jax.vmap(jnp.diag)(a) - a[:, :, None] * a[:, None, :]  # J = diag(a) - a a^T
    np.testing.assert_allclose(jacobians, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(jnp.exp(activations.log_softmax(z)), a, rtol=1e-12)
