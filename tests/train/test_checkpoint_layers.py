"""Checkpoints of any network: Sequential stacks of built-in and custom layers, templates, the old MLP format."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import purebp as pb
from purebp.network import dense_stack, is_mlp
from purebp.train.checkpoint import FORMAT_MLP, FORMAT_SEQUENTIAL, CheckpointError, describe_network

ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity", "gelu", "elu")


def _assert_identical(a, b):
    """Same tree structure (static fields included), every leaf equal bit for bit with the same shape and dtype."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for i, (x, y) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, f"leaf {i}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        assert x.tobytes() == y.tobytes(), f"leaf {i} differs"


def _perturbed(net, seed):
    """Every parameter replaced by seeded random values in its own dtype (layer norm starts at exactly 1 and 0).

    Drawn with NumPy, so no JAX kernel is compiled per shape.
    """
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(net)
    moved = [jnp.asarray(rng.normal(size=leaf.shape).astype(leaf.dtype)) for leaf in leaves]
    return jax.tree.unflatten(treedef, moved)


def _mlp(sizes, activations, dtype="float64", seed=0):
    """An MLP (a Sequential of Dense, as init_mlp makes) with seeded random parameters drawn by NumPy (init_mlp
    would compile one program per architecture)."""
    rng = np.random.default_rng(seed)
    weights, biases = [], []
    for n_in, n_out in itertools.pairwise(sizes):
        weights.append(jnp.asarray(rng.normal(size=(n_out, n_in)).astype(dtype)))
        biases.append(jnp.asarray(rng.normal(size=n_out).astype(dtype)))
    return dense_stack(weights, biases, tuple(activations))


def _write_mlp_format(path, net, opt_state=None, step=0, metadata=None):
    """Write ``net`` (an MLP) in the MLP layout of earlier versions, purebp-checkpoint-1, field by field."""
    arrays = {}
    for l, layer in enumerate(net.layers):
        arrays[f"net/{l}/w"], arrays[f"net/{l}/b"] = np.asarray(layer.w), np.asarray(layer.b)
    opt_leaves, opt_treedef = jax.tree.flatten(opt_state)
    for i, leaf in enumerate(opt_leaves):
        arrays[f"opt/{i}"] = np.asarray(leaf)
    meta = {
        "format": FORMAT_MLP,
        "purebp_version": "0.1.0",
        "sizes": [int(net.layers[0].w.shape[1])] + [int(layer.w.shape[0]) for layer in net.layers],
        "activations": [layer.activation for layer in net.layers],
        "dtype": str(np.asarray(net.layers[0].w).dtype),
        "step": step,
        "key_impl": None,
        "opt_treedef": str(opt_treedef).replace("Sequential", "Network"),  # an old file names the old type
        "opt_leaves": [[list(np.shape(leaf)), str(np.asarray(leaf).dtype)] for leaf in opt_leaves],
        "metadata": metadata or {},
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    with open(path, "wb") as file:
        np.savez(file, **arrays)


# --------------------------------------------------------------------------------------------------------------
# Random stacks of the built-in layers


@st.composite
def _body(draw, width, depth):
    """Shape-preserving layers for a residual body."""
    items = []
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["dense", "layer_norm", "dropout", "residual"] if depth < 2 else ["dense"]))
        if kind == "dense":
            items.append(pb.dense(width, draw(st.sampled_from(ACTIVATIONS))))
        elif kind == "layer_norm":
            items.append(pb.layer_norm(draw(st.sampled_from([1e-5, 1e-3, 0.5]))))
        elif kind == "dropout":
            items.append(pb.dropout(draw(st.sampled_from([0.0, 0.1, 0.5]))))
        else:
            items.append(pb.residual(*draw(_body(width, depth + 1))))
    return items


