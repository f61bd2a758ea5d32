"""The finite-difference oracle (reference/finite_differences.py) is accurate, including where a fixed step is not.

Tolerances: relative error |fd - exact| / |exact| (or over a stated scale where the exact derivative may be
near 0). The badly-scaled case is the deep sigmoid network whose first layer made the previous
2000-architecture equivalence run report two finite-difference mismatches: there the old fixed step 1e-5
must fail at 1e-6 and the adaptive oracle must pass.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.equivalence_fd_recheck import SPEC as DEEP_SIGMOID  # the network of the two former mismatches
from experiments.equivalence_fd_recheck import run_directions
from purebp.testing import make_case
from reference import finite_differences, numpy_matrix

OLD_STEP = 1e-5  # the fixed step of the previous equivalence run
FD_TOLERANCE = 1e-6  # what experiments/equivalence.py allows against finite differences


def fixed_step(phi, step=OLD_STEP):
    return (phi(step) - phi(-step)) / (2 * step)


@settings(max_examples=40)
@given(
    amplitude=st.floats(1e-3, 1e3),
    curvature=st.floats(0.1, 3.0),
    frequency=st.floats(0.1, 3.0),
    phase=st.floats(-3.0, 3.0),
    offset=st.floats(-10.0, 10.0),
)
def test_known_derivative_of_a_smooth_function(amplitude, curvature, frequency, phase, offset):
    """phi(t) = A exp(B sin(C t + D)) + E A: phi'(0) = A B C cos(D) exp(B sin D), to 1e-9 of the derivative's scale."""

    def phi(t):
        return amplitude * math.exp(curvature * math.sin(frequency * t + phase)) + offset * amplitude

    exact = amplitude * curvature * frequency * math.cos(phase) * math.exp(curvature * math.sin(phase))
    scale = amplitude * curvature * frequency * math.exp(curvature)  # cos(D) may be ~0: compare to the terms' size
    result = finite_differences.directional_derivative(phi)
    assert abs(result.value - exact) <= 1e-9 * scale, (result, exact, scale)
    assert result.smooth and result.evaluations <= 24


def test_large_loss_with_a_small_derivative_defeats_the_fixed_step_not_the_adaptive_one():
    """L ~ 20 with dL/dt ~ 1e-5 at 8 phases: the fixed step carries rounding ~eps L / h, up to ~2e-5 of it."""
    old_errors, new_errors = [], []
    for phase in np.linspace(0.1, 1.3, 8):

        def phi(t, phase=phase):
            return 20.0 + 1e-5 * math.sin(t + phase) + 1e-6 * t**3

        exact = 1e-5 * math.cos(phase)
        old_errors.append(abs(fixed_step(phi) - exact) / exact)
        new_errors.append(abs(finite_differences.directional_derivative(phi).value - exact) / exact)
    assert max(old_errors) > FD_TOLERANCE, old_errors
    assert max(new_errors) <= 1e-7 and max(new_errors) < max(old_errors) / 100, (new_errors, old_errors)


def _deep_sigmoid_layer_0():
    """phi(t) for layer 0's w or b of the recorded network, float64 NumPy loss; and the NumPy gradient."""
    case = make_case(DEEP_SIGMOID)
    weights = [np.asarray(layer.w, np.float64) for layer in case.net.layers]
    biases = [np.asarray(layer.b, np.float64) for layer in case.net.layers]
    x, y = np.asarray(case.x), np.asarray(case.y)
    _, grad_w, grad_b = numpy_matrix.loss_and_gradients(weights, biases, DEEP_SIGMOID.activations, x, y, "mse")
    total = math.sqrt(sum(float(np.sum(g * g)) for g in grad_w + grad_b))

    def along(name, direction):
        def phi(t):
            w = [weights[0] + t * direction if name == "w" else weights[0], *weights[1:]]
            b = [biases[0] + t * direction if name == "b" else biases[0], *biases[1:]]
            return numpy_matrix.loss_and_gradients(w, b, DEEP_SIGMOID.activations, x, y, DEEP_SIGMOID.loss)[0]

        return phi

    return along, {"w": grad_w[0], "b": grad_b[0]}, total


