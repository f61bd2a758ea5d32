"""Learning rules other than backprop (purebp.extras.rules): exact where the answer is known, float64.

Tolerances: "bit for bit" is ``np.testing.assert_array_equal``; against the
independent NumPy oracle (reference/numpy_rules.py, one example at a time) the
relative error per leaf, max |a - b| / max |b|, is at most 1e-10.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax._src.interpreters import ad

import purebp as pb
from purebp import engine as backprop
from purebp.train import fit as training
from reference import numpy_rules

ROOT = Path(__file__).resolve().parents[2]
LOSS = "softmax_cross_entropy"


def mlp(seed=0, sizes=(6, 8, 7, 3), activations=("tanh", "relu", "identity")):
    return pb.init_mlp(jax.random.key(seed), sizes, activations, dtype=jnp.float64)


def batch(seed=0, n=12, features=6, classes=3):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, features))), jnp.asarray(rng.integers(0, classes, n).astype(np.int32))


def dropout_stack(seed=0):
    layers = [pb.dense(8, "tanh"), pb.dropout(0.25), pb.dense(7, "relu"), pb.dropout(0.25), pb.dense(3)]
    return pb.init_network(jax.random.key(seed), 6, layers, dtype=jnp.float64)


def every_rule(net, seed=1):
    return {
        "backprop": pb.rules.backprop(),
        "fa": pb.rules.feedback_alignment(jax.random.key(seed), net),
        "dfa": pb.rules.direct_feedback_alignment(jax.random.key(seed), net),
        "sign": pb.rules.sign_symmetry(),
    }


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for left, right in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(left, right)


def assert_relative(actual, expected, tolerance=1e-10):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(np.max(np.abs(expected)), 1e-300)
    error = np.max(np.abs(actual - expected)) / scale
    assert error <= tolerance, f"relative error {error:.2e} > {tolerance:.0e}"


# ---------------------------------------------------------------- exact answers


@pytest.mark.slow
def test_feedback_weights_is_backprop_bit_for_bit_over_a_training_run():
    """feedback="weights": M^{l+1} is the current W^{l+1} at every step, so 4 epochs of Adam are backprop's bits."""
    net, (x, y) = mlp(), batch(n=36)
    options = dict(loss=LOSS, optimizer=optax.adam(0.05), epochs=3, batch_size=12, key=jax.random.key(3), verify=False)
    trained, history = pb.fit(net, (x, y), **options)
    rule = pb.rules.feedback_alignment(None, net, feedback="weights")
    trained_fa, history_fa = pb.fit(net, (x, y), rule=rule, **options)
    assert_trees_equal(trained_fa, trained)
    assert history_fa["train_loss"] == history["train_loss"]
    assert not np.array_equal(trained.layers[0].w, net.layers[0].w)  # it did train


def test_fixed_feedback_equal_to_the_weights_is_backprop_only_while_it_equals_them():
    """A rule's matrices are fixed leaves: re-made from the current weights each step it is backprop at every
    step (bit for bit); made once, it is backprop at the first step and a different run afterwards."""
    net, (x, y) = mlp(seed=2), batch(seed=2)
    step = jax.jit(pb.make_train_step(optax.sgd(0.5), loss=LOSS), static_argnames=())
    traced = jax.jit(lambda n, s, b, r: pb.make_train_step(optax.sgd(0.5), loss=LOSS)(n, s, b, None, rule=r))
    fixed = pb.rules.feedback_alignment(None, net, feedback=net)
    reference, remade, once = net, net, net
    state = optax.sgd(0.5).init(net)
    for index in range(4):
        reference, _, _ = step(reference, state, (x, y))
        remade, _, _ = traced(remade, state, (x, y), pb.rules.feedback_alignment(None, remade, feedback=remade))
        once, _, _ = traced(once, state, (x, y), fixed)
        assert_trees_equal(remade, reference)
        if index == 0:
            assert_trees_equal(once, reference)
    assert not np.array_equal(once.layers[0].w, reference.layers[0].w)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dfa_with_one_hidden_layer_is_fa_with_the_same_matrix(seed):
    """One hidden layer: DFA's e @ F^1 and FA's delta^2 @ M^2 are the same product when F^1 = M^2 (e = delta^2).

    With that matrix = the output weights both are backprop.
    """
    net, (x, y) = mlp(seed, sizes=(6, 9, 4), activations=("tanh", "identity")), batch(seed, classes=4)
    dfa = pb.rules.direct_feedback_alignment(jax.random.key(seed + 10), net)
    fa = pb.rules.feedback_alignment(None, net, feedback=[dfa.feedback[0]])
    _, update_dfa = pb.value_and_grad(net, x, y, loss=LOSS, rule=dfa)
    _, update_fa = pb.value_and_grad(net, x, y, loss=LOSS, rule=fa)
    assert_trees_equal(update_dfa, update_fa)
    _, true_grads = pb.value_and_grad(net, x, y, loss=LOSS)
    assert not np.array_equal(update_dfa.layers[0].w, true_grads.layers[0].w)
    own = pb.rules.direct_feedback_alignment(None, net, feedback=[net.layers[1].w])
    assert_trees_equal(pb.grad(net, x, y, loss=LOSS, rule=own), true_grads)


