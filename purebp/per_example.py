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

from purebp import activations as _activations
from purebp import backprop as _backprop
from purebp import losses as _losses
from purebp.network import Layer, Network

Array = jax.Array

DP_REDUCTIONS = ("mean", "sum")


# ---------------------------------------------------------------- the passes


def _per_example_pass(net: Network, x: Array, y: Array, loss: str):
    """Return (forward cache, delta^L, deltas per layer, per-example costs) for C^n (not divided by N).

    Only the deltas and activations are used by the callers; the batch-summed
    gradients ``backward_pass`` also builds are dead code that XLA removes under jit.
    """
    cache = _backprop.forward_pass(net, x)
    pre_activation, activation = cache[-1]
    target = _losses.dense_targets(y, net.layers[-1].w.shape[0], activation.dtype)
    cost = _losses.per_example_cost(pre_activation, activation, target, loss)
    output = _activations.get(net.activations[-1])
    # (BP1) delta^L_n = dC^n/dz^L_n, the per-example cost's own delta (reduction="sum")
    output_delta = _losses.output_delta(pre_activation, activation, target, loss, output)
    _, deltas = _backprop.backward_pass(net, x, cache, output_delta)
    return cache, output_delta, deltas, cost


def _inputs_per_layer(x: Array, cache) -> tuple[Array, ...]:
    """Return (a^0, ..., a^{L-1}): the input of every layer, a^0 = x."""
    return (x,) + tuple(a for _, a in cache[:-1])


def _squared_norms(delta: Array, activation_prev: Array) -> tuple[Array, Array]:
    """Return (||delta_n a_prev_n^T||_F^2, ||delta_n||^2) for every n, shapes (N,), without the outer product."""
    delta_sq = jnp.sum(delta * delta, axis=1)
    return delta_sq * jnp.sum(activation_prev * activation_prev, axis=1), delta_sq


def _global_norms(deltas, inputs) -> Array:
    """Return ||dC^n/dtheta||_2 for every n, shape (N,), by Goodfellow's factorisation."""
    total = None
    for delta, activation_prev in zip(deltas, inputs):
        w_sq, b_sq = _squared_norms(delta, activation_prev)
        total = w_sq + b_sq if total is None else total + w_sq + b_sq
    return jnp.sqrt(total)


@functools.partial(jax.jit, static_argnames=("loss",))
def _per_example_grads_jit(net: Network, x: Array, y: Array, loss: str) -> Network:
    cache, _, deltas, _ = _per_example_pass(net, x, y, loss)
    layers = tuple(
        # (BP4) per example: dC^n/dW^l = delta^l_n (a^{l-1}_n)^T, one batched product; (BP3) dC^n/db^l = delta^l_n
        Layer(w=jnp.einsum("ni,nj->nij", delta, activation_prev), b=delta)
        for delta, activation_prev in zip(deltas, _inputs_per_layer(x, cache))
    )
    return Network(layers=layers, activations=net.activations)


@functools.partial(jax.jit, static_argnames=("loss", "per_layer"))
def _per_example_grad_norms_jit(net: Network, x: Array, y: Array, loss: str, per_layer: bool):
    cache, _, deltas, _ = _per_example_pass(net, x, y, loss)
    inputs = _inputs_per_layer(x, cache)
    norms = _global_norms(deltas, inputs)
    if not per_layer:
        return norms
    leaf_norms = []
    for delta, activation_prev in zip(deltas, inputs):
        w_sq, b_sq = _squared_norms(delta, activation_prev)
        leaf_norms.append(Layer(w=jnp.sqrt(w_sq), b=jnp.sqrt(b_sq)))
    return norms, Network(layers=tuple(leaf_norms), activations=net.activations)


def _clip_multipliers(norms: Array, l2_norm_clip: Array) -> Array:
    """Return min(1, c / ||g_n||) per example, exactly as optax.per_example_global_norm_clip computes it.

    A zero gradient gives c / 0 = inf, so multiplier 1; c = 0 with a zero
    gradient gives NaN, mapped to 1 like optax does (that gradient is zero anyway).
    """
    clip = jnp.asarray(l2_norm_clip, dtype=norms.dtype)
    return jnp.nan_to_num(jnp.minimum(clip / norms, 1.0), nan=1.0)


def _add_noise(summed: Network, key: Array, noise_std: Array, divisor: int) -> tuple[Network, Array]:
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
    net: Network,
    x: Array,
    y: Array,
    key: Array,
    l2_norm_clip: Array,
    noise_multiplier: Array,
    loss: str,
    reduction: str,
):
    # pass 1: forward, deltas, and per-example norms by the factorisation
    cache, output_delta, deltas, cost = _per_example_pass(net, x, y, loss)
    norms = _global_norms(deltas, _inputs_per_layer(x, cache))
    multipliers = _clip_multipliers(norms, l2_norm_clip)
    # pass 2: one backward pass from delta^L with row n scaled by m_n: every delta^l_n,
    # hence g_n, is scaled by m_n, so the summed gradient is sum_n m_n g_n
    clipped_sum, _ = _backprop.backward_pass(net, x, cache, multipliers[:, None] * output_delta)
    # the product before the cast, as optax forms c * sigma in Python before meeting the dtype
    noise_std = (jnp.asarray(l2_norm_clip) * jnp.asarray(noise_multiplier)).astype(norms.dtype)
    divisor = x.shape[0] if reduction == "mean" else 1
    grads, next_key = _add_noise(clipped_sum, key, noise_std, divisor)
    value = jnp.mean(cost) if reduction == "mean" else jnp.sum(cost)
    return value, grads, next_key


