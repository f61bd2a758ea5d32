"""Networks are immutable pytrees whose leaves are exactly the weights and biases."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import purebp as pb


def test_init_mlp_shapes_dtypes_and_static_activations():
    net = pb.init_mlp(jax.random.key(0), sizes=(64, 128, 10), activations=("relu", "identity"))
    assert net.layers[0].w.shape == (128, 64) and net.layers[0].b.shape == (128,)
    assert net.layers[1].w.shape == (10, 128) and net.layers[1].b.shape == (10,)
    assert net.activations == ("relu", "identity")
    assert net.sizes == (64, 128, 10) and net.dtype == np.float32
    leaves = jax.tree.leaves(net)
    assert len(leaves) == 4
    assert [leaf.shape for leaf in leaves] == [(128, 64), (128,), (10, 128), (10,)]
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    # activations live in the tree structure, not the leaves
    other = pb.init_mlp(jax.random.key(0), sizes=(64, 128, 10), activations=("tanh", "identity"))
    assert jax.tree.structure(net) != jax.tree.structure(other)


def test_init_is_deterministic_in_the_key_and_float64_works():
    a = pb.init_mlp(jax.random.key(3), (5, 7, 2), ("tanh", "identity"), dtype=jnp.float64)
    b = pb.init_mlp(jax.random.key(3), (5, 7, 2), ("tanh", "identity"), dtype=jnp.float64)
    c = pb.init_mlp(jax.random.key(4), (5, 7, 2), ("tanh", "identity"), dtype=jnp.float64)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
        assert x.dtype == jnp.float64
    assert not np.array_equal(a.layers[0].w, c.layers[0].w)


@pytest.mark.parametrize(
    "activation,expected_std",
    [("relu", np.sqrt(2 / 400)), ("gelu", np.sqrt(2 / 400)), ("tanh", np.sqrt(2 / 700)), ("sigmoid", np.sqrt(2 / 700))],
)
def test_he_for_rectifiers_glorot_otherwise(activation, expected_std):
    net = pb.init_mlp(jax.random.key(1), (400, 300, 2), (activation, "identity"))
    std = float(np.std(np.asarray(net.layers[0].w)))
    assert std == pytest.approx(expected_std, rel=0.02)  # 120000 draws: sampling error ~0.2%
    assert not np.any(np.asarray(net.layers[0].b))


def test_networks_are_immutable():
    net = pb.init_mlp(jax.random.key(0), (3, 2), ("identity",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        net.layers = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        net.layers[0].w = None


def test_optax_update_lines_up_leaf_for_leaf_and_leaves_input_untouched():
    net = pb.init_mlp(jax.random.key(0), (4, 5, 3), ("relu", "identity"))
    before = [np.array(leaf) for leaf in jax.tree.leaves(net)]
    x = jax.random.normal(jax.random.key(1), (8, 4), dtype=jnp.float32)
    y = jnp.arange(8) % 3
    optimizer = optax.adam(1e-2)
    state = optimizer.init(net)
    grads = pb.grad(net, x, y, loss="softmax_cross_entropy")
    with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes int32 counts with floats
        updates, state = optimizer.update(grads, state, net)
    new_net = optax.apply_updates(net, updates)
    assert isinstance(new_net, pb.Sequential) and new_net.activations == net.activations
    for old, leaf in zip(before, jax.tree.leaves(net)):
        np.testing.assert_array_equal(old, leaf)
    assert any(not np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves(new_net)))


def test_deprecated_network_and_layer_build_the_one_type():
    net = pb.init_mlp(jax.random.key(0), (3, 4, 2), ("tanh", "sigmoid"))
    assert isinstance(net, pb.Network) and isinstance(net.layers[0], pb.Layer)  # isinstance keeps answering
    with pytest.warns(DeprecationWarning, match="purebp.Layer is deprecated"):
        layers = [pb.Layer(w=layer.w, b=layer.b) for layer in net.layers]
    with pytest.warns(DeprecationWarning, match="purebp.Network is deprecated"):
        rebuilt = pb.Network(layers=layers, activations=net.activations)
    assert type(rebuilt) is pb.Sequential and rebuilt.activations == ("tanh", "sigmoid")
    assert jax.tree.structure(rebuilt) == jax.tree.structure(net)
    assert not isinstance(pb.init_network(jax.random.key(0), (3,), [pb.dense(2), pb.layer_norm()]), pb.Network)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="softmax is only allowed on the output"):
        pb.Network(layers=layers, activations=("softmax", "sigmoid"))


def test_repr_names_the_architecture():
    net = pb.init_mlp(jax.random.key(0), (3, 4, 2), ("tanh", "sigmoid"))
    assert repr(net) == "Sequential(input_shape=(3,), layers=[Dense(4, 'tanh'), Dense(2, 'sigmoid')])"
    # tree utilities may put non-arrays in the leaves: repr must not crash
    assert "Sequential" in repr(jax.tree.map(lambda _: None, net, is_leaf=lambda x: x is None))


def test_sequential_repr_survives_scalar_and_non_array_leaves():
    """Tree maps that turn the parameters into scalars or floats (a sum per leaf, a count) still print."""
    net = pb.init_network(jax.random.key(0), (3,), [pb.dense(4, "tanh"), pb.residual(pb.dense(4)), pb.layer_norm()])
    assert repr(net).startswith("Sequential(input_shape=(3,), layers=[Dense(4, 'tanh')")
    sums = jax.tree.map(lambda leaf: leaf.sum(), net)
    floats = jax.tree.map(lambda leaf: 1.5, net)
    for tree in (sums, floats, jax.tree.map(lambda _: None, net, is_leaf=lambda x: x is None)):
        text = repr(tree)
        assert text.startswith("Sequential(") and "Dense" in text and "LayerNorm" in text, text