@pytest.mark.slow
@pytest.mark.parametrize("network", ["mlp", "dropout stack"])
def test_output_layer_update_is_the_true_gradient_under_every_rule(network):
    """The loss and the output layer's update are backprop's bits; the first layer's differ (but for backprop).

    The dropout stack runs in training mode: the masks gate every rule's error as they gate backprop's.
    """
    net = mlp(3) if network == "mlp" else dropout_stack(3)
    key = None if network == "mlp" else jax.random.key(7)
    x, y = batch(3)
    true_value, true_grads = pb.value_and_grad(net, x, y, loss=LOSS, key=key)
    # the dropout stack: FA and DFA (sign symmetry runs FA's code path with sign(W) as the matrix)
    kinds = ("backprop", "fa", "dfa", "sign") if network == "mlp" else ("fa", "dfa")
    for kind, rule in every_rule(net).items():
        if kind not in kinds:
            continue
        value, update = pb.value_and_grad(net, x, y, loss=LOSS, rule=rule, key=key)
        assert float(value) == float(true_value), kind
        assert_trees_equal(update.layers[-1], true_grads.layers[-1])
        hidden_equal = np.array_equal(update.layers[0].w, true_grads.layers[0].w)
        assert hidden_equal == (kind == "backprop"), kind


@pytest.mark.slow
def test_sign_symmetry_on_weights_of_magnitude_c_is_backprop_rescaled_exactly():
    """All weights +-c with c = 1/4: sign(W) = W / c, so layer l's delta is backprop's times c^-(L-1-l), exactly
    (a power of two); the feedback angles are 0."""
    c = 0.25
    net = mlp(4)
    signs = dataclasses.replace(
        net, layers=tuple(dataclasses.replace(layer, w=c * jnp.sign(layer.w), b=layer.b + 0.1) for layer in net.layers)
    )
    x, y = batch(4)
    _, update = pb.value_and_grad(signs, x, y, loss=LOSS, rule=pb.rules.sign_symmetry())
    _, true_grads = pb.value_and_grad(signs, x, y, loss=LOSS)
    depth = len(signs.layers)
    for l in range(depth):
        factor = (1.0 / c) ** (depth - 1 - l)
        np.testing.assert_array_equal(update.layers[l].w, factor * true_grads.layers[l].w)
        np.testing.assert_array_equal(update.layers[l].b, factor * true_grads.layers[l].b)
    angles = pb.alignment_angles(signs, x, y, loss=LOSS, rule=pb.rules.sign_symmetry())
    np.testing.assert_array_equal(np.asarray(angles.feedback[1:]), 0.0)
    np.testing.assert_allclose(np.asarray(angles.update), 0.0, atol=1e-6)  # parallel updates, different lengths


# ---------------------------------------------------------------- against the NumPy oracle


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["backprop", "fa", "dfa", "sign"])
def test_every_rule_matches_the_independent_numpy_oracle(kind, seed):
    net, (x, y) = mlp(seed), batch(seed)
    rule = every_rule(net, seed + 20)[kind]
    _, update = pb.value_and_grad(net, x, y, loss=LOSS, rule=rule)
    weights = [np.asarray(layer.w) for layer in net.layers]
    biases = [np.asarray(layer.b) for layer in net.layers]
    feedback = None
    if kind == "fa":  # Lillicrap's B^l = (M^{l+1})^T, (n_l, n_{l+1})
        feedback = [np.asarray(rule.feedback[l + 1]).T for l in range(len(weights) - 1)]
    elif kind == "dfa":  # Nokland's D^l = (F^l)^T, (n_l, n_L)
        feedback = [np.asarray(rule.feedback[l]).T for l in range(len(weights) - 1)]
    expected_w, expected_b = numpy_rules.rule_update(
        weights, biases, list(net.activations), np.asarray(x), np.asarray(y), kind, feedback
    )
    for l, layer in enumerate(update.layers):
        assert_relative(layer.w, expected_w[l])
        assert_relative(layer.b, expected_b[l])
    angles = pb.alignment_angles(net, x, y, loss=LOSS, rule=rule)
    _, true_grads = pb.value_and_grad(net, x, y, loss=LOSS)
    for l in range(len(weights)):
        expected = numpy_rules.angle_degrees(expected_w[l], np.asarray(true_grads.layers[l].w))
        # 1e-5 degrees: the oracle's arccos is only good to sqrt(2 eps) rad (1.2e-6 degrees) near 0
        assert abs(float(angles.update[l]) - expected) < 1e-5, (l, float(angles.update[l]), expected)
    if kind == "fa":
        for l in range(1, len(weights)):
            expected = numpy_rules.angle_degrees(feedback[l - 1], weights[l].T)
            assert abs(float(angles.feedback[l]) - expected) < 1e-5
    assert np.isnan(float(angles.feedback[0]))