@st.composite
def stacks(draw):
    """(input width, layer builders, dtype, seed): 1-5 layers of every built-in kind, residuals nested."""
    n_in = draw(st.integers(1, 5))
    width, items = n_in, []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["dense", "residual", "layer_norm", "dropout"]))
        if kind == "dense":
            width = draw(st.integers(1, 6))
            items.append(pb.dense(width, draw(st.sampled_from(ACTIVATIONS))))
        elif kind == "residual":
            items.append(pb.residual(*draw(_body(width, 0))))
        elif kind == "layer_norm":
            items.append(pb.layer_norm(draw(st.sampled_from([1e-5, 1e-2]))))
        else:
            items.append(pb.dropout(draw(st.sampled_from([0.0, 0.25]))))
    return n_in, items, draw(st.sampled_from(["float32", "float64"])), draw(st.integers(0, 2**16))


@pytest.mark.slow
@settings(max_examples=12)
@given(stacks())
def test_random_sequential_round_trip_is_bit_identical(tmp_path_factory, case):
    n_in, items, dtype, seed = case
    net = _perturbed(pb.init_network(jax.random.key(seed), (n_in,), items, dtype=dtype), seed + 1)
    optimizer = optax.adam(1e-2)
    opt_state = jax.tree.map(lambda leaf: leaf + 1, optimizer.init(net))  # non-zero moments and count
    key = jax.random.fold_in(jax.random.key(seed), 3)
    path = tmp_path_factory.mktemp("ckpt") / "stack.ckpt"
    pb.save_checkpoint(path, net, opt_state, step=seed, key=key, metadata={"seed": seed})

    restored = pb.load_checkpoint(path, opt_state_template=optimizer.init(net))  # from the file alone
    _assert_identical(restored.net, net)
    assert isinstance(restored.net, pb.Sequential) and restored.net.input_shape == (n_in,)
    assert restored.net.layers == tuple(restored.net.layers)  # a tuple, as init_network makes
    assert describe_network(restored.net) == describe_network(net)
    _assert_identical(restored.opt_state, opt_state)
    assert restored.step == seed and restored.metadata == {"seed": seed}
    assert np.array_equal(jax.random.key_data(restored.key), jax.random.key_data(key))
    # with a template (the freshly initialised network) the same network comes back
    fresh = pb.init_network(jax.random.key(seed), (n_in,), items, dtype=dtype)
    _assert_identical(pb.load_checkpoint(path, net_template=fresh).net, net)


@settings(max_examples=20)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    data=st.data(),
    dtype=st.sampled_from(["float32", "float64"]),
    seed=st.integers(0, 2**16),
)
def test_random_mlp_round_trip_is_bit_identical_in_the_one_layout_and_from_the_old_one(
    tmp_path_factory, sizes, data, dtype, seed
):
    activations = tuple(data.draw(st.sampled_from(ACTIVATIONS)) for _ in sizes[1:])
    net = _mlp(sizes, activations, dtype, seed)
    folder = tmp_path_factory.mktemp("ckpt")
    path, old = folder / "mlp.ckpt", folder / "old.ckpt"
    pb.save_checkpoint(path, net, step=4)
    _write_mlp_format(old, net, step=4)  # the MLP layout earlier versions wrote
    for written in (path, old):
        restored = pb.load_checkpoint(written)
        _assert_identical(restored.net, net)
        assert is_mlp(restored.net) and restored.net.activations == activations and restored.step == 4
        _assert_identical(pb.load_checkpoint(written, net_template=net).net, net)
    with np.load(path) as archive:  # one layout is written, for MLPs too
        meta = json.loads(archive["meta"].tobytes())
        assert meta["format"] == FORMAT_SEQUENTIAL == "purebp-checkpoint-2"
        assert sorted(archive.files) == sorted(["meta"] + [f"params/{i}" for i in range(2 * len(activations))])
        described = meta["network"]
        assert described["input_shape"] == [sizes[0]] and described["dtype"] == dtype
        assert [(layer["kind"], layer["n_out"], layer["activation"]) for layer in described["layers"]] == [
            ("dense", n_out, name) for n_out, name in zip(sizes[1:], activations)
        ]
    with np.load(old) as archive:
        assert json.loads(archive["meta"].tobytes())["format"] == FORMAT_MLP == "purebp-checkpoint-1"


