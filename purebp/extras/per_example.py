"""Per-example gradients, their norms and DP-SGD, straight from the deltas.

The hand-written pass already holds, for every example n and layer l, delta^l_n
(shape (n_l,)) and a^{l-1}_n (shape (n_{l-1},)), and the notes' (BP3)-(BP4)
for one example read

    dC^n/dW^l = delta^l_n (a^{l-1}_n)^T        dC^n/db^l = delta^l_n

with delta^l_n = dC^n/dz^l_n of the per-example cost C^n (``reduction="sum"``
deltas, not divided by N). So:

- per-example gradients are one batched outer product per layer,
  ``einsum("ni,nj->nij", delta, a_prev)``: no autodiff, no vmap of the pass;
- their norms never need those outer products (Goodfellow 2015, "Efficient
  per-example gradient computations"):
  ||dC^n/dW^l||^2 = ||delta^l_n||^2 ||a^{l-1}_n||^2 and ||dC^n/db^l||^2 = ||delta^l_n||^2,
  which is O(N * sum of widths) memory instead of O(N * parameters);
- DP-SGD (Abadi et al. 2016) needs sum_n min(1, c/||g_n||) g_n + sigma c xi.
  Every delta^l_n is linear in delta^L_n (BP2 multiplies by W^T and G'(z), which
  do not depend on delta), so scaling row n of delta^L by m_n scales every
  delta^l_n, hence g_n, by m_n: one more backward pass from the reweighted
  delta^L gives the clipped sum without any per-example gradient in memory.

The DP gradient follows ``optax.contrib.differentially_private_aggregate``
exactly: same clipping multipliers (``nan_to_num(min(c / norm, 1), nan=1)``),
same noise (``key`` split into one key per leaf plus the next key, leaves in
``jax.tree.leaves`` order, one ``jax.random.normal`` per leaf) and the same
division by N, so with the same key the two agree to rounding.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from purebp import engine as _engine
from purebp import inputs as _inputs
from purebp import layers as _layers
from purebp.network import AnyNetwork, like

Array = jax.Array

DP_REDUCTIONS = ("mean", "sum")


# ---------------------------------------------------------------- the passes


def _per_example_pass(net: AnyNetwork, x: Array, y: Array, loss: str, key: Array | None):
    """Return (caches, delta^L, what each layer's backward got, per-example costs) for C^n (not divided by N).

    Only the caches and the per-layer gradients are used by the callers; the
    batch-summed gradients ``backward_pass`` also builds are dead code that
    XLA removes under jit.
    """
    output, caches = _engine.forward_pass(net, x, key)
    cost = _engine.output_cost(net, output, caches, y, loss=loss)
    # (BP1) delta^L_n = dC^n/dz^L_n, the per-example cost's own delta (reduction="sum")
    _, output_delta = _engine.loss_and_output_delta(net, output, caches, y, loss=loss, reduction="sum")
    _, grad_outputs = _engine.backward_pass(net, caches, output_delta)
    return caches, output_delta, grad_outputs, cost


def _squared_norms(net: AnyNetwork, caches, grad_outputs) -> list:
    """Per layer, a tree of ||dC^n/dtheta||^2 per parameter leaf, each (N,), by each layer's own rule."""
    return [
        _layers.per_example_squared_norms(layer, cache, grad_output)
        for layer, cache, grad_output in zip(_engine.backward_layers(net), caches, grad_outputs)
    ]


def _global_norms(squared_norms: list) -> Array:
    """Return ||dC^n/dtheta||_2 for every n, shape (N,): the root of the sum of every leaf's squared norm."""
    total = None
    for leaf in jax.tree.leaves(squared_norms):
        total = leaf if total is None else total + leaf
    return jnp.sqrt(total)


@functools.partial(jax.jit, static_argnames=("loss",))
def _per_example_grads_jit(net: AnyNetwork, x: Array, y: Array, loss: str, key: Array | None = None) -> AnyNetwork:
    caches, _, grad_outputs, _ = _per_example_pass(net, x, y, loss, key)
    # each layer's (BP3)-(BP4) for one example: for a dense layer delta^l_n (a^{l-1}_n)^T and delta^l_n
    layers = [
        layer.per_example_grads(cache, grad_output)
        for layer, cache, grad_output in zip(_engine.backward_layers(net), caches, grad_outputs)
    ]
    return like(net, layers)


@functools.partial(jax.jit, static_argnames=("loss", "per_layer"))
def _per_example_grad_norms_jit(
    net: AnyNetwork, x: Array, y: Array, loss: str, per_layer: bool, key: Array | None = None
):
    caches, _, grad_outputs, _ = _per_example_pass(net, x, y, loss, key)
    squared = _squared_norms(net, caches, grad_outputs)
    norms = _global_norms(squared)
    if not per_layer:
        return norms
    return norms, like(net, jax.tree.map(jnp.sqrt, squared))


def _clip_multipliers(norms: Array, l2_norm_clip: Array) -> Array:
    """Return min(1, c / ||g_n||) per example, exactly as optax.per_example_global_norm_clip computes it.

    A zero gradient gives c / 0 = inf, so multiplier 1; c = 0 with a zero
    gradient gives NaN, mapped to 1 like optax does (that gradient is zero anyway).
    """
    clip = jnp.asarray(l2_norm_clip, dtype=norms.dtype)
    return jnp.nan_to_num(jnp.minimum(clip / norms, 1.0), nan=1.0)


def _add_noise(summed: AnyNetwork, key: Array, noise_std: Array, divisor: int) -> tuple[AnyNetwork, Array]:
    """Return ((g + noise_std * xi) / divisor leaf by leaf, next key), drawing xi as optax's DP aggregate does.

    With noise_std == 0 the draw is skipped at run time (``lax.cond``): g + 0 * xi
    is g, and drawing one Gaussian per parameter costs more than a training step
    on a CPU. The key advances either way, as optax's does.
    """
    leaves, treedef = jax.tree.flatten(summed)
    next_key, *leaf_keys = jax.random.split(key, len(leaves) + 1)

    def draw(leaves):
        return [
            leaf + noise_std * jax.random.normal(leaf_key, leaf.shape, leaf.dtype)
            for leaf, leaf_key in zip(leaves, leaf_keys)
        ]

    noised = jax.lax.cond(noise_std == 0, lambda leaves: list(leaves), draw, leaves)
    return jax.tree.unflatten(treedef, [leaf / divisor for leaf in noised]), next_key


def _dp_value_and_grad(
    net: AnyNetwork,
    x: Array,
    y: Array,
    key: Array,
    l2_norm_clip: Array,
    noise_multiplier: Array,
    loss: str,
    reduction: str,
    dropout_key: Array | None = None,
):
    # pass 1: forward, deltas, and per-example norms by the factorisation
    caches, output_delta, grad_outputs, cost = _per_example_pass(net, x, y, loss, dropout_key)
    norms = _global_norms(_squared_norms(net, caches, grad_outputs))
    multipliers = _clip_multipliers(norms, l2_norm_clip)
    # pass 2: one backward pass from delta^L with row n scaled by m_n: every layer's backward is
    # linear in what it receives and acts on each example alone, so g_n is scaled by m_n and the
    # summed gradient is sum_n m_n g_n
    scaled = multipliers.reshape((-1,) + (1,) * (output_delta.ndim - 1)) * output_delta
    clipped_sum, _ = _engine.backward_pass(net, caches, scaled)
    # the product before the cast, as optax forms c * sigma in Python before meeting the dtype
    noise_std = (jnp.asarray(l2_norm_clip) * jnp.asarray(noise_multiplier)).astype(norms.dtype)
    divisor = x.shape[0] if reduction == "mean" else 1
    grads, next_key = _add_noise(clipped_sum, key, noise_std, divisor)
    value = jnp.mean(cost) if reduction == "mean" else jnp.sum(cost)
    return value, grads, next_key


_dp_value_and_grad_jit = jax.jit(_dp_value_and_grad, static_argnames=("loss", "reduction"))


@functools.partial(jax.jit, static_argnames=("optimizer", "loss"))
def _dp_sgd_step_jit(net, opt_state, x, y, key, l2_norm_clip, noise_multiplier, optimizer, loss, dropout_key=None):
    value, grads, next_key = _dp_value_and_grad(
        net, x, y, key, l2_norm_clip, noise_multiplier, loss, "mean", dropout_key
    )
    # optax mixes Python scalars with int32 counters (Adam's bias correction): give it the
    # standard promotion rules even when the caller runs strict ones (as purebp.train.fit does)
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, net)
        net = optax.apply_updates(net, updates)
    return net, opt_state, value, next_key


