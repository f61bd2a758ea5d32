"""The oracle's 1-D convolution, pooling and flatten layers (reference/numpy_layers.py) against PyTorch and autodiff.

- Forward: conv1d, max_pool1d, avg_pool1d and flatten against torch.nn.functional on seeded random shapes, strides
  and paddings, float64; relative error <= 1e-12 in the max-abs norm (max|oracle - torch| / max|torch|).
- Gradients: seeded random stacks (conv1d with every elementwise activation and various K, s, p; max and average
  pooling; residual blocks around shape-preserving convs, with layer norm over the length axis inside; layer norm
  and dropout on (N, C, L); flatten; dense layers; every loss) against jax.grad of a forward written here in
  jax.numpy/lax (lax.conv_general_dilated, lax.reduce_window), which shares no code with the oracle, and against
  torch autograd of a forward written here in torch. Tolerance, float64: relative error <= 1e-10 per leaf, the
  relative error of a leaf being max|oracle - reference| / max|reference| (0 when both are exactly 0); the loss
  the same. A failure prints the stack.
- Ties in max pooling go to the first maximum: a hand-made case with the exact expected gradient.
- The comparison can fail: a conv backward with the kernel not flipped, the positions shifted by one, or dC/dw
  with its taps reversed (monkeypatched into the oracle) is caught.
- The transposed-convolution form of the input gradient derived in reference/DERIVATION.md section 7 equals the
  oracle's chain-rule loops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from reference import numpy_layers

torch = pytest.importorskip("torch", reason="torch is needed for the PyTorch comparisons of the conv oracle")
F = torch.nn.functional

TOLERANCE = 1e-10  # float64 gradients against autodiff, relative, max-abs norm, per leaf
FORWARD_TOLERANCE = 1e-12  # float64 forward against torch, relative, max-abs norm
FAST_COMPILE = (
    {
        "xla_backend_optimization_level": 0,
        "xla_cpu_use_fusion_emitters": False,
        "xla_cpu_parallel_codegen_split_count": 1,
    }
    if jax.default_backend() == "cpu"
    else None
)
ELEMENTWISE = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "softplus", "gelu")
LOSSES = ("mse", "cross_entropy", "softmax_cross_entropy", "binary_cross_entropy")
REDUCTIONS = ("mean", "sum")


def relative_error(value, reference) -> float:
    """max|value - reference| / max|reference|; 0 when both are exactly 0, inf when only the reference is."""
    value, reference = np.asarray(value, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    assert value.shape == reference.shape, (value.shape, reference.shape)
    difference = float(np.max(np.abs(value - reference), initial=0.0))
    scale = float(np.max(np.abs(reference), initial=0.0))
    if difference == 0.0:
        return 0.0
    return difference / scale if scale > 0.0 else np.inf


def t64(array) -> torch.Tensor:
    # a fresh C-order copy: torch refuses negative strides, which a reversed size-1 axis can keep
    return torch.tensor(np.array(array, dtype=np.float64, order="C", copy=True), dtype=torch.float64)


# ---------------------------------------------------------------- (1) forward against torch.nn.functional

TORCH_ACTIVATIONS = {
    "identity": lambda z: z,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.01),
    "elu": F.elu,
    "softplus": lambda z: F.softplus(z, threshold=1e9),  # torch's default returns z itself above 20
    "gelu": F.gelu,  # exact, z Phi(z)
}


def random_conv_shape(rng: np.random.Generator) -> tuple[int, int, int, int, int, int, int]:
    """(N, C_in, C_out, L, K, s, p) with K <= L + 2p."""
    n, c_in, c_out, length = (int(v) for v in rng.integers((1, 1, 1, 1), (4, 5, 5, 13)))
    padding, stride = int(rng.integers(0, 3)), int(rng.integers(1, 4))
    kernel = int(rng.integers(1, min(length + 2 * padding, 6) + 1))
    return n, c_in, c_out, length, kernel, stride, padding


@pytest.mark.parametrize("seed", range(25))
def test_forward_equals_torch_functional(seed):
    rng = np.random.default_rng([seed, 100])
    n, c_in, c_out, length, kernel, stride, padding = random_conv_shape(rng)
    name = ELEMENTWISE[seed % len(ELEMENTWISE)]
    x = rng.normal(size=(n, c_in, length))
    w, b = rng.normal(size=(c_out, c_in, kernel)), rng.normal(size=c_out)
    conv = {"kind": "conv1d", "w": w, "b": b, "stride": stride, "padding": padding, "activation": name}
    case = f"x{x.shape} w{w.shape} stride={stride} padding={padding} activation={name}"
    ours = numpy_layers.forward([conv], x)
    theirs = TORCH_ACTIVATIONS[name](F.conv1d(t64(x), t64(w), t64(b), stride=stride, padding=padding)).numpy()
    assert ours.shape == theirs.shape == (n, c_out, (length + 2 * padding - kernel) // stride + 1), case
    assert relative_error(ours, theirs) <= FORWARD_TOLERANCE, case

    pool_kernel, pool_stride = int(rng.integers(1, length + 1)), int(rng.integers(1, 4))
    case = f"x{x.shape} kernel={pool_kernel} stride={pool_stride}"
    for kind, torch_pool in (("max_pool1d", F.max_pool1d), ("avg_pool1d", F.avg_pool1d)):
        ours = numpy_layers.forward([{"kind": kind, "kernel": pool_kernel, "stride": pool_stride}], x)
        theirs = torch_pool(t64(x), pool_kernel, pool_stride).numpy()
        assert ours.shape == theirs.shape == (n, c_in, (length - pool_kernel) // pool_stride + 1), (kind, case)
        assert relative_error(ours, theirs) <= FORWARD_TOLERANCE, (kind, case)

    flat = numpy_layers.forward([{"kind": "flatten"}], x)
    np.testing.assert_array_equal(flat, torch.flatten(t64(x), 1).numpy())
    assert flat[0, min(1, c_in - 1) * length] == x[0, min(1, c_in - 1), 0]  # (channel, position) order


# ---------------------------------------------------------------- random stacks

N_CASES = 24


def random_spec(rng: np.random.Generator, channels: int, length: int, seed: int) -> list:
    """Plain blocks (no arrays) on an (N, channels, length) input, ending 2-D; the loss's output layer last."""
    spec, convs = [], 0
    for _ in range(int(rng.integers(1, 4))):
        kind = ("conv1d", "conv1d", "max_pool1d", "avg_pool1d", "residual", "layer_norm", "dropout")[rng.integers(7)]
        if kind in ("max_pool1d", "avg_pool1d"):
            kernel = int(rng.integers(1, min(length, 4) + 1))
            stride = int(rng.integers(1, 4))
            spec.append((kind, kernel, stride))
            length = (length - kernel) // stride + 1
        elif kind == "residual":  # shape-preserving: stride 1, padding (K - 1) / 2, C_out = C_in
            body = [("conv1d", channels, int(rng.choice((1, 3, 5))), 1, None, ELEMENTWISE[(seed + convs) % 8])]
            convs += 1
            if rng.random() < 0.5 and length > 1:
                body.insert(int(rng.integers(2)), ("layer_norm", 0.1 if length == 2 else 1e-3))
            spec.append(("residual", body))
        elif kind == "layer_norm" and length > 1:  # over one position xhat is 0 and the gradients are rounding
            spec.append(("layer_norm", 0.1 if length == 2 else 1e-3))
        elif kind == "layer_norm":
            continue
        elif kind == "dropout":
            spec.append(("dropout", 0.5))
        else:
            padding, stride = int(rng.integers(0, 3)), int(rng.integers(1, 4))
            kernel = int(rng.integers(1, min(length + 2 * padding, 5) + 1))
            channels = int(rng.integers(1, 4))
            spec.append(("conv1d", channels, kernel, stride, padding, ELEMENTWISE[(seed + convs) % 8]))
            convs += 1
            length = (length + 2 * padding - kernel) // stride + 1
    spec.append(("flatten",))
    loss = LOSSES[seed % 4]
    if rng.random() < 0.6 or loss in ("cross_entropy", "binary_cross_entropy"):
        spec.append(("dense", int(rng.integers(2, 5)), ELEMENTWISE[rng.integers(8)]))
    if loss == "cross_entropy":
        spec.append(("dense", int(rng.integers(2, 5)), "softmax"))
    elif loss == "binary_cross_entropy":
        spec.append(("dense", int(rng.integers(1, 5)), "sigmoid"))
    return spec