def _example_stack(dtype="float64", eps=1e-5, width=6, activation="relu", rate=0.25):
    items = [
        pb.dense(width, activation),
        pb.residual(pb.dense(width, "tanh"), pb.layer_norm(eps)),
        pb.dropout(rate),
        pb.dense(3, "identity"),
    ]
    return pb.init_network(jax.random.key(0), (4,), items, dtype=dtype)


def test_the_sequential_layout_names_every_parameter_and_describes_the_architecture(tmp_path):
    net = _perturbed(_example_stack(), 1)
    path = tmp_path / "stack.ckpt"
    pb.save_checkpoint(path, net)
    with np.load(path) as archive:
        meta = json.loads(archive["meta"].tobytes())
        params = [archive[f"params/{i}"] for i in range(len(meta["param_paths"]))]
    assert meta["format"] == FORMAT_SEQUENTIAL
    assert meta["param_paths"] == [
        ".layers[0].w", ".layers[0].b",
        ".layers[1].layers[0].w", ".layers[1].layers[0].b", ".layers[1].layers[1].scale", ".layers[1].layers[1].offset",
        ".layers[3].w", ".layers[3].b",
    ]  # fmt: skip
    assert meta["network"] == {
        "kind": "sequential",
        "input_shape": [4],
        "dtype": "float64",
        "layers": [
            {"kind": "dense", "activation": "relu", "n_out": 6},
            {"kind": "residual", "layers": [
                {"kind": "dense", "activation": "tanh", "n_out": 6}, {"kind": "layer_norm", "eps": 1e-5}]},
            {"kind": "dropout", "rate": 0.25},
            {"kind": "dense", "activation": "identity", "n_out": 3},
        ],
    }  # fmt: skip
    assert meta["treedef"] == str(jax.tree.structure(net))
    assert meta["param_leaves"][2] == [[6, 6], "float64"]
    for stored, leaf in zip(params, jax.tree.leaves(net), strict=True):
        assert np.array_equal(stored, np.asarray(leaf))
    assert json.loads(json.dumps(describe_network(net))) == describe_network(net)  # JSON values only


def test_a_loaded_stack_computes_what_the_saved_one_did(tmp_path):
    # static fields (activations, eps, rate) come back too: same outputs, same dropout masks, bit for bit
    net = _perturbed(_example_stack(eps=0.3, rate=0.5), 2)
    path = tmp_path / "stack.ckpt"
    pb.save_checkpoint(path, net)
    loaded = pb.load_checkpoint(path).net
    x = jax.random.normal(jax.random.key(3), (8, 4), dtype=jnp.float64)
    y = jax.random.randint(jax.random.key(4), (8,), 0, 3)
    for key in (None, jax.random.key(5)):
        assert np.array_equal(pb.forward(loaded, x, key=key), pb.forward(net, x, key=key))
    loss = "softmax_cross_entropy"
    _, expected = pb.value_and_grad(net, x, y, loss=loss, key=jax.random.key(6))
    _, got = pb.value_and_grad(loaded, x, y, loss=loss, key=jax.random.key(6))
    _assert_identical(got, expected)


# --------------------------------------------------------------------------------------------------------------
# A layer of the user's own


@dataclasses.dataclass(frozen=True)
class Scale:
    """out = a (.) exp(log_scale): a per-feature positive scale, written the way a user would."""

    log_scale: jax.Array
    label: str = "scale"

    def forward(self, a, key=None):
        out = a * jnp.exp(self.log_scale)[None, :]
        return out, (a, out)

    def backward(self, cache, grad_out):
        _, out = cache
        grad_in = grad_out * jnp.exp(self.log_scale)[None, :]
        return grad_in, Scale(jnp.sum(grad_out * out, axis=0), self.label)


jax.tree_util.register_dataclass(Scale, data_fields=["log_scale"], meta_fields=["label"])


