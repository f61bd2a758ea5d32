"""The ``purebp`` command: ``verify``, ``train``, ``check-backprop``, ``launch`` (one entry point, ``main``)."""

from purebp.cli.main import main

__all__ = ["main"]