_dp_value_and_grad_jit = jax.jit(_dp_value_and_grad, static_argnames=("loss", "reduction"))


@functools.partial(jax.jit, static_argnames=("optimizer", "loss"))
def _dp_sgd_step_jit(net, opt_state, x, y, key, l2_norm_clip, noise_multiplier, optimizer, loss):
    value, grads, next_key = _dp_value_and_grad(net, x, y, key, l2_norm_clip, noise_multiplier, loss, "mean")
    # optax mixes Python scalars with int32 counters (Adam's bias correction): give it the
    # standard promotion rules even when the caller runs strict ones (as purebp.training does)
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, net)
        net = optax.apply_updates(net, updates)
    return net, opt_state, value, next_key


# ---------------------------------------------------------------- public API


def per_example_grads(net: Network, x: Array, y: Array, *, loss: str) -> Network:
    """Return dC^n/dtheta for every example n: a ``Network`` whose leaves have a leading batch axis N.

    Leaf shapes: ``layers[l].w`` is (N, n_out, n_in) and ``layers[l].b`` is
    (N, n_out); entry n is the gradient of the per-example cost C^n (not divided
    by N), so summing over axis 0 gives ``purebp.grad(..., reduction="sum")``.
    Built from the deltas with one batched outer product per layer (no autodiff,
    no vmap). Memory is N times the parameter count: for norms alone use
    ``per_example_grad_norms``.
    """
    _backprop.validate_inputs(net, x, y, loss=loss, reduction="sum")
    return _per_example_grads_jit(net, x, y, loss)


def per_example_grad_norms(
    net: Network, x: Array, y: Array, *, loss: str, per_layer: bool = False
) -> Array | tuple[Array, Network]:
    """Return ||dC^n/dtheta||_2 for every example, shape (N,), without materialising the gradients.

    Uses ||dC^n/dW^l||^2 = ||delta^l_n||^2 ||a^{l-1}_n||^2 and ||dC^n/db^l||^2 =
    ||delta^l_n||^2 (Goodfellow 2015), so memory is O(N * sum of widths), not
    O(N * parameters). With ``per_layer=True`` returns ``(norms, leaf_norms)``
    where ``leaf_norms`` is a ``Network`` whose ``layers[l].w`` and
    ``layers[l].b`` are (N,) arrays: the norms of dC^n/dW^l and dC^n/db^l (the
    global norm is the root of the sum of their squares).
    """
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer must be True or False, got {per_layer!r}")
    _backprop.validate_inputs(net, x, y, loss=loss, reduction="sum")
    return _per_example_grad_norms_jit(net, x, y, loss, per_layer)


def dp_value_and_grad(
    net: Network,
    x: Array,
    y: Array,
    key: Array,
    *,
    loss: str,
    l2_norm_clip: float | Array,
    noise_multiplier: float | Array,
    reduction: str = "mean",
) -> tuple[Array, Network, Array]:
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
    from delta^L with row n scaled by min(1, c / ||g_n||).
    """
    _validate_dp(net, x, y, key, loss, l2_norm_clip, noise_multiplier, reduction)
    return _dp_value_and_grad_jit(net, x, y, key, l2_norm_clip, noise_multiplier, loss, reduction)


def dp_sgd_step(
    net: Network,
    opt_state: optax.OptState,
    x: Array,
    y: Array,
    key: Array,
    *,
    optimizer: optax.GradientTransformation,
    loss: str,
    l2_norm_clip: float | Array,
    noise_multiplier: float | Array,
) -> tuple[Network, optax.OptState, Array, Array]:
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
    return _dp_sgd_step_jit(net, opt_state, x, y, key, l2_norm_clip, noise_multiplier, optimizer, loss)


# ---------------------------------------------------------------- input checks


def _validate_dp(net, x, y, key, loss, l2_norm_clip, noise_multiplier, reduction) -> None:
    """Raise ValueError/TypeError before compiling if the DP arguments are wrong."""
    if reduction not in DP_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions: {', '.join(DP_REDUCTIONS)}")
    _backprop.validate_inputs(net, x, y, loss=loss, reduction=reduction)
    _validate_key(key)
    _validate_nonnegative_scalar("l2_norm_clip", l2_norm_clip)
    _validate_nonnegative_scalar("noise_multiplier", noise_multiplier)


def _validate_key(key: object) -> None:
    if not isinstance(key, jax.Array):
        raise TypeError(f"key must be a JAX random key such as jax.random.key(0), got {type(key).__name__}")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key must be a single random key (shape ()), got a key array of shape {key.shape}")
    elif key.dtype != jnp.uint32 or key.shape != (2,):
        raise TypeError(
            f"key must be a JAX random key (jax.random.key(0) or a legacy uint32[2] PRNGKey), "
            f"got an array of dtype {key.dtype} and shape {key.shape}"
        )


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
