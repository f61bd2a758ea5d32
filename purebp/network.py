"""Networks as immutable parameter pytrees: one type, ``Sequential``.

A network is a ``Sequential``: a tuple of layers (``purebp.layers``: dense,
residual, layer norm, dropout, convolution, pooling, your own) applied in
order, and the per-example input shape, static. A multi-layer perceptron
(``init_mlp``) is a ``Sequential`` of ``Dense(w, b, activation)``: ``w`` shaped
``(n_out, n_in)`` as in the notes, ``b`` shaped ``(n_out,)``, the activation
name static, so ``jax.tree.leaves(net)`` is exactly ``[w0, b0, w1, b1, ...]``.
Nothing here mutates: every function returns new values.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from purebp import activations as _activations
from purebp.layers import Dense
from purebp.layers.dense import HE_ACTIVATIONS, init_dense
from purebp.layers.shapes import init_stack, is_layer, output_shape


def _describe(leaf: object) -> str:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    return f"{dtype}{list(shape)}" if shape is not None else repr(leaf)


# The parameter dtypes purebp computes in; the 16-bit ones serve low- and mixed-precision
# training (purebp.train.precision). float8 and other floating types are refused.
SUPPORTED_DTYPES = (np.dtype("float16"), np.dtype(jnp.bfloat16), np.dtype("float32"), np.dtype("float64"))
_SUPPORTED_NAMES = ", ".join(dtype.name for dtype in SUPPORTED_DTYPES)


def supported_dtype(dtype: object) -> np.dtype:
    """Return ``dtype`` as a NumPy dtype if purebp computes in it (float16, bfloat16, float32, float64).

    Anything else (integers, float8, complex, unknown names) is a TypeError listing those four.
    """
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be one of {_SUPPORTED_NAMES}, got {dtype!r}") from None
    if resolved not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {_SUPPORTED_NAMES}, got {resolved}")
    return resolved


__all__ = ["HE_ACTIVATIONS", "Layer", "Network", "Sequential", "init_mlp", "init_network"]


def init_mlp(
    key: jax.Array,
    sizes: Sequence[int],
    activations: Sequence[str],
    *,
    dtype: jnp.dtype = jnp.float32,
) -> Sequential:
    """Return a freshly initialised MLP with layer widths ``sizes``: a ``Sequential`` of ``Dense`` layers.

    Layer l gets W ~ N(0, s^2) with s = sqrt(2 / n_in) (He) when its activation
    is relu, leaky_relu, elu, gelu or softplus, and s = sqrt(2 / (n_in + n_out))
    (Glorot) otherwise; biases start at zero. Deterministic in ``key``: each
    layer draws from ``jax.random.split(key, L)[l]``. ``dtype`` is one of
    float16, bfloat16, float32 (default) or float64. The 16-bit weights are
    drawn in float32 and rounded once: a normal drawn directly in bfloat16
    takes only 128 distinct values and no value beyond 2.9 s (float32, then
    rounded: thousands of values, tails past 4.6 s, per million draws).
    """
    validate_architecture(sizes, activations)
    sizes, activations = tuple(int(n) for n in sizes), tuple(activations)
    dtype = supported_dtype(dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise TypeError(
            "dtype=float64 needs jax_enable_x64: call jax.config.update('jax_enable_x64', True) before creating arrays"
        )
    return Sequential(layers=_init_layers(key, sizes, activations, dtype), input_shape=(sizes[0],))


@functools.partial(jax.jit, static_argnames=("sizes", "activations", "dtype"))
def _init_layers(key, sizes, activations, dtype) -> tuple[Dense, ...]:
    # one compile per architecture instead of one eager random kernel per layer
    keys = jax.random.split(key, len(sizes) - 1)
    return tuple(
        Dense(*init_dense(layer_key, n_in, n_out, name, dtype), name)
        for layer_key, n_in, n_out, name in zip(keys, sizes[:-1], sizes[1:], activations)
    )


def validate_architecture(sizes: Sequence[int], activations: Sequence[str]) -> None:
    """Raise ValueError/TypeError if ``sizes`` and ``activations`` do not describe an MLP."""
    if isinstance(activations, str):
        raise TypeError(f"activations must be a sequence of names, one per layer, got the string {activations!r}")
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least two widths (inputs and outputs), got {tuple(sizes)}")
    for i, n in enumerate(sizes):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"sizes[{i}] must be an int, got {n!r}")
        if n <= 0:
            raise ValueError(f"sizes[{i}] must be a positive width, got {n}")
    if len(activations) != len(sizes) - 1:
        raise ValueError(
            f"expected {len(sizes) - 1} activation names (one per layer for sizes {tuple(sizes)}), "
            f"got {len(activations)}: {tuple(activations)}"
        )
    for i, name in enumerate(activations):
        _activations.get(name)
        if name == "softmax" and i != len(activations) - 1:
            raise ValueError(
                f"softmax is only allowed on the output layer; activations[{i}] of {len(activations)} is 'softmax'"
            )


@dataclasses.dataclass(frozen=True)
class Sequential:
    """A stack of layers applied in order: ``layers`` (pytrees with forward/backward), ``input_shape`` static.

    ``input_shape`` is the per-example shape, e.g. ``(40,)`` or ``(1, 40)``
    (channels, length); inputs are batch-first, (N,) + input_shape.
    ``jax.tree.leaves(net)`` are the layers' parameters in order.
    """

    layers: tuple
    input_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})

    @property
    def dtype(self) -> np.dtype | None:
        """The floating dtype of the parameters (None for a stack without any)."""
        leaves = [leaf for leaf in jax.tree.leaves(self) if hasattr(leaf, "dtype")]
        return np.dtype(leaves[0].dtype) if leaves else None

    @property
    def activations(self) -> tuple[str | None, ...]:
        """G's name per layer (an MLP's ``activations``); None for a layer without one."""
        return tuple(getattr(layer, "activation", None) for layer in self.layers)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Widths (n_0, n_1, ..., n_L) of a stack of dense layers, read off the weight shapes."""
        if not all(isinstance(layer, Dense) for layer in self.layers):
            raise AttributeError("sizes is defined for a stack of dense layers only; see output_shape")
        return tuple(self.input_shape) + tuple(layer.w.shape[0] for layer in self.layers)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The per-example output shape, inferred layer by layer."""
        shape = self.input_shape
        for layer in self.layers:
            shape = output_shape(layer, shape, self.dtype)
        return shape

    def __repr__(self) -> str:
        try:
            layers = ", ".join(map(_layer_repr, self.layers))
        except TypeError:  # layers is not a sequence
            layers = _describe(self.layers)
        return f"Sequential(input_shape={self.input_shape}, layers=[{layers}])"


def _layer_repr(layer: object) -> str:
    # tree maps can leave scalars or floats where a layer's repr expects arrays (a sum per leaf, a count):
    # then name the type and describe the leaves instead of raising from inside repr
    try:
        return repr(layer)
    except (AttributeError, IndexError, TypeError, ValueError):
        leaves = ", ".join(_describe(leaf) for leaf in jax.tree.leaves(layer))
        return f"{type(layer).__name__}({leaves})"


jax.tree_util.register_dataclass(Sequential)  # the layers' leaves; input_shape static

AnyNetwork = Sequential  # the one network type (the name kept for annotations)


def init_network(
    key: jax.Array,
    input_shape: int | Sequence[int],
    layers: Sequence[object],
    *,
    dtype: jnp.dtype = jnp.float32,
) -> Sequential:
    """Initialise a stack of layers for per-example inputs of shape ``input_shape``; return a ``Sequential``.

    ``layers`` holds builders (``purebp.dense(100, "relu")``,
    ``purebp.residual(...)``, ``purebp.layer_norm()``, ``purebp.dropout(0.1)``)
    and/or initialised layers of your own (any pytree with ``forward`` and
    ``backward``, kept as given). Shapes are inferred layer by layer; a layer
    that does not fit its input is a clear error naming it. Deterministic in
    ``key``: item i draws from ``jax.random.split(key, len(layers))[i]``, with
    the He/Glorot rule of ``init_mlp`` for each dense layer, so a stack of
    dense layers starts exactly where ``init_mlp`` with the same key does.
    """
    if isinstance(input_shape, (int, np.integer)) and not isinstance(input_shape, bool):
        input_shape = (int(input_shape),)
    input_shape = tuple(input_shape)
    for i, n in enumerate(input_shape):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"input_shape[{i}] must be a positive int, got {n!r} (input_shape {input_shape})")
    if not input_shape:
        raise ValueError("input_shape must have at least one axis, e.g. (40,) or (channels, length)")
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"layers must be a non-empty list of layers, got {layers!r}")
    dtype = supported_dtype(dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise TypeError(
            "dtype=float64 needs jax_enable_x64: call jax.config.update('jax_enable_x64', True) before creating arrays"
        )
    stack_layers, _ = init_stack(key, tuple(int(n) for n in input_shape), list(layers), dtype)
    return Sequential(layers=stack_layers, input_shape=tuple(int(n) for n in input_shape))


def dense_stack(weights: Sequence[jax.Array], biases: Sequence[jax.Array], activations: Sequence[str]) -> Sequential:
    """An MLP from given parameters: ``Dense(weights[l], biases[l], activations[l])`` in order, unchecked."""
    layers = tuple(Dense(w, b, name) for w, b, name in zip(weights, biases, activations, strict=True))
    return Sequential(layers=layers, input_shape=(int(layers[0].w.shape[1]),))


def is_mlp(net: AnyNetwork) -> bool:
    """True for a stack of dense layers only (an ``init_mlp`` network): it has ``sizes`` and ``activations``."""
    return isinstance(net, Sequential) and bool(net.layers) and all(isinstance(layer, Dense) for layer in net.layers)


def like(net: AnyNetwork, layers: Sequence[object]) -> AnyNetwork:
    """Return a network with the tree structure of ``net`` and the leaves of ``layers`` (e.g. its gradients)."""
    return jax.tree.unflatten(jax.tree.structure(net), jax.tree.leaves(tuple(layers)))


def validate_sequential(net: Sequential) -> tuple[int, ...]:
    """Raise a clear error, naming the layer, if ``net``'s layers do not fit together; return its output shape."""
    if not isinstance(net, Sequential):
        raise TypeError(f"expected a purebp.Sequential, got {type(net).__name__}")
    if not net.layers:
        raise ValueError("the network has no layers")
    dtype = None
    for path, leaf in jax.tree_util.tree_leaves_with_path(net):
        where = jax.tree_util.keystr(path)
        leaf_dtype = getattr(leaf, "dtype", None)
        if leaf_dtype is None or not jnp.issubdtype(leaf_dtype, jnp.floating):
            raise TypeError(f"parameter {where} must be a floating array, got {leaf!r}")
        if leaf_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"parameter {where} has dtype {leaf_dtype}; supported dtypes: {_SUPPORTED_NAMES}")
        dtype = dtype or leaf_dtype
        if leaf_dtype != dtype:
            raise TypeError(f"parameter {where} is {leaf_dtype} but earlier parameters are {dtype}")
    shape = net.input_shape
    for index, layer in enumerate(net.layers):
        if not is_layer(layer):
            raise TypeError(f"layer {index} is {layer!r}, not a layer with forward(a, key=None) and backward(cache, g)")
        try:
            shape = output_shape(layer, shape, dtype)
        except (ValueError, TypeError) as error:
            raise type(error)(f"layer {index} ({layer!r}): {error}") from None
    return shape


