"""The hand-written backward pass against jax.grad of the same forward pass and cost.

This is the only module of the library that uses JAX's autodiff: it is the
witness the hand-written pass is compared with, never part of it.

Why one module of ~700 lines: the structural test (tests/core/test_structure.py) allows autodiff in the
witnesses only, and keeping every comparison with autodiff here (gradients, a layer's backward, a
registered G' or cost derivative) keeps that boundary one file wide.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from purebp import activations as _activations
from purebp import engine as _engine
from purebp import inputs as _inputs
from purebp import layers as _layers
from purebp import programs as _programs
from purebp.layers.shapes import describe
from purebp.network import AnyNetwork, is_mlp

Array = jax.Array

# Stated tolerances (relative error per leaf, see ``relative_error``). The
# 16-bit ones come from the distribution measured by experiments/mixed_precision.py
# (hand-written vs jax.grad, both in that dtype, over random architectures):
# see check_gradients' docstring and the README's "Mixed precision".
TOLERANCE = {
    np.dtype("float64"): 1e-10,
    np.dtype("float32"): 1e-5,
    np.dtype(jnp.bfloat16): 1e-1,
    np.dtype(jnp.float16): 3e-2,
}
# A leaf whose autodiff gradient is below FLOOR * (norm of the whole gradient)
# is compared in absolute terms against that floor instead of its own norm:
# tiny leaves (dead units, sums that cancel over the batch) carry rounding
# error of the size of the terms they were summed from, not of the result.
FLOOR = {
    np.dtype("float64"): 1e-6,
    np.dtype("float32"): 1e-3,
    np.dtype(jnp.bfloat16): 1e-2,
    np.dtype(jnp.float16): 1e-2,
}
# Below 32 bits check_gradients also reports both gradients against this
# reference: jax.grad of the same parameters, upcast exactly, in float64
# (float32 when x64 is off).
LOW_PRECISION = frozenset({np.dtype(jnp.bfloat16), np.dtype(jnp.float16)})


def loss_function(
    net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str = "mean", key: Array | None = None
) -> Array:
    """Return L(theta) from purebp's own forward pass and cost: what jax.grad differentiates."""
    output, caches = _engine.forward_pass(net, x, key)
    cost = _engine.output_cost(net, output, caches, y, loss=loss)
    return jnp.mean(cost) if reduction == "mean" else jnp.sum(cost)


_autodiff_value_and_grad_jit = jax.jit(jax.value_and_grad(loss_function), static_argnames=("loss", "reduction"))


def compiled_autodiff_value_and_grad(
    net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str, key: Array | None = None
) -> tuple[Array, AnyNetwork]:
    """The jitted (L, jax.grad L) program, unchecked: the autodiff twin of ``backprop.compiled_value_and_grad``."""
    return _autodiff_value_and_grad_jit(net, x, y, loss, reduction, key)


def autodiff_value_and_grad(
    net: AnyNetwork, x: Array, y: Array, *, loss: str, reduction: str = "mean", key: Array | None = None
) -> tuple[Array, AnyNetwork]:
    """Return (L, jax.grad L) of the same forward pass and cost as ``purebp.value_and_grad``.

    Same signature and checks as ``purebp.value_and_grad``, so the two can be swapped.
    """
    x, y = _inputs.coerce_inputs(net, x, y)
    _inputs.validate_inputs(net, x, y, loss=loss, reduction=reduction)
    return _autodiff_value_and_grad_jit(net, x, y, loss, reduction, key)


def _both_value_and_grad(net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str, key: Array | None = None):
    # the same two jitted functions as check_gradients' default path, nested in one program
    hand = _engine.compiled_value_and_grad(net, x, y, loss, reduction, key)
    return hand, _autodiff_value_and_grad_jit(net, x, y, loss, reduction, key)


# XLA options for a program compiled to run once (check_gradients(fast_compile=True)), where compile
# time is nearly all of the cost: the same HLO program, its kernels emitted by the classic elemental
# emitters instead of the MLIR fusion emitters, as one LLVM module, compiled by LLVM at -O0.
# CPU only: on other backends the program keeps XLA's defaults.
FAST_COMPILE_OPTIONS = {
    "cpu": {
        "xla_backend_optimization_level": 0,
        "xla_cpu_use_fusion_emitters": False,
        "xla_cpu_parallel_codegen_split_count": 1,
    }
}