@pytest.mark.slow
def test_random_feedback_has_the_weights_distribution():
    """FA's M^{l+1} is drawn like W^{l+1} (He for relu, Glorot otherwise); DFA's F^l ~ N(0, 1/n_L).

    Standard deviations of 20000 and 40000 draws: rtol 3% is over 4 standard errors.
    """
    net = mlp(0, sizes=(2, 200, 200, 10), activations=("tanh", "relu", "identity"))
    fa = pb.rules.feedback_alignment(jax.random.key(5), net)
    assert fa.feedback[0] is None and fa.feedback[1].shape == (200, 200) and fa.feedback[2].shape == (10, 200)
    np.testing.assert_allclose(np.std(fa.feedback[1]), np.sqrt(2.0 / 200), rtol=0.03)  # relu: He
    np.testing.assert_allclose(np.std(fa.feedback[2]), np.sqrt(2.0 / (200 + 10)), rtol=0.03)  # identity: Glorot
    dfa = pb.rules.direct_feedback_alignment(jax.random.key(5), net)
    assert dfa.feedback[0].shape == (10, 200) and dfa.feedback[1].shape == (10, 200) and dfa.feedback[2] is None
    np.testing.assert_allclose(np.std(np.concatenate(dfa.feedback[:2])), np.sqrt(1.0 / 10), rtol=0.03)
    assert not np.array_equal(fa.feedback[1], pb.rules.feedback_alignment(jax.random.key(6), net).feedback[1])


# ---------------------------------------------------------------- errors, before anything compiles


def test_layers_without_a_rule_are_refused_naming_index_and_kind():
    net = pb.init_network(jax.random.key(0), 6, [pb.dense(8, "tanh"), pb.layer_norm(), pb.dense(3)], dtype=jnp.float64)
    x, y = batch()
    for make in (
        lambda: pb.rules.feedback_alignment(jax.random.key(0), net),
        lambda: pb.rules.direct_feedback_alignment(jax.random.key(0), net),
    ):
        with pytest.raises(TypeError, match=r"layer 1 is LayerNorm"):
            make()
    compiled = backprop._value_and_grad_jit._cache_size()
    with pytest.raises(TypeError, match=r"sign_symmetry rule .* layer 1 is LayerNorm"):
        pb.value_and_grad(net, x, y, loss=LOSS, rule=pb.rules.sign_symmetry())
    with pytest.raises(TypeError, match=r"layer 1 is LayerNorm"):
        pb.fit(net, (x, y), loss=LOSS, epochs=1, rule=pb.rules.sign_symmetry())
    residual = pb.init_network(
        jax.random.key(0), 6, [pb.dense(8, "tanh"), pb.residual(pb.dense(8, "tanh")), pb.dense(3)], dtype=jnp.float64
    )
    with pytest.raises(TypeError, match=r"layer 1 is Residual"):
        pb.value_and_grad(residual, x, y, loss=LOSS, rule=pb.rules.sign_symmetry())
    assert backprop._value_and_grad_jit._cache_size() == compiled