# ---------------------------------------------------------------- deprecated: the MLP type of earlier versions


class _Deprecated(type):
    # the former classes: calling one builds the new type (with a warning); isinstance still answers
    def __instancecheck__(cls, instance: object) -> bool:
        return cls._is_instance(instance)

    def __call__(cls, *args, **kwargs):
        warnings.warn(f"purebp.{cls.__name__} is deprecated: {cls._instead}", DeprecationWarning, stacklevel=2)
        return cls._build(*args, **kwargs)


class Layer(metaclass=_Deprecated):
    """Deprecated: a dense layer is ``Dense(w, b, activation)``; ``Layer(w, b)`` returns ``Dense(w, b)``."""

    _instead = "use purebp.Dense(w, b, activation)"

    @staticmethod
    def _is_instance(instance: object) -> bool:
        return isinstance(instance, Dense)

    @staticmethod
    def _build(w: jax.Array, b: jax.Array) -> Dense:
        return Dense(w, b)


class Network(metaclass=_Deprecated):
    """Deprecated: an MLP is a ``Sequential`` of ``Dense`` (what ``init_mlp`` returns).

    ``Network(layers, activations)`` returns that ``Sequential``; ``isinstance(net, Network)`` is ``is_mlp(net)``.
    """

    _instead = "an MLP is a purebp.Sequential of purebp.Dense layers (init_mlp returns one)"

    @staticmethod
    def _is_instance(instance: object) -> bool:
        return is_mlp(instance)

    @staticmethod
    def _build(layers: Sequence[Dense], activations: Sequence[str]) -> Sequential:
        layers = tuple(layers)
        if len(layers) != len(activations):
            raise ValueError(f"the network has {len(layers)} layers but {len(activations)} activation names")
        if layers and all(hasattr(layer.w, "shape") for layer in layers):
            sizes = (layers[0].w.shape[1],) + tuple(layer.w.shape[0] for layer in layers)
            validate_architecture(sizes, tuple(activations))
        return dense_stack([layer.w for layer in layers], [layer.b for layer in layers], activations)
