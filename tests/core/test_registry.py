"""Your own costs (register_loss), the loss table, and replacing a registration (no stale programs).

Float64 throughout (the conftest enables x64). Gradients against a NumPy
formula: relative 1e-12 per element (np.testing.assert_allclose); against
jax.grad: check_gradients' stated 1e-10 per leaf.
"""

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purebp as pb
from purebp import activations, losses, programs, testing

RTOL = 1e-12
softplus = activations.get("softplus").forward


def tiny_net(hidden: str, output: str = "identity", seed: int = 0):
    """A (3, 4, 2) float64 network with inputs and float targets in [0, 1], drawn with NumPy."""
    rng = np.random.default_rng(seed)
    net = pb.Sequential(
        layers=(
            pb.Dense(jnp.asarray(rng.standard_normal((4, 3))), jnp.asarray(0.5 * rng.standard_normal(4)), hidden),
            pb.Dense(jnp.asarray(rng.standard_normal((2, 4))), jnp.asarray(0.5 * rng.standard_normal(2)), output),
        ),
        input_shape=(3,),
    )
    return net, jnp.asarray(rng.standard_normal((6, 3))), jnp.asarray(rng.uniform(size=(6, 2)))


def numpy_value_and_grad(net, x, y, hidden, hidden_prime, cost, cost_prime):
    """(L, [dW1, db1, dW2, db2]) for an identity output layer and reduction="mean", by the notes' BP1-BP4 in NumPy."""
    (w1, b1), (w2, b2) = [(np.asarray(layer.w), np.asarray(layer.b)) for layer in net.layers]
    x, y = np.asarray(x), np.asarray(y)
    z1 = x @ w1.T + b1
    a1 = hidden(z1)
    a2 = a1 @ w2.T + b2  # identity output: a^2 = z^2
    n = len(x)
    delta2 = cost_prime(a2, y) / n  # BP1 with G' = 1
    delta1 = (delta2 @ w2) * hidden_prime(z1)  # BP2
    grads = [delta1.T @ x, delta1.sum(0), delta2.T @ a1, delta2.sum(0)]  # BP4, BP3
    return cost(a2, y).sum() / n, grads


def assert_matches_numpy(value, grads, expected_value, expected_grads):
    np.testing.assert_allclose(float(value), expected_value, rtol=RTOL)
    for leaf, expected in zip(jax.tree.leaves(grads), expected_grads):
        np.testing.assert_allclose(np.asarray(leaf), expected, rtol=RTOL, atol=1e-14)


def tanh_prime(z):
    return 1.0 - np.tanh(z) ** 2


def half_square(a, y):
    return 0.5 * np.sum((a - y) ** 2, axis=-1)


def pseudo_huber(a, y):
    return np.sum(np.sqrt(1.0 + (a - y) ** 2) - 1.0, axis=-1)


def jnp_pseudo_huber(z, a, y):
    return jnp.sum(jnp.sqrt(1.0 + (a - y) ** 2) - 1.0, axis=-1)


def jnp_pseudo_huber_grad(z, a, y):
    return (a - y) / jnp.sqrt(1.0 + (a - y) ** 2)


# ---------------------------------------------------------------- replacing a registration (issue 12, item 6)


@pytest.mark.slow
def test_overwritten_activation_is_used_by_programs_compiled_before():
    """Old code: the jit caches key on the name, so the second registration's G and G' were never traced."""
    name = "test_registry_overwritten_activation"
    pb.register_activation(name, jnp.sin, jnp.cos, overwrite=True)
    net, x, y = tiny_net(name)
    user_jitted = jax.jit(lambda net, x, y: pb.value_and_grad(net, x, y, loss="mse"))
    sin_value, sin_grads = numpy_value_and_grad(net, x, y, np.sin, np.cos, half_square, lambda a, y: a - y)
    assert_matches_numpy(*pb.value_and_grad(net, x, y, loss="mse"), sin_value, sin_grads)
    assert_matches_numpy(*user_jitted(net, x, y), sin_value, sin_grads)
    assert pb.check_gradients(net, x, y, loss="mse").passed

    pb.register_activation(name, jnp.arctan, lambda z: 1.0 / (1.0 + z * z), overwrite=True)
    value, grads = numpy_value_and_grad(net, x, y, np.arctan, lambda z: 1.0 / (1.0 + z * z), half_square, np.subtract)
    assert not np.allclose(grads[0], sin_grads[0], rtol=1e-3)  # the two registrations do differ
    assert_matches_numpy(*pb.value_and_grad(net, x, y, loss="mse"), value, grads)
    assert_matches_numpy(*user_jitted(net, x, y), value, grads)
    report = pb.check_gradients(net, x, y, loss="mse")
    assert report.passed, report
    np.testing.assert_allclose(report.loss_autodiff, value, rtol=RTOL)  # the witness sees the new G too