@functools.cache
def _fast_compile_jit(platform: str):
    return jax.jit(
        _both_value_and_grad,
        static_argnames=("loss", "reduction"),
        compiler_options=FAST_COMPILE_OPTIONS.get(platform),
    )


_programs.on_clear(_fast_compile_jit.cache_clear)


def _fast_compile_call(net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str, key: Array | None = None):
    jitted = _fast_compile_jit(jax.default_backend())
    # traced with jit disabled, the inner jitted functions (the two above, jnp's) inline into one
    # flat jaxpr with the same equations: less tracing, and XLA would inline them anyway. Compiled
    # ahead of time, the executable is in no cache: it is freed when this returns.
    with jax.disable_jit():
        lowered = jitted.trace(net, x, y, loss, reduction, key).lower()
    return lowered.compile()(net, x, y, key)


@dataclasses.dataclass(frozen=True)
class LeafComparison:
    """One parameter leaf: hand-written h vs autodiff g."""

    layer: int  # the top-level layer the leaf belongs to
    parameter: str  # "w" or "b" for a dense layer; the field path inside any other layer, e.g. "layers[0].w"
    shape: tuple[int, ...]
    max_abs_error: float  # max_i |h_i - g_i|
    relative_error: float  # ||h - g||_2 / max(||g||_2, FLOOR * ||g_all||_2)
    passed: bool
    # 16-bit networks only: h and g against the reference r (jax.grad in float64 of the
    # same parameters), same measure with r in place of g; not part of ``passed``
    handwritten_vs_reference: float | None = None
    autodiff_vs_reference: float | None = None


@dataclasses.dataclass(frozen=True)
class GradientReport:
    """What ``check_gradients`` found. ``passed`` is True when every leaf and the loss agree."""

    sizes: tuple[int, ...]
    activations: tuple[str, ...]
    loss_name: str
    reduction: str
    dtype: str
    tolerance: float
    loss_handwritten: float
    loss_autodiff: float
    loss_relative_error: float
    leaves: tuple[LeafComparison, ...]
    reference_dtype: str | None = None  # set when the leaves carry *_vs_reference errors
    architecture: str = ""  # the layers of a Sequential (sizes and activations are empty then)

    @property
    def passed(self) -> bool:
        return self.loss_relative_error <= self.tolerance and all(leaf.passed for leaf in self.leaves)

    @property
    def max_relative_error(self) -> float:
        """The worst relative error over the loss and every leaf."""
        return max([self.loss_relative_error] + [leaf.relative_error for leaf in self.leaves])

    @property
    def first_failing_layer(self) -> int | None:
        """The first layer, counting from the output (where backprop starts), that disagrees."""
        failing = [leaf.layer for leaf in self.leaves if not leaf.passed]
        return max(failing) if failing else None

    def __str__(self) -> str:
        ref = self.reference_dtype
        network = self.architecture or f"sizes={self.sizes} activations={self.activations}"
        width = max([5] + [len(leaf.parameter) for leaf in self.leaves])
        lines = [
            f"check_gradients: {network} loss={self.loss_name} reduction={self.reduction} dtype={self.dtype}",
            f"  loss: handwritten={self.loss_handwritten:.17g} autodiff={self.loss_autodiff:.17g} "
            f"rel={self.loss_relative_error:.2e}",
            f"  {'layer':>5} {'param':>{width}} {'shape':>12} {'max abs':>10} {'rel':>10}  ok"
            + (f" {'hand vs ' + ref:>16} {'autodiff vs ' + ref:>20}" if ref else ""),
        ]
        for leaf in self.leaves:
            ok = "yes" if leaf.passed else "NO"
            lines.append(
                f"  {leaf.layer:>5} {leaf.parameter:>{width}} {leaf.shape!s:>12} "
                f"{leaf.max_abs_error:>10.2e} {leaf.relative_error:>10.2e}  "
                + (f"{ok:<3} {leaf.handwritten_vs_reference:>16.2e} {leaf.autodiff_vs_reference:>20.2e}" if ref else ok)
            )
        if ref:
            lines.append(f"  (vs {ref}: jax.grad in {ref} of the same parameters; reported, not part of the verdict)")
        verdict = "PASS" if self.passed else f"FAIL (first failing layer from the output: {self.first_failing_layer})"
        lines.append(f"  {verdict}: max relative error {self.max_relative_error:.2e}, tolerance {self.tolerance:.0e}")
        return "\n".join(lines)


