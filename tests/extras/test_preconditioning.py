"""The curvature preconditioners (purebp.extras.preconditioning) against their math, built explicitly.

Curvature trees are drawn by hand with the shapes of the curvature contract
(pb.diag_ggn: a tree like the network; pb.kfac: one KroneckerFactors(g, a) per
layer), so these tests check the preconditioner alone. Float64 throughout.
Tolerance: relative 1e-10 in the max norm per leaf against the explicit
formula (the diagonal step is the same arithmetic and is compared exactly);
the K-FAC step is compared with a dense solve of kron(G_d, A_d) on the
row-major vec(W), so a transposed factor, a factor on the wrong side or a
column-major vec fails it.
"""

from __future__ import annotations

import itertools
import math

import jax
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import purebp as pb
from purebp.extras import preconditioning as pc

RTOL = 1e-10


KroneckerFactors = pb.KroneckerFactors


def array(values, dtype=np.float64) -> jax.Array:
    """A device array from NumPy values: a transfer (jnp.asarray and jnp.ones compile a program per shape)."""
    return jax.device_put(np.asarray(values, dtype))


def ones(shape) -> jax.Array:
    return array(np.ones(shape))


def leaves(tree) -> list[np.ndarray]:
    """The leaves as NumPy arrays: the expected values are computed in NumPy, with no eager JAX op to compile."""
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def mlp(sizes=(3, 4, 2), activation="relu") -> pb.Sequential:
    """A float64 MLP of these widths, built by hand (no initialiser to compile: only shapes matter here)."""
    names = (activation,) * (len(sizes) - 2) + ("identity",)
    layers = tuple(
        pb.Dense(ones((n_out, n_in)), ones(n_out), g) for (n_in, n_out), g in zip(itertools.pairwise(sizes), names)
    )
    return pb.Sequential(layers=layers, input_shape=(sizes[0],))


def random_like(tree, rng: np.random.Generator, positive: bool = False):
    def draw(leaf):
        values = rng.uniform(0.1, 2.0, leaf.shape) if positive else rng.normal(size=leaf.shape)
        return array(values, leaf.dtype)

    return jax.tree.map(draw, tree)


def spd(n: int, rng: np.random.Generator) -> jax.Array:
    """A random symmetric positive semi-definite matrix, like an average of outer products (full rank here)."""
    r = rng.normal(size=(n, n + 2))
    return array(r @ r.T / (n + 2))


