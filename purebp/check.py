"""The hand-written backward pass against jax.grad of the same forward pass and cost.

This is the only module of the library that uses JAX's autodiff: it is the
witness the hand-written pass is compared with, never part of it.

Why one module of ~700 lines: the structural test (tests/core/test_structure.py) allows autodiff in the
witnesses only, and keeping every comparison with autodiff here (gradients, a layer's backward, a
registered G' or cost derivative) keeps that boundary one file wide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

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

# The verdict (see ``check_gradients``): per leaf, the hand-written gradient h and autodiff's a are both
# measured against a float64 truth t (autodiff of the same network and inputs promoted to float64), and h is
# wrong when ||h - t|| > max(KAPPA ||a - t||, TOLERANCE[dtype] s), s = max(||t_leaf||, FLOOR[dtype] ||t_all||).
# KAPPA: h may be a few times as far from the truth as autodiff is (two different orders of rounding), never
# far more. A wrong rule moves h by its own error, which rounding does not reach.
KAPPA = 4.0
# TOLERANCE: the floor of the verdict, relative to s, in units of the dtype's epsilon: 84 eps in float32 (2^-23),
# 13 in bfloat16 (2^-7), 31 in float16 (2^-10), well above where a well-conditioned leaf lands (about 1 eps from
# the truth, median over random float32 stacks); on ill-conditioned leaves the KAPPA term sets the bound. In
# float64 the truth is autodiff itself (||a - t|| = 0): 1e-10 is the whole tolerance there, as it always was.
TOLERANCE = {
    np.dtype("float64"): 1e-10,
    np.dtype("float32"): 1e-5,
    np.dtype(jnp.bfloat16): 1e-1,
    np.dtype(jnp.float16): 3e-2,
}
# FLOOR: a leaf whose truth is below FLOOR * ||t_all|| (dead units, a sum that cancels over the batch, a conv
# bias a layer norm removes) is measured against that floor instead of its own norm: its rounding error is of
# the size of the terms it was summed from, which the network's gradient scale bounds, not the leaf's.
FLOOR = {
    np.dtype("float64"): 1e-3,
    np.dtype("float32"): 1e-3,
    np.dtype(jnp.bfloat16): 1e-2,
    np.dtype(jnp.float16): 1e-2,
}
TRUTH_DTYPE = "float64"


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


def rules_signature(tree: object) -> tuple:
    """Every layer class in ``tree`` (residual bodies included) with the forward and backward functions it runs.

    Part of the key of check_gradients' programs: a program is traced again when a rule changes (a subclass, or
    a method patched on a class), so a check never runs a program traced with an older rule. JAX's own caches
    key a program on the classes in the tree, not on the code of their methods.
    """
    found = []

    def visit(node: object) -> None:
        cls = type(node)
        if callable(getattr(cls, "backward", None)):
            found.append((cls, getattr(cls, "forward", None), cls.backward))
        for child in jax.tree_util.tree_leaves(node, is_leaf=lambda item: item is not node):
            if child is not node:
                visit(child)

    visit(tree)
    return tuple(found)


def _all_value_and_grads(
    net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str, key: Array | None = None, truth: bool = False,
    rules: tuple = (),
):  # fmt: skip
    # the hand-written pass and autodiff from their unjitted functions, in one program; with ``truth`` (traced with
    # x64 on) also autodiff of the promoted network, the float64 truth. ``rules`` is part of the key only.
    del rules
    hand = _engine.loss_and_grads(net, x, y, loss=loss, reduction=reduction, key=key)
    autodiff = jax.value_and_grad(loss_function)(net, x, y, loss, reduction, key)
    if not truth:
        return hand, autodiff, None
    return hand, autodiff, jax.value_and_grad(loss_function)(*promote((net, x, y)), loss, reduction, key)


_check_jit = jax.jit(_all_value_and_grads, static_argnames=("loss", "reduction", "truth", "rules"))


def _handwritten(net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str, key: Array | None, rules: tuple):
    del rules  # part of the key only
    return _engine.loss_and_grads(net, x, y, loss=loss, reduction=reduction, key=key)


_handwritten_jit = jax.jit(_handwritten, static_argnames=("loss", "reduction", "rules"))


@functools.cache
def _fast_handwritten_jit(platform: str):
    options = FAST_COMPILE_OPTIONS.get(platform)
    return jax.jit(_handwritten, static_argnames=("loss", "reduction", "rules"), compiler_options=options)


_programs.on_clear(_fast_handwritten_jit.cache_clear)


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
        _all_value_and_grads,
        static_argnames=("loss", "reduction", "truth", "rules"),
        compiler_options=FAST_COMPILE_OPTIONS.get(platform),
    )


_programs.on_clear(_fast_compile_jit.cache_clear)


def _fast_compile_call(
    net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str, key: Array | None = None, truth: bool = False
):
    jitted = _fast_compile_jit(jax.default_backend())
    # traced with jit disabled, jnp's jitted functions inline into one flat jaxpr with the same equations: less
    # tracing, and XLA would inline them anyway. Compiled ahead of time, the executable is in no cache: it is
    # freed when this returns. The trace is keyed on the rules too (JAX caches traces), as the default path is.
    with jax.disable_jit():
        lowered = jitted.trace(net, x, y, loss, reduction, key, truth, rules_signature(net)).lower()
    return lowered.compile()(net, x, y, key)


class GradientPasses(NamedTuple):
    """What check_gradients compares, each (L, grads): the hand-written pass, autodiff, and the float64 truth
    (autodiff of the promoted network; None for a float64 network, whose truth is autodiff itself)."""

    handwritten: tuple
    autodiff: tuple
    truth: tuple | None


@dataclasses.dataclass(frozen=True)
class LeafComparison:
    """One parameter leaf: the hand-written h and autodiff's a, each against the float64 truth t.

    ``relative_error`` = ||h - t|| / s and ``autodiff_error`` = ||a - t|| / s, s = max(||t||, FLOOR ||t_all||);
    ``allowed`` = max(KAPPA * autodiff_error, tolerance); ``passed``: relative_error <= allowed. In float64 the
    truth is autodiff itself, so autodiff_error is 0 and relative_error is h against autodiff.
    """

    layer: int  # the top-level layer the leaf belongs to
    parameter: str  # "w" or "b" for a dense layer; the field path inside any other layer, e.g. "layers[0].w"
    shape: tuple[int, ...]
    max_abs_error: float  # max_i |h_i - t_i|
    relative_error: float  # ||h - t||_2 / max(||t||_2, FLOOR * ||t_all||_2)
    passed: bool
    autodiff_error: float = 0.0  # ||a - t||_2, same denominator
    allowed: float = math.nan  # the bound relative_error is held to
    # autodiff is so far from the truth here that KAPPA times its distance, not the tolerance, sets the bound:
    # the dtype cannot resolve this leaf better than that (an ill-conditioned leaf, not a wrong rule)
    cannot_tell: bool = False
    # set only where the first rule failed below float64: the same hand-written pass run on the network promoted
    # to float64, against the truth (same measure); the leaf passes when it is within TOLERANCE[float64], i.e.
    # the rule is right and the first rule saw rounding (the hand-written formula rounds worse than autodiff's)
    float64_error: float | None = None

    # the names of the 16-bit report before the verdict measured both passes against the truth
    @property
    def handwritten_vs_reference(self) -> float:
        return self.relative_error

    @property
    def autodiff_vs_reference(self) -> float:
        return self.autodiff_error


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
    loss_relative_error: float  # |L_h - L_t| / |L_t|
    leaves: tuple[LeafComparison, ...]
    reference_dtype: str | None = None  # the truth's dtype when it is not the network's (below float64)
    architecture: str = ""  # the layers of a Sequential (sizes and activations are empty then)
    kappa: float = KAPPA
    loss_truth: float = math.nan
    loss_autodiff_error: float = 0.0  # |L_a - L_t| / |L_t|
    loss_float64_error: float | None = None  # as LeafComparison.float64_error, for the loss
    # the three (L, grads) the report judged: hand-written, autodiff, truth (None in float64), for a caller that
    # compares them with more oracles without computing them again; not part of equality or repr
    passes: GradientPasses | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def loss_passed(self) -> bool:
        if self.loss_relative_error <= max(self.kappa * self.loss_autodiff_error, self.tolerance):
            return True
        return self.loss_float64_error is not None and self.loss_float64_error <= TOLERANCE[np.dtype("float64")]

    @property
    def passed(self) -> bool:
        return self.loss_passed and all(leaf.passed for leaf in self.leaves)

    @property
    def max_relative_error(self) -> float:
        """The worst hand-written distance from the truth over the loss and every leaf."""
        return max([self.loss_relative_error] + [leaf.relative_error for leaf in self.leaves])

    @property
    def max_autodiff_error(self) -> float:
        """The worst autodiff distance from the truth (0 in float64, where autodiff is the truth)."""
        return max([self.loss_autodiff_error] + [leaf.autodiff_error for leaf in self.leaves])

    @property
    def first_failing_layer(self) -> int | None:
        """The first layer, counting from the output (where backprop starts), that disagrees."""
        failing = [leaf.layer for leaf in self.leaves if not leaf.passed]
        return max(failing) if failing else None

    def __str__(self) -> str:
        truth = self.reference_dtype
        network = self.architecture or f"sizes={self.sizes} activations={self.activations}"
        width = max([5] + [len(leaf.parameter) for leaf in self.leaves])
        against = f"the {truth} truth" if truth else "jax.grad"
        lines = [
            f"check_gradients: {network} loss={self.loss_name} reduction={self.reduction} dtype={self.dtype}",
            f"  loss: handwritten={self.loss_handwritten:.17g} autodiff={self.loss_autodiff:.17g} "
            f"rel={self.loss_relative_error:.2e}"
            + (f" (vs {truth} {self.loss_truth:.17g})" if truth else "")
            + ("" if self.loss_float64_error is None else f"; in float64 {self.loss_float64_error:.1e}"),
            f"  {'layer':>5} {'param':>{width}} {'shape':>12} {'max abs':>10} {'hand':>10}"
            + (f" {'autodiff':>10} {'allowed':>10}" if truth else "")
            + f"  ok   (relative distance from {against})",
        ]
        for leaf in self.leaves:
            ok = "yes" if leaf.passed else "NO"
            lines.append(
                f"  {leaf.layer:>5} {leaf.parameter:>{width}} {leaf.shape!s:>12} {leaf.max_abs_error:>10.2e} "
                f"{leaf.relative_error:>10.2e}"
                + (f" {leaf.autodiff_error:>10.2e} {leaf.allowed:>10.2e}" if truth else "")
                + f"  {ok}"
                + _leaf_note(leaf, self.dtype)
            )
        if truth:
            lines.append(
                f"  (hand, autodiff: each gradient's distance from the truth, autodiff of the same network and inputs "
                f"in {truth}; a leaf fails when hand > max({self.kappa:g} x autodiff, {self.tolerance:.0e}))"
            )
        verdict = "PASS" if self.passed else f"FAIL (first failing layer from the output: {self.first_failing_layer})"
        lines.append(
            f"  {verdict}: max relative error {self.max_relative_error:.2e}"
            + (f" (autodiff {self.max_autodiff_error:.2e}), kappa {self.kappa:g}" if truth else "")
            + f", tolerance {self.tolerance:.0e}"
        )
        return "\n".join(lines)


def _leaf_note(leaf: LeafComparison, dtype: str) -> str:
    if leaf.float64_error is not None:
        verdict = "the rule is right, this is rounding" if leaf.passed else "the rule is wrong"
        distance = f"{leaf.float64_error:.1e}"
        return f"  ({dtype} cannot decide; in float64 the same pass is {distance} from the truth: {verdict})"
    return f"  ({dtype} cannot tell: autodiff is as far)" if leaf.cannot_tell else ""


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
    handwritten: AnyNetwork,
    autodiff: AnyNetwork,
    *,
    tolerance: float,
    floor: float,
    truth: AnyNetwork | None = None,
    kappa: float = KAPPA,
) -> tuple[LeafComparison, ...]:
    """Compare two gradient trees leaf by leaf against ``truth`` (``autodiff`` itself when None).

    Per leaf: e_h = ||h - t|| / s, e_a = ||a - t|| / s, s = max(||t||, floor ||t_all||) (``relative_errors``);
    the leaf passes when e_h <= max(kappa e_a, tolerance) and e_h is finite. See ``LeafComparison``.
    """
    h_leaves = [np.asarray(leaf, dtype=np.float64) for leaf in jax.tree.leaves(handwritten)]
    a_leaves = [np.asarray(leaf, dtype=np.float64) for leaf in jax.tree.leaves(autodiff)]
    t_leaves = a_leaves if truth is None else [np.asarray(leaf, dtype=np.float64) for leaf in jax.tree.leaves(truth)]
    names = leaf_names(autodiff)
    h_errors = relative_errors(h_leaves, t_leaves, floor)
    a_errors = [0.0] * len(a_leaves) if truth is None else relative_errors(a_leaves, t_leaves, floor)
    comparisons = []
    for index, (h, t, e_h, e_a) in enumerate(zip(h_leaves, t_leaves, h_errors, a_errors)):
        # autodiff non-finite where the truth is finite (a 16-bit overflow) is no measure of rounding: the leaf is
        # held to the tolerance, and below float64 decided in float64
        allowed = max(kappa * e_a, tolerance) if math.isfinite(e_a) else tolerance
        comparisons.append(
            LeafComparison(
                layer=names[index][0],
                parameter=names[index][1],
                shape=h.shape,
                max_abs_error=float(np.max(np.abs(h - t))) if h.size else 0.0,
                relative_error=e_h,
                passed=math.isfinite(e_h) and e_h <= allowed,
                autodiff_error=e_a,
                allowed=allowed,
                cannot_tell=kappa * e_a > tolerance,
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
    """Compare ``purebp.value_and_grad`` with ``jax.value_and_grad`` of the same function, both against the truth.

    The truth t is autodiff of the same network and inputs promoted to
    float64 (exactly: every float32 or 16-bit value is a float64 value),
    computed with x64 on whatever the caller's setting; in float64 it is
    autodiff itself. Per leaf, the hand-written gradient h and autodiff's
    a are measured against it, e_h = ||h - t||_2 / s and e_a = ||a - t||_2 / s
    with s = max(||t_leaf||_2, FLOOR[dtype] ||t_all||_2) (computed in float64
    on the host), and the leaf is a mismatch when

        e_h > max(KAPPA e_a, tolerance),   KAPPA = 4.

    So a leaf that the dtype cannot resolve (autodiff is as far from the
    truth: a layer norm after a narrow layer, a conv bias that a layer norm
    removes) is not called a mismatch, and a wrong rule, which moves h by
    its own error while a stays within rounding, is. The default tolerance
    (``TOLERANCE``) is 1e-10 for float64, 1e-5 for float32, 1e-1 for
    bfloat16 and 3e-2 for float16; FLOOR is 1e-3 (1e-2 for 16-bit dtypes):
    a leaf that is a cancellation (its truth below FLOOR of the network's
    gradient) carries rounding of the size of the terms it was summed from,
    so it is measured against the network's gradient scale. The loss is
    held to the same rule. Both passes run jitted, at
    ``jax.default_matmul_precision("highest")`` (float32 matmuls default to
    TF32 on recent NVIDIA GPUs). Returns a ``GradientReport``; ``str(report)``
    is a table with both distances per leaf.

    ``fast_compile=True`` is for an architecture checked once (``purebp
    verify``), where compiling is nearly all the cost: the functions are
    traced into one program and compiled on CPU with
    ``FAST_COMPILE_OPTIONS`` (LLVM -O0, classic emitters). The math, op by
    op, is the same; the kernels are less optimised, so results can differ
    from the default compile in the last bits. With a ``key`` the default
    compile is used (see the comment in the code).

    ``key`` draws dropout masks, the same for every pass (a ``Sequential``
    with dropout is checked in training mode only when a key is given).
    """
    x, y = _finite_inputs(net, x, y, loss, reduction)
    dtype = np.dtype(net.dtype or x.dtype)
    tolerance = TOLERANCE.get(dtype, 1e-5) if tolerance is None else tolerance
    floor = FLOOR.get(dtype, FLOOR[np.dtype("float32")])
    passes = GradientPasses(*_all_passes(net, x, y, loss, reduction, key, fast_compile))
    leaves, losses = _judge(passes, (net, x, y), dtype, loss, reduction, key, tolerance, floor, fast_compile)
    mlp = is_mlp(net)
    return GradientReport(
        sizes=net.sizes if mlp else (),
        activations=net.activations if mlp else (),
        architecture="" if mlp else repr(net),
        loss_name=loss,
        reduction=reduction,
        dtype=str(dtype),
        tolerance=tolerance,
        leaves=leaves,
        reference_dtype=None if passes.truth is None else TRUTH_DTYPE,
        passes=passes,
        **losses,
    )


def _judge(passes: GradientPasses, data: tuple, dtype: np.dtype, loss, reduction, key, tolerance, floor, fast_compile):
    """The verdict on ``passes``: the leaves, then the loss's fields of the report (see ``check_gradients``)."""
    (value_h, grads_h), (value_g, grads_g), truth = passes
    value_t, grads_t = truth if truth is not None else (value_g, None)
    leaves = compare_gradients(grads_h, grads_g, tolerance=tolerance, floor=floor, truth=grads_t)
    value_h, value_g, value_t = float(value_h), float(value_g), float(value_t)
    loss_error = _loss_error(value_h, value_t, dtype)
    loss_autodiff_error = _loss_error(value_g, value_t, dtype)
    loss_failed = not loss_error <= max(KAPPA * loss_autodiff_error, tolerance)
    loss_float64_error = None
    if truth is not None and (loss_failed or not all(leaf.passed for leaf in leaves)):
        leaves, loss_float64_error = _decide_in_float64(
            leaves, loss_failed, data, loss, reduction, key, truth, fast_compile
        )
    losses = {
        "loss_handwritten": value_h,
        "loss_autodiff": value_g,
        "loss_relative_error": loss_error,
        "loss_truth": value_t,
        "loss_autodiff_error": loss_autodiff_error,
        "loss_float64_error": loss_float64_error,
    }
    return leaves, losses