def _custom_stack(width=5, label="scale", dtype="float64", nested=True):
    scale = Scale(jnp.full((width,), 0.1, dtype=dtype), label)
    body = (
        [pb.dense(width, "tanh"), Scale(jnp.zeros((width,), dtype=dtype), label)]
        if nested
        else [pb.dense(width, "tanh")]
    )
    items = [pb.dense(width, "relu"), scale, pb.residual(*body), pb.dense(2)]
    return pb.init_network(jax.random.key(1), (3,), items, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_custom_layer_round_trips_with_a_template_and_is_refused_without(tmp_path, dtype):
    fresh = _custom_stack(dtype=dtype)
    trained = _perturbed(fresh, 7)
    optimizer = optax.sgd(0.1, momentum=0.9)
    opt_state = jax.tree.map(lambda leaf: leaf + 0.5, optimizer.init(trained))
    path = tmp_path / "custom.ckpt"
    pb.save_checkpoint(path, trained, opt_state, step=9)
    with pytest.raises(CheckpointError, match=r"layers\[1\] is a .*Scale, not a built-in layer.*pass net_template="):
        pb.load_checkpoint(path)
    restored = pb.load_checkpoint(path, net_template=fresh, opt_state_template=optimizer.init(fresh))
    _assert_identical(restored.net, trained)
    _assert_identical(restored.opt_state, opt_state)
    assert type(restored.net.layers[1]) is Scale and restored.net.layers[1].label == "scale"
    assert type(restored.net.layers[2].layers[1]) is Scale
    x = jax.random.normal(jax.random.key(2), (4, 3), dtype=dtype)
    assert np.array_equal(pb.forward(restored.net, x), pb.forward(trained, x))


def test_a_custom_layer_inside_a_residual_is_named_by_its_path(tmp_path):
    net = pb.init_network(jax.random.key(0), (3,), [pb.residual(pb.dense(3), Scale(jnp.zeros((3,))))], dtype="float64")
    path = tmp_path / "nested.ckpt"
    pb.save_checkpoint(path, net)
    with pytest.raises(CheckpointError, match=r"layers\[0\]\.layers\[1\] is a .*Scale.*net_template"):
        pb.load_checkpoint(path)
    _assert_identical(pb.load_checkpoint(path, net_template=net).net, net)


def test_custom_layers_are_described_by_type_structure_and_shapes():
    entry = describe_network(_custom_stack())["layers"][1]
    assert entry["kind"] == "custom" and entry["type"].endswith("test_checkpoint_layers.Scale")
    assert "scale" in entry["structure"] and entry["shapes"] == {".log_scale": [5]}


# --------------------------------------------------------------------------------------------------------------
# A template that does not match is refused, naming the first difference


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (lambda: _example_stack(width=7), r"layers\[0\]\.n_out: 6 in the checkpoint, 7 in net_template"),
        (lambda: _example_stack(activation="elu"), r"layers\[0\]\.activation: 'relu' in the checkpoint, 'elu' in"),
        (lambda: _example_stack(eps=1e-3), r"layers\[1\]\.layers\[1\]\.eps: 1e-05 in the checkpoint, 0\.001 in"),
        (lambda: _example_stack(rate=0.5), r"layers\[2\]\.rate: 0\.25 in the checkpoint, 0\.5 in net_template"),
        (lambda: _example_stack(dtype="float32"), r"dtype: 'float64' in the checkpoint, 'float32' in net_template"),
        (
            lambda: _mlp((4, 6, 3), ("relu", "identity"), "float64"),
            r"layers\[1\]\.kind: 'residual' in the checkpoint, 'dense' in net_template",
        ),
        (
            lambda: pb.init_network(jax.random.key(0), (4,), [pb.dense(6, "relu")], dtype="float64"),
            r"layers: 4 entries in the checkpoint, 1 in net_template",
        ),
        (
            lambda: pb.init_network(jax.random.key(0), (5,), [pb.dense(6, "relu")], dtype="float64"),
            r"input_shape\[0\]: 4 in the checkpoint, 5 in net_template",
        ),
    ],
)
def test_a_mismatched_template_is_refused_naming_the_difference(tmp_path, template, message):
    path = tmp_path / "stack.ckpt"
    pb.save_checkpoint(path, _example_stack())
    with pytest.raises(CheckpointError, match="does not match net_template: " + message):
        pb.load_checkpoint(path, net_template=template())