def factors_for(layers, rng) -> tuple:
    """Random KroneckerFactors per w/b layer, None per parameterless layer, tuples for residual blocks."""
    entries = []
    for layer in layers:
        if not jax.tree.leaves(layer):
            entries.append(None)
        elif isinstance(layer, pb.Residual):
            entries.append(factors_for(layer.layers, rng))
        else:
            n_out = layer.w.shape[0]
            entries.append(KroneckerFactors(spd(n_out, rng), spd(layer.w.size // n_out, rng)))
    return tuple(entries)


def assert_close(actual, expected, rtol=RTOL) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(np.max(np.abs(expected)), 1e-300)
    error = np.max(np.abs(actual - expected)) / scale
    assert error <= rtol, f"relative max-norm error {error:.3e} > {rtol:.0e}\nactual {actual}\nexpected {expected}"


def explicit_kfac_step(g, a, dw, db, damping, pi_damping):
    """The step written out: solve kron(G_d, A_d) x = vec(dW), W row-major, and (g + damping I) y = db."""
    n_out, n_in = g.shape[0], a.shape[0]
    pi = math.sqrt((np.trace(a) / n_in) / (np.trace(g) / n_out)) if pi_damping else 1.0
    g_d = np.asarray(g) + math.sqrt(damping) / pi * np.eye(n_out)
    a_d = np.asarray(a) + math.sqrt(damping) * pi * np.eye(n_in)
    vec = np.linalg.solve(np.kron(g_d, a_d), np.asarray(dw).reshape(-1))  # row-major vec(W)
    return vec.reshape(dw.shape), np.linalg.solve(np.asarray(g) + damping * np.eye(n_out), np.asarray(db))


# ---------------------------------------------------------------- diagonal


@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.7])
def test_diag_step_is_update_over_curvature_plus_damping(damping):
    rng = np.random.default_rng(1)
    net = mlp((3, 5, 4, 2))
    grads, curvature = random_like(net, rng), random_like(net, rng, positive=True)
    opt = pc.diag_ggn_preconditioner(damping)
    updates, state = opt.update(grads, opt.init(net), net, curvature=curvature)
    assert isinstance(state, optax.EmptyState)
    assert jax.tree.structure(updates) == jax.tree.structure(net)
    for u, g, c in zip(leaves(updates), leaves(grads), leaves(curvature)):
        np.testing.assert_array_equal(u, g / (c + damping))


def test_diag_in_a_chain_under_jit_is_minus_lr_times_the_step():
    rng = np.random.default_rng(2)
    net = mlp()
    grads, curvature = random_like(net, rng), random_like(net, rng, positive=True)
    opt = optax.chain(pc.diag_ggn_preconditioner(1e-3), optax.scale_by_learning_rate(0.1))
    updates, _ = jax.jit(lambda g, s, p, c: opt.update(g, s, p, curvature=c))(grads, opt.init(net), net, curvature)
    for u, g, c in zip(leaves(updates), leaves(grads), leaves(curvature)):
        assert_close(u, -0.1 * g / (c + 1e-3))


def test_diag_unit_curvature_without_damping_is_the_identity():
    rng = np.random.default_rng(3)
    net = mlp()
    grads = random_like(net, rng)
    updates, _ = pc.diag_ggn_preconditioner(0.0).update(
        grads, None, curvature=jax.tree.map(lambda w: ones(w.shape), net)
    )
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
        np.testing.assert_array_equal(u, g)


def test_diag_on_a_sequential_with_parameterless_and_residual_layers():
    rng = np.random.default_rng(4)
    net = sequential()
    grads, curvature = random_like(net, rng), random_like(net, rng, positive=True)
    updates, _ = pc.diag_ggn_preconditioner(0.5).update(grads, None, curvature=curvature)
    assert jax.tree.structure(updates) == jax.tree.structure(net)
    for u, g, c in zip(leaves(updates), leaves(grads), leaves(curvature)):
        np.testing.assert_array_equal(u, g / (c + 0.5))


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_diag_moving_average_is_bias_corrected(decay):
    rng = np.random.default_rng(5)
    net = mlp()
    opt = pc.diag_ggn_preconditioner(0.1, decay=decay)
    state = opt.init(net)
    assert int(state.count) == 0
    seen = []
    for step in range(1, 4):
        grads, curvature = random_like(net, rng), random_like(net, rng, positive=True)
        seen.append(curvature)
        updates, state = opt.update(grads, state, net, curvature=curvature)
        assert int(state.count) == step
        # c_t = sum_k (1 - decay) decay^(t - k) C_k, and the step divides by c_t / (1 - decay^t) + damping
        weights = [(1 - decay) * decay ** (step - k) for k in range(1, step + 1)]
        for index, (u, g) in enumerate(zip(leaves(updates), leaves(grads))):
            average = sum(w * leaves(c)[index] for w, c in zip(weights, seen))
            assert_close(leaves(state.curvature)[index], average)
            assert_close(u, g / (average / (1 - decay**step) + 0.1))


def test_diag_decay_zero_is_no_average():
    rng = np.random.default_rng(6)
    net = mlp()
    grads, curvature = random_like(net, rng), random_like(net, rng, positive=True)
    plain, _ = pc.diag_ggn_preconditioner(0.2).update(grads, None, curvature=curvature)
    averaged, _ = pc.diag_ggn_preconditioner(0.2, decay=0.0).update(
        grads, pc.diag_ggn_preconditioner(0.2, decay=0.0).init(net), curvature=curvature
    )
    for p, a in zip(jax.tree.leaves(plain), jax.tree.leaves(averaged)):
        np.testing.assert_array_equal(p, a)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda f: f(-1e-3), ValueError, r"damping must be a finite number >= 0, got -0.001"),
        (lambda f: f(float("nan")), ValueError, r"damping must be a finite number >= 0, got nan"),
        (lambda f: f(float("inf")), ValueError, r"damping must be a finite number >= 0, got inf"),
        (lambda f: f(True), TypeError, r"damping must be a non-negative number, got True"),
        (lambda f: f("0.1"), TypeError, r"damping must be a non-negative number, got '0.1'"),
        (
            lambda f: f(np.ones(2)),
            TypeError,
            r"damping must be a non-negative number \(a scalar\), got an array of shape \(2,\)",
        ),
        (lambda f: f(array(-0.5)), ValueError, r"damping must be a finite number >= 0, got Array\(-0.5"),
        (lambda f: f(0.1, decay=array(1.5)), ValueError, r"decay must be in \[0, 1\).*got Array\(1.5"),
        (lambda f: f(0.1, decay=1.0), ValueError, r"decay must be in \[0, 1\) \(None: no moving average\), got 1.0"),
        (lambda f: f(0.1, decay=-0.5), ValueError, r"decay must be in \[0, 1\).*got -0.5"),
        (lambda f: f(0.1, decay=float("nan")), ValueError, r"decay must be in \[0, 1\).*got nan"),
        (lambda f: f(0.1, decay="0.9"), TypeError, r"decay must be None or a number in \[0, 1\), got '0.9'"),
    ],
)
@pytest.mark.parametrize("factory", [pc.diag_ggn_preconditioner, pc.kfac_preconditioner])
def test_bad_hyperparameters_are_refused_when_built(factory, build, error, match):
    with pytest.raises(error, match=factory.__name__ + ": " + match):
        build(factory)


