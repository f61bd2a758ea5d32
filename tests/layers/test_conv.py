"""conv1d, max_pool1d, avg_pool1d and flatten: hand-written rules against autodiff, the NumPy oracle and PyTorch.

Tolerances: float64 relative L2 error 1e-10 per leaf (``purebp.check``'s measure), float32 1e-5; the
forward against PyTorch in float64 to 1e-12 (max abs over max |value|).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import purebp as pb
from purebp import check
from purebp.layers import AvgPool1d, Conv1d, MaxPool1d
from purebp.layers.conv import use_gram_form
from purebp.testing import StackSpec, assert_case_matches, make_stack_case, random_stack_spec, stack_specs

ROOT = Path(__file__).resolve().parents[2]
RNG_SEED = 20261201


def _array(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape))


def mnist1d_cnn(dtype="float64", seed=0):
    return pb.init_network(
        jax.random.key(seed),
        (1, 40),
        [
            pb.conv1d(25, 5, stride=2, padding=1, activation="relu"),
            pb.conv1d(25, 3, stride=2, padding=1, activation="relu"),
            pb.conv1d(25, 3, stride=2, padding=1, activation="relu"),
            pb.flatten(),
            pb.dense(10),
        ],
        dtype=dtype,
    )


# ---------------------------------------------------------------- each layer against autodiff of its forward

CONV_CASES = [
    # (length, kernel, stride, padding, activation): K = 1; stride leaving unread positions ((L + 2p - K) mod s > 0);
    # padding beyond K - 1 (the transposed form crops); a kernel as long as the padded input
    (5, 1, 1, 0, "identity"),
    (8, 3, 2, 1, "tanh"),
    (9, 2, 3, 0, "relu"),
    (9, 5, 2, 6, "identity"),
    (5, 5, 3, 2, "sigmoid"),
    (3, 7, 1, 2, "gelu"),
]


@pytest.mark.parametrize("length,kernel,stride,padding,activation", CONV_CASES)
def test_conv1d_backward_matches_autodiff_of_its_forward(length, kernel, stride, padding, activation):
    rng = np.random.default_rng(kernel * 100 + stride * 10 + padding)
    layer = Conv1d(_array(rng, 3, 2, kernel), _array(rng, 3), stride, padding, activation)
    x = _array(rng, 4, 2, length)
    out, _ = layer.forward(x)
    assert out.shape == (4, 3, (length + 2 * padding - kernel) // stride + 1)
    report = pb.check_layer(layer, x)
    assert report.passed, report


@pytest.mark.parametrize("kernel,stride", [(2, 2), (3, 2), (3, 1), (1, 3)])
def test_pools_match_autodiff_of_their_forward(kernel, stride):
    rng = np.random.default_rng(kernel * 10 + stride)
    x = _array(rng, 3, 2, 9)
    for layer in (MaxPool1d(kernel, stride), AvgPool1d(kernel, stride)):
        report = pb.check_layer(layer, x)
        assert report.passed, report


def test_max_pool_routes_ties_to_the_first_maximum_and_autodiff_of_its_forward_agrees():
    x = jnp.asarray([[[1.0, 1.0, 0.5, 2.0, 2.0, 2.0, -1.0]]])
    pool = pb.max_pool1d(3)  # windows [1, 1, .5] and [2, 2, 2]; the last position is read by no window
    out, cache = pool.forward(x)
    np.testing.assert_array_equal(out, [[[1.0, 2.0]]])
    grad_in, _ = pool.backward(cache, jnp.asarray([[[10.0, 20.0]]]))
    np.testing.assert_array_equal(grad_in, [[[10.0, 0.0, 0.0, 20.0, 0.0, 0.0, 0.0]]])
    assert pb.check_layer(pb.max_pool1d(3, stride=2), x).passed  # overlapping windows, with ties, vs autodiff


def test_avg_pool_spreads_evenly_and_overlapping_windows_add_up():
    pool = pb.avg_pool1d(2, stride=1)
    x = jnp.asarray([[[1.0, 3.0, 5.0]]])
    out, cache = pool.forward(x)
    np.testing.assert_array_equal(out, [[[2.0, 4.0]]])
    grad_in, _ = pool.backward(cache, jnp.asarray([[[2.0, 4.0]]]))
    np.testing.assert_array_equal(grad_in, [[[1.0, 3.0, 2.0]]])


def test_flatten_is_channel_major_and_its_backward_is_the_inverse_reshape():
    x = jnp.arange(6.0).reshape(1, 2, 3)
    out, cache = pb.flatten().forward(x)
    np.testing.assert_array_equal(out, [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])  # (channel, position) order
    grad_in, _ = pb.flatten().backward(cache, out * 10)
    np.testing.assert_array_equal(grad_in, x * 10)


def test_a_wrong_conv_backward_is_caught_and_named():
    @dataclasses.dataclass(frozen=True)
    class Unflipped(Conv1d):  # the input gradient with the kernel not flipped: a classic transposed-conv slip
        def backward(self, cache, grad_out):
            _, grads = super().backward(cache, grad_out)
            wrong = dataclasses.replace(self, w=self.w[:, :, ::-1])
            return Conv1d.backward(wrong, cache, grad_out)[0], grads

    jax.tree_util.register_dataclass(Unflipped)
    rng = np.random.default_rng(1)
    report = pb.check_layer(Unflipped(_array(rng, 2, 2, 3), _array(rng, 2), 1, 1, "tanh"), _array(rng, 3, 2, 6))
    assert not report.passed
    assert "the input gradient dC/da" in str(report) and "parameter 'w'" not in str(report).split("FAIL")[-1]


# ---------------------------------------------------------------- whole networks: jax.grad and the NumPy oracle


@pytest.mark.slow
@settings(max_examples=10)
@given(stack_specs(conv=True, dtypes=("float64",), max_depth=3, max_width=6, max_batch=4))
def test_random_conv_stacks_match_autodiff(spec):
    # float64 (1e-10); float32 on conv stacks is the MNIST-1D CNN test below and experiments/results/
    # equivalence_conv.md, whose misses are layer norms behind narrow layers (jax.grad as far from float64)
    assert_case_matches(make_stack_case(spec))


def test_random_conv_stacks_cover_every_kind():
    rng = np.random.default_rng(RNG_SEED)
    specs = [random_stack_spec(rng, conv=True) for _ in range(200)]
    kinds = set()

    def collect(descriptions):
        for description in descriptions:
            kinds.add(description[0])
            if description[0] == "residual":
                kinds.add("residual of convs" if description[1][0][0] == "conv1d" else "residual")
                collect(description[1])

    for spec in specs:
        collect(spec.layers)
    assert {"conv1d", "max_pool1d", "avg_pool1d", "flatten", "layer_norm", "residual of convs", "dense"} <= kinds
    assert any(d[0] == "conv1d" and d[3] > 1 and d[4] > 0 for s in specs for d in s.layers)  # stride and padding
    assert random_stack_spec(np.random.default_rng(3)) == random_stack_spec(np.random.default_rng(3), conv=False)


@pytest.mark.slow  # conv1d keeps default-tier coverage in tests/layers/test_kinds.py and tests/core/
def test_conv_stacks_match_the_numpy_oracle():
    from experiments import equivalence
    from reference import numpy_layers

    rng = np.random.default_rng(RNG_SEED + 1)
    for _ in range(6):
        spec = dataclasses.replace(random_stack_spec(rng, conv=True, max_depth=3, max_width=6), dtype="float64")
        case = make_stack_case(spec)
        value, grads = pb.value_and_grad(case.net, case.x, case.y, loss=spec.loss, reduction=spec.reduction,
                                         key=case.key)  # fmt: skip
        plain = equivalence.plain_layers(case.net, spec.batch, case.key)
        value_o, grads_o = numpy_layers.loss_and_grads(
            plain, np.asarray(case.x), np.asarray(case.y), loss=spec.loss, reduction=spec.reduction
        )
        oracle = jax.tree.unflatten(jax.tree.structure(grads), equivalence.plain_grad_leaves(grads_o))
        assert abs(float(value) - value_o) <= 1e-12 * max(abs(value_o), 1.0), spec
        leaves = check.compare_gradients(grads, oracle, tolerance=1e-10, floor=1e-6)
        assert all(leaf.passed for leaf in leaves), (spec, leaves)


@pytest.mark.slow  # conv1d keeps default-tier coverage in tests/layers/test_kinds.py and tests/core/
def test_the_mnist1d_cnn_matches_autodiff_in_float64_and_float32():
    rng = np.random.default_rng(2)
    for dtype in ("float64", "float32"):
        net = mnist1d_cnn(dtype)
        x = jnp.asarray(rng.standard_normal((16, 1, 40)).astype(dtype))
        y = jnp.asarray(rng.integers(0, 10, 16))
        report = pb.check_gradients(net, x, y, loss="softmax_cross_entropy")
        assert report.passed, report
        assert sum(leaf.size for leaf in jax.tree.leaves(net)) == 5210  # the authors' ConvBase


# ---------------------------------------------------------------- PyTorch's semantics, weights ported one to one


def test_forward_and_gradients_equal_pytorch_with_the_same_weights():
    torch = pytest.importorskip("torch", reason="PyTorch is in the bench extra: pip install -e '.[bench]'")
    rng = np.random.default_rng(3)
    net = pb.init_network(
        jax.random.key(4),
        (2, 23),
        [
            pb.conv1d(4, 4, stride=3, padding=2, activation="tanh"),
            pb.max_pool1d(2),
            pb.conv1d(3, 2, padding=1, activation="relu"),
            pb.avg_pool1d(3, stride=1),
            pb.flatten(),
            pb.dense(5),
        ],
        dtype="float64",
    )
    x = rng.standard_normal((6, 2, 23))
    y = rng.integers(0, 5, 6)
    params = [torch.tensor(np.asarray(leaf), requires_grad=True) for leaf in jax.tree.leaves(net)]
    F = torch.nn.functional
    h = F.conv1d(torch.tensor(x), params[0], params[1], stride=3, padding=2).tanh()
    h = F.max_pool1d(h, 2)
    h = F.avg_pool1d(F.conv1d(h, params[2], params[3], padding=1).relu(), 3, stride=1)
    logits = torch.flatten(h, 1) @ params[4].T + params[5]
    loss = F.cross_entropy(logits, torch.tensor(y))
    loss.backward()
    out = np.asarray(pb.forward(net, jnp.asarray(x)))
    assert np.max(np.abs(out - logits.detach().numpy())) <= 1e-12 * np.max(np.abs(out))
    value, grads = pb.value_and_grad(net, jnp.asarray(x), jnp.asarray(y), loss="softmax_cross_entropy")
    assert abs(float(value) - loss.item()) <= 1e-12
    for mine, theirs in zip(jax.tree.leaves(grads), params, strict=True):
        theirs = theirs.grad.numpy()
        assert np.linalg.norm(np.asarray(mine) - theirs) <= 1e-10 * np.linalg.norm(theirs)


# ---------------------------------------------------------------- per-example gradients, DP-SGD, checkpoints


@pytest.mark.slow
def test_per_example_grads_and_both_norm_forms_match_vmap_of_grad():
    rng = np.random.default_rng(5)
    # the first conv has few positions and wide channels (the Gram form is cheaper), the second many positions
    net = pb.init_network(jax.random.key(6), (4, 30), [pb.conv1d(16, 5, stride=6, activation="tanh"),
                          pb.conv1d(2, 1, activation="relu"), pb.flatten(), pb.dense(3)], dtype="float64")  # fmt: skip
    first, second = net.layers[0], net.layers[1]
    assert use_gram_form(*first.w.shape, 5) and not use_gram_form(*second.w.shape, 5)  # 5 positions each
    x = jnp.asarray(rng.standard_normal((5, 4, 30)))
    y = jnp.asarray(rng.integers(0, 3, 5))

    def cost_of_one(net, x_n, y_n):
        return check.loss_function(net, x_n[None], y_n[None], "softmax_cross_entropy", "sum")

    expected = jax.vmap(jax.grad(cost_of_one), in_axes=(None, 0, 0))(net, x, y)
    per_example = pb.per_example_grads(net, x, y, loss="softmax_cross_entropy")
    for mine, theirs in zip(jax.tree.leaves(per_example), jax.tree.leaves(expected), strict=True):
        assert np.linalg.norm(np.asarray(mine) - theirs) <= 1e-10 * np.linalg.norm(theirs)
    norms = pb.per_example_grad_norms(net, x, y, loss="softmax_cross_entropy")
    expected_norms = np.sqrt(sum(np.sum(np.reshape(g, (5, -1)) ** 2, axis=1) for g in jax.tree.leaves(expected)))
    np.testing.assert_allclose(np.asarray(norms), expected_norms, rtol=1e-10)


@pytest.mark.slow  # conv1d keeps default-tier coverage in tests/layers/test_kinds.py and tests/core/
def test_dp_sgd_on_a_cnn_clips_each_examples_gradient():
    rng = np.random.default_rng(7)
    net = mnist1d_cnn()
    x = jnp.asarray(rng.standard_normal((8, 1, 40)))
    y = jnp.asarray(rng.integers(0, 10, 8))
    clip = 0.05
    per_example = pb.per_example_grads(net, x, y, loss="softmax_cross_entropy")
    norms = np.sqrt(sum(np.sum(np.reshape(g, (8, -1)) ** 2, axis=1) for g in jax.tree.leaves(per_example)))
    assert np.all(norms > clip)  # every example is clipped: the test sees the clipping
    factors = np.minimum(1.0, clip / norms)
    expected = [np.tensordot(factors, np.asarray(g), axes=1) / 8 for g in jax.tree.leaves(per_example)]
    _, update, _ = pb.dp_value_and_grad(
        net, x, y, loss="softmax_cross_entropy", l2_norm_clip=clip, noise_multiplier=0.0, key=jax.random.key(0)
    )
    for mine, theirs in zip(jax.tree.leaves(update), expected, strict=True):
        assert np.linalg.norm(np.asarray(mine) - theirs) <= 1e-10 * np.linalg.norm(theirs)


@pytest.mark.slow  # conv1d keeps default-tier coverage in tests/layers/test_kinds.py and tests/core/
def test_a_cnn_checkpoint_round_trips(tmp_path):
    net = mnist1d_cnn("float32")
    x = np.random.default_rng(8).standard_normal((200, 1, 40)).astype(np.float32)
    y = np.random.default_rng(9).integers(0, 10, 200)
    path = tmp_path / "cnn.npz"
    trained, _ = pb.fit(net, (x, y), loss="softmax_cross_entropy", optimizer=optax.adam(1e-2), batch_size=50,
                        steps=4, key=jax.random.key(1), checkpoint=path)  # fmt: skip
    loaded = pb.load_checkpoint(path)
    assert jax.tree.structure(loaded.net) == jax.tree.structure(trained)
    for a, b in zip(jax.tree.leaves(loaded.net), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(a, b)
    described = pb.describe_network(trained)["layers"]
    assert described[0] == {"kind": "conv1d", "activation": "relu", "channels": 25, "kernel": 5, "stride": 2,
                            "padding": 1}  # fmt: skip
    assert [item["kind"] for item in described] == ["conv1d", "conv1d", "conv1d", "flatten", "dense"]
    pooled = pb.init_network(jax.random.key(0), (2, 9), [pb.max_pool1d(2), pb.avg_pool1d(3, 1), pb.flatten(),
                             pb.dense(2)])  # fmt: skip
    pb.save_checkpoint(tmp_path / "pooled.npz", pooled)
    assert pb.load_checkpoint(tmp_path / "pooled.npz").net.layers[:2] == pooled.layers[:2]


MESH_CODE = """
import numpy as np, optax, purebp as pb
from purebp.train import distributed
mesh = distributed.make_data_mesh()
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 1, 12)); y = rng.integers(0, 3, size=64).astype(np.int32)
net = pb.init_network(jax.random.key(1), (1, 12), [pb.conv1d(4, 3, stride=2, padding=1, activation="relu"),
                      pb.max_pool1d(2), pb.flatten(), pb.dense(3)], dtype="float64")
