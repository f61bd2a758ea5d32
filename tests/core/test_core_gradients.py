"""The hand-written gradient against jax.grad and the independent oracles in reference/.

Tolerances (per leaf, relative L2 error ||h - g||_2 / max(||g||_2, floor * ||g_all||_2),
floor 1e-6 in float64 and 1e-3 in float32, see purebp.check): 1e-10 in float64
and 1e-5 in float32 against jax.grad and against the NumPy and scalar oracles;
1e-6 against float64 central finite differences.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import purebp as pb
from purebp import losses
from purebp.check import TOLERANCE, compare_gradients
from purebp.network import dense_stack
from purebp.testing import LOSS_OUTPUT_PAIRS, CaseSpec, assert_gradients_match, cases, make_case
from reference import finite_differences, numpy_matrix, scalar_chain_rule

SMOOTH = ("identity", "sigmoid", "tanh", "softplus", "gelu", "elu")  # no kink for finite differences to straddle


def as_network(weights, biases, activations) -> pb.Sequential:
    weights = [np.asarray(w, np.float64) for w in weights]
    return dense_stack(weights, [np.asarray(b, np.float64) for b in biases], tuple(activations))


def assert_close_to_oracle(case, oracle_loss, oracle_grads: pb.Sequential, tolerance: float):
    loss, grads = pb.value_and_grad(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction)
    floor = 1e-6 if case.spec.dtype == "float64" else 1e-3
    leaves = compare_gradients(grads, oracle_grads, tolerance=tolerance, floor=floor)
    failed = [leaf for leaf in leaves if not leaf.passed]
    assert not failed, f"{case}\n" + "\n".join(map(str, failed))
    assert abs(float(loss) - oracle_loss) <= tolerance * max(abs(oracle_loss), 1e-300), (case, float(loss), oracle_loss)


# ---------------------------------------------------------------- vs jax.grad


def _matches_jax_grad(case):
    """Depth 1-8, widths 1-64, any hidden activation, every loss/output pair, batch 1-64, both dtypes/reductions.

    Compiled as `purebp verify` compiles a one-off check (fast_compile: the same two functions in one program at
    XLA -O0, a fraction of the compile time); the default compile of the hand-written gradient is checked on
    random architectures against the oracles below, and against jax.grad in the saturation test here and in
    test_cli_verify.test_fast_compile_agrees_with_the_default_compile.
    """
    report = pb.check_gradients(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction, fast_compile=True)
    assert report.tolerance == TOLERANCE[np.dtype(case.spec.dtype)] and report.passed, f"{case}\n{report}"


@settings(max_examples=8)
@given(cases())
def test_matches_jax_grad_on_random_architectures(case):
    _matches_jax_grad(case)


@pytest.mark.slow
@settings(max_examples=80)
@given(cases())
def test_matches_jax_grad_on_many_random_architectures(case):
    """The same property on 80 more architectures (the slow tier)."""
    _matches_jax_grad(case)


SATURATING = cases(
    hidden_activations=("sigmoid", "softplus", "tanh"),
    input_scales=(300.0, 1000.0),
    max_depth=4,
    max_width=16,
    max_batch=16,
)


@settings(max_examples=4)  # every saturating output at +-1e3 also in test_output_at_plus_minus_1e3_is_finite
@given(SATURATING)
def test_saturated_inputs_give_finite_matching_gradients(case):
    """|z| in the hundreds to thousands through sigmoid, softplus, softmax: finite and still equal to jax.grad."""
    _saturated(case)


@pytest.mark.slow
@settings(max_examples=16)
@given(SATURATING)
def test_saturated_inputs_give_finite_matching_gradients_on_more_cases(case):
    _saturated(case)


def _saturated(case):
    loss, grads = pb.value_and_grad(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction)
    assert np.isfinite(float(loss)), case
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(grads)), case
    # the comparison compiled as purebp verify compiles it; the finite values above are the default program's
    report = pb.check_gradients(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction, fast_compile=True)
    assert report.passed, f"{case}\n{report}"


@pytest.mark.parametrize("loss,output", [p for p in LOSS_OUTPUT_PAIRS if p[1] in ("sigmoid", "softplus", "softmax")])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_output_at_plus_minus_1e3_is_finite(loss, output, dtype):
    """z^L = +-1000 exactly: log(0) would appear in a naive cost; the stable forms stay finite."""
    net = dense_stack([jnp.eye(2, dtype=dtype)], [jnp.zeros((2,), dtype=dtype)], (output,))
    x = jnp.asarray([[1000.0, -1000.0], [-1000.0, 1000.0]], dtype=dtype)
    if loss in losses.CLASSIFICATION_LOSSES:
        y = jnp.asarray([1, 1])
    else:
        y = jnp.asarray([[0.0, 1.0], [1.0, 0.0]], dtype=dtype)
    value, grads = pb.value_and_grad(net, x, y, loss=loss)
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(grads))
    assert_gradients_match(net, x, y, loss=loss)


# ---------------------------------------------------------------- vs reference oracles


def _matches_numpy_matrix_oracle(case):
    net = case.net
    oracle_loss, oracle_w, oracle_b = numpy_matrix.loss_and_gradients(
        [np.asarray(layer.w) for layer in net.layers],
        [np.asarray(layer.b) for layer in net.layers],
        net.activations,
        np.asarray(case.x),
        np.asarray(case.y),
        case.loss,
        case.reduction,
    )
    tolerance = TOLERANCE[np.dtype(case.spec.dtype)]
    assert_close_to_oracle(case, oracle_loss, as_network(oracle_w, oracle_b, net.activations), tolerance)


@settings(max_examples=6)
@given(cases(max_depth=5, max_width=24, max_batch=16))
def test_matches_numpy_matrix_oracle(case):
    _matches_numpy_matrix_oracle(case)


@pytest.mark.slow
@settings(max_examples=20)
@given(cases(max_depth=5, max_width=24, max_batch=16))
def test_matches_numpy_matrix_oracle_on_more_cases(case):
    _matches_numpy_matrix_oracle(case)


def _matches_scalar_chain_rule_oracle(case):
    net = case.net
    targets = numpy_matrix.dense_targets(np.asarray(case.y), net.sizes[-1])
    oracle_loss, oracle_w, oracle_b = scalar_chain_rule.loss_and_gradients(
        [np.asarray(layer.w, np.float64).tolist() for layer in net.layers],
        [np.asarray(layer.b, np.float64).tolist() for layer in net.layers],
        net.activations,
        np.asarray(case.x, np.float64).tolist(),
        targets.tolist(),
        case.loss,
        case.reduction,
    )
    tolerance = TOLERANCE[np.dtype(case.spec.dtype)]
    assert_close_to_oracle(case, oracle_loss, as_network(oracle_w, oracle_b, net.activations), tolerance)


@settings(max_examples=8)
@given(cases(max_depth=3, max_width=4, max_batch=4))
def test_matches_scalar_chain_rule_oracle(case):
    _matches_scalar_chain_rule_oracle(case)


@pytest.mark.slow
@settings(max_examples=25)
@given(cases(max_depth=3, max_width=4, max_batch=4))
def test_matches_scalar_chain_rule_oracle_on_more_cases(case):
    _matches_scalar_chain_rule_oracle(case)


def _reported_loss(case):
    """L(theta) as purebp.value_and_grad reports it, as a function of float64 parameter arrays."""

    def loss(parameters):
        weights = [jnp.asarray(w) for w in parameters[0::2]]
        net = dense_stack(weights, [jnp.asarray(b) for b in parameters[1::2]], case.net.activations)
        return float(pb.value_and_grad(net, case.x, case.y, loss=case.loss, reduction=case.reduction)[0])

    return loss


def _reported_loss_and_gradient_agree_with_finite_differences(case):
    """The gradient purebp returns is the gradient of the loss purebp reports (<= 1e-6, float64)."""
    fd = finite_differences.central_differences(_reported_loss(case), jax.tree.leaves(case.net))
    grads = pb.grad(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction)
    leaves = compare_gradients(grads, jax.tree.unflatten(jax.tree.structure(case.net), fd), tolerance=1e-6, floor=1e-6)
    assert all(leaf.passed for leaf in leaves), f"{case}\n" + "\n".join(map(str, leaves))


@settings(max_examples=5)
@given(cases(dtypes=("float64",), hidden_activations=SMOOTH, max_depth=3, max_width=6, max_batch=8))
def test_reported_loss_and_gradient_agree_with_finite_differences(case):
    _reported_loss_and_gradient_agree_with_finite_differences(case)


@pytest.mark.slow
@settings(max_examples=15)
@given(cases(dtypes=("float64",), hidden_activations=SMOOTH, max_depth=3, max_width=6, max_batch=8))
def test_reported_loss_and_gradient_agree_with_finite_differences_on_more_cases(case):
    _reported_loss_and_gradient_agree_with_finite_differences(case)


@pytest.mark.parametrize("loss,output", LOSS_OUTPUT_PAIRS)
def test_every_loss_output_pair_with_multiple_outputs_matches_finite_differences(loss, output):
    """Multi-output regression included: a loss averaged over outputs but a gradient summed over them would fail."""
    hidden = "softplus" if output == "identity" else "tanh"
    case = make_case(CaseSpec(sizes=(3, 4, 3), activations=(hidden, output), loss=loss, batch=5, seed=7))
    fd = finite_differences.central_differences(_reported_loss(case), jax.tree.leaves(case.net))
    grads = pb.grad(case.net, case.x, case.y, loss=case.loss)
    leaves = compare_gradients(grads, jax.tree.unflatten(jax.tree.structure(case.net), fd), tolerance=1e-6, floor=1e-6)
    assert all(leaf.passed for leaf in leaves), "\n".join(map(str, leaves))
    oracle_loss, _, _ = numpy_matrix.loss_and_gradients(
        [layer.w for layer in case.net.layers],
        [layer.b for layer in case.net.layers],
        case.net.activations,
        np.asarray(case.x),
        np.asarray(case.y),
        loss,
    )
    assert float(pb.value_and_grad(case.net, case.x, case.y, loss=loss)[0]) == pytest.approx(oracle_loss, rel=1e-12)


# ---------------------------------------------------------------- identities between losses


@settings(max_examples=6)
@given(cases(losses=("cross_entropy",), max_depth=3, max_width=16))
def test_softmax_plus_cross_entropy_equals_identity_plus_softmax_cross_entropy(case):
    logits_net = dataclasses.replace(case.net, layers=(*case.net.layers[:-1], case.net.layers[-1].linear()))
    loss_a, grads_a = pb.value_and_grad(case.net, case.x, case.y, loss="cross_entropy", reduction=case.reduction)
    loss_b, grads_b = pb.value_and_grad(
        logits_net, case.x, case.y, loss="softmax_cross_entropy", reduction=case.reduction
    )
    tolerance = TOLERANCE[np.dtype(case.spec.dtype)]
    assert float(loss_a) == pytest.approx(float(loss_b), rel=tolerance)
    floor = 1e-6 if case.spec.dtype == "float64" else 1e-3
    assert all(leaf.passed for leaf in compare_gradients(grads_a, grads_b, tolerance=tolerance, floor=floor)), case


@settings(max_examples=6)
@given(cases(max_depth=3, max_width=16))
def test_sum_reduction_is_n_times_mean(case):
    n = case.x.shape[0]
    loss_mean, grads_mean = pb.value_and_grad(case.net, case.x, case.y, loss=case.loss, reduction="mean")
    loss_sum, grads_sum = pb.value_and_grad(case.net, case.x, case.y, loss=case.loss, reduction="sum")
    tolerance = TOLERANCE[np.dtype(case.spec.dtype)]
    assert float(loss_sum) == pytest.approx(n * float(loss_mean), rel=tolerance, abs=1e-300)
    scaled = jax.tree.map(lambda g: n * g, grads_mean)
    floor = 1e-6 if case.spec.dtype == "float64" else 1e-3
    assert all(leaf.passed for leaf in compare_gradients(grads_sum, scaled, tolerance=tolerance, floor=floor)), case


@pytest.mark.parametrize("loss,output", [("cross_entropy", "softmax"), ("softmax_cross_entropy", "identity")])
def test_one_hot_targets_equal_integer_labels(loss, output):
    labels_case = make_case(CaseSpec(sizes=(5, 7, 4), activations=("relu", output), loss=loss, batch=9, seed=3))
    one_hot_case = make_case(
        CaseSpec(sizes=(5, 7, 4), activations=("relu", output), loss=loss, batch=9, seed=3, one_hot=True)
    )
    assert np.array_equal(np.argmax(np.asarray(one_hot_case.y), axis=1), np.asarray(labels_case.y))
    loss_a, grads_a = pb.value_and_grad(labels_case.net, labels_case.x, labels_case.y, loss=loss)
    loss_b, grads_b = pb.value_and_grad(one_hot_case.net, one_hot_case.x, one_hot_case.y, loss=loss)
    assert float(loss_a) == float(loss_b)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- tree structure of the result


def test_grads_have_the_network_tree_structure_and_line_up_with_jax_grad():
    case = make_case(CaseSpec(sizes=(4, 6, 3), activations=("tanh", "identity"), loss="softmax_cross_entropy"))
    grads = pb.grad(case.net, case.x, case.y, loss=case.loss)
    autodiff_grads = pb.autodiff_value_and_grad(case.net, case.x, case.y, loss=case.loss)[1]
    assert jax.tree.structure(grads) == jax.tree.structure(case.net) == jax.tree.structure(autodiff_grads)
    stepped = jax.tree.map(lambda p, g: p - 0.1 * g, case.net, grads)
    assert isinstance(stepped, pb.Sequential) and stepped.activations == case.net.activations
    for p, g, s in zip(jax.tree.leaves(case.net), jax.tree.leaves(grads), jax.tree.leaves(stepped)):
        assert p.shape == g.shape == s.shape and p.dtype == g.dtype
        np.testing.assert_array_equal(s, p - 0.1 * g)


def test_backprop_trace_shapes_and_consistency():
    case = make_case(CaseSpec(sizes=(5, 7, 6, 3), activations=("relu", "tanh", "softmax"), loss="cross_entropy"))
    trace = pb.backprop_trace(case.net, case.x, case.y, loss=case.loss)
    n = case.x.shape[0]
    assert [z.shape for z in trace.pre_activations] == [(n, 7), (n, 6), (n, 3)]
    assert [a.shape for a in trace.activations] == [(n, 7), (n, 6), (n, 3)]
    assert [d.shape for d in trace.deltas] == [(n, 7), (n, 6), (n, 3)]
    np.testing.assert_array_equal(trace.activations[-1], pb.forward(case.net, case.x))
    # dC/dW^l = delta^l (a^{l-1})^T from the traced quantities
    np.testing.assert_allclose(trace.grads.layers[1].w, trace.deltas[1].T @ trace.activations[0], rtol=1e-12)
    loss, _grads = pb.value_and_grad(case.net, case.x, case.y, loss=case.loss)
    assert float(loss) == float(trace.loss)


@settings(max_examples=4)
@given(st.integers(0, 2**31 - 1))
def test_detects_a_wrong_derivative(seed):
    """check_gradients must fail, and name the layer, when G' is wrong: a checker that cannot fail proves nothing."""
    from purebp import activations

    case = make_case(CaseSpec(sizes=(3, 5, 4, 2), activations=("tanh", "sigmoid", "identity"), loss="mse", seed=seed))
    broken = activations.Activation("sigmoid", activations._sigmoid, lambda z, a: a * (1.0 - a) * 1.001)
    original = activations._REGISTRY["sigmoid"]
    jax.clear_caches()
    activations._REGISTRY["sigmoid"] = broken
    try:
        report = pb.check_gradients(case.net, case.x, case.y, loss="mse")
    finally:
        activations._REGISTRY["sigmoid"] = original
        jax.clear_caches()
    assert not report.passed
    assert report.first_failing_layer == 1  # layer 2 (index 2) is before the broken G'; layers 0 and 1 are after
    assert [leaf.passed for leaf in report.leaves] == [False, False, False, False, True, True]
    assert "FAIL" in str(report)
