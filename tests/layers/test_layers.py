"""The layer engine: init_network, residual, layer norm, dropout, custom layers, check_layer, keys.

Tolerances: float64 hand-written vs jax.grad, relative 1e-10 per leaf (check_gradients' measure,
||h - g||_2 / ||g||_2 with its floor); bit-for-bit where the claim is identity.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import purebp as pb
from purebp import engine as backprop
from purebp.layers import example_keys, layer_keys
from purebp.network import is_mlp

F64 = jnp.float64


def _data(n=6, d=4, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, d)), dtype=F64)
    y = jnp.asarray(rng.integers(0, classes, n))
    return x, y


def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(la, lb))


def _resnet(key=0, dropout=0.3, dtype=F64):
    return pb.init_network(
        jax.random.key(key),
        (4,),
        [
            pb.dense(5, "tanh"),
            pb.residual(pb.dense(5, "relu"), pb.layer_norm()),
            pb.layer_norm(),
            pb.dropout(dropout),
            pb.dense(3),
        ],
        dtype=dtype,
    )


# ---------------------------------------------------------------- init_network and the MLP on the engine


def test_a_dense_stack_starts_where_init_mlp_starts_and_gets_the_same_gradient_bit_for_bit():
    mlp = pb.init_mlp(jax.random.key(7), (4, 6, 5, 3), ("relu", "tanh", "identity"), dtype=F64)
    stack = pb.init_network(jax.random.key(7), (4,), [pb.dense(6, "relu"), pb.dense(5, "tanh"), pb.dense(3)], dtype=F64)
    assert _same(mlp, stack)
    x, y = _data()
    loss_mlp, grads_mlp = pb.value_and_grad(mlp, x, y, loss="softmax_cross_entropy")
    loss_stack, grads_stack = pb.value_and_grad(stack, x, y, loss="softmax_cross_entropy")
    assert float(loss_mlp) == float(loss_stack)
    assert _same(grads_mlp, grads_stack)
    # one network type: the MLP's gradient is a Sequential of Dense, the MLP's own structure
    assert is_mlp(grads_mlp) and jax.tree.structure(grads_mlp) == jax.tree.structure(mlp)
    assert isinstance(grads_mlp, pb.Sequential) and isinstance(grads_stack, pb.Sequential)
    assert jax.tree.structure(grads_stack) == jax.tree.structure(stack)


def test_init_network_is_deterministic_in_the_key():
    assert _same(_resnet(3), _resnet(3))
    assert not _same(_resnet(3), _resnet(4))


@pytest.mark.parametrize(
    "layers,message",
    [
        ([pb.residual(pb.dense(7, "relu"))], r"maps per-example shape \(4,\) to \(7,\)"),
        ([pb.dense(3), "relu"], "expected a layer builder"),
        ([], "non-empty list"),
    ],
)
def test_init_network_errors_name_the_layer(layers, message):
    with pytest.raises((ValueError, TypeError), match=message):
        pb.init_network(jax.random.key(0), (4,), layers, dtype=F64)


def test_builder_arguments_are_checked():
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\)"):
        pb.dropout(1.0)
    with pytest.raises(ValueError, match="eps must be a positive"):
        pb.layer_norm(0.0)
    with pytest.raises(ValueError, match="n_out must be a positive int"):
        pb.dense(0)
    with pytest.raises(ValueError, match="unknown activation"):
        pb.dense(3, "swishy")
    with pytest.raises(ValueError, match="residual\\(\\) needs at least one layer"):
        pb.residual()


def test_a_dense_layer_after_a_rank_3_activation_says_to_flatten():
    with pytest.raises(ValueError, match="flatten it first"):
        pb.init_network(jax.random.key(0), (2, 5), [pb.layer_norm(), pb.dense(3)], dtype=F64)


def test_a_rank_3_activation_passes_through_residual_and_layer_norm_unchanged_in_shape():
    """(N, channels, length) through the engine: the protocol carries any rank."""
    net = pb.init_network(
        jax.random.key(0), (2, 5), [pb.layer_norm(), pb.residual(pb.layer_norm()), pb.dropout(0.5)], dtype=F64
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 5)), dtype=F64)
    out, caches = backprop.forward_pass(net, x, jax.random.key(1))
    assert out.shape == (3, 2, 5)
    g = jnp.ones_like(out)
    grads, _grad_outputs = backprop.backward_pass(net, caches, g)
    assert jax.tree.structure(grads) == jax.tree.structure(net)
    for layer in (net.layers[0], net.layers[1]):
        report = pb.check_layer(layer, x, key=jax.random.key(1))
        assert report.passed, str(report)


def test_x_of_the_wrong_per_example_shape_is_refused_before_compiling():
    net = _resnet()
    with pytest.raises(ValueError, match="expects 4"):
        pb.forward(net, jnp.zeros((2, 5), F64))
    with pytest.raises(ValueError, match="costs? takes? outputs of shape"):
        rank3 = pb.init_network(jax.random.key(0), (2, 5), [pb.layer_norm()], dtype=F64)
        pb.value_and_grad(rank3, jnp.zeros((3, 2, 5), F64), jnp.zeros((3, 5), F64), loss="mse")


def test_a_cost_that_needs_a_dense_output_layer_says_what_the_network_ends_in():
    net = pb.init_network(jax.random.key(0), (4,), [pb.dense(3), pb.layer_norm()], dtype=F64)
    x, y = _data()
    with pytest.raises(ValueError, match="ends in LayerNorm"):
        pb.value_and_grad(net, x, y, loss="cross_entropy")
    report = pb.check_gradients(net, x, y, loss="softmax_cross_entropy")  # logits: fine
    assert report.passed, str(report)


# ---------------------------------------------------------------- gradients of the new layers


@pytest.mark.parametrize(
    ("loss", "reduction"),
    [
        ("softmax_cross_entropy", "mean"),
        ("mse", "sum"),
        pytest.param("softmax_cross_entropy", "sum", marks=pytest.mark.slow),
        pytest.param("mse", "mean", marks=pytest.mark.slow),
    ],
)
def test_residual_layer_norm_dropout_match_autodiff_in_float64(loss, reduction):
    net = _resnet()
    x, labels = _data()
    y = labels if loss == "softmax_cross_entropy" else jax.nn.one_hot(labels, 3, dtype=F64)
    for key in (None, jax.random.key(5)):
        report = pb.check_gradients(net, x, y, loss=loss, reduction=reduction, key=key)
        assert report.passed and report.max_relative_error <= 1e-10, str(report)


def test_a_wrong_layer_norm_backward_is_caught():
    """The check can fail: a layer norm whose backward forgets the mean term is refused, piece named."""

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class NoMeanLayerNorm(pb.LayerNorm):
        def backward(self, cache, grad_out):
            grad_xhat = grad_out * self.scale[None, :]
            xhat = cache.normalized
            grad_in = cache.inverse_std * (grad_xhat - xhat * jnp.mean(grad_xhat * xhat, axis=-1, keepdims=True))
            return grad_in, NoMeanLayerNorm(jnp.sum(grad_out * xhat, axis=0), jnp.sum(grad_out, axis=0), self.eps)

    good = pb.LayerNorm(jnp.linspace(0.5, 2.0, 4, dtype=F64), jnp.zeros(4, F64))
    bad = NoMeanLayerNorm(good.scale, good.offset)
    x, y = _data()
    assert pb.check_layer(good, x).passed
    report = pb.check_layer(bad, x)
    assert not report.passed and report.failing == ("the input gradient dC/da",), str(report)
    net = pb.init_network(jax.random.key(0), (4,), [pb.dense(4, "tanh"), bad, pb.dense(3)], dtype=F64)
    assert not pb.check_gradients(net, x, y, loss="softmax_cross_entropy").passed


# ---------------------------------------------------------------- dropout and keys


def test_dropout_masks_come_from_the_key_bit_for_bit_and_no_key_is_inference():
    net = _resnet(dropout=0.5)
    x, y = _data()
    k = jax.random.key(11)
    assert _same(pb.grad(net, x, y, loss="softmax_cross_entropy", key=k),
                 pb.grad(net, x, y, loss="softmax_cross_entropy", key=k))  # fmt: skip
    assert not _same(pb.grad(net, x, y, loss="softmax_cross_entropy", key=k),
                     pb.grad(net, x, y, loss="softmax_cross_entropy", key=jax.random.key(12)))  # fmt: skip
    # forward(key=k) is the output value_and_grad(key=k) differentiates
    trace = pb.backprop_trace(net, x, y, loss="softmax_cross_entropy", key=k)
    assert np.array_equal(pb.forward(net, x, key=k), trace.activations[-1])
    # no key: the dropout layer is the identity
    no_dropout = pb.Sequential(tuple(layer for layer in net.layers if not isinstance(layer, pb.Dropout)), (4,))
    assert np.array_equal(pb.forward(net, x), pb.forward(no_dropout, x))
    mask_layer = trace.activations[3] / trace.inputs[3]
    kept = np.asarray(mask_layer[np.asarray(trace.inputs[3]) != 0])
    assert set(np.round(kept, 12)) <= {0.0, 2.0}  # inverted: kept units are scaled by 1 / (1 - 0.5)


@pytest.mark.slow
def test_a_batch_in_shards_draws_the_masks_of_the_whole_batch():
    """What fit(mesh=) relies on: shard s, starting at example offset, draws the masks the whole batch draws."""
    net = _resnet(dropout=0.5)
    x, y = _data(n=8)
    k = jax.random.key(2)
    whole_loss, whole = backprop.loss_and_grads(net, x, y, loss="softmax_cross_entropy", reduction="sum", key=k)
    parts = [
        backprop.loss_and_grads(
            net, x[i : i + 4], y[i : i + 4], loss="softmax_cross_entropy", reduction="sum", key=k, example_offset=i
        )
        for i in (0, 4)
    ]
    np.testing.assert_allclose(float(parts[0][0] + parts[1][0]), float(whole_loss), rtol=1e-13)
    for a, b, c in zip(jax.tree.leaves(parts[0][1]), jax.tree.leaves(parts[1][1]), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a + b, c, rtol=1e-12, atol=1e-15)


def test_per_example_and_per_layer_keys_are_fold_ins():
    k = jax.random.key(3)
    keys = example_keys(k, 4, offset=2)
    assert np.array_equal(jax.random.key_data(keys[1]), jax.random.key_data(jax.random.fold_in(k, 3)))
    assert np.array_equal(
        jax.random.key_data(layer_keys(keys, 5)[0]), jax.random.key_data(jax.random.fold_in(keys[0], 5))
    )


def test_a_bad_key_is_refused():
    net = _resnet()
    x, y = _data()
    message = r"key must be one JAX random key \(shape \(\)\), got a key array of shape \(2,\)"
    with pytest.raises(ValueError, match=message):
        pb.value_and_grad(net, x, y, loss="softmax_cross_entropy", key=jax.random.split(jax.random.key(0), 2))


# ---------------------------------------------------------------- per-example quantities


@pytest.mark.slow
def test_per_example_grads_norms_and_dp_on_a_residual_layer_norm_dropout_network():
    net = _resnet()
    x, y = _data()
    k = jax.random.key(4)
    per_example = pb.per_example_grads(net, x, y, loss="softmax_cross_entropy", key=k)
    summed = pb.grad(net, x, y, loss="softmax_cross_entropy", reduction="sum", key=k)
    for pe, g in zip(jax.tree.leaves(per_example), jax.tree.leaves(summed)):
        np.testing.assert_allclose(np.sum(pe, axis=0), g, rtol=1e-12, atol=1e-15)
    # example 2's gradient alone, from the engine on that example (its keys: offset 2)
    _, one = backprop.loss_and_grads(
        net, x[2:3], y[2:3], loss="softmax_cross_entropy", reduction="sum", key=k, example_offset=2
    )
    for pe, g in zip(jax.tree.leaves(per_example), jax.tree.leaves(one)):
        np.testing.assert_allclose(pe[2], g, rtol=1e-12, atol=1e-15)
    norms, per_leaf = pb.per_example_grad_norms(net, x, y, loss="softmax_cross_entropy", key=k, per_layer=True)
    direct = np.sqrt(sum(np.sum(np.reshape(pe, (6, -1)) ** 2, axis=1) for pe in jax.tree.leaves(per_example)))
    np.testing.assert_allclose(norms, direct, rtol=1e-12)
    assert jax.tree.structure(per_leaf) == jax.tree.structure(net)
    _, dp, _ = pb.dp_value_and_grad(
        net, x, y, jax.random.key(9), loss="softmax_cross_entropy", l2_norm_clip=1e9, noise_multiplier=0.0,
        dropout_key=k,
    )  # fmt: skip
    for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(summed)):
        np.testing.assert_allclose(a, b / 6, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- your own layer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scale:
    s: jax.Array

    def forward(self, a, key=None):
        return a * self.s[None, :], a

    def backward(self, a, grad_out):
        return grad_out * self.s[None, :], Scale(jnp.sum(grad_out * a, axis=0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaleWrongParameter(Scale):
    def backward(self, a, grad_out):
        return grad_out * self.s[None, :], ScaleWrongParameter(jnp.sum(grad_out, axis=0))


def test_check_layer_passes_a_right_layer_and_names_the_wrong_parameter():
    x, _ = _data(d=3)
    s = jnp.asarray([0.5, -1.0, 2.0], dtype=F64)
    assert pb.check_layer(Scale(s), x).passed
    report = pb.check_layer(ScaleWrongParameter(s), x)
    assert report.failing == ("parameter 's'",), str(report)
    assert "FAIL, wrong: parameter 's'" in str(report)


def test_check_layer_refuses_a_backward_of_the_wrong_structure():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class ReturnsArray(Scale):
        def backward(self, a, grad_out):
            return grad_out * self.s[None, :], jnp.sum(grad_out * a, axis=0)

    x, _ = _data(d=3)
    with pytest.raises(TypeError, match="return a layer of the same type"):
        pb.check_layer(ReturnsArray(jnp.ones(3, F64)), x)


def test_a_custom_layer_trains_and_a_wrong_one_is_refused_by_fit_with_its_report():
    x, y = _data(d=3, n=8)
    good = pb.init_network(jax.random.key(0), (3,), [pb.dense(3, "tanh"), Scale(jnp.ones(3, F64)), pb.dense(3)],
                           dtype=F64)  # fmt: skip
    _trained, history = pb.fit(good, (x, y), loss="softmax_cross_entropy", epochs=5, learning_rate=0.5)
    assert history["train_loss"][-1] < history["train_loss"][0]
    bad = pb.Sequential((good.layers[0], ScaleWrongParameter(jnp.ones(3, F64)), good.layers[2]), (3,))
    with pytest.raises(pb.GradientMismatchError, match="FAIL, wrong: parameter 's'") as error:
        pb.fit(bad, (x, y), loss="softmax_cross_entropy", epochs=1)
    assert [report.failing for report in error.value.layer_reports] == [("parameter 's'",)]


# ---------------------------------------------------------------- fit with dropout


@pytest.mark.slow
def test_fit_needs_a_key_for_dropout_and_is_reproducible_with_one():
    net = _resnet()
    x, y = _data(n=12)
    with pytest.raises(ValueError, match="dropout, whose masks are drawn from a key"):
        pb.fit(net, (x, y), loss="softmax_cross_entropy", epochs=1)
    run = dict(loss="softmax_cross_entropy", optimizer=optax.adam(1e-2), epochs=4, batch_size=4, key=jax.random.key(1))
    a, history_a = pb.fit(net, (x, y), **run)
    b, history_b = pb.fit(net, (x, y), **run)
    assert _same(a, b) and history_a["train_loss"] == history_b["train_loss"]
    no_dropout = pb.Sequential(tuple(layer for layer in net.layers if not isinstance(layer, pb.Dropout)), (4,))
    c, _ = pb.fit(no_dropout, (x, y), **run)
    assert not _same(a, c)  # the masks were on


@pytest.mark.slow
def test_a_dropout_run_cut_mid_epoch_resumes_bit_for_bit(tmp_path):
    net = _resnet()
    x, y = _data(n=12)
    run = dict(loss="softmax_cross_entropy", optimizer=optax.sgd(0.1), batch_size=4, key=jax.random.key(1))
    whole, _ = pb.fit(net, (x, y), steps=7, **run)
    path = tmp_path / "ck.npz"
    pb.fit(net, (x, y), steps=4, checkpoint=path, **run)  # cut in epoch 1 (3 steps per epoch)
    resumed, _ = pb.fit(net, (x, y), steps=7, checkpoint=path, resume=True, **run)
    assert _same(whole, resumed)


@pytest.mark.slow
def test_resuming_with_a_changed_layer_is_refused_naming_it_and_a_custom_layer_resumes(tmp_path):
    x, y = _data(n=12)
    run = dict(loss="softmax_cross_entropy", optimizer=optax.sgd(0.1), batch_size=4, key=jax.random.key(1))
    path = tmp_path / "ck.npz"
    pb.fit(_resnet(dropout=0.3), (x, y), steps=3, checkpoint=path, **run)
    with pytest.raises((ValueError, pb.CheckpointError), match="rate"):
        pb.fit(_resnet(dropout=0.2), (x, y), steps=6, checkpoint=path, resume=True, **run)
    custom = pb.init_network(jax.random.key(0), (4,), [pb.dense(3, "tanh"), Scale(jnp.ones(3, F64)), pb.dense(3)],
                             dtype=F64)  # fmt: skip
    whole, _ = pb.fit(custom, (x, y), steps=6, **run)
    other = tmp_path / "custom.npz"
    pb.fit(custom, (x, y), steps=2, checkpoint=other, **run)
    resumed, _ = pb.fit(custom, (x, y), steps=6, checkpoint=other, resume=True, **run)
    assert _same(whole, resumed)
