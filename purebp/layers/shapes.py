"""Shape inference through a stack of layers, and initialising a stack from builders."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

Array = jax.Array


def describe(item: object, limit: int = 200) -> str:
    """A short text for an error or a report: ``repr(item)`` when it is short and prints no array values,
    else the type and each leaf's dtype and shape (a user's dataclass layer would print its weights)."""
    try:
        text = repr(item)
    except (AttributeError, IndexError, TypeError, ValueError):  # a repr that expects arrays got other leaves
        text = None
    if text is not None and len(text) <= limit and "Array(" not in text and "array(" not in text:
        return text
    leaves = []
    for leaf in jax.tree.leaves(item):
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        leaves.append(f"{dtype}{list(shape)}" if shape is not None else type(leaf).__name__)
    return f"{type(item).__name__}({', '.join(leaves)})"


def is_layer(item: object) -> bool:
    """True for an initialised layer: an object with ``forward`` and ``backward``."""
    return callable(getattr(item, "forward", None)) and callable(getattr(item, "backward", None))


def output_shape(layer: object, input_shape: tuple[int, ...], dtype: np.dtype | None = None) -> tuple[int, ...]:
    """Return the per-example output shape of ``layer`` on per-example inputs ``input_shape``.

    Built-in layers check their parameters and the input shape statically
    (``layer.output_shape``); any other layer is traced abstractly with
    ``jax.eval_shape`` on a batch of one (no compile, no FLOPs).
    """
    if hasattr(layer, "output_shape"):
        return tuple(layer.output_shape(tuple(input_shape)))
    if not is_layer(layer):
        raise TypeError(
            f"expected a layer with forward(a, key=None) and backward(cache, grad_out), got {describe(layer)}"
        )
    leaves = [leaf for leaf in jax.tree.leaves(layer) if hasattr(leaf, "dtype")]
    dtype = dtype or (leaves[0].dtype if leaves else np.dtype("float32"))
    spec = jax.ShapeDtypeStruct((1,) + tuple(input_shape), dtype)
    out = jax.eval_shape(lambda layer, a: layer.forward(a)[0], layer, spec)  # parameters may be shape structs
    return tuple(out.shape[1:])


def init_stack(
    key: Array, input_shape: tuple[int, ...], items: Sequence[object], dtype: np.dtype
) -> tuple[tuple, tuple[int, ...]]:
    """Initialise builders (``dense(...)`` etc.) in order, keep initialised layers; return (layers, output shape).

    Item i draws from ``jax.random.split(key, len(items))[i]``, so a stack of
    dense layers gets the same weights as ``init_mlp`` with the same key.
    """
    keys = jax.random.split(key, len(items))
    layers, shape = [], tuple(input_shape)
    for index, (item, item_key) in enumerate(zip(items, keys)):
        try:
            if is_layer(item):
                layer = item
            elif callable(getattr(item, "init", None)):
                layer = item.init(item_key, shape, dtype)
            else:
                raise TypeError(
                    f"expected a layer builder such as purebp.dense(10) or an initialised layer, got {item!r}"
                )
            shape = output_shape(layer, shape, dtype)
        except (ValueError, TypeError) as error:
            raise type(error)(f"layer {index} ({item!r}): {error}") from None
        layers.append(layer)
    return tuple(layers), shape