@pytest.mark.slow
@pytest.mark.parametrize("decay", [None, 0.5])
def test_traced_hyperparameters_under_inject_hyperparams_give_the_same_steps(decay):
    """optax.inject_hyperparams checks the values at init and passes them traced to update: same arithmetic."""
    rng = np.random.default_rng(16)
    net = mlp((3, 4, 2))
    for factory, draw in (
        (pc.diag_ggn_preconditioner, lambda: random_like(net, rng, positive=True)),
        (pc.kfac_preconditioner, lambda: factors_for(net.layers, rng)),
    ):
        injected = optax.inject_hyperparams(factory)(damping=0.3, decay=decay)
        plain = factory(0.3, decay=decay)
        update = jax.jit(lambda g, s, c, opt=injected: opt.update(g, s, curvature=c))
        state, plain_state = injected.init(net), plain.init(net)
        for _ in range(2):
            grads, curvature = random_like(net, rng), draw()
            updates, state = update(grads, state, curvature)
            expected, plain_state = plain.update(grads, plain_state, curvature=curvature)
            for u, e in zip(leaves(updates), leaves(expected)):
                assert_close(u, e, rtol=1e-13)
        with pytest.raises(ValueError, match=factory.__name__ + r": damping must be a finite number >= 0"):
            optax.inject_hyperparams(factory)(damping=-1.0).init(net)


def test_kfac_pi_damping_must_be_a_bool():
    with pytest.raises(TypeError, match=r"kfac_preconditioner: pi_damping must be True or False, got 'yes'"):
        pc.kfac_preconditioner(0.1, pi_damping="yes")


