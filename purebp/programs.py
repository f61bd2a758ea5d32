"""Compiled programs: one switch that drops them all.

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

from collections.abc import Callable
from typing import Any

import jax

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