def _decide_in_float64(leaves, loss_failed, data, loss, reduction, key, truth, fast_compile):
    """Where the first rule failed below float64: run the same hand-written pass on the promoted network; a leaf
    (or the loss) it puts within TOLERANCE[float64] of the truth passes, with that error recorded."""
    float64 = np.dtype("float64")
    value_64, grads_64 = handwritten_in_float64(
        *data, loss=loss, reduction=reduction, key=key, fast_compile=fast_compile
    )
    value_t, grads_t = truth
    again = compare_gradients(grads_64, grads_t, tolerance=TOLERANCE[float64], floor=FLOOR[float64])
    leaves = tuple(
        leaf if leaf.passed else dataclasses.replace(leaf, passed=twin.passed, float64_error=twin.relative_error)
        for leaf, twin in zip(leaves, again)
    )
    loss_float64_error = _loss_error(float(value_64), float(value_t), float64) if loss_failed else None
    return leaves, loss_float64_error


def handwritten_in_float64(
    net: AnyNetwork, x: Array, y: Array, *, loss: str, reduction: str = "mean", key: Array | None = None,
    fast_compile: bool = False,
) -> tuple[Array, AnyNetwork]:  # fmt: skip
    """(L, grads) of the hand-written pass on the network and inputs promoted to float64 (x64 on for the call).

    The float64 decision of ``check_gradients``: where float32 (or 16 bits) cannot decide a leaf, this says
    whether the rule itself is right. Keyed on the layers' rules (``rules_signature``); unchecked inputs.
    """
    promoted, rules = promote((net, x, y)), rules_signature(net)
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
        if fast_compile and key is None:  # as check_gradients' program was compiled: once, at XLA's quick settings
            jitted = _fast_handwritten_jit(jax.default_backend())
            with jax.disable_jit():
                compiled = jitted.trace(*promoted, loss, reduction, key, rules).lower().compile()
            return compiled(*promoted, key)
        return _handwritten_jit(*promoted, loss, reduction, key, rules)


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


