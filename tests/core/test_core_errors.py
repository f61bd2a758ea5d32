"""Bad input gets a clear ValueError/TypeError before anything is compiled."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purebp as pb
from purebp import engine as backprop


@pytest.fixture
def net():
    return pb.init_mlp(jax.random.key(0), (4, 5, 3), ("relu", "identity"), dtype=jnp.float64)


@pytest.fixture
def x():
    return jnp.ones((6, 4), dtype=jnp.float64)


@pytest.fixture(autouse=True)
def nothing_compiles(monkeypatch):
    """Fail the test if a bad input reaches the jitted functions."""

    def refuse(*args, **kwargs):
        raise AssertionError("a jitted function was called: validation came too late")

    monkeypatch.setattr(backprop, "_value_and_grad_jit", refuse)
    monkeypatch.setattr(backprop, "_forward_jit", refuse)


LABELS = jnp.asarray([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (
            lambda x: (jnp.ones((6, 5), jnp.float64), LABELS),
            ValueError,
            "x has 5 features per example but the network expects 4",
        ),
        (lambda x: (jnp.ones((4,), jnp.float64), LABELS), ValueError, r"x must have shape \(N, 4\).*x\[None, :\]"),
        (lambda x: (x, LABELS[:5]), ValueError, "x has a batch of 6 examples but y has shape"),
        (lambda x: (x, jnp.asarray([0, 1, 2, 3, 1, 2])), ValueError, r"class label 3 at index 3 is outside \[0, 3\)"),
        (lambda x: (x, jnp.asarray([0, 1, -1, 0, 1, 2])), ValueError, r"class label -1 at index 2 is outside \[0, 3\)"),
        (lambda x: (x, LABELS.astype(jnp.float64)), TypeError, "takes integer class labels"),
        (
            lambda x: (x, jnp.ones((6, 4), jnp.float64)),
            ValueError,
            r"one-hot targets of shape \(N, 3\); got y of shape \(6, 4\)",
        ),
        (
            lambda x: (x.astype(jnp.float32), LABELS),
            TypeError,
            "x has dtype float32 but the network's parameters are float64",
        ),
        (lambda x: (x, jnp.ones((6, 3), jnp.float32)), TypeError, "takes float64 targets"),
        (lambda x: (jnp.ones((0, 4), jnp.float64), LABELS[:0]), ValueError, "empty batch"),
    ],
)
def test_bad_inputs(net, x, make_args, error, match):
    bad_x, bad_y = make_args(x)
    with pytest.raises(error, match=match):
        pb.value_and_grad(net, bad_x, bad_y, loss="softmax_cross_entropy")


def test_regression_targets_of_the_wrong_width(net, x):
    with pytest.raises(ValueError, match=r"takes targets of shape \(N, 3\); got y of shape \(6, 2\)"):
        pb.grad(net, x, jnp.ones((6, 2), jnp.float64), loss="mse")
    with pytest.raises(ValueError, match=r"takes targets of shape \(N, 3\); got y of shape \(6,\)"):
        pb.grad(net, x, jnp.ones((6,), jnp.float64), loss="mse")


def test_binary_cross_entropy_targets_outside_0_1(x):
    net = pb.init_mlp(jax.random.key(0), (4, 2), ("sigmoid",), dtype=jnp.float64)
    y = jnp.asarray([[0.0, 1.0]] * 5 + [[1.5, 0.0]], dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]; got 1.5"):
        pb.grad(net, x, y, loss="binary_cross_entropy")


def test_unknown_names_list_the_valid_ones(net, x):
    with pytest.raises(ValueError, match="unknown loss 'hinge'; valid losses: mse, cross_entropy"):
        pb.grad(net, x, LABELS, loss="hinge")
    with pytest.raises(ValueError, match="unknown reduction 'max'; valid reductions: mean, sum"):
        pb.grad(net, x, LABELS, loss="softmax_cross_entropy", reduction="max")
    with pytest.raises(ValueError, match="unknown activation 'swish'; valid names: identity, sigmoid"):
        pb.init_mlp(jax.random.key(0), (4, 3), ("swish",))


def test_loss_must_fit_the_output_layer(net, x):
    with pytest.raises(ValueError, match="loss 'cross_entropy' needs a 'softmax' output layer"):
        pb.grad(net, x, LABELS, loss="cross_entropy")
    with pytest.raises(ValueError, match="needs a 'sigmoid' output layer"):
        pb.grad(net, x, jnp.ones((6, 3), jnp.float64), loss="binary_cross_entropy")


@pytest.mark.parametrize(
    "sizes,activations,error,match",
    [
        (
            (4, 5, 3),
            ("softmax", "identity"),
            ValueError,
            r"softmax is only allowed on the output layer; activations\[0\]",
        ),
        ((4, 5, 3), ("relu",), ValueError, "expected 2 activation names"),
        ((4,), (), ValueError, "at least two widths"),
        ((4, 0, 3), ("relu", "identity"), ValueError, r"sizes\[1\] must be a positive width, got 0"),
        ((4, -2, 3), ("relu", "identity"), ValueError, r"sizes\[1\] must be a positive width, got -2"),
        ((4, 2.5, 3), ("relu", "identity"), TypeError, r"sizes\[1\] must be an int"),
        ((4, 3), "relu", TypeError, "sequence of names"),
    ],
)
def test_bad_architectures(sizes, activations, error, match):
    with pytest.raises(error, match=match):
        pb.init_mlp(jax.random.key(0), sizes, activations)


def test_float64_without_x64_is_explained():
    with jax.enable_x64(False), pytest.raises(TypeError, match="jax_enable_x64"):
        pb.init_mlp(jax.random.key(0), (2, 2), ("identity",), dtype=jnp.float64)


def test_inconsistent_hand_built_network(x):
    layers = (
        pb.Dense(jnp.ones((5, 4), jnp.float64), jnp.ones((5,), jnp.float64), "relu"),
        pb.Dense(jnp.ones((3, 6), jnp.float64), jnp.ones((3,), jnp.float64)),
    )
    message = r"layer 1 \(Dense\(3, 'identity'\)\): w expects 6 inputs but the layer receives 5"
    with pytest.raises(ValueError, match=message):
        pb.forward(pb.Sequential(layers=layers, input_shape=(4,)), x)
    with pytest.raises(TypeError, match="expected a purebp.Sequential"):
        pb.forward({"w": 1}, x)


def test_out_of_range_label_under_user_jit_poisons_the_loss_instead_of_clamping(net, x, monkeypatch):
    """Under jit the labels are tracers and cannot be checked: the loss becomes NaN, not a clamped value."""
    monkeypatch.undo()  # this test does compile
    loss_fn = jax.jit(lambda n, x, y: pb.value_and_grad(n, x, y, loss="softmax_cross_entropy")[0])
    assert np.isfinite(float(loss_fn(net, x, LABELS)))
    assert np.isnan(float(loss_fn(net, x, jnp.asarray([0, 1, 2, 3, 1, 2]))))


@pytest.mark.parametrize("function", [pb.value_and_grad, pb.grad, pb.backprop_trace])
def test_bad_label_after_the_shapes_have_compiled_still_raises(net, x, monkeypatch, function):
    """Once a signature has compiled, labels are checked while the pass runs: a bad one must still raise."""
    monkeypatch.undo()  # this test does compile
    function(net, x, LABELS, loss="softmax_cross_entropy")
    function(net, x, LABELS, loss="softmax_cross_entropy")  # the overlapped path, good labels
    with pytest.raises(ValueError, match=r"class label 3 at index 3 is outside \[0, 3\)"):
        function(net, x, jnp.asarray([0, 1, 2, 3, 1, 2]), loss="softmax_cross_entropy")
    with pytest.raises(ValueError, match=r"class label -1 at index 2 is outside \[0, 3\)"):
        function(net, x, np.asarray([0, 1, -1, 0, 1, 2]), loss="softmax_cross_entropy")


def test_reports_and_errors_name_a_users_layer_by_its_shapes_not_its_weights():
    @dataclasses.dataclass(frozen=True)
    class Scale:  # a user's layer whose dataclass repr would print 300 weights
        s: jax.Array

        def forward(self, a, key=None):
            return a * self.s[None, :], a

        def backward(self, cache, g):
            return g * self.s[None, :], Scale(jnp.sum(g * cache, axis=0))

    jax.tree_util.register_dataclass(Scale, data_fields=["s"], meta_fields=[])
    layer = Scale(jnp.linspace(0.5, 1.5, 300))
    report = pb.check_layer(layer, jnp.ones((2, 300)))
    assert report.passed and report.layer == "Scale(float64[300])"
    assert "0.5" not in str(report)
    with pytest.raises(TypeError, match=r"layers\[0\]\.s must be a floating array, got .*int64"):
        pb.forward(pb.Sequential(layers=(Scale(jnp.arange(3)),), input_shape=(3,)), jnp.ones((2, 3)))