def build(spec, shape: tuple, rng: np.random.Generator) -> tuple[list, tuple]:
    """The oracle's layer dicts for a spec with random arrays; shape is the input's; returns (layers, out shape)."""
    layers = []
    for block in spec:
        kind = block[0]
        if kind == "conv1d":
            _, c_out, kernel, stride, padding, name = block
            padding = (kernel - 1) // 2 if padding is None else padding
            n, c_in, length = shape
            w = rng.normal(size=(c_out, c_in, kernel)) / np.sqrt(c_in * kernel)
            b = rng.normal(scale=0.5, size=c_out)
            layers.append({"kind": "conv1d", "w": w, "b": b, "stride": stride, "padding": padding, "activation": name})
            shape = (n, c_out, (length + 2 * padding - kernel) // stride + 1)
        elif kind in ("max_pool1d", "avg_pool1d"):
            _, kernel, stride = block
            layers.append({"kind": kind, "kernel": kernel, "stride": stride})
            shape = shape[:2] + ((shape[2] - kernel) // stride + 1,)
        elif kind == "layer_norm":
            scale, offset = rng.normal(1.0, 0.5, size=shape[-1]), rng.normal(scale=0.5, size=shape[-1])
            layers.append({"kind": "layer_norm", "scale": scale, "offset": offset, "eps": block[1]})
        elif kind == "dropout":
            mask = (rng.random(shape) >= block[1]).astype(np.float64)
            layers.append({"kind": "dropout", "rate": block[1], "mask": mask})
        elif kind == "residual":
            body, _ = build(block[1], shape, rng)
            layers.append({"kind": "residual", "layers": body})
        elif kind == "flatten":
            layers.append({"kind": "flatten"})
            shape = (shape[0], int(np.prod(shape[1:])))
        else:
            _, n_out, name = block
            w = rng.normal(size=(n_out, shape[1])) / np.sqrt(shape[1])
            layers.append({"kind": "dense", "w": w, "b": rng.normal(scale=0.5, size=n_out), "activation": name})
            shape = (shape[0], n_out)
    return layers, shape


def seeded_case(seed: int):
    """(layers, x, y, loss, reduction) of case ``seed``."""
    rng = np.random.default_rng([seed, 200])
    n, channels, length = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(3, 13))
    spec = random_spec(rng, channels, length, seed)
    layers, (_, n_out) = build(spec, (n, channels, length), rng)
    loss, reduction = LOSSES[seed % 4], REDUCTIONS[(seed // 4) % 2]
    x = rng.normal(size=(n, channels, length))
    if loss == "mse":
        y = rng.normal(size=(n, n_out))
    elif loss == "binary_cross_entropy":
        y = rng.random((n, n_out))
    elif seed % 3 == 0:
        y = rng.integers(0, n_out, size=n)  # integer labels
    else:
        y = rng.dirichlet(np.ones(n_out), size=n)
    return layers, x, y, loss, reduction


def describe(layers, indent: str = "") -> str:
    """The stack, one layer a line, for failure messages."""
    lines = []
    for layer in layers:
        kind = layer["kind"]
        if kind == "conv1d":
            c_out, c_in, kernel = layer["w"].shape
            lines.append(
                f"{indent}conv1d {c_in}->{c_out} K={kernel} stride={layer['stride']} padding={layer['padding']} "
                f"{layer['activation']}"
            )
        elif kind in ("max_pool1d", "avg_pool1d"):
            lines.append(f"{indent}{kind} kernel={layer['kernel']} stride={layer['stride']}")
        elif kind == "dense":
            n_out, n_in = layer["w"].shape
            lines.append(f"{indent}dense {n_in}->{n_out} {layer['activation']}")
        elif kind == "layer_norm":
            lines.append(f"{indent}layer_norm n={layer['scale'].shape[0]} eps={layer['eps']}")
        elif kind == "dropout":
            lines.append(f"{indent}dropout rate={layer['rate']} mask {layer['mask'].shape}")
        elif kind == "flatten":
            lines.append(f"{indent}flatten")
        else:
            lines += [f"{indent}residual [", describe(layer["layers"], indent + "    "), f"{indent}]"]
    return "\n".join(lines)


def parameters(layers, to) -> list:
    """The trainable leaves, in the structure of the oracle's gradients, converted by ``to``."""
    tree = []
    for layer in layers:
        kind = layer["kind"]
        if kind in ("conv1d", "dense"):
            tree.append({"w": to(layer["w"]), "b": to(layer["b"])})
        elif kind == "layer_norm":
            tree.append({"scale": to(layer["scale"]), "offset": to(layer["offset"])})
        elif kind == "residual":
            tree.append({"layers": parameters(layer["layers"], to)})
        else:
            tree.append({})
    return tree


# ---------------------------------------------------------------- the independent forward in jax.numpy / lax

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


def jax_forward(layers, params, a):
    for layer, p in zip(layers, params):
        kind = layer["kind"]
        if kind == "conv1d":
            z = lax.conv_general_dilated(
                a,
                p["w"],
                window_strides=(layer["stride"],),
                padding=[(layer["padding"], layer["padding"])],
                dimension_numbers=("NCH", "OIH", "NCH"),
                precision=lax.Precision.HIGHEST,
            )
            a = JAX_ACTIVATIONS[layer["activation"]](z + p["b"][None, :, None])
        elif kind == "max_pool1d":
            window, strides = (1, 1, layer["kernel"]), (1, 1, layer["stride"])
            a = lax.reduce_window(a, -jnp.inf, lax.max, window, strides, "VALID")
        elif kind == "avg_pool1d":
            window, strides = (1, 1, layer["kernel"]), (1, 1, layer["stride"])
            a = lax.reduce_window(a, 0.0, lax.add, window, strides, "VALID") / layer["kernel"]
        elif kind == "flatten":
            a = jnp.reshape(a, (a.shape[0], -1))
        elif kind == "dense":
            a = JAX_ACTIVATIONS[layer["activation"]](a @ p["w"].T + p["b"][None, :])
        elif kind == "layer_norm":
            lead = (1,) * (a.ndim - 1)
            mean = jnp.mean(a, axis=-1, keepdims=True)
            variance = jnp.mean(jnp.square(a - mean), axis=-1, keepdims=True)
            xhat = (a - mean) / jnp.sqrt(variance + layer["eps"])
            a = xhat * p["scale"].reshape(lead + (-1,)) + p["offset"].reshape(lead + (-1,))
        elif kind == "dropout":
            a = a * jnp.asarray(layer["mask"]) / (1.0 - layer["rate"])
        else:
            a = a + jax_forward(layer["layers"], p["layers"], a)
    return a


def jax_loss(params, layers, x, y, loss: str, reduction: str):
    a = jax_forward(layers, params, x)
    if y.ndim == 1:
        y = jax.nn.one_hot(y, a.shape[-1], dtype=jnp.float64)
    if loss == "mse":
        cost = 0.5 * jnp.sum(jnp.square(a - y), axis=-1)
    elif loss == "cross_entropy":
        cost = -jnp.sum(y * jnp.log(a), axis=-1)
    elif loss == "softmax_cross_entropy":
        cost = -jnp.sum(y * jax.nn.log_softmax(a, axis=-1), axis=-1)
    else:
        cost = -jnp.sum(y * jnp.log(a) + (1.0 - y) * jnp.log(1.0 - a), axis=-1)
    return jnp.sum(cost) if reduction == "sum" else jnp.mean(cost)


def jax_value_and_grads(layers, x, y, loss, reduction):
    params = parameters(layers, jnp.asarray)

    def value_and_grad(params, x, y):
        return jax.value_and_grad(jax_loss)(params, layers, x, y, loss, reduction)

    # a new architecture per case, run once: traced without jit and compiled with XLA's cheapest settings
    with jax.disable_jit():
        lowered = jax.jit(value_and_grad, compiler_options=FAST_COMPILE).trace(params, x, y).lower()
    return lowered.compile()(params, jnp.asarray(x), jnp.asarray(y))


# ---------------------------------------------------------------- the independent forward in torch


def torch_forward(layers, params, a):
    for layer, p in zip(layers, params):
        kind = layer["kind"]
        if kind == "conv1d":
            z = F.conv1d(a, p["w"], p["b"], stride=layer["stride"], padding=layer["padding"])
            a = TORCH_ACTIVATIONS[layer["activation"]](z)
        elif kind == "max_pool1d":
            a = F.max_pool1d(a, layer["kernel"], layer["stride"])
        elif kind == "avg_pool1d":
            a = F.avg_pool1d(a, layer["kernel"], layer["stride"])
        elif kind == "flatten":
            a = torch.flatten(a, 1)
        elif kind == "dense":
            z = F.linear(a, p["w"], p["b"])
            a = torch.softmax(z, -1) if layer["activation"] == "softmax" else TORCH_ACTIVATIONS[layer["activation"]](z)
        elif kind == "layer_norm":
            a = F.layer_norm(a, (a.shape[-1],), p["scale"], p["offset"], eps=layer["eps"])
        elif kind == "dropout":
            a = a * t64(layer["mask"]) / (1.0 - layer["rate"])
        else:
            a = a + torch_forward(layer["layers"], p["layers"], a)
    return a


def torch_value_and_grads(layers, x, y, loss, reduction):
    params = parameters(layers, lambda v: t64(v).requires_grad_(True))
    a = torch_forward(layers, params, t64(x))
    y = torch.eye(a.shape[-1], dtype=torch.float64)[torch.tensor(y)] if np.ndim(y) == 1 else t64(y)
    if loss == "mse":
        cost = 0.5 * torch.sum((a - y) ** 2, dim=-1)
    elif loss == "cross_entropy":
        cost = -torch.sum(y * torch.log(a), dim=-1)
    elif loss == "softmax_cross_entropy":
        cost = -torch.sum(y * torch.log_softmax(a, -1), dim=-1)
    else:
        cost = -torch.sum(y * torch.log(a) + (1.0 - y) * torch.log(1.0 - a), dim=-1)
    value = torch.sum(cost) if reduction == "sum" else torch.mean(cost)
    leaves = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, torch.Tensor))
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    grads = [np.zeros(tuple(v.shape)) if g is None else g.numpy() for v, g in zip(leaves, grads)]
    return float(value.detach()), grads


def errors_against(reference: str, layers, x, y, loss, reduction) -> dict[str, float]:
    value, grads = numpy_layers.loss_and_grads(layers, x, y, loss=loss, reduction=reduction)
    if reference == "jax":
        ref_value, ref_grads = jax_value_and_grads(layers, x, y, loss, reduction)
        assert jax.tree.structure(grads) == jax.tree.structure(ref_grads), "gradient structures differ"
        ref_leaves = jax.tree.leaves(ref_grads)
    else:
        ref_value, ref_leaves = torch_value_and_grads(layers, x, y, loss, reduction)
    errors = {"loss": relative_error(value, ref_value)}
    paths = jax.tree_util.tree_leaves_with_path(grads)
    assert len(paths) == len(ref_leaves)
    for (path, leaf), ref_leaf in zip(paths, ref_leaves):
        errors[jax.tree_util.keystr(path)] = relative_error(leaf, ref_leaf)
    return errors


def failure(layers, x, y, loss, reduction, errors, against) -> str:
    worst = max(errors, key=errors.get)
    return (
        f"oracle vs {against}: worst relative error {errors[worst]:.3g} at {worst} (tolerance {TOLERANCE})\n"
        f"loss={loss} reduction={reduction} x{x.shape} y{np.shape(y)} {np.asarray(y).dtype}\n"
        f"stack:\n{describe(layers)}\nall errors: {errors}"
    )


# ---------------------------------------------------------------- (2) gradients against jax.grad and torch


@pytest.mark.parametrize("seed", range(N_CASES))
def test_oracle_gradients_equal_jax_grad_and_torch_autograd_on_random_conv_stacks(seed):
    layers, x, y, loss, reduction = seeded_case(seed)
    for against in ("jax", "torch"):
        errors = errors_against(against, layers, x, y, loss, reduction)
        assert max(errors.values()) <= TOLERANCE, failure(layers, x, y, loss, reduction, errors, against)


def test_the_seeded_cases_cover_every_conv_setting_and_layer_kind():
    """What the N_CASES seeded stacks are claimed to cover, so that fewer cases cannot quietly cover less."""
    seen = set()

    def walk(layers, inside):
        for layer in layers:
            kind = layer["kind"]
            if kind == "conv1d":
                seen.update({("activation", layer["activation"]), ("stride", layer["stride"])})
                seen.update({("padding", layer["padding"]), ("K", layer["w"].shape[2]), ("conv", inside)})
            elif kind == "residual":
                seen.add(("residual",))
                walk(layer["layers"], True)
            else:
                seen.add((kind, inside))
                if kind in ("max_pool1d", "avg_pool1d") and layer["stride"] < layer["kernel"]:
                    seen.add((kind, "overlapping"))

    for seed in range(N_CASES):
        layers, _, y, loss, reduction = seeded_case(seed)
        walk(layers, False)
        seen.update({("loss", loss), ("reduction", reduction), ("labels", np.ndim(y) == 1)})
    wanted = {("activation", name) for name in ELEMENTWISE} | {("stride", s) for s in (1, 2, 3)}
    wanted |= {("padding", p) for p in (0, 1, 2)} | {("K", k) for k in range(1, 6)}
    wanted |= {("conv", False), ("conv", True), ("residual",), ("layer_norm", True), ("layer_norm", False)}
    wanted |= {(kind, False) for kind in ("max_pool1d", "avg_pool1d", "flatten", "dense", "dropout")}
    wanted |= {("max_pool1d", "overlapping"), ("avg_pool1d", "overlapping")}
    wanted |= {("loss", loss) for loss in LOSSES} | {("reduction", r) for r in REDUCTIONS}
    wanted |= {("labels", True), ("labels", False)}
    assert wanted <= seen, sorted(wanted - seen)


# ---------------------------------------------------------------- (3) ties in max pooling


def test_max_pool_ties_route_the_gradient_to_the_first_maximum():
    a = np.array([[[1.0, 3.0, 3.0, 2.0, 3.0]]])
    chosen = numpy_layers.max_pool1d_argmax(a, 3, 1)  # windows [1 3 3], [3 3 2], [3 2 3]
    np.testing.assert_array_equal(chosen, [[[1, 0, 0]]])
    grad = numpy_layers.max_pool1d_input_gradient(np.array([[[1.0, 10.0, 100.0]]]), chosen, 1, 5)
    np.testing.assert_array_equal(grad, [[[0.0, 11.0, 100.0, 0.0, 0.0]]])  # positions 1, 1, 2
    torch_a = t64(a).requires_grad_(True)
    (F.max_pool1d(torch_a, 3, 1) * t64([[[1.0, 10.0, 100.0]]])).sum().backward()
    np.testing.assert_array_equal(torch_a.grad.numpy(), grad)  # PyTorch's choice too

    # through a stack: z = conv(x) = [3, 3, 4] ties at z_0 = 1 + 2 and z_1 = 2 + 1; the pool's one window [3, 3]
    # selects z_0, so dC/dw = dC/dout (x_0, x_1) = 3 (1, 2), not 3 (2, 1) as the second maximum would give
    conv = {"kind": "conv1d", "w": np.ones((1, 1, 2)), "b": np.zeros(1), "stride": 1, "padding": 0}
    layers = [{**conv, "activation": "identity"}, {"kind": "max_pool1d", "kernel": 2, "stride": 2}, {"kind": "flatten"}]
    x = np.array([[[1.0, 2.0, 1.0, 3.0]]])
    value, grads = numpy_layers.loss_and_grads(layers, x, np.zeros((1, 1)), loss="mse", reduction="sum")
    assert value == 4.5
    np.testing.assert_array_equal(grads[0]["w"], [[[3.0, 6.0]]])
    np.testing.assert_array_equal(grads[0]["b"], [3.0])
    _, torch_grads = torch_value_and_grads(layers, x, np.zeros((1, 1)), "mse", "sum")
    np.testing.assert_array_equal(torch_grads[1], grads[0]["w"])  # leaves in key order: b, w


def test_overlapping_average_pool_windows_add_up():
    grad = numpy_layers.avg_pool1d_input_gradient(np.array([[[3.0, 6.0]]]), 3, 1, 4)  # windows 0-2 and 1-3
    np.testing.assert_array_equal(grad, [[[1.0, 3.0, 3.0, 2.0]]])


# ---------------------------------------------------------------- (4) the transposed-convolution form


@pytest.mark.parametrize("seed", range(10))
def test_the_input_gradient_is_the_transposed_convolution_of_the_derivation(seed):
    """dC/da = crop_p(correlate(pad_{K-1}(dilate_s(delta)), flip(w) with channels swapped)), right-padded where
    (L + 2p - K) mod s positions of a_pad are reached by no window (DERIVATION.md section 7)."""
    rng = np.random.default_rng([seed, 300])
    n, c_in, c_out, length, kernel, stride, padding = random_conv_shape(rng)
    w = rng.normal(size=(c_out, c_in, kernel))
    steps = (length + 2 * padding - kernel) // stride + 1
    delta = rng.normal(size=(n, c_out, steps))
    dilated = np.zeros((n, c_out, (steps - 1) * stride + 1))
    dilated[:, :, ::stride] = delta
    flipped = np.transpose(w[:, :, ::-1], (1, 0, 2))  # (C_in, C_out, K)
    full = F.conv1d(t64(dilated), t64(flipped), padding=kernel - 1).numpy()  # (N, C_in, (T - 1) s + K)
    unreached = (length + 2 * padding - kernel) % stride
    full = np.pad(full, ((0, 0), (0, 0), (0, unreached)))
    expected = full[:, :, padding : padding + length]
    ours = numpy_layers.conv1d_input_gradient(delta, w, stride, padding, length)
    case = f"delta{delta.shape} w{w.shape} stride={stride} padding={padding} L={length}"
    assert relative_error(ours, expected) <= FORWARD_TOLERANCE, case


# ---------------------------------------------------------------- (5) the comparison can fail

ORIGINAL_INPUT_GRADIENT = numpy_layers.conv1d_input_gradient
ORIGINAL_PARAMETER_GRADIENTS = numpy_layers.conv1d_parameter_gradients


def input_gradient_kernel_not_flipped(delta, w, stride, padding, length):
    """A plausible slip: the transposed convolution written with the taps in forward order."""
    return ORIGINAL_INPUT_GRADIENT(delta, w[:, :, ::-1], stride, padding, length)


def input_gradient_off_by_one(delta, w, stride, padding, length):
    """A plausible slip: the padding cropped one position late (a_pad[t s + k + 1] instead of a_pad[t s + k])."""
    return np.roll(ORIGINAL_INPUT_GRADIENT(delta, w, stride, padding, length), -1, axis=2)


def parameter_gradients_taps_reversed(delta, a_pad, kernel, stride):
    grad_w, grad_b = ORIGINAL_PARAMETER_GRADIENTS(delta, a_pad, kernel, stride)
    return grad_w[:, :, ::-1], grad_b


def conv(c_out, c_in, kernel, stride, padding, name, rng):
    w, b = rng.normal(size=(c_out, c_in, kernel)), rng.normal(size=c_out)
    return {"kind": "conv1d", "w": w, "b": b, "stride": stride, "padding": padding, "activation": name}


def mutation_stacks():
    rng = np.random.default_rng(5)
    dense = {"kind": "dense", "w": rng.normal(size=(3, 8)), "b": rng.normal(size=3), "activation": "identity"}
    return [
        # convs below convs, so that the input gradient reaches a parameter
        [conv(2, 2, 3, 1, 1, "tanh", rng), conv(2, 2, 3, 2, 1, "elu", rng), {"kind": "flatten"}, dense],
        [
            conv(2, 2, 3, 1, 0, "identity", rng),
            {"kind": "residual", "layers": [conv(2, 2, 3, 1, 1, "gelu", rng)]},
            {"kind": "max_pool1d", "kernel": 2, "stride": 1},
            {"kind": "flatten"},
            dense,
        ],
    ]


@pytest.mark.parametrize(
    "name, mutant",
    [
        ("conv1d_input_gradient", input_gradient_kernel_not_flipped),
        ("conv1d_input_gradient", input_gradient_off_by_one),
        ("conv1d_parameter_gradients", parameter_gradients_taps_reversed),
    ],
)
@pytest.mark.parametrize("stack", range(2))
def test_a_wrong_conv_backward_fails_the_comparison(monkeypatch, name, mutant, stack):
    layers = mutation_stacks()[stack]
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(2, 2, 8 if stack == 0 else 7)), rng.normal(size=(2, 3))
    errors = errors_against("torch", layers, x, y, "mse", "mean")
    assert max(errors.values()) <= TOLERANCE, failure(layers, x, y, "mse", "mean", errors, "torch")
    monkeypatch.setattr(numpy_layers, name, mutant)
    for against in ("torch", "jax"):
        errors = errors_against(against, layers, x, y, "mse", "mean")
        assert errors["loss"] <= TOLERANCE  # the forward pass is untouched
        assert max(errors.values()) > 1e-3, f"the mutant {mutant.__name__} passed:\n{describe(layers)}\n{errors}"


