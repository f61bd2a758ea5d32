"""What every layer kind shares: per-example keys and the generic per-example fallbacks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def example_keys(key: Array, batch: int, offset: int | Array = 0) -> Array:
    """Return one key per example, ``fold_in(key, offset + n)`` for n = 0..batch-1, shape (batch,).

    Example n of a batch gets the same key whether the batch runs whole or in
    shards (a shard starting at example ``offset`` passes that offset), so
    dropout masks do not depend on how the batch is split over devices.
    """
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    # int32 counters whatever the offset's integer type (a device's shard index is int32, Python ints are
    # int64 under x64): fold_in reads them as uint32 either way, so the keys are the same
    counters = jnp.asarray(offset).astype(jnp.int32) + jnp.arange(batch, dtype=jnp.int32)
    return jax.vmap(lambda n: jax.random.fold_in(key, n))(counters)


def layer_keys(keys: Array | None, index: int) -> Array | None:
    """Return the per-example keys of the ``index``-th layer of a stack: ``fold_in(keys[n], index)``."""
    if keys is None:
        return None
    return jax.vmap(lambda k: jax.random.fold_in(k, index))(keys)


def per_example_squared_norms(layer: object, cache: object, grad_out: Array) -> object:
    """Return, for every parameter leaf of ``layer``, the per-example squared norms ||dC^n/dtheta||^2, shape (N,).

    Uses ``layer.per_example_squared_norms`` when the layer has a cheaper
    rule, otherwise squares ``layer.per_example_grads``.
    """
    if hasattr(layer, "per_example_squared_norms"):
        return layer.per_example_squared_norms(cache, grad_out)
    if not hasattr(layer, "per_example_grads"):
        raise TypeError(
            f"{type(layer).__name__} has no per_example_grads(cache, grad_out) method, so its per-example "
            "gradients are not defined; add one (dC^n/dtheta with a leading batch axis) to use this layer here"
        )
    per_example = layer.per_example_grads(cache, grad_out)
    return jax.tree.map(lambda g: jnp.sum(jnp.reshape(g * g, (g.shape[0], -1)), axis=1), per_example)


def along_last(vector: Array, ndim: int) -> Array:
    """Reshape a (n,) parameter to broadcast over the last axis of a rank-``ndim`` activation (no rank promotion)."""
    return jnp.reshape(vector, (1,) * (ndim - 1) + vector.shape)


def sum_leading(array: Array) -> Array:
    """Sum over every axis but the last: a per-feature parameter's gradient, summed over examples (and positions)."""
    return jnp.sum(array, axis=tuple(range(array.ndim - 1)))


def sum_inner(array: Array) -> Array:
    """Sum over every axis but the first and the last: the per-example gradient of a per-feature parameter."""
    return jnp.sum(array, axis=tuple(range(1, array.ndim - 1))) if array.ndim > 2 else array
