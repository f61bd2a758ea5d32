"""Networks as immutable parameter pytrees.

A multi-layer perceptron is a ``Network``: a tuple of ``Layer(w, b)`` (the
leaves, ``w`` shaped ``(n_out, n_in)`` as in the notes, ``b`` shaped
``(n_out,)``) plus one activation name per layer, kept as static metadata in
the tree structure. Any other stack of layers (``purebp.layers``: dense,
residual, layer norm, dropout, your own) is a ``Sequential``, made by
``init_network``. Both run on the same engine (``purebp.engine``), which sees
a ``Network`` as the stack of ``Dense`` layers it is (``stack``). Nothing here
mutates: every function returns new values.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from purebp import activations as _activations
from purebp.layers import Dense
from purebp.layers.dense import HE_ACTIVATIONS, init_dense
from purebp.layers.shapes import init_stack, is_layer, output_shape


@dataclasses.dataclass(frozen=True)
class Layer:
    """One affine layer, z = W a_prev + b, with W of shape (n_out, n_in)."""

    w: jax.Array
    b: jax.Array

    def __repr__(self) -> str:
        return f"Layer(w={_describe(self.w)}, b={_describe(self.b)})"


@dataclasses.dataclass(frozen=True)
class Network:
    """An MLP: ``layers[l]`` maps a^{l} to z^{l+1}; ``activations[l]`` is G for it.

    ``activations`` is part of the tree structure (static), so
    ``jax.tree.leaves(net)`` is exactly ``[w0, b0, w1, b1, ...]`` and two
    networks with different activations never share a compiled function.
    """

    layers: tuple[Layer, ...]
    activations: tuple[str, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Layer widths (n_0, n_1, ..., n_L), read off the weight shapes."""
        return (self.layers[0].w.shape[1],) + tuple(layer.w.shape[0] for layer in self.layers)

    @property
    def dtype(self) -> np.dtype:
        """The floating dtype of the parameters."""
        return np.dtype(self.layers[0].w.dtype)

    def __repr__(self) -> str:
        try:
            return f"Network(sizes={self.sizes}, activations={self.activations}, dtype={self.dtype})"
        except (AttributeError, IndexError, TypeError):  # leaves that are not arrays
            return f"Network(layers={self.layers!r}, activations={self.activations!r})"


jax.tree_util.register_dataclass(Layer, data_fields=["w", "b"], meta_fields=[])
jax.tree_util.register_dataclass(Network, data_fields=["layers"], meta_fields=["activations"])


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
) -> Network:
    """Return a freshly initialised ``Network`` with layer widths ``sizes``.

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
    return Network(layers=_init_layers(key, sizes, activations, dtype), activations=activations)


@functools.partial(jax.jit, static_argnames=("sizes", "activations", "dtype"))
def _init_layers(key, sizes, activations, dtype) -> tuple[Layer, ...]:
    # one compile per architecture instead of one eager random kernel per layer
    keys = jax.random.split(key, len(sizes) - 1)
    return tuple(
        Layer(*init_dense(layer_key, n_in, n_out, name, dtype))
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


def validate_network(net: Network) -> None:
    """Raise a clear error if ``net`` is not a consistent MLP (shapes, dtypes, names)."""
    if not isinstance(net, Network):
        raise TypeError(f"expected a purebp.Network, got {type(net).__name__}")
    if not net.layers:
        raise ValueError("the network has no layers")
    if len(net.activations) != len(net.layers):
        raise ValueError(f"the network has {len(net.layers)} layers but {len(net.activations)} activation names")
    dtype = None
    for l, layer in enumerate(net.layers):
        w, b = layer.w, layer.b
        if getattr(w, "ndim", None) != 2 or getattr(b, "ndim", None) != 1:
            raise ValueError(
                f"layer {l}: expected w of shape (n_out, n_in) and b of shape (n_out,), got "
                f"w {getattr(w, 'shape', w)} and b {getattr(b, 'shape', b)}"
            )
        if w.shape[0] != b.shape[0]:
            raise ValueError(f"layer {l}: w has {w.shape[0]} rows but b has {b.shape[0]} entries")
        if l > 0 and w.shape[1] != net.layers[l - 1].w.shape[0]:
            raise ValueError(
                f"layer {l}: w expects {w.shape[1]} inputs but layer {l - 1} has {net.layers[l - 1].w.shape[0]} outputs"
            )
        for leaf_name, leaf in (("w", w), ("b", b)):
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(f"layer {l}: {leaf_name} has non-floating dtype {leaf.dtype}")
            if leaf.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"layer {l}: {leaf_name} has dtype {leaf.dtype}; supported dtypes: {_SUPPORTED_NAMES}")
            dtype = dtype or leaf.dtype
            if leaf.dtype != dtype:
                raise TypeError(f"layer {l}: {leaf_name} is {leaf.dtype} but earlier parameters are {dtype}")
    validate_architecture(net.sizes, net.activations)


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

AnyNetwork = Network | Sequential


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


def stack(net: AnyNetwork) -> tuple:
    """Return the layers the engine runs: ``Dense(w, b, G)`` per layer of a ``Network``, ``net.layers`` otherwise."""
    if isinstance(net, Network):
        return tuple(Dense(layer.w, layer.b, name) for layer, name in zip(net.layers, net.activations))
    return net.layers


def like(net: AnyNetwork, layers: Sequence[object]) -> AnyNetwork:
    """Return a network with the tree structure of ``net`` and the leaves of ``layers`` (e.g. its gradients)."""
    return jax.tree.unflatten(jax.tree.structure(net), jax.tree.leaves(tuple(layers)))


def input_shape_of(net: AnyNetwork) -> tuple[int, ...]:
    """The per-example input shape: (n_0,) for a ``Network``."""
    return (net.layers[0].w.shape[1],) if isinstance(net, Network) else net.input_shape


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