def test_a_mismatched_custom_template_is_refused_naming_the_difference(tmp_path):
    path = tmp_path / "custom.ckpt"
    pb.save_checkpoint(path, _custom_stack())
    with pytest.raises(CheckpointError, match=r"layers\[1\]\.structure: .*'scale'.* in the checkpoint, .*'gain'"):
        pb.load_checkpoint(path, net_template=_custom_stack(label="gain"))
    with pytest.raises(CheckpointError, match=r"layers\[0\]\.n_out: 5 in the checkpoint, 4 in net_template"):
        pb.load_checkpoint(path, net_template=_custom_stack(width=4))
    with pytest.raises(CheckpointError, match=r"layers\[2\]\.layers: 2 entries in the checkpoint, 1 in"):
        pb.load_checkpoint(path, net_template=_custom_stack(nested=False))
    built_in = pb.init_network(jax.random.key(1), (3,), [pb.dense(5, "relu"), pb.dense(5)], dtype="float64")
    with pytest.raises(CheckpointError, match=r"layers\[1\]\.kind: 'custom' in the checkpoint, 'dense' in"):
        pb.load_checkpoint(path, net_template=built_in)


def test_a_mismatched_mlp_template_is_refused_naming_the_difference(tmp_path):
    net = _mlp((5, 7, 3), ("tanh", "identity"), "float64")
    path = tmp_path / "mlp.ckpt"
    pb.save_checkpoint(path, net)
    cases = [
        (_mlp((5, 8, 3), ("tanh", "identity"), "float64"), r"layers\[0\]\.n_out: 7 in the checkpoint, 8 in"),
        (_mlp((5, 7, 3), ("relu", "identity"), "float64"), r"layers\[0\]\.activation: 'tanh' in the checkpoint"),
        (
            pb.init_network(jax.random.key(0), (5,), [pb.dense(7, "tanh"), pb.dense(3)], dtype="float32"),
            "dtype: 'float64' in the checkpoint, 'float32' in net_template",
        ),
    ]
    for template, message in cases:
        with pytest.raises(CheckpointError, match="does not match net_template: " + message):
            pb.load_checkpoint(path, net_template=template)
    # an MLP is a Sequential: init_network's stack of the same dense layers is the same network
    same = pb.init_network(jax.random.key(0), (5,), [pb.dense(7, "tanh"), pb.dense(3)], dtype="float64")
    _assert_identical(pb.load_checkpoint(path, net_template=same).net, net)
    with pytest.raises(TypeError, match="expected a purebp.Sequential, got dict"):
        pb.load_checkpoint(path, net_template={"w": net.layers[0].w})


# --------------------------------------------------------------------------------------------------------------
# Files written by the MLP-only checkpoint code (commit e81ed9f) still load