def test_diag_curvature_that_does_not_match_the_updates_is_refused():
    rng = np.random.default_rng(7)
    net = mlp()
    grads = random_like(net, rng)
    opt = pc.diag_ggn_preconditioner(0.1)
    with pytest.raises(TypeError, match=r"update needs the curvature as a keyword"):
        opt.update(grads, None)
    other = random_like(mlp((3, 4, 4, 2)), rng, positive=True)
    with pytest.raises(ValueError, match=r"the curvature must be a tree like the updates.*missing.*\.layers\[2\]"):
        opt.update(grads, None, curvature=other)
    wrong_shape = random_like(mlp((3, 5, 2)), rng, positive=True)
    with pytest.raises(ValueError, match=r"curvature\.layers\[0\]\.w has shape \(5, 3\), the update has \(4, 3\)"):
        opt.update(grads, None, curvature=wrong_shape)
    other_activation = mlp((3, 4, 2), activation="tanh")
    with pytest.raises(ValueError, match=r"same leaves, different static metadata"):
        opt.update(grads, None, curvature=other_activation)
    as_float32 = jax.tree.map(lambda c: array(c, np.float32), random_like(net, rng, positive=True))
    with pytest.raises(TypeError, match=r"curvature\.layers\[0\]\.w is float32, the update is float64"):
        opt.update(grads, None, curvature=as_float32)
    # the same checks run while tracing, before any compile
    with pytest.raises(ValueError, match=r"has shape \(5, 3\)"):
        jax.jit(lambda g, c: opt.update(g, None, curvature=c))(grads, wrong_shape)


# ---------------------------------------------------------------- Kronecker-factored


