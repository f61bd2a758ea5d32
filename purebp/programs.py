"""Compiled programs: one switch that drops them all, and readable descriptions of Python objects.

Jitted functions close over what they need or take it as traced arguments;
their static arguments are names, numbers and functions compared by identity,
so a program is never keyed on a function's bytecode. (How a sweep over
learning rates still compiles once: ``purebp.train.optimizers.program_update``.)

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
            digest = hashlib.sha256(array.tobytes()).hexdigest()[:16]
            out[path] = f"{array.dtype}{list(array.shape)} sha256:{digest}"
    else:
        out[path] = f"<{type(value).__module__}.{type(value).__qualname__}>"