def leaf_names(tree: object) -> list[tuple[int, str]]:
    """(top-level layer, parameter path) for every leaf of a network or gradient tree, in leaf order."""
    names = []
    for path, _ in jax.tree_util.tree_leaves_with_path(tree):
        if len(path) >= 2 and getattr(path[0], "name", None) == "layers" and hasattr(path[1], "idx"):
            names.append((path[1].idx, jax.tree_util.keystr(path[2:]).lstrip(".")))
        else:
            names.append((0, jax.tree_util.keystr(path).lstrip(".")))
    return names


def relative_errors(computed: list[np.ndarray], reference: list[np.ndarray], floor: float) -> list[float]:
    """The verdict's error per leaf: ||c - r|| / max(||r||, floor * ||all of r||), the one rule of the package.

    The floor keeps a leaf whose reference is (near) zero from turning rounding into a huge relative error;
    0 when the leaves are equal. A leaf with NaN or inf scores 0 if both agree exactly (NaN where NaN), inf
    otherwise: a NaN in stays visible, it never passes as a small error.
    """
    total = math.sqrt(sum(float(np.sum(r * r)) for r in reference))
    errors = []
    for c, r in zip(computed, reference):
        if not (np.all(np.isfinite(c)) and np.all(np.isfinite(r))):
            errors.append(0.0 if np.array_equal(c, r, equal_nan=True) else math.inf)
            continue
        difference = float(np.linalg.norm((c - r).ravel()))
        scale = max(float(np.linalg.norm(r.ravel())), floor * total)
        errors.append(0.0 if difference == 0.0 else (difference / scale if scale > 0 else math.inf))
    return errors


def compare_gradients(
    handwritten: AnyNetwork, autodiff: AnyNetwork, *, tolerance: float, floor: float
) -> tuple[LeafComparison, ...]:
    """Compare two gradient trees leaf by leaf; see ``LeafComparison`` for the error measure."""
    h_leaves = [np.asarray(leaf, dtype=np.float64) for leaf in jax.tree.leaves(handwritten)]
    g_leaves = [np.asarray(leaf, dtype=np.float64) for leaf in jax.tree.leaves(autodiff)]
    names = leaf_names(autodiff)
    comparisons = []
    errors = relative_errors(h_leaves, g_leaves, floor)
    for index, (h, g, relative) in enumerate(zip(h_leaves, g_leaves, errors)):
        comparisons.append(
            LeafComparison(
                layer=names[index][0],
                parameter=names[index][1],
                shape=h.shape,
                max_abs_error=float(np.max(np.abs(h - g))) if h.size else 0.0,
                relative_error=relative,
                passed=relative <= tolerance,
            )
        )
    return tuple(comparisons)


