"""The layer-stack oracle (reference/numpy_layers.py) equals autodiff of an independent forward pass.

The independent forward is written here in jax.numpy (jax.nn activations, textbook costs on the outputs) and
differentiated with jax.grad; it shares no code with the oracle or with purebp. Random stacks, 40 seeded cases:
1-4 blocks of dense layers (every activation), residual blocks (nesting dense, layer norm, dropout and residual
blocks), layer norms and dropout with random keep-masks, widths 1-6, batch 1-5, every loss with an output layer
that fits it, both reductions, float and integer targets (a test checks that the cases cover all of these).

Tolerance, float64 against autodiff: relative error <= 1e-10 per leaf, the relative error of a leaf being
max|oracle - jax| / max|jax| (the max-abs norm of the difference over the max-abs norm of the jax leaf; 0 when
both are exactly 0); the loss the same, |L_oracle - L_jax| / |L_jax|. Pure dense stacks are also compared with
the column-major matrix oracle reference/numpy_matrix.py at the same tolerance. A mutated layer-norm backward
(the mean term dropped from its Jacobian) must fail the comparison, so the comparison can fail.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import numpy_layers, numpy_matrix

TOLERANCE = 1e-10
# XLA CPU options for a program compiled to run once, where compile time is nearly all of its cost
FAST_COMPILE = (
    {
        "xla_backend_optimization_level": 0,
        "xla_cpu_use_fusion_emitters": False,
        "xla_cpu_parallel_codegen_split_count": 1,
    }
    if jax.default_backend() == "cpu"
    else None
)
ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "softplus", "gelu", "softmax")
LOSSES = ("mse", "cross_entropy", "softmax_cross_entropy", "binary_cross_entropy")
REDUCTIONS = ("mean", "sum")
TARGETS = ("float", "hard", "labels")  # float: any float y; hard: one-hot / 0-1 rows; labels: integer (N,)

# ---------------------------------------------------------------- architectures
# Seeded, not drawn by hypothesis: hypothesis builds examples by mutating earlier ones, so over a few dozen
# examples some activations and block kinds came up once or never; here every case is an independent draw,
# and test_the_seeded_cases_cover_every_layer_kind_activation_and_loss says what the set covers.

N_CASES = 40
EPS = (1e-5, 1e-3, 0.1)
# over 2 features xhat = +-d / sqrt(d^2 + eps) passes on a change of d times eps / sigma^3 only, so the
# gradient below it is O(1) terms cancelling down to O(eps / var), and rounding grows by var / eps there
EPS_OVER_TWO = (0.1, 1.0)


def random_spec(rng: np.random.Generator, width: int, depth: int, count: int) -> tuple[list, int]:
    """``count`` random blocks (plain specs, no arrays) on ``width`` features; returns (spec, output width)."""
    # dense twice: most parameters and every activation are there; residual blocks nest two deep at most
    kinds = (
        ("dense", "dense", "residual", "layer_norm", "dropout")
        if depth < 2
        else ("dense", "dense", "layer_norm", "dropout")
    )
    spec = []
    for _ in range(count):
        kind = kinds[rng.integers(len(kinds))]
        if kind == "dense":
            width = int(rng.integers(1, 7))
            spec.append(("dense", width, ACTIVATIONS[rng.integers(len(ACTIVATIONS))]))
        elif kind == "layer_norm":
            choices = EPS_OVER_TWO if width == 2 else EPS
            spec.append(("layer_norm", choices[rng.integers(len(choices))]))
        elif kind == "dropout":
            spec.append(("dropout", (0.0, 0.25, 0.5)[rng.integers(3)], bool(rng.random() < 0.7)))
        else:
            body, inner = random_spec(rng, width, depth + 1, int(rng.integers(1, 4)))
            if inner != width:  # the body must keep the shape: close it with a dense layer back to the width
                body.append(("dense", width, ACTIVATIONS[rng.integers(len(ACTIVATIONS))]))
            spec.append(("residual", body))
    return spec, width


def seeded_case(seed: int) -> tuple:
    """Case ``seed``: (spec, n_in, batch, loss, reduction, targets, seed); loss, reduction and targets cycle."""
    rng = np.random.default_rng(seed)
    loss, reduction = LOSSES[seed % 4], REDUCTIONS[(seed // 4) % 2]
    classification = loss in ("cross_entropy", "softmax_cross_entropy")
    targets = TARGETS[(seed // 8) % 3] if classification else TARGETS[(seed // 8) % 2]
    n_in, batch = int(rng.integers(1, 7)), int(rng.integers(1, 6))
    spec, _ = random_spec(rng, n_in, 0, int(rng.integers(1, 5)))
    if loss == "cross_entropy":
        spec.append(("dense", int(rng.integers(2, 7)), "softmax"))
    elif loss == "binary_cross_entropy":
        spec.append(("dense", int(rng.integers(1, 7)), "sigmoid"))
    return spec, n_in, batch, loss, reduction, targets, seed


def build(spec, n_in: int, batch: int, rng: np.random.Generator) -> tuple[list, int]:
    """The oracle's layer dicts for a spec, with random arrays; returns (layers, output width)."""
    layers, width = [], n_in
    for block in spec:
        kind = block[0]
        if kind == "dense":
            _, n_out, name = block
            w = rng.normal(size=(n_out, width)) / np.sqrt(width)
            layers.append({"kind": "dense", "w": w, "b": rng.normal(scale=0.5, size=n_out), "activation": name})
            width = n_out
        elif kind == "layer_norm":
            scale, offset = rng.normal(1.0, 0.5, size=width), rng.normal(scale=0.5, size=width)
            layers.append({"kind": "layer_norm", "scale": scale, "offset": offset, "eps": block[1]})
        elif kind == "dropout":
            _, rate, masked = block
            mask = (rng.random((batch, width)) >= rate).astype(np.float64) if masked else None
            layers.append({"kind": "dropout", "rate": rate, "mask": mask})
        else:
            body, _ = build(block[1], width, batch, rng)
            layers.append({"kind": "residual", "layers": body})
    return layers, width


