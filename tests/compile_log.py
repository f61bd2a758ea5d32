"""Which programs XLA compiles inside a block, from jax.monitoring's compile events (shared by the tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax


@contextlib.contextmanager
def compiles() -> Iterator[list[str]]:
    """Yield a list that collects the names of the programs XLA compiles inside the block."""
    names: list[str] = []

    def listener(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax._src.monitoring.unregister_event_duration_listener(listener)
