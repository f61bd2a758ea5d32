"""Low and mixed precision: float32 master parameters, bfloat16 or float16 compute.

GPU training keeps the parameters theta in float32 (the "master" copy), runs
the forward and backward passes on a 16-bit copy, and applies the update to
the float32 copy, so that small updates eta * grad are not lost to rounding
(in bfloat16, theta + eta grad rounds back to theta once |eta grad| < 2^-9 |theta|).
One mixed gradient is

    theta_c = round_c(theta),  x_c = round_c(x)          (c: the compute dtype)
    L, g_c  = hand-written (BP1)-(BP4) at (theta_c, x_c), every operation in c
    g       = float32(g_c)                               (returned with L as float32)

all in one compiled function. XLA may skip the last rounding of a result to c
when the next operation converts it to float32 (``--xla_allow_excess_precision``,
on by default): the dW = delta^T a products then reach float32 unrounded, so g
can be slightly more accurate than ``purebp.value_and_grad`` on the cast
network, cast up (with that flag off the two are equal bit for bit).

Small pure functions in the optax style:

- ``cast_network(net, dtype)``: every parameter leaf cast to ``dtype``.
- ``mixed_value_and_grad(compute_dtype, loss_scale=1.0)``: a function
  ``(net, x, y, loss, reduction) -> (L, grads)``, the signature of the
  gradient functions ``purebp.train.fit.make_train_step`` runs, computing in
  ``compute_dtype`` and returning L and the gradients in the master dtype.
  ``make_train_step(..., compute_dtype="bfloat16")`` uses it.

Loss scaling (float16): float16 has 5 exponent bits, so values below 2^-14
(6.1e-5) are subnormal and lose significant bits, and values below 2^-25
round to 0; deltas shrink with every sigmoid layer and with 1/N. A static
``loss_scale`` S multiplies delta^L by S, so every delta^l and every gradient
is S times larger in the backward pass, and the gradients are divided by S
again in the master dtype (exact for a power of two). The loss itself is not
scaled. If S is too large, a delta or gradient overflows float16 (max
65504): the returned gradients then hold inf or NaN, and nothing is skipped
or clamped here; wrap the optimizer in ``optax.apply_if_finite`` to skip such
steps (dynamic loss scaling, which lowers S after an overflow, is not
implemented). bfloat16 has float32's exponent range and needs no scaling.

Accuracy (hand-written vs jax.grad and each vs float64, per leaf): see
``purebp.check.TOLERANCE`` and experiments/mixed_precision.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from purebp import engine as _engine
from purebp import inputs as _inputs
from purebp.network import AnyNetwork, Sequential, supported_dtype

Array = jax.Array
GradientFunction = Callable[..., tuple[Array, AnyNetwork]]


def cast_network(net: Sequential, dtype: object) -> Sequential:
    """Return ``net`` with every parameter leaf cast to ``dtype`` (float16, bfloat16, float32 or float64).

    Rounds to nearest; casting up (bfloat16 -> float32 -> float64) is exact.
    Pure and jittable; the activations and tree structure are unchanged.
    """
    if not isinstance(net, Sequential):
        raise TypeError(f"expected a purebp.Sequential, got {type(net).__name__}")
    dtype = supported_dtype(dtype)
    return jax.tree.map(lambda leaf: leaf.astype(dtype), net)


def mixed_value_and_grad(compute_dtype: object, *, loss_scale: float = 1.0) -> GradientFunction:
    """Return ``f(net, x, y, loss, reduction="mean") -> (L, grads)`` computing in ``compute_dtype``.

    ``f`` casts the parameters, x and floating targets y (integer labels stay
    as they are) to ``compute_dtype``, runs the hand-written pass there (delta^L
    multiplied by ``loss_scale``), and returns L and dL/dtheta = grads / loss_scale
    in the master dtype, ``net``'s own (float32 in mixed training). Inputs must
    be in the master dtype, as for ``purebp.value_and_grad(net, ...)``: float32
    x for a float32 net is right, float32 x for a bfloat16 net is a TypeError.
    The checks of ``purebp.engine.validate_inputs`` run on every call (on
    shapes and dtypes only under ``jit``, where they run once per trace).
    Jittable and scannable; one compile per signature.

    ``loss_scale`` must be a finite number > 0, a power of two to make the
    unscaling exact; ``loss_scale * (1/N for "mean", 1 for "sum")`` must be
    a finite, nonzero value of ``compute_dtype`` (a ValueError otherwise). See
    the module docstring for overflow.
    """
    compute = supported_dtype(compute_dtype).name
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"loss_scale must be a number, got {loss_scale!r}")
    scale = float(loss_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")

    def value_and_grad(
        net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str = "mean", key: Array | None = None
    ) -> tuple[Array, AnyNetwork]:
        _inputs.validate_inputs(net, x, y, loss=loss, reduction=reduction)
        _check_scaled_delta(compute, scale, x.shape[0], reduction)
        return _mixed_value_and_grad_jit(net, x, y, loss, reduction, compute, scale, key)

    value_and_grad.__doc__ = f"(L, dL/dtheta) of the hand-written pass in {compute} (loss scale {scale:g})"
    return value_and_grad


@functools.lru_cache(maxsize=1024)
def _check_scaled_delta(compute: str, loss_scale: float, n: int, reduction: str) -> None:
    # delta^L's factor loss_scale / N (or loss_scale) is one compute-dtype number: refuse inf or 0
    factor = loss_scale / n if reduction == "mean" else loss_scale
    with np.errstate(over="ignore"):
        rounded = float(np.asarray(factor, dtype=np.dtype(compute)))
    if not math.isfinite(rounded) or rounded == 0.0:
        info = jnp.finfo(compute)
        raise ValueError(
            f"loss_scale {loss_scale:g} with reduction {reduction!r} over a batch of {n} multiplies delta^L by "
            f"{factor:g}, which is {rounded:g} in {compute} (finite range {float(info.smallest_subnormal):g} to "
            f"{float(info.max):g}); choose a loss_scale that keeps it in range"
        )


@functools.partial(jax.jit, static_argnames=("loss", "reduction", "compute", "loss_scale"))
def _mixed_value_and_grad_jit(net, x, y, loss, reduction, compute, loss_scale, key=None):
    master = net.dtype
    compute_net = cast_network(net, compute)
    x_c = x.astype(compute)
    y_c = y.astype(compute) if jnp.issubdtype(y.dtype, jnp.floating) else y
    value, grads = _scaled_value_and_grad(compute_net, x_c, y_c, loss, reduction, loss_scale, key)
    if loss_scale == 1.0:
        grads = cast_network(grads, master)
    else:  # unscale in the master dtype, where g / S neither underflows nor overflows
        grads = jax.tree.map(lambda g: g.astype(master) / loss_scale, grads)
    return value.astype(master), grads


def _scaled_value_and_grad(
    net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str, loss_scale: float, key: Array | None = None
):
    """(L, S dL/dtheta): purebp.value_and_grad's pass, built from the public passes, with delta^L times S."""
    output, caches = _engine.forward_pass(net, x, key)
    value, delta = _engine.loss_and_output_delta(net, output, caches, y, loss=loss, reduction=reduction)
    # (BP1) delta^L times S; every layer's backward is linear in what it receives, so every gradient is S dL/dtheta
    grads, _ = _engine.backward_pass(net, caches, loss_scale * delta)
    return value, grads