options = dict(loss="softmax_cross_entropy", optimizer=optax.adam(0.01), epochs=2, batch_size=16,
               key=jax.random.key(2))
single, _ = pb.fit(net, (x, y), **options)
sharded, _ = pb.fit(net, (x, y), mesh=mesh, **options)
for u, v in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
    assert np.linalg.norm(np.asarray(u) - np.asarray(v)) <= 1e-10 * np.linalg.norm(np.asarray(v))
print("ok")
"""
MESH_RUN = dict(
    command=[sys.executable, "-c", "import jax\njax.config.update('jax_num_cpu_devices', 8)\n"
             "jax.config.update('jax_enable_x64', True)\n" + MESH_CODE],
    cwd=ROOT,
    timeout=300,
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.background("conv: fit on 8 devices", **MESH_RUN)
def test_fit_on_a_mesh_trains_a_cnn_as_one_device_does(background):
    """fit(mesh=8 simulated devices) on a conv + max-pool network ends where fit on one device ends (float64,
    relative L2 1e-10 per leaf); a fresh process, run beside the in-process tests (conftest.Background)."""
    result = background.result("conv: fit on 8 devices", **MESH_RUN).process
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


# ---------------------------------------------------------------- no autodiff, no needless compiles


@pytest.mark.slow  # conv1d keeps default-tier coverage in tests/layers/test_kinds.py and tests/core/
def test_no_autodiff_in_the_conv_backward_pass(monkeypatch):
    from jax._src.interpreters import ad

    def forbidden(*args, **kwargs):
        raise AssertionError("autodiff was called")

    net = mnist1d_cnn("float32")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 1, 40)).astype(np.float32))
    y = jnp.asarray([1, 2, 3, 4])
    for name in ("grad", "value_and_grad", "vjp", "jvp", "linearize", "jacfwd", "jacrev"):
        monkeypatch.setattr(jax, name, forbidden)
    for name in ("jvp", "linearize", "backward_pass"):
        monkeypatch.setattr(ad, name, forbidden)
    jax.clear_caches()
    pooled = pb.init_network(jax.random.key(0), (1, 40), [pb.conv1d(3, 3), pb.max_pool1d(2), pb.avg_pool1d(2),
                             pb.flatten(), pb.dense(5)], dtype="float32")  # fmt: skip
    for network in (net, pooled):
        value, grads = pb.value_and_grad(network, x, y, loss="softmax_cross_entropy")
        assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    jax.clear_caches()


def test_new_weights_of_the_same_cnn_do_not_recompile():
    x = jnp.zeros((4, 1, 40))
    y = jnp.asarray([1, 2, 3, 4])
    first, second = mnist1d_cnn(seed=0), mnist1d_cnn(seed=1)
    pb.value_and_grad(first, x, y, loss="softmax_cross_entropy")
    before = pb.engine._value_and_grad_jit._cache_size()
    pb.value_and_grad(second, x, y, loss="softmax_cross_entropy")
    assert pb.engine._value_and_grad_jit._cache_size() == before


# ---------------------------------------------------------------- clear errors, before anything compiles


def test_a_two_dimensional_input_to_a_conv_is_told_to_add_the_channel_axis():
    with pytest.raises(ValueError, match=r"layer 0 .*add the channel axis, input_shape=\(1, 40\) and x\[:, None, :\]"):
        pb.init_network(jax.random.key(0), (40,), [pb.conv1d(4, 3)])
    net = pb.init_network(jax.random.key(0), (1, 40), [pb.conv1d(4, 3), pb.flatten(), pb.dense(2)])
    with pytest.raises(ValueError, match=r"add the channel axis: x\[:, None, :\]"):
        pb.value_and_grad(net, jnp.zeros((3, 40)), jnp.asarray([0, 1, 0]), loss="softmax_cross_entropy")


@pytest.mark.parametrize(
    "layers,message",
    [
        (
            [pb.conv1d(4, 3), pb.conv1d(2, 9)],
            r"layer 1 .*kernel \(9\) is longer than the padded input \(length 6 \+ "
            r"2 x padding 0 = 6\)",
        ),
        ([pb.max_pool1d(9)], r"layer 0 .*pooling window \(9\) is longer than the input \(length 8\)"),
        ([pb.conv1d(4, 3), pb.dense(2)], r"layer 1 .*flatten it first"),
    ],
)
def test_layers_that_do_not_fit_are_named(layers, message):
    with pytest.raises(ValueError, match=message):
        pb.init_network(jax.random.key(0), (1, 8), layers)


def test_bad_settings_are_refused_with_the_value():
    with pytest.raises(ValueError, match=r"conv1d: stride must be an int >= 1, got 0"):
        pb.conv1d(4, 3, stride=0)
    with pytest.raises(ValueError, match=r"conv1d: padding must be an int >= 0, got 1.5"):
        pb.conv1d(4, 3, padding=1.5)
    with pytest.raises(ValueError, match=r"conv1d: channels must be a positive int, got 0"):
        pb.conv1d(0, 3)
    with pytest.raises(ValueError, match=r"not elementwise.*after flatten"):
        pb.conv1d(4, 3, activation="softmax")
    with pytest.raises(ValueError, match=r"max_pool1d: kernel must be an int >= 1, got 0"):
        pb.max_pool1d(0)
    with pytest.raises(ValueError, match=r"avg_pool1d: stride must be an int >= 1, got -1"):
        pb.avg_pool1d(2, stride=-1)
    net = pb.init_network(jax.random.key(0), (1, 8), [pb.conv1d(2, 3)], dtype="float64")
    with pytest.raises(ValueError, match=r"end it with a flatten and a dense layer"):
        pb.value_and_grad(net, jnp.zeros((2, 1, 8)), jnp.zeros((2, 2)), loss="mse")


def test_stack_spec_notation_and_replay_for_conv_stacks():
    spec = StackSpec(
        input_width=2,
        input_length=9,
        layers=(("conv1d", 3, 5, 2, 1, "relu"), ("max_pool1d", 2, 1), ("flatten",), ("dense", 2, "identity")),
        loss="mse",
    )
    assert spec.notation == "in2x9>c3k5s2p1r>mp2s1>fl>d2"
    case = make_stack_case(spec)
    assert case.x.shape == (4, 2, 9) and case.net.input_shape == (2, 9)
    assert eval(repr(spec), {"StackSpec": StackSpec}) == spec
    with pytest.raises(ValueError, match=r"expected \('conv1d', channels >= 1"):
        StackSpec(input_width=2, input_length=9, layers=(("conv1d", 3, 5, 0, 1, "relu"),), loss="mse")


# ---------------------------------------------------------------- the experiments, in --quick mode


@pytest.mark.slow
def test_the_conv_equivalence_and_benchmark_experiments_run_quick(tmp_path):
    from experiments import benchmark_conv, equivalence

    assert equivalence.main(["--layers", "conv", "--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "equivalence_conv_quick.md").read_text()
    assert "**0 mismatches**" in text and "with conv1d" in text and "--layers conv --quick" in text
    assert benchmark_conv.main(["--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "benchmark_conv_quick.md").read_text()
    for contender in ("purebp", "idiomatic JAX", "jax.grad of purebp's forward"):
        assert f"| {contender} |" in table
    result = __import__("json").loads((tmp_path / "benchmark_conv_quick.json").read_text())
    assert all(row["gradient vs purebp"] < 1e-4 for row in result["rows"]), result["rows"]  # float32, same gradient