@settings(max_examples=12)
@given(
    sizes=st.sampled_from([(3, 4, 2), (1, 5, 1), (4, 2, 3, 3)]),  # few shapes: each new one compiles the solves
    damping=st.sampled_from([0.0, 1e-4, 0.3, 5.0]),
    pi_damping=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kfac_step_is_the_explicit_kronecker_solve(sizes, damping, pi_damping, seed):
    rng = np.random.default_rng(seed)
    net = mlp(sizes)
    grads = random_like(net, rng)
    curvature = factors_for(net.layers, rng)
    updates, _ = pc.kfac_preconditioner(damping, pi_damping=pi_damping).update(grads, None, curvature=curvature)
    assert jax.tree.structure(updates) == jax.tree.structure(net)
    for layer, grad, entry in zip(updates.layers, grads.layers, curvature):
        expected_w, expected_b = explicit_kfac_step(entry.g, entry.a, grad.w, grad.b, damping, pi_damping)
        assert_close(layer.w, expected_w, rtol=1e-8 if damping == 0 else RTOL)  # bare factors: less well conditioned
        assert_close(layer.b, expected_b, rtol=1e-8 if damping == 0 else RTOL)


def test_kfac_identity_factors_without_damping_is_the_identity():
    rng = np.random.default_rng(8)
    net = mlp((3, 5, 2))
    grads = random_like(net, rng)
    curvature = tuple(
        KroneckerFactors(array(np.eye(layer.w.shape[0])), array(np.eye(layer.w.shape[1]))) for layer in net.layers
    )
    for pi_damping in (True, False):
        updates, _ = pc.kfac_preconditioner(0.0, pi_damping=pi_damping).update(grads, None, curvature=curvature)
        for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
            assert_close(u, g, rtol=1e-15)


def test_kfac_weight_step_is_left_and_right_division():
    """G^-1 dW A^-1 with g and a of different sizes: a factor applied on the wrong side would not even fit."""
    rng = np.random.default_rng(9)
    g, a = spd(2, rng), spd(3, rng)
    dw, db = array(rng.normal(size=(2, 3))), array(rng.normal(size=2))
    step_w, step_b = pc.kfac_solve(g, a, dw, db, 0.0, pi_damping=False)
    g, a, step_w, step_b = (np.asarray(m) for m in (g, a, step_w, step_b))
    assert_close(g @ step_w @ a, dw, rtol=1e-9)
    assert_close(g @ step_b, db, rtol=1e-9)


def test_kfac_pi_is_one_where_a_factor_has_zero_trace():
    rng = np.random.default_rng(10)
    g, a = array(np.zeros((2, 2))), spd(3, rng)
    dw, db = array(rng.normal(size=(2, 3))), array(rng.normal(size=2))
    with_pi = pc.kfac_solve(g, a, dw, db, 0.25, pi_damping=True)
    without = pc.kfac_solve(g, a, dw, db, 0.25, pi_damping=False)
    for x, y in zip(with_pi, without):
        np.testing.assert_array_equal(x, y)
    assert np.all(np.isfinite(with_pi[0]))
    assert_close(without[0], explicit_kfac_step(g, a, dw, db, 0.25, False)[0])


def test_kfac_solve_refuses_negative_damping():
    with pytest.raises(ValueError, match=r"kfac_solve: damping must be a finite number >= 0, got -1"):
        pc.kfac_solve(ones((2, 2)), ones((2, 2)), ones((2, 2)), ones(2), -1)


def sequential() -> pb.Sequential:
    """conv1d (3 channels, kernel 3) on (2, 6) inputs, flatten, residual(dense 12, dense 12), dense 2; by hand."""
    layers = (
        pb.Conv1d(ones((3, 2, 3)), ones(3), activation="relu"),
        pb.Flatten(),
        pb.Residual((pb.Dense(ones((12, 12)), ones(12), "tanh"), pb.Dense(ones((12, 12)), ones(12)))),
        pb.Dense(ones((2, 12)), ones(2)),
    )
    return pb.Sequential(layers, (2, 6))


def test_kfac_on_conv_flatten_and_residual_layers():
    rng = np.random.default_rng(11)
    net = sequential()
    grads = random_like(net, rng)
    curvature = factors_for(net.layers, rng)
    assert curvature[1] is None and isinstance(curvature[2], tuple) and curvature[0].a.shape == (6, 6)
    updates, _ = pc.kfac_preconditioner(0.1).update(grads, None, curvature=curvature)
    assert jax.tree.structure(updates) == jax.tree.structure(net)
    pairs = [(updates.layers[0], grads.layers[0], curvature[0]), (updates.layers[3], grads.layers[3], curvature[3])]
    pairs += list(zip(updates.layers[2].layers, grads.layers[2].layers, curvature[2]))
    for layer, grad, entry in pairs:
        dw = grad.w.reshape(grad.w.shape[0], -1)  # a convolution's (C_out, C_in, K) weight as (C_out, C_in K)
        expected_w, expected_b = explicit_kfac_step(entry.g, entry.a, dw, grad.b, 0.1, True)
        assert_close(layer.w, expected_w.reshape(grad.w.shape))
        assert_close(layer.b, expected_b)


@pytest.mark.parametrize("decay", [0.0, 0.8])
def test_kfac_moving_average_of_the_factors(decay):
    rng = np.random.default_rng(12)
    net = sequential()
    opt = pc.kfac_preconditioner(0.05, decay=decay)
    state = opt.init(net)
    assert int(state.count) == 0 and state.factors[1] is None and len(state.factors[2]) == 2
    seen = []
    for step in range(1, 4):
        grads, curvature = random_like(net, rng), factors_for(net.layers, rng)
        seen.append(curvature)
        updates, state = opt.update(grads, state, curvature=curvature)
        assert int(state.count) == step
        weights = [(1 - decay) * decay ** (step - k) for k in range(1, step + 1)]
        average = jax.tree.map(lambda *fs, w=weights: sum(c * np.asarray(f) for c, f in zip(w, fs)), *seen)
        for stored, expected in zip(leaves(state.factors), leaves(average)):
            assert_close(stored, expected)
        corrected = jax.tree.map(lambda f, t=step: array(f / (1 - decay**t)), average)
        expected_updates, _ = pc.kfac_preconditioner(0.05).update(grads, None, curvature=corrected)
        for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected_updates)):
            assert_close(u, e)


def test_kfac_in_a_chain_with_momentum_under_jit():
    rng = np.random.default_rng(13)
    net = mlp((3, 4, 2))
    opt = optax.chain(pc.kfac_preconditioner(0.1), optax.trace(0.9), optax.scale_by_learning_rate(0.5))
    state = opt.init(net)
    update = jax.jit(lambda g, s, p, c: opt.update(g, s, p, curvature=c))
    steps = []
    for _ in range(2):
        grads, curvature = random_like(net, rng), factors_for(net.layers, rng)
        updates, state = update(grads, state, net, curvature)
        alone, _ = pc.kfac_preconditioner(0.1).update(grads, None, curvature=curvature)
        steps.append(alone)
    expected = [-0.5 * (0.9 * first + second) for first, second in zip(leaves(steps[0]), leaves(steps[1]))]
    for u, e in zip(leaves(updates), expected):
        assert_close(u, e)


