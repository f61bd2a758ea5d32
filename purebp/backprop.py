"""The forward pass with its cache and the hand-written backward pass.

Notation of the notes, batch-first: x is (N, n_0), a^0 = x, and for l = 1..L

    z^l = a^{l-1} W^l^T + b^l          (the notes' z = W a + b, one row per example)
    a^l = G_l(z^l)

The forward pass keeps z^l and a^l (the notes' "forward pass: dz/dw = a").
The backward pass then runs the notes' four equations, no autodiff anywhere:

    (BP1) delta^L = dC/da (.) G'(z^L)                  (fused with the cost: losses.py)
    (BP2) delta^l = ((W^{l+1})^T delta^{l+1}) (.) G'(z^l)
    (BP3) dC/db^l = sum_n delta^l_n
    (BP4) dC/dW^l = delta^l (a^{l-1})^T               (batch-first: delta^T @ a_prev)

summed over the batch because L = sum_n C^n (divided by N for ``reduction="mean"``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from purebp import activations as _activations
from purebp import losses as _losses
from purebp.network import Layer, Network, validate_network

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BackpropTrace:
    """Everything one forward + backward pass computes, as a pytree.

    For a network with L layers and a batch of N examples (layer l = 0..L-1 here
    is the notes' layer l + 1):

    - ``pre_activations[l]``: z, shape (N, n_{l+1})
    - ``activations[l]``: a = G(z), shape (N, n_{l+1}); a^0 = x is not repeated
    - ``deltas[l]``: delta = dC^n/dz per example, shape (N, n_{l+1}), already
      scaled by 1/N when ``reduction="mean"``
    - ``loss``: the scalar L; ``grads``: dL/dtheta as a ``Network``
    """

    pre_activations: tuple[Array, ...]
    activations: tuple[Array, ...]
    deltas: tuple[Array, ...]
    loss: Array
    grads: Network


jax.tree_util.register_dataclass(
    BackpropTrace,
    data_fields=["pre_activations", "activations", "deltas", "loss", "grads"],
    meta_fields=[],
)


# ---------------------------------------------------------------- the passes


def forward_pass(net: Network, x: Array) -> tuple[tuple[Array, Array], ...]:
    """Return ((z^1, a^1), ..., (z^L, a^L)): what the backward pass needs from the forward pass."""
    cache = []
    activation = x
    for layer, name in zip(net.layers, net.activations):
        pre_activation = activation @ layer.w.T + layer.b[None, :]  # z^l = W^l a^{l-1} + b^l
        activation = _activations.get(name).forward(pre_activation)  # a^l = G(z^l)
        cache.append((pre_activation, activation))
    return tuple(cache)


def backward_pass(
    net: Network, x: Array, cache: tuple[tuple[Array, Array], ...], output_delta: Array
) -> tuple[Network, tuple[Array, ...]]:
    """Run (BP2)-(BP4) from delta^L = ``output_delta``; return (grads, deltas per layer)."""
    num_layers = len(net.layers)
    grads: list[Layer] = [None] * num_layers
    deltas: list[Array] = [None] * num_layers
    delta = output_delta  # (BP1) delta^L, formed with the cost (losses.output_delta)
    for l in reversed(range(num_layers)):
        deltas[l] = delta
        activation_prev = x if l == 0 else cache[l - 1][1]
        grad_w = delta.T @ activation_prev  # (BP4) dC/dW^l = delta^l (a^{l-1})^T
        grad_b = jnp.sum(delta, axis=0)  # (BP3) dC/db^l = sum_n delta^l_n
        grads[l] = Layer(w=grad_w, b=grad_b)
        if l > 0:  # a^0 = x needs no delta: the first layer stops here, no input gradient is formed
            pre_activation_prev, activation_prev = cache[l - 1]
            upstream = delta @ net.layers[l].w  # (BP2) (W^{l+1})^T delta^{l+1}
            # (BP2) delta^l = ((W^{l+1})^T delta^{l+1}) (.) G'(z^l), G' from the stored z^l and a^l
            delta = _activations.get(net.activations[l - 1]).chain(upstream, pre_activation_prev, activation_prev)
    return Network(layers=tuple(grads), activations=net.activations), tuple(deltas)


def _trace(net: Network, x: Array, y: Array, loss: str, reduction: str) -> BackpropTrace:
    cache = forward_pass(net, x)
    pre_activation, activation = cache[-1]
    target = _losses.dense_targets(y, net.layers[-1].w.shape[0], activation.dtype)
    cost = _losses.per_example_cost(pre_activation, activation, target, loss)
    scale = 1.0 / x.shape[0] if reduction == "mean" else 1.0  # L = (1/N) sum_n C^n or sum_n C^n
    output = _activations.get(net.activations[-1])
    # (BP1) delta^L = dC/da (.) G'(z^L), times dL/dC^n
    delta = scale * _losses.output_delta(pre_activation, activation, target, loss, output)
    grads, deltas = backward_pass(net, x, cache, delta)
    return BackpropTrace(
        pre_activations=tuple(z for z, _ in cache),
        activations=tuple(a for _, a in cache),
        deltas=deltas,
        loss=scale * jnp.sum(cost),
        grads=grads,
    )


@functools.partial(jax.jit, static_argnames=("loss", "reduction"))
def _value_and_grad_jit(net: Network, x: Array, y: Array, loss: str, reduction: str):
    trace = _trace(net, x, y, loss, reduction)
    return trace.loss, trace.grads


_backprop_trace_jit = jax.jit(_trace, static_argnames=("loss", "reduction"))


@jax.jit
def _forward_jit(net: Network, x: Array) -> Array:
    return forward_pass(net, x)[-1][1]


# ---------------------------------------------------------------- public API


def forward(net: Network, x: Array) -> Array:
    """Return the network's output a^L for a batch x of shape (N, n_in): shape (N, n_out)."""
    x, _ = coerce_inputs(net, x)
    validate_inputs(net, x)
    return _forward_jit(net, x)


def value_and_grad(net: Network, x: Array, y: Array, *, loss: str, reduction: str = "mean") -> tuple[Array, Network]:
    """Return (L, dL/dtheta) computed by the hand-written backward pass.

    ``grads`` is a ``Network`` with the same tree structure as ``net``, so it
    lines up leaf for leaf with ``net``, optax updates and ``jax.grad``.
    x is (N, n_in); y is integer labels (N,) or one-hot (N, C) for the
    classification losses and (N, n_out) targets otherwise. One compile per
    architecture, shape, dtype, loss and reduction.
    """
    return _checked_call(_value_and_grad_jit, net, x, y, loss, reduction)


def grad(net: Network, x: Array, y: Array, *, loss: str, reduction: str = "mean") -> Network:
    """Return dL/dtheta only (see ``value_and_grad``)."""
    return value_and_grad(net, x, y, loss=loss, reduction=reduction)[1]


def backprop_trace(net: Network, x: Array, y: Array, *, loss: str, reduction: str = "mean") -> BackpropTrace:
    """Return a ``BackpropTrace``: z^l, a^l, delta^l for every layer, the loss and grads, from one pass."""
    return _checked_call(_backprop_trace_jit, net, x, y, loss, reduction)


# ---------------------------------------------------------------- input checks


def _signature(array: object) -> tuple:
    if isinstance(array, jax.Array) and not isinstance(array, jax.core.Tracer):
        return array.shape, array.dtype  # already canonical: the cheap path of every eager call
    shape = getattr(array, "shape", None)
    dtype = getattr(array, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"expected an array, got {type(array).__name__}")
    return tuple(shape), jax.dtypes.canonicalize_dtype(dtype)


def coerce_inputs(net: Network, x: object, y: object = None) -> tuple[object, object]:
    """Cast floating NumPy inputs to the network's dtype (``jnp.asarray(x, dtype)``); JAX arrays pass unchanged.

    JAX's convention: host data (NumPy arrays, which default to float64) is
    converted to the dtype the computation runs in, while a JAX array of
    another dtype is a mistake in the caller's program and is refused by
    ``validate_inputs``. Integer labels are never cast.
    """
    if not isinstance(x, (np.ndarray, np.generic)) and not isinstance(y, (np.ndarray, np.generic)):
        return x, y  # the eager hot path: JAX arrays, nothing to look up
    dtype = _parameter_dtype(net)
    return _cast_host(x, dtype), _cast_host(y, dtype)


def _parameter_dtype(net: Network) -> np.dtype | None:
    leaves = jax.tree.leaves(net) if isinstance(net, Network) else []
    return getattr(leaves[0], "dtype", None) if leaves else None


def _cast_host(array: object, dtype: np.dtype | None) -> object:
    if dtype is None or not isinstance(array, (np.ndarray, np.generic)):
        return array
    if jnp.issubdtype(array.dtype, jnp.floating) and array.dtype != dtype:
        return np.asarray(array, dtype=dtype)
    return array


def check_finite(context: str, **arrays: Array | None) -> None:
    """Raise ValueError naming the first row and column where one of ``arrays`` is NaN or infinite.

    ``check_finite("the training data", x=x, y=y)``; integer arrays, None and
    tracers are skipped. Used before training and before a gradient check: a
    NaN in the data is not a wrong gradient, and should not be reported as one.
    """
    for name, array in arrays.items():
        if array is None or isinstance(array, jax.core.Tracer):
            continue
        values = np.asarray(array)
        if not jnp.issubdtype(values.dtype, jnp.inexact):
            continue
        finite = np.isfinite(values.astype(np.float32) if values.dtype.itemsize < 4 else values)
        if finite.all():
            continue
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        where = ", ".join(f"{axis} {i}" for axis, i in zip(("row", "column"), first))
        where += "".join(f", index {i}" for i in first[2:])
        raise ValueError(
            f"{context} is not finite: {name}[{', '.join(map(str, first))}] is {values[first]} ({where}; "
            f"{int((~finite).sum())} non-finite values in {name} in all); remove or replace them first"
        )


def validate_inputs(
    net: Network, x: Array, y: Array | None = None, *, loss: str | None = None, reduction: str = "mean"
) -> None:
    """Raise ValueError/TypeError, before anything compiles, if (net, x, y, loss) do not fit together.

    Shapes and dtypes are always checked (they are static, even under a user's
    ``jit``). Label values (range of integer classes, [0, 1] for binary
    cross-entropy) are checked only when y is concrete; under a user's ``jit``
    an out-of-range integer label makes the loss NaN instead (see
    ``losses.dense_targets``).
    """
    _check_static(net, x, y, loss, reduction)
    _check_values(net, y, loss)


def _check_static(net: Network, x: Array, y: Array | None, loss: str | None, reduction: str) -> tuple:
    """Check shapes, dtypes and names (cached per signature); return the signature."""
    if not isinstance(net, Network):
        raise TypeError(f"expected a purebp.Network as the first argument, got {type(net).__name__}")
    try:
        param_signature = tuple([_signature(leaf) for leaf in jax.tree.leaves(net)])
    except TypeError as error:
        raise TypeError(f"the network's parameters must be arrays: {error}") from None
    x_signature = _signature(x)
    y_signature = None if y is None else _signature(y)
    signature = (net.activations, param_signature, x_signature, y_signature, loss, reduction)
    _validate_structure(*signature)
    return signature


def _check_values(net: Network, y: Array | None, loss: str | None) -> None:
    if y is not None and not isinstance(y, jax.core.Tracer):
        _validate_target_values(np.asarray(y), loss, net.layers[-1].w.shape[0])


# (jitted function, signature) pairs already called once, so already compiled
_CALLED: set[tuple] = set()


def _checked_call(jitted, net: Network, x: Array, y: Array, loss: str, reduction: str):
    """Return ``jitted(net, x, y, loss, reduction)`` with every check of ``validate_inputs`` done.

    The static checks come first, always. On the first call for a signature
    the label values are checked too before anything is dispatched, so bad
    input does not cost a compile (after ``jax.clear_caches()`` a signature
    seen before may compile again before its labels are checked). On later
    calls the computation is dispatched first and the labels are checked
    while it runs: a bad label still raises and no result is returned, but
    the host work hides behind the computation (measured: an eager call on
    tiny 28 us cheaper than checking first, 1.01-1.03x a jitted jax.grad call).
    """
    x, y = coerce_inputs(net, x, y)
    key = (jitted, _check_static(net, x, y, loss, reduction))
    if key not in _CALLED:
        _check_values(net, y, loss)
        result = jitted(net, x, y, loss, reduction)
        if len(_CALLED) > 4096:  # bounded: a long sweep over shapes does not grow it forever
            _CALLED.clear()
        _CALLED.add(key)
        return result
    result = jitted(net, x, y, loss, reduction)
    _check_values(net, y, loss)
    return result


@functools.lru_cache(maxsize=1024)
def _validate_structure(activations, param_signature, x_signature, y_signature, loss, reduction) -> None:
    # cached: the same shapes are checked once, so eager calls stay cheap
    layers = [
        Layer(w=jax.ShapeDtypeStruct(*param_signature[2 * l]), b=jax.ShapeDtypeStruct(*param_signature[2 * l + 1]))
        for l in range(len(param_signature) // 2)
    ]
    net = Network(layers=tuple(layers), activations=activations)
    validate_network(net)
    n_in, n_out, dtype = net.sizes[0], net.sizes[-1], net.dtype
    x_shape, x_dtype = x_signature
    if len(x_shape) != 2:
        raise ValueError(
            f"x must have shape (N, {n_in}) (batch first), got shape {x_shape}"
            + ("; for one example use x[None, :]" if len(x_shape) == 1 else "")
        )
    if x_shape[1] != n_in:
        raise ValueError(f"x has {x_shape[1]} features per example but the network expects {n_in}")
    if x_shape[0] == 0:
        raise ValueError("x is an empty batch (N = 0)")
    if x_dtype != dtype:
        raise TypeError(f"x has dtype {x_dtype} but the network's parameters are {dtype}; cast x to {dtype}")
    if y_signature is None:
        return
    if loss is None:
        raise ValueError(f"a loss name is needed with targets; valid losses: {', '.join(_losses.LOSSES)}")
    _losses.validate_loss(loss, activations[-1], reduction)
    y_shape, y_dtype = y_signature
    if len(y_shape) == 0 or y_shape[0] != x_shape[0]:
        raise ValueError(f"x has a batch of {x_shape[0]} examples but y has shape {y_shape}")
    if loss in _losses.CLASSIFICATION_LOSSES:
        if len(y_shape) == 1:
            if not jnp.issubdtype(y_dtype, jnp.integer) or y_dtype == np.bool_:
                raise TypeError(
                    f"loss {loss!r} takes integer class labels of shape (N,) or one-hot targets of shape "
                    f"(N, {n_out}); got {y_dtype} labels of shape {y_shape}"
                )
            return
        expected = f"integer labels of shape (N,) or one-hot targets of shape (N, {n_out})"
    else:
        expected = f"targets of shape (N, {n_out})"
    if len(y_shape) != 2 or y_shape[1] != n_out:
        raise ValueError(f"loss {loss!r} on a network with {n_out} outputs takes {expected}; got y of shape {y_shape}")
    if y_dtype != dtype:
        raise TypeError(f"loss {loss!r} takes {dtype} targets (the parameters' dtype); got y of dtype {y_dtype}")


def _validate_target_values(y: np.ndarray, loss: str, n_out: int) -> None:
    if y.size == 0:
        return
    if loss in _losses.CLASSIFICATION_LOSSES and np.issubdtype(y.dtype, np.integer):
        if y.min() >= 0 and y.max() < n_out:  # two reductions: the common case stays cheap
            return
        bad = np.flatnonzero((y < 0) | (y >= n_out))
        if bad.size:
            raise ValueError(
                f"class label {y[bad[0]]} at index {bad[0]} is outside [0, {n_out}) "
                f"({bad.size} labels out of range); the network has {n_out} outputs"
            )
    elif loss in _losses.CLASSIFICATION_LOSSES:  # one-hot or soft labels: probabilities
        _check_unit_interval(y, f"{loss} targets given as one-hot or soft labels")
    elif loss == "binary_cross_entropy":
        _check_unit_interval(y, "binary_cross_entropy targets")


def _check_unit_interval(y: np.ndarray, what: str) -> None:
    if y.min() >= 0 and y.max() <= 1:  # NaN fails both: it falls through to the search
        return
    bad = np.argwhere(~((y >= 0) & (y <= 1)))
    if bad.size:
        position = ", ".join(map(str, bad[0]))
        raise ValueError(f"{what} must lie in [0, 1]; got {y[tuple(bad[0])]} at y[{position}]")