def make_targets(rng: np.random.Generator, loss: str, targets: str, batch: int, n_out: int) -> np.ndarray:
    if targets == "labels":
        return rng.integers(0, n_out, size=batch)
    if loss == "mse":
        return rng.normal(size=(batch, n_out)) if targets == "float" else np.eye(n_out)[rng.integers(0, n_out, batch)]
    if loss == "binary_cross_entropy":
        return rng.random((batch, n_out)) if targets == "float" else rng.integers(0, 2, (batch, n_out)) * 1.0
    # the cross-entropies: soft labels (rows on the simplex) or one-hot rows
    return (
        rng.dirichlet(np.ones(n_out), size=batch)
        if targets == "float"
        else np.eye(n_out)[rng.integers(0, n_out, batch)]
    )


def describe(layers, indent: str = "") -> str:
    """The architecture, one layer a line, for failure messages."""
    lines = []
    for layer in layers:
        kind = layer["kind"]
        if kind == "dense":
            n_out, n_in = layer["w"].shape
            lines.append(f"{indent}dense {n_in}->{n_out} {layer['activation']}")
        elif kind == "layer_norm":
            lines.append(f"{indent}layer_norm n={layer['scale'].shape[0]} eps={layer['eps']}")
        elif kind == "dropout":
            lines.append(f"{indent}dropout rate={layer['rate']} mask={'none' if layer['mask'] is None else 'drawn'}")
        else:
            lines.append(f"{indent}residual [")
            lines.append(describe(layer["layers"], indent + "    "))
            lines.append(f"{indent}]")
    return "\n".join(lines)


# ---------------------------------------------------------------- the independent forward, in jax.numpy

JAX_ACTIVATIONS = {
    "identity": lambda z: z,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "leaky_relu": lambda z: jax.nn.leaky_relu(z, negative_slope=0.01),
    "elu": jax.nn.elu,
    "softplus": jax.nn.softplus,
    "gelu": lambda z: jax.nn.gelu(z, approximate=False),
    "softmax": lambda z: jax.nn.softmax(z, axis=-1),
}


def parameters(layers) -> list:
    """The trainable leaves, in the structure the oracle's gradients have."""
    tree = []
    for layer in layers:
        kind = layer["kind"]
        if kind == "dense":
            tree.append({"w": jnp.asarray(layer["w"]), "b": jnp.asarray(layer["b"])})
        elif kind == "layer_norm":
            tree.append({"scale": jnp.asarray(layer["scale"]), "offset": jnp.asarray(layer["offset"])})
        elif kind == "dropout":
            tree.append({})
        else:
            tree.append({"layers": parameters(layer["layers"])})
    return tree


def jax_forward(layers, params, a):
    for layer, p in zip(layers, params):
        kind = layer["kind"]
        if kind == "dense":
            a = JAX_ACTIVATIONS[layer["activation"]](a @ p["w"].T + p["b"][None, :])
        elif kind == "layer_norm":
            mean = jnp.mean(a, axis=-1, keepdims=True)
            variance = jnp.mean(jnp.square(a - mean), axis=-1, keepdims=True)
            a = (a - mean) / jnp.sqrt(variance + layer["eps"]) * p["scale"][None, :] + p["offset"][None, :]
        elif kind == "dropout":
            if layer["mask"] is not None:
                a = a * jnp.asarray(layer["mask"]) / (1.0 - layer["rate"])
        else:
            a = a + jax_forward(layer["layers"], p["layers"], a)
    return a