def test_bad_rules_and_feedback_are_clear_errors():
    net, (x, y) = mlp(), batch()
    other = mlp(sizes=(6, 5, 7, 3))
    compiled = backprop._value_and_grad_jit._cache_size()
    with pytest.raises(ValueError, match=r"layer 1 has shape \(7, 8\), expected \(7, 5\)"):
        pb.value_and_grad(other, x, y, loss=LOSS, rule=pb.rules.feedback_alignment(jax.random.key(0), net))
    with pytest.raises(ValueError, match=r"layer 0 has shape \(3, 8\), expected \(3, 5\)"):
        pb.value_and_grad(other, x, y, loss=LOSS, rule=pb.rules.direct_feedback_alignment(jax.random.key(0), net))
    with pytest.raises(ValueError, match="made for a network of 3 layers, but this network has 2"):
        pb.value_and_grad(
            mlp(sizes=(6, 8, 3), activations=("tanh", "identity")), x, y, loss=LOSS,
            rule=pb.rules.feedback_alignment(jax.random.key(0), net),
        )  # fmt: skip
    assert backprop._value_and_grad_jit._cache_size() == compiled
    with pytest.raises(TypeError, match="rule must be None or a rule from purebp.rules"):
        pb.value_and_grad(net, x, y, loss=LOSS, rule="fa")
    with pytest.raises(ValueError, match="feedback has 1 matrices but the network has 2 dense layers after the first"):
        pb.rules.feedback_alignment(None, net, feedback=[net.layers[1].w])
    with pytest.raises(ValueError, match="feedback must be None, 'weights'"):
        pb.rules.feedback_alignment(None, net, feedback="weight")
    with pytest.raises(ValueError, match="has shape \\(7, 9\\), expected \\(7, 8\\)"):
        pb.rules.feedback_alignment(None, net, feedback=[jnp.zeros((7, 9)), net.layers[2].w])
    with pytest.raises(TypeError, match="is float32 but the network's parameters are float64"):
        pb.rules.feedback_alignment(None, net, feedback=[jnp.zeros((7, 8), jnp.float32), net.layers[2].w])
    with pytest.raises(ValueError, match="2 hidden dense layers"):
        pb.rules.direct_feedback_alignment(None, net, feedback=[jnp.zeros((3, 8))])
    rule = pb.rules.sign_symmetry()
    with pytest.raises(ValueError, match="needs gradient='handwritten'"):
        pb.make_train_step(optax.sgd(0.1), loss=LOSS, gradient="autodiff", rule=rule)
    with pytest.raises(ValueError, match="needs gradient='handwritten'"):
        pb.fit(net, (x, y), loss=LOSS, epochs=1, gradient="autodiff", rule=rule)
    with pytest.raises(ValueError, match="cannot be combined with compute_dtype"):
        pb.fit(net, (x, y), loss=LOSS, epochs=1, compute_dtype="bfloat16", rule=rule)
    with pytest.raises(TypeError, match="log_alignment must be True or False"):
        pb.fit(net, (x, y), loss=LOSS, epochs=1, log_alignment="yes")


# ---------------------------------------------------------------- compiles, jit, scan, pytrees


def test_a_new_rule_of_the_same_shapes_does_not_recompile():
    net, (x, y) = mlp(5), batch(5, n=7)  # a batch size no other test uses: the first call compiles
    compiled = backprop._value_and_grad_jit._cache_size()
    first = pb.grad(net, x, y, loss=LOSS, rule=pb.rules.feedback_alignment(jax.random.key(1), net))
    assert backprop._value_and_grad_jit._cache_size() == compiled + 1
    second = pb.grad(net, x, y, loss=LOSS, rule=pb.rules.feedback_alignment(jax.random.key(2), net))
    assert backprop._value_and_grad_jit._cache_size() == compiled + 1
    assert not np.array_equal(first.layers[0].w, second.layers[0].w)  # a different rule, the same program
    # backprop() is rule=None: the program backprop always had
    pb.grad(net, x, y, loss=LOSS)
    after_default = backprop._value_and_grad_jit._cache_size()
    pb.grad(net, x, y, loss=LOSS, rule=pb.rules.backprop())
    assert backprop._value_and_grad_jit._cache_size() == after_default
    # fit: the rule is a traced argument of the compiled epoch
    options = dict(loss=LOSS, epochs=1, batch_size=6, key=jax.random.key(0), verify=False)
    pb.fit(net, (x, y), rule=pb.rules.direct_feedback_alignment(jax.random.key(1), net), **options)
    epochs = training._run_epoch_jit._cache_size()
    pb.fit(net, (x, y), rule=pb.rules.direct_feedback_alignment(jax.random.key(2), net), **options)
    assert training._run_epoch_jit._cache_size() == epochs


def test_rules_are_pytrees_through_jit_and_scan():
    net, (x, y) = mlp(6), batch(6)
    for rule in every_rule(net).values():
        leaves, structure = jax.tree.flatten(rule)
        assert_trees_equal(jax.tree.unflatten(structure, leaves), rule)
        assert_trees_equal(jax.jit(lambda r: r)(rule), rule)
    rule = pb.rules.feedback_alignment(jax.random.key(1), net)
    step = pb.make_train_step(optax.sgd(0.2), loss=LOSS)
    state = optax.sgd(0.2).init(net)

    def body(carry, _):
        params, r = carry
        params, _, metrics = step(params, state, (x, y), None, rule=r)
        return (params, r), metrics["loss"]

    (scanned, carried_rule), losses = jax.jit(lambda n, r: jax.lax.scan(body, (n, r), length=3))(net, rule)
    assert_trees_equal(carried_rule, rule)
    python = net
    for _ in range(3):
        python, _, _ = jax.jit(lambda n, r: step(n, state, (x, y), None, rule=r))(python, rule)
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(python)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    assert float(losses[-1]) < float(losses[0])


