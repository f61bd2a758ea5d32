"""Every input check, once: the network, x and y fit together, keys are keys, data is finite.

Shapes, dtypes and names are checked per signature (cached), before anything
compiles; label values are checked when they are concrete. The engine, the
extras and training all call these; none keeps a copy.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from purebp import losses as _losses
from purebp import programs as _programs
from purebp.layers import Dense
from purebp.network import AnyNetwork, Sequential, validate_sequential

Array = jax.Array


def _signature(array: object) -> tuple:
    if isinstance(array, jax.Array) and not isinstance(array, jax.core.Tracer):
        return array.shape, array.dtype  # already canonical: the cheap path of every eager call
    shape = getattr(array, "shape", None)
    dtype = getattr(array, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"expected an array, got {type(array).__name__}")
    return tuple(shape), jax.dtypes.canonicalize_dtype(dtype)


def coerce_inputs(net: AnyNetwork, x: object, y: object = None) -> tuple[object, object]:
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


def _parameter_dtype(net: AnyNetwork) -> np.dtype | None:
    leaves = jax.tree.leaves(net) if isinstance(net, Sequential) else []
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
    net: AnyNetwork, x: Array, y: Array | None = None, *, loss: str | None = None, reduction: str = "mean"
) -> None:
    """Raise ValueError/TypeError, before anything compiles, if (net, x, y, loss) do not fit together.

    Shapes and dtypes are always checked (they are static, even under a user's
    ``jit``). Label values (range of integer classes, [0, 1] for binary
    cross-entropy) are checked only when y is concrete; under a user's ``jit``
    an out-of-range integer label makes the loss NaN instead (see
    ``losses.dense_targets``).
    """
    _, n_out = check_static(net, x, y, loss, reduction)
    check_values(n_out, y, loss)


def check_static(net: AnyNetwork, x: Array, y: Array | None, loss: str | None, reduction: str) -> tuple:
    """Check shapes, dtypes and names (cached per signature); return (signature, number of outputs)."""
    if not isinstance(net, Sequential):
        raise TypeError(
            f"expected a purebp.Sequential (init_mlp, init_network) as the first argument, got {type(net).__name__}"
        )
    try:
        param_signature = tuple([_signature(leaf) for leaf in jax.tree.leaves(net)])
    except TypeError as error:
        raise TypeError(f"the network's parameters must be arrays: {error}") from None
    x_signature = _signature(x)
    y_signature = None if y is None else _signature(y)
    structure = jax.tree.structure(net)
    signature = (structure, param_signature, x_signature, y_signature, loss, reduction)
    n_out = _validate_structure(*signature)
    return signature, n_out


def check_values(n_out: int, y: Array | None, loss: str | None) -> None:
    if y is not None and not isinstance(y, jax.core.Tracer):
        _validate_target_values(np.asarray(y), loss, n_out)


def check_key(key: object, *, name: str = "key", required: bool = False) -> None:
    """Raise unless ``key`` is one JAX random key (a typed key of shape (), or a legacy uint32[2] key), or None.

    None passes unless ``required``. TypeError for anything that is not a key, ValueError for an array of
    several typed keys. The one key check of the package: the engine, the extras and training call it.
    """
    if key is None and not required:
        return
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is None or shape is None:
        raise TypeError(f"{name} must be one JAX random key such as jax.random.key(0), got {type(key).__name__}")
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(f"{name} must be one JAX random key (shape ()), got a key array of shape {shape}")
        return
    if dtype != np.uint32 or tuple(shape) != (2,):
        raise TypeError(
            f"{name} must be one JAX random key such as jax.random.key(0) (or a legacy uint32[2] PRNGKey), "
            f"got {type(key).__name__} of dtype {dtype} and shape {tuple(shape)}"
        )


@functools.lru_cache(maxsize=1024)
def _validate_structure(structure, param_signature, x_signature, y_signature, loss, reduction) -> int:
    # cached: the same shapes are checked once, so eager calls stay cheap; returns the number of outputs
    net = jax.tree.unflatten(structure, [jax.ShapeDtypeStruct(*leaf) for leaf in param_signature])
    output_shape = validate_sequential(net)
    input_shape, dtype = net.input_shape, net.dtype
    last = net.layers[-1]
    output_activation = last.activation if isinstance(last, Dense) else "identity"
    ends_in = None if isinstance(last, Dense) else last
    x_shape, x_dtype = x_signature
    if len(x_shape) != 1 + len(input_shape):
        expected = "(N, " + ", ".join(map(str, input_shape)) + ")"
        raise ValueError(
            f"x must have shape {expected} (batch first), got shape {x_shape}"
            + (
                "; add the channel axis: x[:, None, :]"
                if len(input_shape) == 2 and input_shape[0] == 1 and tuple(x_shape[1:]) == tuple(input_shape[1:])
                else "; for one example use x[None, :]"
                if len(x_shape) == len(input_shape)
                else ""
            )
        )
    if tuple(x_shape[1:]) != tuple(input_shape):
        if len(input_shape) == 1:
            raise ValueError(f"x has {x_shape[1]} features per example but the network expects {input_shape[0]}")
        raise ValueError(f"x has per-example shape {tuple(x_shape[1:])} but the network expects {input_shape}")
    if x_shape[0] == 0:
        raise ValueError("x is an empty batch (N = 0)")
    if dtype is None:
        if not jnp.issubdtype(x_dtype, jnp.floating):
            raise TypeError(f"x must be a floating array, got dtype {x_dtype}")
        dtype = x_dtype
    if x_dtype != dtype:
        raise TypeError(f"x has dtype {x_dtype} but the network's parameters are {dtype}; cast x to {dtype}")
    n_out = output_shape[-1] if output_shape else 0
    if y_signature is None:
        return n_out
    if loss is None:
        raise ValueError(f"a loss name is needed with targets; valid losses: {', '.join(_losses.names())}")
    if len(output_shape) != 1:
        raise ValueError(
            f"a cost takes outputs of shape (N, n_out), but the network's outputs have per-example shape "
            f"{tuple(output_shape)}: end it with a flatten and a dense layer"
        )
    try:
        _losses.validate_loss(loss, output_activation, reduction)
    except ValueError as error:
        if ends_in is None:
            raise
        raise ValueError(
            f"{error} (the network ends in {ends_in!r}, not a dense layer, so the cost sees its output as an "
            "identity output: logits or values)"
        ) from None
    y_shape, y_dtype = y_signature
    if len(y_shape) == 0 or y_shape[0] != x_shape[0]:
        raise ValueError(f"x has a batch of {x_shape[0]} examples but y has shape {y_shape}")
    if _losses.get(loss).classification:
        if len(y_shape) == 1:
            if not jnp.issubdtype(y_dtype, jnp.integer) or y_dtype == np.bool_:
                raise TypeError(
                    f"loss {loss!r} takes integer class labels of shape (N,) or one-hot targets of shape "
                    f"(N, {n_out}); got {y_dtype} labels of shape {y_shape}"
                )
            return n_out
        expected = f"integer labels of shape (N,) or one-hot targets of shape (N, {n_out})"
    else:
        expected = f"targets of shape (N, {n_out})"
    if len(y_shape) != 2 or y_shape[1] != n_out:
        raise ValueError(f"loss {loss!r} on a network with {n_out} outputs takes {expected}; got y of shape {y_shape}")
    if y_dtype != dtype:
        raise TypeError(f"loss {loss!r} takes {dtype} targets (the parameters' dtype); got y of dtype {y_dtype}")
    return n_out


_programs.on_clear(_validate_structure.cache_clear)


def _validate_target_values(y: np.ndarray, loss: str, n_out: int) -> None:
    if y.size == 0:
        return
    table = _losses.get(loss)
    if table.classification and np.issubdtype(y.dtype, np.integer):
        if y.min() >= 0 and y.max() < n_out:  # two reductions: the common case stays cheap
            return
        bad = np.flatnonzero((y < 0) | (y >= n_out))
        if bad.size:
            raise ValueError(
                f"class label {y[bad[0]]} at index {bad[0]} is outside [0, {n_out}) "
                f"({bad.size} labels out of range); the network has {n_out} outputs"
            )
    elif table.classification:  # one-hot or soft labels: probabilities
        _check_unit_interval(y, f"{loss} targets given as one-hot or soft labels")
    elif table.targets_in_unit_interval:
        _check_unit_interval(y, f"{loss} targets")


def _check_unit_interval(y: np.ndarray, what: str) -> None:
    if y.min() >= 0 and y.max() <= 1:  # NaN fails both: it falls through to the search
        return
    bad = np.argwhere(~((y >= 0) & (y <= 1)))
    if bad.size:
        position = ", ".join(map(str, bad[0]))
        raise ValueError(f"{what} must lie in [0, 1]; got {y[tuple(bad[0])]} at y[{position}]")


def digest(*arrays: object) -> str:
    """A short sha256 of arrays' dtypes, shapes and bytes (16 hex digits): the one digest of the package.

    Names data, parameters or fixed matrices in a run description without storing them, so that a resumed
    run can tell that it was given the same ones.
    """
    hashed = hashlib.sha256()
    for array in arrays:
        host = np.ascontiguousarray(np.asarray(array))
        hashed.update(f"{host.dtype}{host.shape}".encode())
        hashed.update(host.tobytes())
    return hashed.hexdigest()[:16]


ABSENT = "<absent>"  # what json_differences reports on the side that lacks a key


def json_differences(first: object, second: object, *, into_lists: bool = True, path: tuple = ()) -> list[tuple]:
    """Every place two JSON values differ, as (path, value in first, value in second): the one JSON diff of the
    package (checkpoint templates, resumed runs); each caller words the places its own way.

    Dicts are compared key by key (first's keys in order, then second's new ones; a missing key is ``ABSENT``
    on its side); lists entry by entry, then their lengths (path ending in ``"len"``), or as whole values when
    ``into_lists`` is False; anything else by type and value.
    """
    if isinstance(first, dict) and isinstance(second, dict):
        found = []
        for name in list(first) + [name for name in second if name not in first]:
            found += json_differences(first.get(name, ABSENT), second.get(name, ABSENT), into_lists=into_lists,
                                      path=(*path, name))  # fmt: skip
        return found
    if into_lists and isinstance(first, list) and isinstance(second, list):
        found = []
        for index, (a, b) in enumerate(zip(first, second)):
            found += json_differences(a, b, into_lists=into_lists, path=(*path, index))
        if len(first) != len(second):
            found.append(((*path, "len"), len(first), len(second)))
        return found
    if type(first) is type(second) and first == second:
        return []
    return [(path, first, second)]