# The exact bytes that purebp.save_checkpoint wrote at commit e81ed9f (zlib-compressed, base64), for
#   save_checkpoint(path, _old_network("float64"), {"count": jnp.asarray(3, jnp.int32),
#                   "trace": jax.tree.map(lambda a: a / 2.0, _old_network("float64"))},
#                   step=17, key=jax.random.fold_in(jax.random.key(7), 3),
#                   metadata={"config": {"lr": 0.01}, "history": {"loss": [1.5, 0.25]}})
#   save_checkpoint(path, _old_network("bfloat16"), step=2)
OLD_FLOAT64 = (
    "eNrVVk1oU1kUvumf/XEhKONmhBiEJJLGvDR1pBbeQhGkWrLQhYRSnsl9zaPJe4+XmzrPGFHsorqx2K1IF65ciQtFNy3+gOJCcRgR"
    "OogUZmahCzfD4Gxmzsm7N+m9lSJtcfSR9uae+333ne/ck3NPdqS9o58Ez25y/8frPf/yp4/sIDZl+1L7ziRt1w+RbeQdB4pxbvTk"
    "8eypEJkitWiBVvJedCgcHTYPRBPhqOl4zDPscccrULQfMUoVCvZK0XApzGOZRHggngjXw+t+eu+Vl+6Wl/5YuLbnKHyWF3AGHz5/"
    "xceHC9xdwuc6X9c5ns+Xdb4ft7/Xs1Jwfnhz8c/VwTktgjPPgfObE5yNhQaCI0SfbDy/6sH4ux5YPyribke6r6jitNbJL3Lg4maI"
    "SyfCmf/55GXxV9nNzGrxzZOd5cDZzRG/6Scri8k9+OWgENMDYhwX0lRImeaw6TWlWJkvkrJRISClHXyQ3V9+8eiZ6r72bReg1820"
    "C9LweTP9gvGOkoZ3dJGOHN9MS75fszDJoZnYsf29Gpr091F+nugiWfkBKtLyt172qtIGvu3is/5Tl6W/Nc3zqvTM91F6nihSdg7/"
    "VRJStoKUSeqPFwxmCDUzHDmzpppq5mupyczVtnW8/s2QVXx4O/pJqOgGFWXaUnC5LUCJ8bMKzlW1L1IwmNY2qKG3FoG3lA0WGQpH"
    "3KpHT7v9+SLNT7qOZbN+LZIQ5vEp6lUsx0ZgKqklU7hUsc7SClhyA/CjSITTY2Az8syaMhhAGysRZthFxFoFajOL+REEFZjvUtzK"
    "LDkG259pbMaoCybtJ/iOB2+V3RJCWNGj1PT89M8DacRBfo8zMBWoictZ/wRMDlMzVovmnarNIDJ7IUoQujxG6VC1wpzyqFOgsVHK"
    "zjjeZC4Wi6JXGGPhVTSeiINjudgK+DHDp14u1rDDjnvHINZrLsfH4vW4cLFEjakgOLkcSoZ4gv8IzuHFgSYhPjCusmClWW2ULDjB"
    "9MIfCbyqFsk7tmlNNL6WPBhSyZRWB1DRAr89P1hwKg2/tORgAgDpwbF6vZ4dCbX1t8ud/Dt+U/aR1nMhhP9X9PUqEbvceX6PyMRd"
    "IbKy51WJ2EEu8iotE//hRO3zb8Tua5bXOJn4dxtZ2YupROx0pnkz0yMRH0Nf0ex7VBp2GCI0Mu1SB2n1GyoNb18RGJl2o5O07mKV"
    "hjebCItM87tI655TaXgriKDINLaFtO4IlYYVeIZX2K0STe8mUj1WmVj1sKrhX7fE7IT3ixqYHensIo1z6iMTgHzaOLD/ABavjNA="
)
OLD_BFLOAT16 = (
    "eNqtVL9v00AUPjctKu2CIiSkTsaLU+GkcdJSqULOAIIhovIASChC0SV+IVYc+2RfgtwQqUOGjFFZqv4L/AlIqcTOBgtdmNkRI9wl"
    "5zR2OyDqs6zTe/6+u/f5/TCrmdU8mq/7qHb77OiPWJvoLnKB7hR33hVcEkroDjoVwGj/cPjyuflaQn00UC0Imr56IKuPXpVUTVZb"
    "nk997NY93wLuf4qdAJg/aGMCzM7tanJ5W5OH8n+vjf3z7PnF9GSanSKUNU6MCyNb2a/UKmZM1LPfxLgqqhGJGgvgOB1RN5PERCH0"
    "0XhQOU6IKP58nEmK0C8zMxHASRoiSpq8m3Jm4mJ+fL+3dVXMIiMjARylIyaVjMQF/Pr0+WskYJ0J6ALFUfQdaY6K9mujf9/T/y36"
    "8t4N498YKOyWLqbKgayQng8Nkm+2odkhnu3SvK5okbveBz+wPZcDiwW9UOSfAvsIAuaplVlRaHLpDfPhJrX7mDLo7ItCsdvmWNsC"
    "l9o0VDjIoiEBflSj5XiY6g9np1EgzMcKTOlAWLe7xGGm23Mc5vEIrVMfwIIW55nhC2Y8gVbu0HNhWxEIB3B/HhG/hf94C1PM7MFw"
    "aFallXwmPs5OxbzaRJfreJaapeGWJPKRMRYzIU78tiA2riPyNp2IPowTzyS03LRJIm+Jkaj5OPHtClpukCSRlyIvNf6ux4i5DFoU"
    "plldu8W9a+zZYsgvq9z6C1aIYhQ="
)