def test_fit_refuses_to_resume_with_another_rule_and_logs_alignment(tmp_path):
    net, (x, y) = mlp(7), batch(7, n=24)
    rule = pb.rules.feedback_alignment(jax.random.key(1), net)
    path = tmp_path / "fa.ckpt"
    options = dict(loss=LOSS, batch_size=8, key=jax.random.key(0), verify=False, checkpoint=path)
    _, history = pb.fit(net, (x, y), epochs=2, rule=rule, log_alignment=True, **options)
    assert len(history["update_angles"]) == 2 and len(history["update_angles"][0]) == 3
    assert history["update_angles"][-1][-1] == 0.0 and np.isnan(history["feedback_angles"][-1][0])
    with pytest.raises(ValueError, match="rule kind: checkpoint 'feedback_alignment', now 'backprop'"):
        pb.fit(net, (x, y), epochs=3, resume=True, **options)
    with pytest.raises(ValueError, match="rule feedback_sha256"):
        pb.fit(net, (x, y), epochs=3, resume=True, rule=pb.rules.feedback_alignment(jax.random.key(2), net), **options)
    with pytest.raises(ValueError, match="now 'sign_symmetry'"):
        pb.fit(net, (x, y), epochs=3, resume=True, rule=pb.rules.sign_symmetry(), **options)
    resumed, _ = pb.fit(net, (x, y), epochs=3, resume=True, rule=rule, **options)
    straight, _ = pb.fit(net, (x, y), epochs=3, rule=rule, **{**options, "checkpoint": None})
    assert_trees_equal(resumed, straight)


def test_fit_verify_with_a_rule_checks_backprop_and_says_so():
    net, (x, y) = mlp(8), batch(8)
    messages = []
    pb.fit(net, (x, y), loss=LOSS, epochs=1, rule=pb.rules.sign_symmetry(), log=messages.append)
    assert any("the sign_symmetry rule's update is not a gradient and is not checked" in m for m in messages)


# ---------------------------------------------------------------- no autodiff


def _raise(*args, **kwargs):
    raise AssertionError("autodiff was called")


@pytest.mark.slow
def test_no_autodiff_in_the_rules(monkeypatch):
    """JAX's autodiff entry points and internals replaced by functions that raise: every rule still runs on a
    fresh architecture, its program has no custom_jvp/custom_vjp, and rules.py names no autodiff function."""
    for name in ("grad", "value_and_grad", "vjp", "jvp", "linearize", "jacfwd", "jacrev", "hessian"):
        monkeypatch.setattr(jax, name, _raise)
    for name in ("jvp", "jvp_jaxpr", "linearize", "linearize_jaxpr", "backward_pass"):
        monkeypatch.setattr(ad, name, _raise)
    # an architecture no other test uses, so every program here is traced with the patch live
    net = mlp(9, sizes=(11, 10, 9, 3), activations=("elu", "sigmoid", "identity"))
    x, y = batch(9, features=11)
    for kind, rule in every_rule(net).items():
        if kind == "backprop":
            continue  # tests/core/test_core_jit.py
        value, _ = pb.value_and_grad(net, x, y, loss=LOSS, rule=rule)
        assert np.isfinite(float(value))
        jaxpr = str(jax.make_jaxpr(lambda n, r: backprop.loss_and_grads(n, x, y, loss=LOSS, rule=r))(net, rule))
        for forbidden in ("custom_jvp_call", "custom_vjp_call", "custom_lin"):
            assert forbidden not in jaxpr
    with pytest.raises(AssertionError, match="autodiff was called"):  # the patch is live
        pb.check_gradients(net, x, y, loss=LOSS)
    forbidden = {"grad", "value_and_grad", "vjp", "jvp", "linearize", "jacfwd", "jacrev", "hessian", "custom_vjp",
                 "custom_jvp", "linear_transpose"}  # fmt: skip
    tree = ast.parse((ROOT / "purebp" / "extras" / "rules.py").read_text())
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}  # jax.grad, jax.vjp, ...
    used |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert not used & forbidden, used & forbidden
