"""Argument checks shared by the subcommands: output paths, the float64 switch, the version string.

Nothing here imports JAX: ``purebp --version`` and argument errors answer before it loads.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence


def output_path(text: str) -> str:
    """An argparse ``type`` for a file the command will write (``--json``, ``--plot``, ``--checkpoint``).

    Refused at parse time, before any data is loaded or anything compiles: a path that is a directory, or
    whose parent directory does not exist (argparse turns the error into ``usage ... error`` and exit 2).
    """
    if not text:
        raise argparse.ArgumentTypeError("an empty path: give a file name")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file path inside it")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text!r}: the directory {parent} does not exist")
    return text


def enable_x64_if(dtypes: Sequence[str]) -> None:
    """Turn on JAX's float64 when a float64 run is asked for; must run before any array exists."""
    if "float64" in dtypes:
        import jax

        jax.config.update("jax_enable_x64", True)


def version() -> str:
    """``purebp <version>``, from ``purebp.version`` (the one place the number is written)."""
    from purebp.version import __version__

    return f"purebp {__version__}"