def check_gradients(
    net: AnyNetwork,
    x: Array,
    y: Array,
    *,
    loss: str,
    reduction: str = "mean",
    key: Array | None = None,
    tolerance: float | None = None,
    fast_compile: bool = False,
) -> GradientReport:
    """Compare ``purebp.value_and_grad`` with ``jax.value_and_grad`` of the same function.

    Both run jitted, at ``jax.default_matmul_precision("highest")`` (float32
    matmuls default to TF32 on recent NVIDIA GPUs). Per leaf, the relative
    error is ||h - g||_2 / max(||g||_2, FLOOR[dtype] * ||g_all||_2), computed
    in float64 on the host. The default tolerance (``TOLERANCE``) is 1e-10 for
    float64, 1e-5 for float32, 1e-1 for bfloat16 and 3e-2 for float16 (floors
    1e-6, 1e-3, 1e-2, 1e-2).

    In bfloat16 (8 significant bits, unit roundoff 2^-8 = 3.9e-3) and float16
    (11 bits, 2^-11 = 4.9e-4) the two passes round differently: the
    hand-written pass forms delta^L and G' by the notes' formulas, autodiff by
    its own rules, each rounding to the dtype. The 16-bit tolerances are about
    twice the largest hand-vs-autodiff error measured over 100 random
    architectures (experiments/mixed_precision.py, 514 leaves: median 4.6e-3,
    99th percentile 2.4e-2, max 5.2e-2 in bfloat16; 5.8e-4, 2.4e-3, 1.3e-2 in
    float16) and below the error of a wrong derivative (a G' 25% off is
    caught in both). For 16-bit networks each leaf also carries both
    gradients' error against jax.grad in float64 of the same parameters
    (``LeafComparison.*_vs_reference``, not part of the verdict): the accuracy
    of each pass. At a relu/leaky_relu kink a 16-bit z can land on the other
    side of 0 than in float64, which moves both far from float64 together
    while they still agree with each other. Returns a ``GradientReport``;
    ``str(report)`` is a table.

    ``fast_compile=True`` is for an architecture checked once (``purebp
    verify``), where compiling is nearly all the cost: the same two functions
    are traced into one program (XLA may compute the forward pass they share
    once) and compiled on CPU with ``FAST_COMPILE_OPTIONS`` (LLVM -O0, classic
    emitters). The math, op by op, is the same; the kernels are less
    optimised, so results can differ from the default compile in the last
    bits. Both gradients are compiled alike; the comparison is unchanged.
    With a ``key`` the default compile is used (see the comment in the code).

    ``key`` draws dropout masks, the same for both passes (a ``Sequential``
    with dropout is checked in training mode only when a key is given).
    """
    x, y = _finite_inputs(net, x, y, loss, reduction)
    dtype = np.dtype(net.dtype or x.dtype)
    tolerance = TOLERANCE.get(dtype, 1e-5) if tolerance is None else tolerance
    floor = FLOOR.get(dtype, FLOOR[np.dtype("float32")])
    (value_h, grads_h), (value_g, grads_g) = _both_passes(net, x, y, loss, reduction, key, fast_compile)
    leaves = compare_gradients(grads_h, grads_g, tolerance=tolerance, floor=floor)
    reference_dtype = None
    if dtype in LOW_PRECISION:
        leaves, reference_dtype = _with_reference(leaves, net, x, y, loss, reduction, key, grads_h, grads_g, floor)
    value_h, value_g = float(value_h), float(value_g)
    mlp = is_mlp(net)
    return GradientReport(
        sizes=net.sizes if mlp else (),
        activations=net.activations if mlp else (),
        architecture="" if mlp else repr(net),
        loss_name=loss,
        reduction=reduction,
        dtype=str(dtype),
        tolerance=tolerance,
        loss_handwritten=value_h,
        loss_autodiff=value_g,
        loss_relative_error=_loss_error(value_h, value_g, dtype),
        leaves=leaves,
        reference_dtype=reference_dtype,
    )


def _finite_inputs(net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str) -> tuple[Array, Array]:
    x, y = _inputs.coerce_inputs(net, x, y)
    _inputs.validate_inputs(net, x, y, loss=loss, reduction=reduction)
    # a NaN in the inputs makes both gradients NaN: say so instead of reporting a mismatch
    _inputs.check_finite("check_gradients: the input", x=x, y=y)
    _inputs.check_finite(
        "check_gradients: the network",
        **{f"layer {layer} {name}": leaf for (layer, name), leaf in zip(leaf_names(net), jax.tree.leaves(net))},
    )
    return x, y


def _both_passes(net, x, y, loss, reduction, key, fast_compile):
    """((L, grads) by the hand-written pass, (L, grads) by autodiff), both jitted at the highest matmul precision."""
    with jax.default_matmul_precision("highest"):
        # with a key the -O0 program has returned -inf/NaN for jax.grad's side on CPU (seen with jax 0.10.2 on
        # a float32 stack whose keys go unused): a check with a key always takes the default compile
        if fast_compile and key is None:
            return _fast_compile_call(net, x, y, loss, reduction, key)
        handwritten = _engine.compiled_value_and_grad(net, x, y, loss, reduction, key)
        return handwritten, _autodiff_value_and_grad_jit(net, x, y, loss, reduction, key)


def _loss_error(value_h: float, value_g: float, dtype: np.dtype) -> float:
    if value_h == value_g:
        return 0.0
    if math.isfinite(value_h) and math.isfinite(value_g):
        # jnp.finfo: np.finfo rejects the ml_dtypes types (bfloat16 is "not inexact" to NumPy)
        return abs(value_h - value_g) / max(abs(value_g), float(jnp.finfo(dtype).tiny))
    return math.inf