def test_overwritten_loss_is_used_by_programs_compiled_before():
    name = "test_registry_overwritten_loss"
    pb.register_loss(
        name, lambda z, a, y: 0.5 * jnp.sum((a - y) ** 2, axis=-1), grad_output=lambda z, a, y: a - y, overwrite=True
    )
    net, x, y = tiny_net("tanh")
    square_value, square_grads = numpy_value_and_grad(net, x, y, np.tanh, tanh_prime, half_square, np.subtract)
    assert_matches_numpy(*pb.value_and_grad(net, x, y, loss=name), square_value, square_grads)
    assert pb.check_gradients(net, x, y, loss=name).passed

    pb.register_loss(name, jnp_pseudo_huber, grad_output=jnp_pseudo_huber_grad, overwrite=True)
    value, grads = numpy_value_and_grad(
        net, x, y, np.tanh, tanh_prime, pseudo_huber, lambda a, y: (a - y) / np.sqrt(1 + (a - y) ** 2)
    )
    assert not np.allclose(grads[2], square_grads[2], rtol=1e-3)
    assert_matches_numpy(*pb.value_and_grad(net, x, y, loss=name), value, grads)
    report = pb.check_gradients(net, x, y, loss=name)
    assert report.passed, report
    np.testing.assert_allclose(report.loss_autodiff, value, rtol=RTOL)


def test_clear_caches_calls_jax_and_every_registered_clearer(monkeypatch):
    calls = []
    monkeypatch.setattr(jax, "clear_caches", lambda: calls.append("jax"))
    clearer = programs.on_clear(lambda: calls.append("mine"))
    try:
        pb.clear_caches()
        assert calls == ["jax", "mine"]
        # a first registration replaces nothing: no programs are dropped
        calls.clear()
        pb.register_loss("test_registry_new_name_clears_nothing", jnp_pseudo_huber, grad_output=jnp_pseudo_huber_grad)
        assert calls == []
    finally:
        programs._CLEARERS.remove(clearer)
    with pytest.raises(TypeError, match="callable"):
        programs.on_clear(None)


# ---------------------------------------------------------------- register_loss


@pytest.mark.slow
def test_a_registered_cost_with_grad_output_matches_autodiff_and_trains():
    name = "test_registry_pseudo_huber"
    pb.register_loss(name, jnp_pseudo_huber, grad_output=jnp_pseudo_huber_grad, overwrite=True)
    assert name in losses.names() and name not in losses.LOSSES
    entry = losses.get(name)
    assert (entry.output_activation, entry.classification, entry.targets_in_unit_interval) == (None, False, False)
    for output in ("identity", "sigmoid", "softmax"):  # a cost on any output: delta^L through each G'
        net, x, y = tiny_net("relu", output, seed=1)
        for reduction in ("mean", "sum"):
            report = pb.check_gradients(net, x, y, loss=name, reduction=reduction)
            assert report.passed, report
    net, x, y = tiny_net("tanh", "identity", seed=2)
    _trained, history = pb.fit(net, (x, y), loss=name, epochs=5, learning_rate=0.5)  # verify=True: checked first
    assert history["train_loss"][-1] < history["train_loss"][0]


@pytest.mark.slow
def test_a_registered_cost_with_output_delta_equals_the_builtin_it_copies():
    """binary cross-entropy and cross-entropy on softmax, registered by hand: the built-ins' gradients."""
    pb.register_loss(
        "test_registry_bce",
        lambda z, a, y: jnp.sum(y * softplus(-z) + (1.0 - y) * softplus(z), axis=-1),
        output_delta=lambda z, a, y: a - y,
        output_activation="sigmoid",
        overwrite=True,
    )
    pb.register_loss(
        "test_registry_ce",
        lambda z, a, y: -jnp.sum(y * activations.log_softmax(z), axis=-1),
        output_delta=lambda z, a, y: a * jnp.sum(y, axis=-1, keepdims=True) - y,
        output_activation="softmax",
        overwrite=True,
    )
    for mine, builtin, output in (
        ("test_registry_bce", "binary_cross_entropy", "sigmoid"),
        ("test_registry_ce", "cross_entropy", "softmax"),
    ):
        net, x, y = tiny_net("elu", output, seed=3)
        report = pb.check_gradients(net, x, y, loss=mine)
        assert report.passed, report
        value, grads = pb.value_and_grad(net, x, y, loss=mine)
        expected_value, expected_grads = pb.value_and_grad(net, x, y, loss=builtin)
        np.testing.assert_allclose(float(value), float(expected_value), rtol=RTOL)
        for leaf, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
            np.testing.assert_allclose(np.asarray(leaf), np.asarray(expected), rtol=RTOL, atol=1e-15)
        with pytest.raises(ValueError, match=f"loss '{mine}' needs a '{output}' output layer"):
            pb.value_and_grad(*tiny_net("elu", "identity")[:2], y, loss=mine)