# ---------------------------------------------------------------- public API


def per_example_grads(net: AnyNetwork, x: Array, y: Array, *, loss: str, key: Array | None = None) -> AnyNetwork:
    """Return dC^n/dtheta for every example n: a network whose leaves have a leading batch axis N.

    Leaf shapes: ``layers[l].w`` is (N, n_out, n_in) and ``layers[l].b`` is
    (N, n_out); entry n is the gradient of the per-example cost C^n (not divided
    by N), so summing over axis 0 gives ``purebp.grad(..., reduction="sum")``.
    Built from each layer's own per-example rule (for a dense layer one batched
    outer product of delta and a_prev; no autodiff, no vmap). ``key`` draws the
    dropout masks, as in ``value_and_grad``. Memory is N times the parameter
    count: for norms alone use ``per_example_grad_norms``.
    """
    x, y = _inputs.coerce_inputs(net, x, y)
    _inputs.validate_inputs(net, x, y, loss=loss, reduction="sum")
    return _per_example_grads_jit(net, x, y, loss, key)


def per_example_grad_norms(
    net: AnyNetwork, x: Array, y: Array, *, loss: str, per_layer: bool = False, key: Array | None = None
) -> Array | tuple[Array, AnyNetwork]:
    """Return ||dC^n/dtheta||_2 for every example, shape (N,), without materialising the gradients.

    Uses ||dC^n/dW^l||^2 = ||delta^l_n||^2 ||a^{l-1}_n||^2 and ||dC^n/db^l||^2 =
    ||delta^l_n||^2 (Goodfellow 2015), so memory is O(N * sum of widths), not
    O(N * parameters). With ``per_layer=True`` returns ``(norms, leaf_norms)``
    where ``leaf_norms`` is a ``Network`` whose ``layers[l].w`` and
    ``layers[l].b`` are (N,) arrays: the norms of dC^n/dW^l and dC^n/db^l (the
    global norm is the root of the sum of their squares). A residual block's
    squared norm is the sum of its body layers' squared norms (its parameters
    are theirs), each by that layer's rule; a layer norm's per-example
    gradients are (N, n) vectors, so they are formed explicitly.
    """
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer must be True or False, got {per_layer!r}")
    x, y = _inputs.coerce_inputs(net, x, y)
    _inputs.validate_inputs(net, x, y, loss=loss, reduction="sum")
    return _per_example_grad_norms_jit(net, x, y, loss, per_layer, key)