def test_the_two_former_mismatches_fail_with_the_fixed_step_and_pass_adaptively():
    """Layer 0 w and b of the recorded network along the very directions the previous run drew.

    Reference: the NumPy oracle's float64 gradient, equal to the hand-written and jax.grad gradients to ~1e-15
    on these leaves (results/equivalence.md); denominator ||g_leaf|| as in the run.
    """
    along, gradients, total = _deep_sigmoid_layer_0()
    directions = run_directions(DEEP_SIGMOID)
    for name, direction in (("w", directions[0]), ("b", directions[1])):
        phi, gradient = along(name, direction), gradients[name]
        exact = float(np.sum(gradient * direction))
        scale = max(float(np.linalg.norm(gradient)), 1e-6 * total)
        old_error = abs(fixed_step(phi) - exact) / scale
        result = finite_differences.directional_derivative(phi)
        new_error = abs(result.value - exact) / scale
        assert old_error > FD_TOLERANCE, (name, old_error)  # the previous run: 1.3e-6 (w), 8.4e-6 (b)
        assert new_error <= FD_TOLERANCE / 100, (name, result, new_error)
        assert result.error / scale <= FD_TOLERANCE / 100, (name, result)  # and it knows it is accurate


def test_deep_sigmoid_layer_0_in_random_directions_adaptive_beats_fixed_step():
    """8 more unit directions per leaf: the fixed step fails on some, the adaptive oracle passes on all, 100x better."""
    along, gradients, total = _deep_sigmoid_layer_0()
    rng = np.random.default_rng(0)
    old_errors, new_errors = [], []
    for name, gradient in gradients.items():
        scale = max(float(np.linalg.norm(gradient)), 1e-6 * total)
        for _ in range(8):
            direction = rng.standard_normal(gradient.shape)
            direction /= np.linalg.norm(direction)
            phi, exact = along(name, direction), float(np.sum(gradient * direction))
            old_errors.append(abs(fixed_step(phi) - exact) / scale)
            new_errors.append(abs(finite_differences.directional_derivative(phi).value - exact) / scale)
    assert max(old_errors) > FD_TOLERANCE, old_errors
    assert max(new_errors) <= FD_TOLERANCE, new_errors
    assert np.median(new_errors) <= np.median(old_errors) / 100, (new_errors, old_errors)


def test_a_kink_inside_the_first_step_makes_it_shrink():
    """phi(t) = |t - 0.003| + t^2 is smooth on (-inf, 0.003): phi'(0) = -1 from steps below 0.003 only."""

    def phi(t):
        return abs(t - 0.003) + t * t

    result = finite_differences.directional_derivative(phi, smooth=lambda t: t < 0.003)
    assert result.smooth and result.first_step < 0.003, result
    assert abs(result.value + 1.0) <= 1e-10, result
    # without being told, the large steps straddle the kink and the answer is wrong
    assert abs(finite_differences.directional_derivative(phi, columns=2).value + 1.0) > 0.1


def test_no_smooth_step_gives_nan_not_a_number_that_looks_right():
    result = finite_differences.directional_derivative(lambda t: abs(t), smooth=lambda t: False)
    assert not result.smooth and math.isnan(result.value) and result.error == math.inf, result


@pytest.mark.parametrize(
    "keywords, message",
    [
        ({"step": 0.0}, "step must be a positive finite number, got 0.0"),
        ({"step": math.nan}, "step must be a positive finite number, got nan"),
        ({"shrink": 1.0}, "shrink must be a finite number > 1, got 1.0"),
        ({"columns": 1}, "columns must be >= 2"),
    ],
)
def test_bad_settings_are_refused_with_the_value(keywords, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        finite_differences.directional_derivative(math.sin, **keywords)


def test_central_differences_still_match_a_known_gradient():
    """The fixed-step per-coordinate oracle used by tests/core/test_core_gradients.py: grad of sum(p^3) is 3 p^2.

    L = 10.5 and step 1e-6: rounding ~eps L / h ~ 2e-9 (absolute) bounds what a fixed step can do here.
    """
    parameters = [np.array([[0.5, -1.0], [2.0, 0.25]]), np.array([1.5])]
    gradients = finite_differences.central_differences(lambda ps: sum(float(np.sum(p**3)) for p in ps), parameters)
    for p, g in zip(parameters, gradients):
        np.testing.assert_allclose(g, 3 * p**2, rtol=0, atol=2e-8)