WORST = (
    r"worst at example \d+, output \d+ \(z=\S+, a=\S+, y=\S+\): (.+) gave (\S+), autodiff's (?:dC/da|dC/dz) is (\S+)"
)


@pytest.mark.parametrize(
    "kind",
    ["grad_output", "grad_output through sigmoid", "output_delta"],
)
def test_a_wrong_derivative_is_refused_naming_the_worst_point(kind):
    name = f"test_registry_wrong_{kind.replace(' ', '_')}"
    cost = lambda z, a, y: 1.5 * jnp.sum((a - y) ** 2, axis=-1)  # noqa: E731
    # dC/da = 3 (a - y); off by 1e-6 (a - y) at the element where (a - y) is largest
    wrong = lambda z, a, y: (3.0 + 1e-6) * (a - y)  # noqa: E731
    if kind == "grad_output":
        kwargs = dict(grad_output=wrong)
    elif kind == "grad_output through sigmoid":
        kwargs = dict(grad_output=wrong, output_activation="sigmoid")
    else:
        kwargs = dict(output_delta=wrong, output_activation="identity")
    with pytest.raises(ValueError, match=WORST) as raised:
        pb.register_loss(name, cost, **kwargs)
    message = str(raised.value)
    assert f"loss '{name}'" in message and "relative error 3.33e-07, tolerance 1e-08" in message
    _, given, expected = re.search(WORST, message).groups()
    assert float(given) != float(expected)
    assert name not in losses.names()


def test_a_cost_for_any_output_that_reads_z_is_refused():
    with pytest.raises(ValueError, match=r"output_activation=None .* may read a only.*dC/dz = \S+ at example \d+"):
        pb.register_loss(
            "test_registry_reads_z",
            lambda z, a, y: jnp.sum((z - y) ** 2, axis=-1),
            grad_output=lambda z, a, y: 2.0 * (z - y),
        )
    # named as an identity-output cost it is right
    pb.register_loss(
        "test_registry_reads_z",
        lambda z, a, y: jnp.sum((z - y) ** 2, axis=-1),
        grad_output=lambda z, a, y: 2.0 * (z - y),
        output_activation="identity",
        overwrite=True,
    )


def pseudo_huber_args(**changes):
    return {"name": "test_registry_bad", "cost": jnp_pseudo_huber, "grad_output": jnp_pseudo_huber_grad, **changes}


@pytest.mark.parametrize(
    "changes,error,match",
    [
        (dict(output_delta=lambda z, a, y: a - y), TypeError, "exactly one of output_delta.*got both"),
        (dict(grad_output=None), TypeError, "exactly one of output_delta.*got neither"),
        (dict(cost="mse"), TypeError, "cost must be a callable"),
        (dict(grad_output=3.0), TypeError, "grad_output must be a callable"),
        (dict(name="mse"), ValueError, "'mse' is a built-in loss and cannot be replaced"),
        (dict(name="softmax_cross_entropy", overwrite=True), ValueError, "built-in loss"),
        (dict(name=""), TypeError, "non-empty string"),
        (dict(name=3), TypeError, "non-empty string"),
        (dict(output_activation="swoosh"), ValueError, "unknown output_activation 'swoosh'; valid names: identity"),
        (dict(output_activation=activations.get("sigmoid")), TypeError, "activation name or None"),
        (
            dict(grad_output=None, output_delta=lambda z, a, y: a - y),
            ValueError,
            "output_delta .* depends on the output activation: name it with output_activation",
        ),
        (dict(cost=lambda z, a, y: jnp.sum(a)), ValueError, r"must return a float64 array of shape \(16,\)"),
        (dict(grad_output=lambda z, a, y: a[:, 0]), ValueError, r"grad_output must return .* shape \(16, 4\)"),
        (dict(cost=lambda z, a, y: jnp.sum(jnp.log(a), axis=-1)), ValueError, "the cost is nan at sample example"),
        (dict(grad_output=lambda z, a, y: a @ a), ValueError, "grad_output failed on the sample points"),
    ],
)
def test_bad_arguments_are_clear_errors(changes, error, match):
    args = pseudo_huber_args(**changes)
    with pytest.raises(error, match=match):
        pb.register_loss(args.pop("name"), args.pop("cost"), **args)
    assert "test_registry_bad" not in losses.names()


