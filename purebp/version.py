"""The version of purebp (its own module, so that any floor may read it)."""

__version__ = "0.1.0"