def dp_value_and_grad(
    net: AnyNetwork,
    x: Array,
    y: Array,
    key: Array,
    *,
    loss: str,
    l2_norm_clip: float | Array,
    noise_multiplier: float | Array,
    reduction: str = "mean",
    dropout_key: Array | None = None,
) -> tuple[Array, AnyNetwork, Array]:
    """Return (loss, DP gradient, next key): clipped, noised per-example gradients, summed, in two passes.

    The gradient is (sum_n min(1, c / ||g_n||) g_n + sigma c xi) / N with
    g_n = dC^n/dtheta, c = ``l2_norm_clip``, sigma = ``noise_multiplier`` and
    xi ~ N(0, I) drawn from ``key``; ``reduction="sum"`` leaves out the / N.
    With ``reduction="mean"`` this equals
    ``optax.contrib.differentially_private_aggregate(c, sigma, key)`` applied
    to the per-example gradients (its first update), and ``next_key`` is the
    key that transform keeps for its next update. The loss is the unclipped
    (1/N) sum_n C^n (or the sum). No per-example gradient is ever in memory:
    pass 1 computes the norms from the deltas, pass 2 is one backward pass
    from delta^L with row n scaled by min(1, c / ||g_n||). ``dropout_key``
    draws the dropout masks (both passes use the same ones).
    """
    _validate_dp(net, x, y, key, loss, l2_norm_clip, noise_multiplier, reduction)
    if dropout_key is not None:
        _inputs.check_key(dropout_key)
    return _dp_value_and_grad_jit(net, x, y, key, l2_norm_clip, noise_multiplier, loss, reduction, dropout_key)


def dp_sgd_step(
    net: AnyNetwork,
    opt_state: optax.OptState,
    x: Array,
    y: Array,
    key: Array,
    *,
    optimizer: optax.GradientTransformation,
    loss: str,
    l2_norm_clip: float | Array,
    noise_multiplier: float | Array,
    dropout_key: Array | None = None,
) -> tuple[AnyNetwork, optax.OptState, Array, Array]:
    """Return (new net, new optimizer state, loss, next key): one jitted DP-SGD training step.

    The gradient is ``dp_value_and_grad(..., reduction="mean")``, then
    ``optimizer`` (any optax ``GradientTransformation``, e.g. ``optax.sgd(0.1)``
    or ``optax.adam(1e-3)``; its state from ``optimizer.init(net)``) applies it.
    Threading ``next_key`` into the next call reproduces
    ``optax.chain(optax.contrib.differentially_private_aggregate(c, sigma, key),
    optimizer)`` fed with per-example gradients, step for step. One compile per
    optimizer object, architecture, shapes and loss: create the optimizer once.
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    _validate_dp(net, x, y, key, loss, l2_norm_clip, noise_multiplier, "mean")
    if dropout_key is not None:
        _inputs.check_key(dropout_key)
    return _dp_sgd_step_jit(net, opt_state, x, y, key, l2_norm_clip, noise_multiplier, optimizer, loss, dropout_key)


# ---------------------------------------------------------------- input checks


def _validate_dp(net, x, y, key, loss, l2_norm_clip, noise_multiplier, reduction) -> None:
    """Raise ValueError/TypeError before compiling if the DP arguments are wrong."""
    if reduction not in DP_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions: {', '.join(DP_REDUCTIONS)}")
    _inputs.validate_inputs(net, x, y, loss=loss, reduction=reduction)
    _inputs.check_key(key, required=True)
    _validate_nonnegative_scalar("l2_norm_clip", l2_norm_clip)
    _validate_nonnegative_scalar("noise_multiplier", noise_multiplier)


def _validate_nonnegative_scalar(name: str, value: object) -> None:
    if isinstance(value, jax.core.Tracer):
        if value.shape != ():
            raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
        return  # a traced value cannot be range-checked before compiling
    if isinstance(value, bool) or not isinstance(value, numbers.Real | jax.Array | np.ndarray | np.generic):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if np.shape(value) != ():
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    dtype = np.asarray(value).dtype
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)) or dtype == np.bool_:
        raise TypeError(f"{name} must be a real number, got dtype {dtype}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number} (for no clipping, use a large finite l2_norm_clip)")
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {number}")