def test_a_registered_name_needs_overwrite_to_be_replaced():
    name = "test_registry_taken"
    pb.register_loss(name, jnp_pseudo_huber, grad_output=jnp_pseudo_huber_grad, overwrite=True)
    with pytest.raises(ValueError, match="already registered; pass overwrite=True"):
        pb.register_loss(name, jnp_pseudo_huber, grad_output=jnp_pseudo_huber_grad)
    with pytest.raises(ValueError, match="already registered; pass overwrite=True"):
        losses.install(losses.get(name))
    with pytest.raises(ValueError, match="built-in activation"):
        activations.install(activations.get("relu"), overwrite=True)


# ---------------------------------------------------------------- the one table


def old_per_example_cost(z, a, y, loss):  # the if/elif chain the table replaced, verbatim
    if loss == "mse":
        residual = a - y
        return 0.5 * jnp.sum(residual * residual, axis=-1)
    if loss in ("cross_entropy", "softmax_cross_entropy"):
        return -jnp.sum(y * activations.log_softmax(z), axis=-1)
    return jnp.sum(y * softplus(-z) + (1.0 - y) * softplus(z), axis=-1)


def old_output_delta(z, a, y, loss, output):
    if loss == "mse":
        return output.chain(a - y, z, a)
    if loss == "softmax_cross_entropy":
        return activations.softmax(z) * jnp.sum(y, axis=-1, keepdims=True) - y
    if loss == "cross_entropy":
        return a * jnp.sum(y, axis=-1, keepdims=True) - y
    return a - y


@pytest.mark.slow
@pytest.mark.parametrize("loss,output", testing.LOSS_OUTPUT_PAIRS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_builtin_costs_are_bit_identical_to_the_old_chain(loss, output, dtype):
    rng = np.random.default_rng(0)
    z = jnp.asarray(3.0 * rng.standard_normal((5, 3)), dtype=dtype)
    y = jnp.asarray(rng.uniform(size=(5, 3)), dtype=dtype)
    act = activations.get(output)
    a = act.forward(z)
    assert np.array_equal(losses.per_example_cost(z, a, y, loss), old_per_example_cost(z, a, y, loss))
    assert np.array_equal(losses.output_delta(z, a, y, loss, act), old_output_delta(z, a, y, loss, act))


def test_the_table_holds_the_loss_to_output_map_once():
    assert losses.LOSSES == ("mse", "cross_entropy", "softmax_cross_entropy", "binary_cross_entropy")
    assert losses.CLASSIFICATION_LOSSES == ("cross_entropy", "softmax_cross_entropy")
    assert {name: losses.get(name).output_activation for name in losses.LOSSES} == {
        "mse": None,
        "cross_entropy": "softmax",
        "softmax_cross_entropy": "identity",
        "binary_cross_entropy": "sigmoid",
    }
    assert [name for name in losses.LOSSES if losses.get(name).targets_in_unit_interval] == ["binary_cross_entropy"]
    old_pairs = tuple(
        [("mse", name) for name in activations.BUILTIN_NAMES]
        + [("cross_entropy", "softmax"), ("softmax_cross_entropy", "identity"), ("binary_cross_entropy", "sigmoid")]
    )
    assert old_pairs == testing.LOSS_OUTPUT_PAIRS
    assert losses.names()[:4] == losses.LOSSES
    with pytest.raises(ValueError, match="unknown loss 'hinge'; valid losses: mse, cross_entropy"):
        losses.get("hinge")
    with pytest.raises(TypeError, match="a loss name must be a string"):
        losses.get(None)


def readme_custom_cost() -> dict:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("### Your own cost") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return dict(command=[sys.executable, "-c", code], timeout=300)


@pytest.mark.background("README: Your own cost", **readme_custom_cost())  # beside the in-process tests
def test_the_readme_custom_cost_example_runs(background):
    """README "Your own cost", in a fresh process (default JAX settings: float32, no strict promotion)."""
    result = background.result("README: Your own cost", **readme_custom_cost()).process
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout


def test_a_loss_replaced_with_another_output_activation_is_validated_afresh():
    """The shape/name validation is cached per signature: replacing a loss must clear it too."""
    name = "test_registry_output_changes"
    pb.register_loss(
        name, lambda z, a, y: 0.5 * jnp.sum((a - y) ** 2, axis=-1), grad_output=lambda z, a, y: a - y, overwrite=True
    )
    net, x, y = tiny_net("tanh", output="identity")
    pb.value_and_grad(net, x, y, loss=name)  # valid on an identity output: cached as valid
    pb.register_loss(
        name,
        lambda z, a, y: 0.5 * jnp.sum((a - y) ** 2, axis=-1),
        grad_output=lambda z, a, y: a - y,
        output_activation="sigmoid",
        overwrite=True,
    )
    with pytest.raises(ValueError, match="sigmoid"):
        pb.value_and_grad(net, x, y, loss=name)