def _with_reference(leaves, net, x, y, loss, reduction, key, grads_h, grads_g, floor):
    """Return ``leaves`` with both 16-bit gradients' errors against jax.grad in float64 (float32 without x64)."""
    reference_dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32

    def upcast(tree):  # exact: every 16-bit value is a float32 and a float64 value
        return jax.tree.map(lambda a: a.astype(reference_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)

    with jax.default_matmul_precision("highest"):
        _, grads_r = _autodiff_value_and_grad_jit(upcast(net), upcast(x), upcast(y), loss, reduction, key)
    inf = math.inf  # the verdict is hand vs autodiff; these are reported only
    h_r = compare_gradients(grads_h, grads_r, tolerance=inf, floor=floor)
    g_r = compare_gradients(grads_g, grads_r, tolerance=inf, floor=floor)
    leaves = tuple(
        dataclasses.replace(leaf, handwritten_vs_reference=h.relative_error, autodiff_vs_reference=g.relative_error)
        for leaf, h, g in zip(leaves, h_r, g_r)
    )
    return leaves, np.dtype(reference_dtype).name


# ---------------------------------------------------------------- one layer's backward vs autodiff of its forward

# purebp's own layer kinds, from the table of layer kinds (their backward rules are proven by purebp's tests);
# check_layers_of checks every other layer, a user's registered kind included
BUILTIN_LAYERS = _layers.kinds.builtin_types()
INPUT_GRADIENT = "the input gradient dC/da"


@dataclasses.dataclass(frozen=True)
class PieceComparison:
    """One piece of a layer's backward: its input gradient or one parameter field, hand-written h vs autodiff g."""

    name: str  # INPUT_GRADIENT or "parameter 'w'" (the field's path inside the layer)
    shape: tuple[int, ...]
    max_abs_error: float
    relative_error: float  # as LeafComparison's, the floor taken against all pieces together
    passed: bool


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """What ``check_layer`` found; ``passed`` is True when every piece agrees, ``str()`` names the wrong ones."""

    layer: str
    dtype: str
    tolerance: float
    pieces: tuple[PieceComparison, ...]

    @property
    def passed(self) -> bool:
        return all(piece.passed for piece in self.pieces)

    @property
    def failing(self) -> tuple[str, ...]:
        """The names of the pieces that disagree, e.g. ("the input gradient dC/da", "parameter 'scale'")."""
        return tuple(piece.name for piece in self.pieces if not piece.passed)

    @property
    def max_relative_error(self) -> float:
        return max((piece.relative_error for piece in self.pieces), default=0.0)

    def __str__(self) -> str:
        width = max(len(piece.name) for piece in self.pieces)
        lines = [f"check_layer: {self.layer} dtype={self.dtype}: backward vs autodiff of forward"]
        for piece in self.pieces:
            lines.append(
                f"  {piece.name:<{width}} {piece.shape!s:>12} max abs {piece.max_abs_error:.2e} "
                f"rel {piece.relative_error:.2e}  {'ok' if piece.passed else 'WRONG'}"
            )
        if self.passed:
            lines.append(f"  PASS: max relative error {self.max_relative_error:.2e}, tolerance {self.tolerance:.0e}")
        else:
            lines.append(f"  FAIL, wrong: {'; '.join(self.failing)} (tolerance {self.tolerance:.0e})")
        return "\n".join(lines)


def check_layer(
    layer: object, x: Array, key: Array | None = None, *, tolerance: float | None = None, seed: int = 0
) -> LayerReport:
    """Compare ``layer.backward`` with autodiff (``jax.vjp``) of ``layer.forward`` at input ``x``.

    Runs ``out, cache = layer.forward(x, keys)`` (``keys``: one per example
    from ``key``, as the engine passes them; None without a key), draws a
    random dC/d(out) from ``seed``, and compares ``layer.backward(cache, g)``
    with the vector-Jacobian product of the forward, piece by piece: the
    input gradient and every parameter field, by name. Both jitted, at
    highest matmul precision; the error measure and default tolerances are
    ``check_gradients``' (float64: 1e-10 relative per piece). Raises
    TypeError/ValueError when backward returns the wrong structure or shape.
    """
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"check_layer: x must be a non-empty batch, shape (N, ...), got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"check_layer: x must be a floating array, got dtype {x.dtype}")
    if key is not None:
        _inputs.check_key(key)
    keys = None if key is None else _layers.example_keys(key, x.shape[0])
    return _check_layer(layer, x, keys, tolerance, seed)


def _check_layer(layer: object, x: Array, keys: Array | None, tolerance: float | None, seed: int) -> LayerReport:
    if not (callable(getattr(layer, "forward", None)) and callable(getattr(layer, "backward", None))):
        raise TypeError(
            f"check_layer: expected a layer with forward(a, key=None) and backward(cache, g), got {describe(layer)}"
        )
    dtype = np.dtype(x.dtype)
    for path, leaf in jax.tree_util.tree_leaves_with_path(layer):
        if getattr(leaf, "dtype", None) != dtype:
            raise TypeError(
                f"check_layer: parameter {jax.tree_util.keystr(path).lstrip('.')} of {describe(layer)} has dtype "
                f"{getattr(leaf, 'dtype', type(leaf).__name__)}, x has {dtype}: use one dtype"
            )
    if tolerance is None:
        tolerance = TOLERANCE.get(dtype, 1e-5)
    floor = FLOOR.get(dtype, FLOOR[np.dtype("float32")])
    out = jax.eval_shape(lambda layer, x, keys: layer.forward(x, keys)[0], layer, x, keys)
    cotangent = jnp.asarray(np.random.default_rng(seed).standard_normal(out.shape), dtype=out.dtype)
    with jax.default_matmul_precision("highest"):
        grad_in, grads, auto_in, auto_grads = _layer_both_jit(layer, x, keys, cotangent)
    if jax.tree.structure(grads) != jax.tree.structure(layer):
        raise TypeError(
            f"check_layer: {type(layer).__name__}.backward returned parameter gradients with structure "
            f"{jax.tree.structure(grads)}; expected the layer's own, {jax.tree.structure(layer)} "
            "(return a layer of the same type holding dC/d(each field))"
        )
    if getattr(grad_in, "shape", None) != x.shape:
        raise ValueError(
            f"check_layer: {type(layer).__name__}.backward returned an input gradient of shape "
            f"{getattr(grad_in, 'shape', None)}; expected x's shape {x.shape}"
        )
    names = [INPUT_GRADIENT] + [
        f"parameter {jax.tree_util.keystr(path).lstrip('.')!r}"
        for path, _ in jax.tree_util.tree_leaves_with_path(layer)
    ]
    hands = [np.asarray(grad_in, np.float64)] + [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    autos = [np.asarray(auto_in, np.float64)] + [np.asarray(g, np.float64) for g in jax.tree.leaves(auto_grads)]
    pieces = []
    for name, h, g, relative in zip(names, hands, autos, relative_errors(hands, autos, floor)):
        max_abs = float(np.max(np.abs(h - g))) if h.size else 0.0
        pieces.append(PieceComparison(name, h.shape, max_abs, relative, relative <= tolerance))
    return LayerReport(layer=describe(layer), dtype=dtype.name, tolerance=tolerance, pieces=tuple(pieces))


@jax.jit
def _layer_both_jit(layer, x, keys, cotangent):
    _, cache = layer.forward(x, keys)
    grad_in, grads = layer.backward(cache, cotangent)
    _, vjp = jax.vjp(lambda layer, x: layer.forward(x, keys)[0], layer, x)
    auto_grads, auto_in = vjp(cotangent)
    return grad_in, grads, auto_in, auto_grads


def check_layers_of(net: AnyNetwork, x: Array, *, key: Array | None = None) -> tuple[LayerReport, ...]:
    """``check_layer`` on every top-level layer of ``net`` that is not built in, at the input it gets from ``x``."""
    keys = None if key is None else _layers.example_keys(key, x.shape[0])
    outputs, _ = _engine.forward_layers(net, x, key)
    inputs = (x,) + outputs[:-1]
    return tuple(
        _check_layer(layer, inputs[index], _layers.layer_keys(keys, index), None, index)
        for index, layer in enumerate(net.layers)
        if not isinstance(layer, BUILTIN_LAYERS)
    )


def check_activation_derivative(
    name: str, forward: Callable[[Array], Array], derivative: Callable[[Array], Array]
) -> None:
    """Raise ValueError unless ``derivative`` equals ``jax.grad(forward)`` on [-6, 6].

    Sample points avoid 0 (where kinks such as relu's have a conventional
    derivative). Tolerance: |d - g| <= 1e-4 |g| + 1e-6 in float32 and
    1e-8 |g| + 1e-10 in float64.
    """
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    rtol, atol = (1e-8, 1e-10) if dtype == jnp.float64 else (1e-4, 1e-6)
    points = jnp.linspace(-6.0, 6.0, 240, dtype=dtype) + 0.025  # grid shifted off 0
    try:
        expected = jax.vmap(jax.grad(lambda z: forward(z).sum()))(points)
        actual = derivative(points)
        values = forward(points)
    except Exception as error:
        raise ValueError(f"activation {name!r}: forward or derivative failed on sample points: {error}") from error
    if getattr(values, "shape", None) != points.shape or getattr(actual, "shape", None) != points.shape:
        raise ValueError(
            f"activation {name!r}: forward and derivative must be elementwise (same shape out as in), "
            f"got {getattr(values, 'shape', None)} and {getattr(actual, 'shape', None)} for {points.shape}"
        )
    expected, actual = np.asarray(expected), np.asarray(actual)
    error = np.abs(actual - expected)
    bad = ~(error <= rtol * np.abs(expected) + atol)
    if np.any(bad):
        worst = int(np.argmax(np.where(bad, error, -1.0)))
        raise ValueError(
            f"activation {name!r}: the derivative does not match jax.grad of G at {int(bad.sum())} of "
            f"{points.size} sample points; worst at z={float(points[worst]):.4g}: derivative gave "
            f"{actual[worst]:.6g}, jax.grad(G) gives {expected[worst]:.6g}"
        )


# check_loss_derivative's sample points: N examples of n_out outputs, drawn from np.random.default_rng(0)
LOSS_SAMPLE_SHAPE = (16, 4)


def check_loss_derivative(
    name: str,
    cost: Callable[[Array, Array, Array], Array],
    *,
    output_delta: Callable[[Array, Array, Array], Array] | None = None,
    grad_output: Callable[[Array, Array, Array], Array] | None = None,
    output_activation: str | None = None,
) -> None:
    """Raise ValueError unless the derivative given for ``cost`` equals autodiff of ``cost``.

    Sample points (``LOSS_SAMPLE_SHAPE``: N = 16 examples of n_out = 4
    outputs, from ``np.random.default_rng(0)``, in float64, float32 without
    x64): z ~ N(0, 2^2) elementwise, a = G(z) for the output activation G
    (identity when ``output_activation`` is None), float targets y ~ U(0, 1).
    What is compared, element by element:

    - ``output_delta(z, a, y)`` with jax.grad of z -> sum_n C^n(z, G(z), y),
      the total derivative delta^L = dC/dz^L through a = G(z);
    - ``grad_output`` with a named G: delta^L = G's chain of
      ``grad_output(z, a, y)`` (dC/da (.) G'(z), the Jacobian product for
      softmax), with the same;
    - ``grad_output`` for any G (``output_activation`` None): ``grad_output``
      with the partial dC/da (z held fixed), and the partial dC/dz must vanish:
      delta^L = dC/da (.) G'(z) holds for every G only when C reads a alone.

    An element passes when |d - g| <= rtol max(|g|, 1e-3 max|g|) + atol, d
    the given value and g autodiff's, with (rtol, atol) = (1e-8, 1e-12) in
    float64 and (1e-4, 1e-7) in float32; the relative error reported is
    |d - g| / max(|g|, 1e-3 max|g|). The cost must return C^n, shape (N,),
    finite at the sample points, and the derivative shape (N, n_out), both
    in the dtype of z.
    """
    dtype = np.dtype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    rtol, atol = (1e-8, 1e-12) if dtype == np.float64 else (1e-4, 1e-7)
    output = _activations.get(output_activation or "identity")
    rng = np.random.default_rng(0)
    z = jnp.asarray(2.0 * rng.standard_normal(LOSS_SAMPLE_SHAPE), dtype=dtype)
    y = jnp.asarray(rng.uniform(size=LOSS_SAMPLE_SHAPE), dtype=dtype)
    a = output.forward(z)
    points = (np.asarray(z), np.asarray(a), np.asarray(y))
    derivative = output_delta if output_delta is not None else grad_output
    where = "output_delta" if output_delta is not None else "grad_output"

    def attempt(what: str, compute: Callable[[], Array]) -> Array:
        try:
            return compute()
        except Exception as error:  # the user's function: say which one failed, keep the cause
            raise ValueError(f"loss {name!r}: {what} failed on the sample points: {error}") from error

    values = attempt("the cost", lambda: cost(z, a, y))
    _check_returned(name, "the cost", values, LOSS_SAMPLE_SHAPE[:1], dtype)
    _check_finite_cost(name, np.asarray(values), points, output_activation)
    given = attempt(where, lambda: derivative(z, a, y))
    _check_returned(name, where, given, LOSS_SAMPLE_SHAPE, dtype)
    if output_delta is None and output_activation is None:
        grad_z, expected = attempt(
            "autodiff of the cost", lambda: jax.grad(lambda z_, a_: jnp.sum(cost(z_, a_, y)), argnums=(0, 1))(z, a)
        )
        expected = np.asarray(expected)
        _refuse_a_cost_reading_z(name, np.asarray(grad_z), expected, points, rtol, atol)
        what, label, autodiff = "grad_output", "grad_output", "autodiff's dC/da"
    else:
        expected = attempt(
            "autodiff of the cost", lambda: jax.grad(lambda z_: jnp.sum(cost(z_, output.forward(z_), y)))(z)
        )
        if output_delta is None:
            given = output.chain(given, z, a)
            what = f"grad_output chained through G = {output.name} (delta^L = dC/da (.) G'(z))"
            label = "delta^L from grad_output"
        else:
            what = label = "output_delta"
        autodiff = "autodiff's dC/dz"
    _compare_loss_derivative(name, what, label, np.asarray(given), np.asarray(expected), points, rtol, atol, autodiff)


def _refuse_a_cost_reading_z(name: str, grad_z: np.ndarray, expected: np.ndarray, points: tuple, rtol, atol):
    reads_z = ~(np.abs(grad_z) <= rtol * float(np.max(np.abs(expected), initial=0.0)) + atol)
    if np.any(reads_z):
        n, j = np.unravel_index(int(np.argmax(np.where(reads_z, np.abs(grad_z), -1.0))), grad_z.shape)
        raise ValueError(
            f"loss {name!r}: with output_activation=None (any output layer) the cost may read a only, since "
            f"delta^L = dC/da (.) G'(z) must hold for every G; but autodiff gives dC/dz = {grad_z[n, j]:.10g} "
            f"at example {n}, output {j} ({_describe_point(points, n, j)}): name the output activation "
            "the cost is defined on (output_activation=...)"
        )


def _check_finite_cost(name: str, values: np.ndarray, points: tuple, output_activation: str | None) -> None:
    if not np.all(np.isfinite(values)):
        n = int(np.flatnonzero(~np.isfinite(values))[0])
        raise ValueError(
            f"loss {name!r}: the cost is {values[n]} at sample example {n} ({_describe_point(points, n)}); "
            "it must be finite there (sample points: see purebp.check.check_loss_derivative)"
            + ("; a cost defined on some outputs only names that output_activation" if not output_activation else "")
        )


def _check_returned(name: str, what: str, value, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if getattr(value, "shape", None) != shape or np.dtype(getattr(value, "dtype", None)) != dtype:
        raise ValueError(
            f"loss {name!r}: {what} must return a {dtype} array of shape {shape} for {dtype} inputs of shape "
            f"{LOSS_SAMPLE_SHAPE}; got {getattr(value, 'dtype', type(value).__name__)} of shape "
            f"{getattr(value, 'shape', None)}"
        )


def _describe_point(points: tuple[np.ndarray, ...], n: int, j: int | None = None) -> str:
    z, a, y = (p[n] if j is None else p[n, j] for p in points)
    if j is None:
        return ", ".join(f"{label}={np.array2string(v, precision=4)}" for label, v in zip("zay", (z, a, y)))
    return f"z={z:.4g}, a={a:.4g}, y={y:.4g}"


def _compare_loss_derivative(
    name: str,
    what: str,
    label: str,
    given: np.ndarray,
    expected: np.ndarray,
    points: tuple[np.ndarray, ...],
    rtol: float,
    atol: float,
    autodiff: str,
) -> None:
    """Raise ValueError naming the worst sample point where ``given`` and ``expected`` differ beyond tolerance."""
    scale = np.maximum(np.abs(expected), 1e-3 * float(np.max(np.abs(expected), initial=0.0)))
    error = np.abs(given - expected)
    bad = ~(error <= rtol * scale + atol)  # NaN is bad
    if not np.any(bad):
        return
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(scale > 0, error / scale, np.inf)
    relative = np.where(np.isnan(relative), np.inf, relative)
    n, j = np.unravel_index(int(np.argmax(np.where(bad, relative, -1.0))), bad.shape)
    raise ValueError(
        f"loss {name!r}: {what} does not match autodiff of the cost at {int(bad.sum())} of {bad.size} sample "
        f"points; worst at example {n}, output {j} ({_describe_point(points, n, j)}): {label} gave "
        f"{given[n, j]:.10g}, {autodiff} is {expected[n, j]:.10g} (relative error {relative[n, j]:.2e}, "
        f"tolerance {rtol:.0e})"
    )
