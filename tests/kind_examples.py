"""The example layer of a row of the table of layer kinds, drawn by the row's own ``draw`` (shared by tests)."""

from __future__ import annotations

import numpy as np

from purebp.layers import kinds as _kinds


def inner_draw(rng: np.random.Generator):
    """The ``draw`` a kind's row calls for the layers inside it (a residual body), float64 from ``rng``."""

    def draw(descriptions, shape, scale):
        layers = []
        for description in descriptions:
            kind = _kinds.kind_named(description[0])
            layers.append(kind.draw(description, shape, rng, np.float64, scale, draw))
            shape = kind.shape_after(description, shape)
        return layers

    return draw


def example_layer(kind: _kinds.Kind, seed: int = 0) -> tuple[object, tuple[int, ...]]:
    """The row's example layer with float64 parameters drawn from ``seed``, and its per-example input shape."""
    description, shape = kind.example
    rng = np.random.default_rng(seed)
    return kind.draw(description, shape, rng, np.float64, 1.0, inner_draw(rng)), shape