def _old_network(dtype):
    layers = []
    for n_in, n_out in ((3, 4), (4, 2)):
        w = (np.arange(n_out * n_in, dtype=np.float64).reshape(n_out, n_in) - 5.0) / 7.0
        b = np.arange(n_out, dtype=np.float64) / 3.0
        layers.append((jnp.asarray(w, dtype=dtype), jnp.asarray(b, dtype=dtype)))
    return dense_stack([w for w, _ in layers], [b for _, b in layers], ("tanh", "identity"))


def _write_old(tmp_path, packed):
    path = tmp_path / "old.ckpt"
    path.write_bytes(zlib.decompress(base64.b64decode(packed)))
    return path


def test_an_old_format_mlp_checkpoint_still_loads(tmp_path):
    path = _write_old(tmp_path, OLD_FLOAT64)
    expected = _old_network("float64")
    template = {"count": jnp.zeros((), jnp.int32), "trace": expected}
    restored = pb.load_checkpoint(path, opt_state_template=template)
    _assert_identical(restored.net, expected)
    _assert_identical(
        restored.opt_state, {"count": jnp.asarray(3, jnp.int32), "trace": jax.tree.map(lambda a: a / 2.0, expected)}
    )
    assert restored.step == 17
    assert restored.metadata == {"config": {"lr": 0.01}, "history": {"loss": [1.5, 0.25]}}
    assert np.array_equal(
        jax.random.key_data(restored.key), jax.random.key_data(jax.random.fold_in(jax.random.key(7), 3))
    )
    _assert_identical(pb.load_checkpoint(path, net_template=expected).net, expected)
    other = _mlp((3, 5, 2), ("tanh", "identity"), "float64")
    with pytest.raises(CheckpointError, match=r"layers\[0\]\.n_out: 4 in the checkpoint, 5 in net_template"):
        pb.load_checkpoint(path, net_template=other)
    # its stored optimizer structure names the old Network type: the template is matched leaf by leaf
    with pytest.raises(CheckpointError, match="its optimizer state has 5 leaves but the optimizer given has 1"):
        pb.load_checkpoint(path, opt_state_template={"count": jnp.zeros((), jnp.int32)})
    with pytest.raises(CheckpointError, match=r"optimizer leaf 1 is float64\[4, 3\], expected float64\[5, 3\]"):
        pb.load_checkpoint(path, opt_state_template={"count": jnp.zeros((), jnp.int32), "trace": other})


def test_an_old_bfloat16_checkpoint_loads_now(tmp_path):
    # np.save stores bfloat16 as raw 2-byte voids (|V2); the MLP-only code refused its own file
    restored = pb.load_checkpoint(_write_old(tmp_path, OLD_BFLOAT16))
    _assert_identical(restored.net, _old_network("bfloat16"))
    assert restored.step == 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_networks_and_optimizer_states_round_trip(tmp_path, dtype):
    for net in (
        _perturbed(_example_stack(dtype=dtype), 3),
        _mlp((3, 4, 2), ("relu", "identity"), dtype),
    ):
        opt_state = optax.sgd(0.1, momentum=0.9).init(net)
        opt_state = jax.tree.map(lambda leaf: leaf + jnp.asarray(0.3, dtype=leaf.dtype), opt_state)
        path = tmp_path / "half.ckpt"
        pb.save_checkpoint(path, net, opt_state)
        restored = pb.load_checkpoint(path, opt_state_template=optax.sgd(0.1, momentum=0.9).init(net))
        _assert_identical(restored.net, net)
        _assert_identical(restored.opt_state, opt_state)


# --------------------------------------------------------------------------------------------------------------
# Bad files and bad networks


