"""What a compiled program depends on: stable keys and readable descriptions of Python objects.

``jax.jit`` keys its cache for a static argument on the argument's hash and
equality. An optax ``GradientTransformation`` is a pair of closures, a new
object on every ``optax.adam(...)`` call, so keying on it compiles again for
every optimizer object even when it computes exactly the same thing; keying
on a mutable object could reuse a stale program. ``program_key`` keys on what
the traced program depends on instead: a function's code, module and name,
and recursively its closure cells and defaults; numbers and strings by value;
arrays by shape, dtype and bytes. Anything else is keyed by its own equality
when it is hashable and by identity when it is not, so an unknown object can
cost a compile but never reuse a program traced for a different one.

With ``optax.inject_hyperparams`` the numeric hyperparameters live in the
optimizer state (traced data), not in the closures, so a sweep over learning
rates has one key, and one compiled program.

Activation and loss names are keyed as strings: a program traced for a name
holds the functions registered under it at that time. ``clear_caches`` drops
every compiled program and every cache purebp keeps, and replacing a
registration calls it, so nothing compiled for the old one is reused.
"""

from __future__ import annotations

import functools
import hashlib
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_MAX_DEPTH = 64

# what ``clear_caches`` calls besides jax.clear_caches: each module registers its own caches
_CLEARERS: list[Callable[[], Any]] = []


def on_clear(clear: Callable[[], Any]) -> Callable[[], Any]:
    """Have ``clear_caches`` call ``clear()`` (e.g. an ``lru_cache``'s ``cache_clear``); returns ``clear``."""
    if not callable(clear):
        raise TypeError(f"on_clear takes a callable of no arguments, got {clear!r}")
    if clear not in _CLEARERS:
        _CLEARERS.append(clear)
    return clear


def clear_caches() -> None:
    """Drop every compiled program and cache: ``jax.clear_caches()``, then each function given to ``on_clear``.

    The next call of any purebp function traces and compiles again, with the
    activations and losses registered now.
    """
    jax.clear_caches()
    for clear in tuple(_CLEARERS):
        clear()


def program_key(value: Any) -> tuple:
    """Return a hashable key equal for two objects whenever tracing them gives the same program."""
    return _key(value, {}, 0)


def _key(value: Any, seen: dict[int, int], depth: int) -> Any:
    if isinstance(value, _SCALARS):
        return (type(value).__name__, repr(value))  # repr: nan == nan, 0.0 != -0.0
    if depth > _MAX_DEPTH or id(value) in seen:
        return ("identity", _Identity(value))
    seen = {**seen, id(value): depth}
    recurse = functools.partial(_key, seen=seen, depth=depth + 1)
    if isinstance(value, types.FunctionType):
        cells = []
        for name, cell in zip(value.__code__.co_freevars, value.__closure__ or ()):
            try:
                cells.append((name, recurse(cell.cell_contents)))
            except ValueError:  # an empty cell
                cells.append((name, ("empty",)))
        return (
            "function",
            value.__module__,
            value.__qualname__,
            value.__code__,
            tuple(cells),
            recurse(value.__defaults__),
            recurse(value.__kwdefaults__),
        )
    if isinstance(value, types.MethodType):
        return ("method", recurse(value.__func__), recurse(value.__self__))
    if isinstance(value, functools.partial):
        return ("partial", recurse(value.func), recurse(value.args), recurse(value.keywords))
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(recurse(item) for item in value))
    if isinstance(value, dict):
        return (type(value), tuple((recurse(name), recurse(item)) for name, item in value.items()))
    if isinstance(value, (np.ndarray, np.generic)) or (
        isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
    ):
        array = np.asarray(value)
        return ("array", array.shape, str(array.dtype), array.tobytes())
    try:
        hash(value)
    except TypeError:
        return ("identity", _Identity(value))
    return ("object", type(value), value)


class _Identity:
    """Keys an object by identity, keeping it alive so that its id cannot be reused."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.value is self.value


class Static:
    """A static ``jax.jit`` argument that hashes and compares by ``program_key`` of what it wraps."""

    __slots__ = ("_hash", "key", "value")

    def __init__(self, value: Any):
        self.value = value
        self.key = program_key(value)
        self._hash = hash(self.key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Static) and self._hash == other._hash and self.key == other.key

    def __repr__(self) -> str:
        return f"Static({self.value!r})"


def describe(value: Any, name: str = "", *, limit: int = 400) -> dict[str, str]:
    """Return a flat, JSON-ready {path: text} description of ``value`` for people to compare.

    Functions are described by their module-qualified name and, under
    ``path.<variable>``, the values their closures hold; containers by their
    items; numbers and strings by ``repr``; arrays by shape, dtype and a digest
    (or their values when small). Two objects with the same ``program_key``
    have the same description; where they differ, the paths name what changed
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
            digest = hashlib.sha256(array.tobytes()).hexdigest()[:16]
            out[path] = f"{array.dtype}{list(array.shape)} sha256:{digest}"
    else:
        out[path] = f"<{type(value).__module__}.{type(value).__qualname__}>"