def jax_loss(params, layers, x, y, loss: str, reduction: str):
    a = jax_forward(layers, params, x)
    if y.ndim == 1:  # integer labels
        y = jax.nn.one_hot(y, a.shape[-1], dtype=jnp.float64)
    if loss == "mse":
        cost = 0.5 * jnp.sum(jnp.square(a - y), axis=-1)
    elif loss == "cross_entropy":  # on the probabilities a
        cost = -jnp.sum(y * jnp.log(a), axis=-1)
    elif loss == "softmax_cross_entropy":  # a are logits
        cost = -jnp.sum(y * jax.nn.log_softmax(a, axis=-1), axis=-1)
    else:  # binary cross-entropy on the sigmoid outputs a
        cost = -jnp.sum(y * jnp.log(a) + (1.0 - y) * jnp.log(1.0 - a), axis=-1)
    return jnp.sum(cost) if reduction == "sum" else jnp.mean(cost)


def relative_error(value, reference) -> float:
    """max|value - reference| / max|reference|; 0 when both are exactly 0, inf when only the reference is."""
    value, reference = np.asarray(value, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    assert value.shape == reference.shape, (value.shape, reference.shape)
    difference = float(np.max(np.abs(value - reference), initial=0.0))
    scale = float(np.max(np.abs(reference), initial=0.0))
    if difference == 0.0:
        return 0.0
    return difference / scale if scale > 0.0 else np.inf


def errors_against_jax(layers, x, y, loss: str, reduction: str) -> dict[str, float]:
    """Relative error of the oracle's loss and of every gradient leaf against jax.grad, keyed by leaf path."""
    value, grads = numpy_layers.loss_and_grads(layers, x, y, loss=loss, reduction=reduction)
    params, x, y = parameters(layers), jnp.asarray(x), jnp.asarray(y)

    def value_and_grad(params, x, y):
        return jax.value_and_grad(jax_loss)(params, layers, x, y, loss, reduction)

    # every case is a new architecture, run once: traced with jit disabled (jnp's inner jitted functions
    # inline into one flat program) and compiled with XLA's cheapest settings
    with jax.disable_jit():
        lowered = jax.jit(value_and_grad, compiler_options=FAST_COMPILE).trace(params, x, y).lower()
    compiled = lowered.compile()
    jax_value, jax_grads = compiled(params, x, y)
    assert jax.tree.structure(grads) == jax.tree.structure(jax_grads), "gradient structures differ"
    errors = {"loss": relative_error(value, jax_value)}
    for (path, leaf), jax_leaf in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(jax_grads)):
        errors[jax.tree_util.keystr(path)] = relative_error(leaf, jax_leaf)
    return errors


def draw_case(case):
    """The layer dicts, x and y of a case; the arrays from their own stream of the case's seed."""
    spec, n_in, batch, loss, _, targets, seed = case
    rng = np.random.default_rng([seed, 1])
    layers, n_out = build(spec, n_in, batch, rng)
    x = rng.normal(size=(batch, n_in))
    return layers, x, make_targets(rng, loss, targets, batch, n_out)


def failure(layers, x, y, loss, reduction, errors, against: str = "jax.grad") -> str:
    worst = max(errors, key=errors.get)
    return (
        f"oracle vs {against}: worst relative error {errors[worst]:.3g} at {worst} (tolerance {TOLERANCE})\n"
        f"loss={loss} reduction={reduction} x{x.shape} y{np.shape(y)} {np.asarray(y).dtype}\n"
        f"architecture:\n{describe(layers)}\nall errors: {errors}"
    )


# ---------------------------------------------------------------- (1) random stacks against jax.grad


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(N_CASES))
def test_oracle_equals_jax_grad_on_random_layer_stacks(seed):
    case = seeded_case(seed)
    layers, x, y = draw_case(case)
    loss, reduction = case[3], case[4]
    errors = errors_against_jax(layers, x, y, loss, reduction)
    assert max(errors.values()) <= TOLERANCE, failure(layers, x, y, loss, reduction, errors)


