"""Comparing gradients leaf by leaf, from the output layer down, and the ``Outcome`` of one case."""

from __future__ import annotations

import numpy as np

from purebp import check as _check
from purebp.kit.cases import Ctx
from purebp.kit.notation import sup


def named_leaves(gw: list, gb: list, L: int) -> list[tuple[str, int, np.ndarray]]:
    """(name, layer, array) from the output layer down: W^L, b^L, W^{L-1}, ..."""
    out = []
    for l in range(L, 0, -1):
        out.append((f"W{sup(l)}", l, gw[l]))
        out.append((f"b{sup(l)}", l, gb[l]))
    return out


def leaf_errors(user: list[np.ndarray], ref: list[np.ndarray], floor: float) -> list[float]:
    """Relative error per leaf: the verdict's rule (``check.relative_errors``)."""
    return _check.relative_errors([np.asarray(u, np.float64) for u in user], [np.asarray(r, np.float64) for r in ref],
                                  floor)  # fmt: skip


class Outcome:
    def __init__(self, kind, layer=None, equation=None, mistake=None, detail="", errors=(), max_error=0.0):
        self.kind, self.layer, self.equation, self.mistake = kind, layer, equation, mistake
        self.detail, self.errors, self.max_error = detail, tuple(errors), max_error

    @property
    def signature(self) -> tuple:
        # what a shrunk case must keep: the same kind of failure, in the same equation, by the same mistake
        return self.kind, self.equation, self.mistake


def delta_scale(ctx: Ctx, deltas: list, tolerance: float, floor: float) -> float:
    # per-example deltas dC^n/dz, or dL/dz = those / N under reduction="mean": whichever delta^L fits
    if ctx.scale != 1.0 and max(leaf_errors([deltas[ctx.L]], [ctx.scale * ctx.delta[ctx.L]], floor)) <= tolerance:
        return ctx.scale
    return 1.0


def deltas_match(ctx: Ctx, deltas: list, tolerance: float, floor: float) -> bool:
    scale = delta_scale(ctx, deltas, tolerance, floor)
    reference = [scale * ctx.delta[l] for l in range(1, ctx.L + 1)]
    return (
        all(np.all(np.isfinite(d)) for d in deltas[1:]) and max(leaf_errors(deltas[1:], reference, floor)) <= tolerance
    )
