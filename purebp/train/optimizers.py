"""Optimizers for ``fit``, and the one update function a compiled epoch is keyed on.

A compiled epoch depends on the optimizer only through its ``update``
function, which the epoch's ``jax.jit`` takes as a static argument, compared
by identity: a new optimizer object, or a re-built one, never reuses a
program traced for another. ``optax.inject_hyperparams`` keeps the numeric
hyperparameters (the learning rate, momentum) in the optimizer *state*, so two
such optimizers built from the same factory with the same non-numeric
settings compute the same update of (gradient, state); ``program_update`` hands
the epoch one shared update function for all of them, so that a sweep over
learning rates (``fit(learning_rate=r)``, ``make_optimizer(name, r)`` or the
user's own ``optax.inject_hyperparams(optax.adam)(learning_rate=r)``)
compiles once. Anything else is keyed by its own update function.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from purebp import inputs as _inputs
from purebp import programs as _programs

OPTIMIZERS = ("gd", "sgd", "momentum", "adam")
DEFAULT_LEARNING_RATE = 0.1
# optax.inject_hyperparams's update functions: found by name, read only through the closure variables below
_INJECTED = {
    ("optax.schedules._inject", f"{factory}.<locals>.wrapped_transform.<locals>.update_fn")
    for factory in ("inject_hyperparams", "inject_stateful_hyperparams")
}
_INJECTED_CELLS = ("hyperparam_dtype", "inner_factory", "other_hps", "sched_hps")
_SHARED: dict[tuple, Callable] = {}
_programs.on_clear(_SHARED.clear)


def validate_learning_rate(learning_rate: object) -> float:
    """Return ``learning_rate`` as a float; raise unless it is a finite number > 0."""
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float, np.integer, np.floating)):
        raise TypeError(f"learning rate must be a number, got {learning_rate!r}")
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"learning rate must be finite and > 0, got {learning_rate}")
    return float(learning_rate)


def make_optimizer(name: str, learning_rate: float, *, momentum: float = 0.9) -> optax.GradientTransformation:
    """Return the optax transformation for ``name``: gd and sgd are ``optax.sgd(lr)`` (plain
    theta <- theta - lr grad; gd means full batch), momentum is ``optax.sgd(lr, momentum)``,
    adam is ``optax.adam(lr)``.

    Each is built with ``optax.inject_hyperparams``, so the learning rate (and
    momentum) live in the optimizer state as arrays, not in the compiled
    program: ``fit`` compiles once for a whole learning-rate sweep, and a
    resumed run that changes the rate is told so, with both values.
    """
    learning_rate = validate_learning_rate(learning_rate)
    if name in ("gd", "sgd"):
        return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate)
    if name == "momentum":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=momentum)
    if name == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)
    raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")


def default_optimizer(learning_rate: float | None) -> optax.GradientTransformation:
    """``fit``'s optimizer: theta <- theta - eta grad L, eta = ``learning_rate`` (0.1) held in the state."""
    rate = DEFAULT_LEARNING_RATE if learning_rate is None else learning_rate
    return make_optimizer("sgd", rate)


def program_update(update: Callable) -> Callable:
    """Return the update function a compiled epoch is keyed on: one shared function per injected optimizer kind.

    For ``optax.inject_hyperparams(factory)(...)`` without schedules, the kind
    is (factory, hyperparameter dtype, the non-numeric settings by type and
    value): the numbers are read from the state, so equal kinds compute the
    same update. Anything else, and any setting that is not hashable, is its
    own kind (the function itself): it may cost a compile, never a wrong program.
    """
    kind = _injected_kind(update)
    if kind is None:
        return update
    return _SHARED.setdefault(kind, update)


def _injected_kind(update: Callable) -> tuple | None:
    name = (getattr(update, "__module__", None), getattr(update, "__qualname__", None))
    if name not in _INJECTED:
        return None
    try:
        cells = dict(zip(update.__code__.co_freevars, (cell.cell_contents for cell in update.__closure__ or ())))
    except ValueError:  # an empty cell
        return None
    if set(cells) != set(_INJECTED_CELLS) or cells["sched_hps"]:
        return None  # another optax version, or schedules (functions of their own): keyed by identity
    settings = tuple(sorted((name, type(value), value) for name, value in cells["other_hps"].items()))
    kind: tuple[Any, ...] = (name, cells["inner_factory"], cells["hyperparam_dtype"], settings)
    try:
        hash(kind)
    except TypeError:
        return None
    return kind


# ---------------------------------------------------------------- a readable description, for checkpoints

_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_MAX_DEPTH = 64


def describe(value: Any, name: str = "", *, limit: int = 400) -> dict[str, str]:
    """Return a flat, JSON-ready {path: text} description of ``value`` for people to compare.

    Functions are described by their module-qualified name and, under
    ``path.<variable>``, the values their closures hold; containers by their
    items; numbers and strings by ``repr``; arrays by shape, dtype and a digest
    (or their values when small). Where two descriptions differ, the paths name what changed
    (``purebp.fit`` uses this to say which optimizer setting a resumed run changed).
    """
    out: dict[str, str] = {}
    _describe(value, name, out, set(), 0, limit)
    return out


def _describe(value: Any, path: str, out: dict[str, str], seen: set[int], depth: int, limit: int) -> None:
    if len(out) >= limit:
        return
    if isinstance(value, _SCALARS):
        out[path] = repr(value)
        return
    if depth > _MAX_DEPTH or id(value) in seen:
        out[path] = f"<{type(value).__name__}>"
        return
    seen = seen | {id(value)}

    def recurse(item: Any, suffix: str) -> None:
        _describe(item, path + suffix, out, seen, depth + 1, limit)

    if isinstance(value, types.FunctionType):
        out[path] = f"{value.__module__}.{value.__qualname__}"
        for variable, cell in zip(value.__code__.co_freevars, value.__closure__ or ()):
            try:
                contents = cell.cell_contents
            except ValueError:
                continue
            recurse(contents, f".{variable}")
        for index, default in enumerate(value.__defaults__ or ()):
            recurse(default, f".<default {index}>")
    elif isinstance(value, types.MethodType):
        recurse(value.__func__, "")
        recurse(value.__self__, ".<self>")
    elif isinstance(value, functools.partial):
        recurse(value.func, "")
        for index, argument in enumerate(value.args):
            recurse(argument, f".<arg {index}>")
        for keyword, argument in value.keywords.items():
            recurse(argument, f".{keyword}")
    elif isinstance(value, (tuple, list)):
        if not value:
            out[path] = repr(value)
        fields = getattr(value, "_fields", None)
        for index, item in enumerate(value):
            recurse(item, f".{fields[index]}" if fields else f"[{index}]")
    elif isinstance(value, dict):
        if not value:
            out[path] = "{}"
        for key, item in value.items():
            recurse(item, f"[{key!r}]")
    elif isinstance(value, (np.ndarray, np.generic)) or (
        isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
    ):
        array = np.asarray(value)
        if array.size <= 8:
            out[path] = f"{array.dtype}{list(array.shape)} {array.tolist()}"
        else:
            out[path] = f"{array.dtype}{list(array.shape)} sha256:{_inputs.digest(array)}"
    else:
        out[path] = f"<{type(value).__module__}.{type(value).__qualname__}>"