def test_the_seeded_cases_cover_every_layer_kind_activation_and_loss():
    """What the N_CASES seeded cases are claimed to cover, so that fewer cases cannot quietly cover less."""
    seen = set()

    def walk(spec, depth):
        for index, block in enumerate(spec):
            where = "top" if depth == 0 else "residual"
            if block[0] == "dense":
                seen.add(("activation", block[2], "last" if depth == 0 and index == len(spec) - 1 else "hidden"))
                seen.add(("dense", where))
            elif block[0] == "residual":
                seen.add(("residual", depth))
                walk(block[1], depth + 1)
            elif block[0] == "dropout":
                seen.add(("dropout", where, block[2]))
            else:
                seen.add(("layer_norm", where))

    for seed in range(N_CASES):
        spec, n_in, batch, loss, reduction, targets, _ = seeded_case(seed)
        walk(spec, 0)
        seen.update({("loss", loss, reduction), ("targets", loss, targets), ("n_in", n_in), ("batch", batch)})
    wanted = {("activation", name, "hidden") for name in ACTIVATIONS}
    wanted |= {("dense", "top"), ("dense", "residual"), ("layer_norm", "top"), ("layer_norm", "residual")}
    wanted |= {("residual", 0), ("residual", 1)}
    wanted |= {("dropout", where, masked) for where in ("top", "residual") for masked in (True, False)}
    wanted |= {("loss", loss, reduction) for loss in LOSSES for reduction in REDUCTIONS}
    wanted |= {("targets", loss, t) for loss in ("cross_entropy", "softmax_cross_entropy") for t in TARGETS}
    wanted |= {("n_in", n) for n in range(1, 7)} | {("batch", n) for n in range(1, 6)}
    assert wanted <= seen, sorted(wanted - seen)


# ---------------------------------------------------------------- (2) pure dense stacks against numpy_matrix

widths = st.integers(1, 6)
HIDDEN = tuple(name for name in ACTIVATIONS if name != "softmax")  # numpy_matrix allows softmax on the output only
DENSE_OUTPUT = {"mse": ACTIVATIONS, "cross_entropy": ("softmax",), "softmax_cross_entropy": ("identity",)}
DENSE_OUTPUT["binary_cross_entropy"] = ("sigmoid",)


@st.composite
def dense_cases(draw):
    loss, reduction = draw(st.sampled_from(LOSSES)), draw(st.sampled_from(REDUCTIONS))
    sizes = draw(st.lists(widths, min_size=2, max_size=5))  # n_0, ..., n_L: 1-4 layers
    if loss == "cross_entropy":
        sizes[-1] = max(sizes[-1], 2)
    names = [draw(st.sampled_from(HIDDEN)) for _ in sizes[2:]] + [draw(st.sampled_from(DENSE_OUTPUT[loss]))]
    classification = loss in ("cross_entropy", "softmax_cross_entropy")
    targets = draw(st.sampled_from(TARGETS if classification else TARGETS[:2]))
    return sizes, names, loss, reduction, targets, draw(st.integers(1, 5)), draw(st.integers(0, 2**32 - 1))


@settings(max_examples=40)
@given(case=dense_cases())
def test_oracle_equals_the_matrix_oracle_on_dense_stacks(case):
    sizes, names, loss, reduction, targets, batch, seed = case
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=(n_out, n_in)) / np.sqrt(n_in) for n_in, n_out in itertools.pairwise(sizes)]
    biases = [rng.normal(scale=0.5, size=n_out) for n_out in sizes[1:]]
    x = rng.normal(size=(batch, sizes[0]))
    y = make_targets(rng, loss, targets, batch, sizes[-1])
    layers = [{"kind": "dense", "w": w, "b": b, "activation": g} for w, b, g in zip(weights, biases, names)]
    value, grads = numpy_layers.loss_and_grads(layers, x, y, loss=loss, reduction=reduction)
    matrix_value, grad_w, grad_b = numpy_matrix.loss_and_gradients(weights, biases, names, x, y, loss, reduction)
    errors = {"loss": relative_error(value, matrix_value)}
    for l, (g, w_ref, b_ref) in enumerate(zip(grads, grad_w, grad_b)):
        errors[f"[{l}]['w']"], errors[f"[{l}]['b']"] = relative_error(g["w"], w_ref), relative_error(g["b"], b_ref)
    assert max(errors.values()) <= TOLERANCE, failure(layers, x, y, loss, reduction, errors, "numpy_matrix")


# ---------------------------------------------------------------- (3) the comparison can fail


def jacobian_without_the_mean_term(a_row, eps):
    """The layer-norm Jacobian with the -1/n (the mean's) term dropped: a plausible wrong derivation."""
    n = a_row.shape[0]
    centred = a_row - np.mean(a_row)
    sigma = np.sqrt(np.mean(centred * centred) + eps)
    return np.eye(n) / sigma - np.outer(centred, centred) / (n * sigma**3)