def _saved_stack(tmp_path):
    net = _perturbed(_example_stack(), 4)
    path = tmp_path / "stack.ckpt"
    pb.save_checkpoint(path, net, step=3)
    return path, net


def test_a_corrupted_or_truncated_sequential_checkpoint_is_reported(tmp_path):
    path, net = _saved_stack(tmp_path)
    data = path.read_bytes()
    layer_norm_scale = np.asarray(net.layers[1].layers[1].scale).tobytes()
    offset = data.find(layer_norm_scale[:16])
    assert offset > 0
    corrupted = bytearray(data)
    corrupted[offset + 5] ^= 0x10
    path.write_bytes(bytes(corrupted))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        pb.load_checkpoint(path)
    for length in (0, 10, len(data) // 2, len(data) - 30):
        path.write_bytes(data[:length])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            pb.load_checkpoint(path)


def _rewrite_meta(path, change):
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(arrays["meta"].tobytes())
    change(meta)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def test_a_layer_kind_this_version_does_not_know_is_reported(tmp_path):
    # e.g. a file written by a later purebp with more layer kinds
    path, _ = _saved_stack(tmp_path)
    _rewrite_meta(path, lambda meta: meta["network"]["layers"][2].update(kind="conv9d"))
    with pytest.raises(
        CheckpointError, match=r"layers\[2\] has layer kind 'conv9d', which this purebp .* net_template"
    ):
        pb.load_checkpoint(path)


def test_a_description_that_contradicts_the_arrays_is_reported(tmp_path):
    path, _ = _saved_stack(tmp_path)
    _rewrite_meta(path, lambda meta: meta["network"]["layers"][0].update(n_out=5))
    with pytest.raises(
        CheckpointError, match=r"inconsistent: layers\[0\]\.n_out: 5 in its description, 6 in its arrays"
    ):
        pb.load_checkpoint(path)
    path, _ = _saved_stack(tmp_path)
    _rewrite_meta(path, lambda meta: meta["network"]["layers"][1]["layers"].pop())
    with pytest.raises(
        CheckpointError, match=r"parameter 4 is .layers\[1\].layers\[1\].scale in the checkpoint, .layers\[3\].w"
    ):
        pb.load_checkpoint(path)
    path, _ = _saved_stack(tmp_path)
    _rewrite_meta(path, lambda meta: meta.pop("param_paths"))
    with pytest.raises(CheckpointError, match="incomplete metadata: no 'param_paths'"):
        pb.load_checkpoint(path)


def test_a_failed_write_leaves_the_previous_sequential_checkpoint_intact(tmp_path, monkeypatch):
    path, net = _saved_stack(tmp_path)
    before = path.read_bytes()

    def fail(*args):
        raise OSError("fsync failed (simulated)")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="fsync failed"):
        pb.save_checkpoint(path, _perturbed(net, 9), step=4)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["stack.ckpt"]
    _assert_identical(pb.load_checkpoint(path).net, net)


def test_networks_a_checkpoint_cannot_describe_are_refused_before_writing(tmp_path):
    net = _example_stack()
    norm = net.layers[1].layers[1]
    odd = dataclasses.replace(
        net,
        layers=(net.layers[0], pb.Residual((net.layers[1].layers[0], dataclasses.replace(norm, eps=np.float64(1e-5)))))
        + net.layers[2:],
    )
    with pytest.raises(
        TypeError,
        match=r"layers\[1\]\.layers\[1\]: eps is np\.float64\(1e-05\) \(float64\); a checkpoint needs a Python float",
    ):
        pb.save_checkpoint(tmp_path / "odd.ckpt", odd)
    as_list = dataclasses.replace(net, layers=list(net.layers))
    with pytest.raises(TypeError, match="layers is a list; a checkpoint needs a tuple of layers"):
        describe_network(as_list)
    with pytest.raises(TypeError, match="expected a purebp.Sequential, got dict"):
        pb.save_checkpoint(tmp_path / "dict.ckpt", {"w": jnp.zeros(3)})
    assert os.listdir(tmp_path) == []