def test_kfac_curvature_that_does_not_match_the_updates_is_refused():
    rng = np.random.default_rng(14)
    net = sequential()
    grads = random_like(net, rng)
    good = factors_for(net.layers, rng)
    opt = pc.kfac_preconditioner(0.1)

    def refused(curvature, error, match):
        with pytest.raises(error, match=match):
            opt.update(grads, None, curvature=curvature)

    refused(None, TypeError, r"update needs the curvature as a keyword")
    refused(good[0], TypeError, r"the curvature must be a tuple with one entry per layer.*got KroneckerFactors")
    refused(good[:3], ValueError, r"the network has 4 layers, the curvature 3 entries")
    refused((None,) + good[1:], ValueError, r"entry for layer 0 \(Conv1d\) is None but the layer has parameters")
    refused(good[:1] + (good[0],) + good[2:], ValueError, r"layer 1 \(Flatten\) is KroneckerFactors but .*None")
    refused(good[:3] + ((good[3],),), ValueError, r"layer 3 \(Dense\) is a tuple of 1 entries.*the layer is not one")
    refused(good[:2] + (good[2][:1],) + good[3:], ValueError, r"layer 2 \(Residual\) has 2 body layers, its .* 1")
    swapped = KroneckerFactors(good[0].a, good[0].g)
    refused((swapped,) + good[1:], ValueError, r"layer 0 \(Conv1d, w \(3, 2, 3\)\): factor g has shape \(6, 6\), ex")
    inner = good[2][:1] + (KroneckerFactors(good[2][1].g[:2, :2], good[2][1].a),)
    refused(good[:2] + (inner,) + good[3:], ValueError, r"layer 2\.1 \(Dense.*factor g has shape \(2, 2\)")
    as32 = KroneckerFactors(array(good[3].g, np.float32), good[3].a)
    refused(good[:3] + (as32,), TypeError, r"layer 3: factor g is float32, the update is float64")
    refused(good[:3] + ("g",), TypeError, r"entry for layer 3 must be KroneckerFactors\(g, a\), None or a tuple")
    with pytest.raises(TypeError, match=r"the updates must be a purebp Sequential.*got dict"):
        opt.update({"w": ones(2)}, None, curvature=good)


def test_kfac_refuses_layers_without_kronecker_factors_at_init():
    net = pb.Sequential((pb.Dense(ones((3, 4)), ones(3)), pb.LayerNorm(ones(3), ones(3))), (4,))
    with pytest.raises(TypeError, match=r"layer 1 \(LayerNorm\) has no Kronecker-factored curvature: K-FAC covers"):
        pc.kfac_preconditioner(0.1).init(net)


def test_kfac_results_and_their_moving_average_are_taken_as_they_come():
    """pb.kfac's tuple (float32) fits kfac_preconditioner and its averaged state (the same KroneckerFactors type)."""
    net = pb.init_mlp(jax.random.key(0), (3, 4, 2), ("relu", "identity"))  # float32
    rng = np.random.default_rng(15)
    x, y = array(rng.normal(size=(8, 3)), np.float32), array(np.arange(8) % 2, np.int32)
    factors = pb.kfac(net, x, y, loss="softmax_cross_entropy", key=jax.random.key(1))
    grads = random_like(net, rng)
    opt = pc.kfac_preconditioner(1e-3, decay=0.9)
    updates, state = opt.update(grads, opt.init(net), net, curvature=factors)
    assert jax.tree.structure(updates) == jax.tree.structure(net) and int(state.count) == 1
    # the first averaged step is the step with the factors themselves (bias correction); float32 tolerance
    plain, _ = pc.kfac_preconditioner(1e-3).update(grads, None, curvature=factors)
    for u, p in zip(leaves(updates), leaves(plain)):
        assert np.all(np.isfinite(u))
        assert_close(u, p, rtol=1e-5)