MUTATION_SPECS = [
    # (spec, n_in, loss): layer norms with trainable layers below them, so their input gradient matters
    ([("dense", 4, "tanh"), ("layer_norm", 1e-5), ("dense", 3, "identity")], 3, "mse"),
    (
        [("dense", 5, "gelu"), ("residual", [("layer_norm", 1e-3), ("dense", 5, "relu")]), ("dense", 3, "softmax")],
        2,
        "cross_entropy",
    ),
    (
        [("residual", [("dense", 4, "elu"), ("layer_norm", 0.1), ("dense", 4, "sigmoid")]), ("layer_norm", 1e-5)],
        4,
        "mse",
    ),
]


@pytest.mark.parametrize("spec, n_in, loss", MUTATION_SPECS)
def test_a_wrong_layer_norm_backward_fails_the_comparison(monkeypatch, spec, n_in, loss):
    case = (spec, n_in, 4, loss, "mean", "float", 7)
    layers, x, y = draw_case(case)
    errors = errors_against_jax(layers, x, y, loss, "mean")
    assert max(errors.values()) <= TOLERANCE, failure(layers, x, y, loss, "mean", errors)
    monkeypatch.setattr(numpy_layers, "layer_norm_jacobian", jacobian_without_the_mean_term)
    errors = errors_against_jax(layers, x, y, loss, "mean")
    assert errors["loss"] <= TOLERANCE  # the forward pass is untouched
    assert max(errors.values()) > 1e-3, f"the mutated layer-norm backward passed:\n{describe(layers)}\n{errors}"


# ---------------------------------------------------------------- the oracle's own conventions


def test_dropout_masks_argument_equals_masks_in_the_dicts_and_no_mask_is_the_identity():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 4))
    mask = (rng.random((3, 4)) > 0.5) * 1.0
    dense = {"kind": "dense", "w": rng.normal(size=(4, 4)), "b": rng.normal(size=4), "activation": "tanh"}
    with_dict = [dense, {"kind": "residual", "layers": [{"kind": "dropout", "rate": 0.5, "mask": mask}]}]
    without = [dense, {"kind": "residual", "layers": [{"kind": "dropout", "rate": 0.5}]}]
    np.testing.assert_array_equal(numpy_layers.forward(with_dict, x), numpy_layers.forward(without, x, masks=[mask]))
    hidden = np.tanh(x @ dense["w"].T + dense["b"][None, :])
    np.testing.assert_allclose(numpy_layers.forward(without, x), 2.0 * hidden, rtol=1e-15)
    np.testing.assert_allclose(numpy_layers.forward(with_dict, x), hidden + hidden * mask * 2.0, rtol=1e-15)


def dense(n_out: int, n_in: int, activation: str) -> dict:
    return {"kind": "dense", "w": np.ones((n_out, n_in)), "b": np.ones(n_out), "activation": activation}


@pytest.mark.parametrize(
    "layers, kwargs, message",
    [
        ([dense(2, 3, "tanh")], {}, "expects 3 features"),
        ([dense(2, 2, "swish")], {}, "has activation 'swish'; valid names"),
        ([dense(2, 2, "relu")], {"loss": "cross_entropy"}, "needs a last layer dense 'softmax'"),
        ([{"kind": "dropout", "rate": 0.5, "mask": np.ones((4, 3))}], {}, "mask has shape"),
        ([{"kind": "dropout", "rate": 0.5, "mask": np.full((4, 2), 0.5)}], {}, "only 0 and 1"),
        ([{"kind": "dropout", "rate": 1.0}], {}, "rate 1.0"),
        ([{"kind": "dropout", "rate": 0.5}], {"masks": [None, None]}, "more entries"),
        ([{"kind": "dropout", "rate": 0.5}] * 2, {"masks": [None]}, "fewer entries"),
        ([{"kind": "dropout", "rate": 0.5, "mask": np.ones((4, 2))}], {"masks": [np.ones((4, 2))]}, "give only one"),
        ([{"kind": "residual", "layers": [dense(3, 2, "relu")]}], {}, "must keep it"),
        ([{"kind": "layer_norm", "scale": np.ones(2), "offset": np.ones(2)}], {}, "lacks the key"),
        ([{"kind": "conv"}], {}, "valid kinds"),
    ],
)
def test_bad_stacks_are_refused_with_the_reason(layers, kwargs, message):
    kwargs = {"loss": "mse", "reduction": "sum", **kwargs}
    with pytest.raises(ValueError, match=message):
        numpy_layers.loss_and_grads(layers, np.ones((4, 2)), np.ones((4, 2)), **kwargs)