# ---------------------------------------------------------------- (6) errors

CONV = {"kind": "conv1d", "w": np.ones((2, 3, 2)), "b": np.ones(2), "stride": 1, "padding": 0, "activation": "relu"}


@pytest.mark.parametrize(
    "layers, x_shape, message",
    [
        ([CONV, {"kind": "flatten"}], (4, 5), r"needs a 3-D input \(N, C_in=3, L\), got the 2-D shape \(4, 5\); add"),
        ([CONV, {"kind": "flatten"}], (4, 2, 5), r"C_in=3 input channels \(w \(2, 3, 2\)\), got .* with 2 channels"),
        (
            [{**CONV, "w": np.ones((2, 3, 6)), "padding": 1}, {"kind": "flatten"}],
            (4, 3, 3),
            r"kernel length K=6 is longer than the padded input length L \+ 2p = 5 \(L=3, p=1\)",
        ),
        ([{**CONV, "activation": "softmax"}], (4, 3, 5), "activation 'softmax'; a conv1d's activation must be"),
        ([{**CONV, "activation": "swish"}], (4, 3, 5), "has activation 'swish'; valid names"),
        ([{**CONV, "stride": 0}], (4, 3, 5), r"has stride 0; expected an int >= 1"),
        ([{**CONV, "padding": -1}], (4, 3, 5), r"has padding -1; expected an int >= 0"),
        ([{**CONV, "stride": 1.0}], (4, 3, 5), r"has stride 1.0; expected an int"),
        ([{**CONV, "b": np.ones(3)}], (4, 3, 5), r"needs w \(C_out, C_in, K\) and b \(C_out,\)"),
        ([{"kind": "conv1d", "w": np.ones((2, 3, 2)), "b": np.ones(2)}], (4, 3, 5), "lacks the key"),
        ([CONV], (4, 3, 5), r"costs need a 2-D network output .* shape \(4, 2, 4\); end the stack with .*flatten"),
        ([{"kind": "max_pool1d", "kernel": 6, "stride": 1}], (4, 3, 5), "kernel length 6 is longer than .* L=5"),
        ([{"kind": "avg_pool1d", "kernel": 2, "stride": 0}], (4, 3, 5), "has stride 0"),
        ([{"kind": "avg_pool1d", "kernel": 2, "stride": 1}], (4, 5), "add the channel axis"),
        ([{"kind": "max_pool1d", "kernel": 2}], (4, 3, 5), "lacks the key"),
        (
            [CONV, {"kind": "dense", "w": np.ones((2, 4)), "b": np.ones(2), "activation": "relu"}],
            (4, 3, 5),
            "needs a 2-D input .* put a flatten layer before it",
        ),
    ],
)
def test_bad_conv_stacks_are_refused_with_the_reason(layers, x_shape, message):
    with pytest.raises(ValueError, match=message):
        numpy_layers.loss_and_grads(layers, np.ones(x_shape), np.ones((4, 2)), loss="mse", reduction="sum")


def test_layer_norm_and_residual_work_on_the_length_axis():
    """Layer norm on (N, C, L) normalises each (n, c) row over L; a residual conv block keeps (N, C, L)."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 3, 6))
    norm = {"kind": "layer_norm", "scale": np.ones(6), "offset": np.zeros(6), "eps": 0.0}
    out = numpy_layers.forward([norm], x)
    np.testing.assert_allclose(np.mean(out, axis=2), 0.0, atol=1e-15)
    np.testing.assert_allclose(np.mean(out**2, axis=2), 1.0, rtol=1e-14)
    block = {"kind": "residual", "layers": [conv(3, 3, 5, 1, 2, "tanh", rng)]}
    out = numpy_layers.forward([block], x)
    theirs = t64(x) + torch.tanh(
        F.conv1d(t64(x), t64(block["layers"][0]["w"]), t64(block["layers"][0]["b"]), padding=2)
    )
    assert relative_error(out, theirs.numpy()) <= FORWARD_TOLERANCE