def _all_passes(net, x, y, loss, reduction, key, fast_compile):
    """(L, grads) by the hand-written pass, by autodiff, and by autodiff in float64 (None for a float64 network),
    all from one program, at the highest matmul precision."""
    truth = np.dtype(net.dtype or x.dtype) != np.float64
    # traced with x64 on when the truth is wanted (whatever the caller's setting): the promoted copy is float64
    with jax.enable_x64(True) if truth else contextlib.nullcontext(), jax.default_matmul_precision("highest"):
        # with a key the -O0 program has returned -inf/NaN for jax.grad's side on CPU (seen with jax 0.10.2 on
        # a float32 stack whose keys go unused): a check with a key always takes the default compile
        if fast_compile and key is None:
            return _fast_compile_call(net, x, y, loss, reduction, key, truth)
        return _check_jit(net, x, y, loss, reduction, key, truth, rules_signature(net))


def promote(tree: object) -> object:
    """``tree`` with every floating leaf in float64 (exact from any narrower float): the truth's inputs."""
    return jax.tree.map(lambda a: a.astype(np.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _loss_error(value_h: float, value_g: float, dtype: np.dtype) -> float:
    if value_h == value_g:
        return 0.0
    if math.isfinite(value_h) and math.isfinite(value_g):
        # jnp.finfo: np.finfo rejects the ml_dtypes types (bfloat16 is "not inexact" to NumPy)
        return abs(value_h - value_g) / max(abs(value_g), float(jnp.finfo(dtype).tiny))
    return math.inf


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
    # a NaN in x makes both pieces NaN, which would compare equal: refuse it, as check_gradients does
    _inputs.check_finite("check_layer: the input", x=x)
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
        if type(layer) not in BUILTIN_LAYERS  # a subclass of a built-in kind may override its rules: checked
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
