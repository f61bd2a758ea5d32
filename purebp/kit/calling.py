"""Calling the user's ``fn(weights, biases, x, y)`` in its layout, unpacking what it returns, shape hints."""

from __future__ import annotations

import traceback
from collections.abc import Callable

import numpy as np

from purebp.kit.cases import Ctx, to_numpy
from purebp.kit.compare import Outcome
from purebp.kit.notation import EQUATIONS, sup


def call_user(fn: Callable, ctx: Ctx) -> tuple:
    """Call fn in its layout; return (gw, gb, deltas or None) in the kit's layout, or raise UserError."""
    spec, L, dtype = ctx.spec, ctx.L, ctx.spec.dtype
    weights = [ctx.W[l].astype(dtype) for l in range(1, L + 1)]
    if spec.layout in ("columns", "rows"):
        biases = [ctx.b[l].astype(dtype) for l in range(1, L + 1)]
        x, y = ctx.x.astype(dtype), ctx.y.astype(dtype)
        if spec.layout == "columns":
            x, y = np.ascontiguousarray(x.T), np.ascontiguousarray(y.T)
        result = _invoke(fn, weights, biases, x, y)
        gw, gb, deltas = _unpack(result, ctx, spec.layout)
        if deltas is not None and spec.layout == "columns":
            deltas = [None if d is None else d.T for d in deltas]
        return gw, gb, deltas
    # examples: Nielsen's network.py, one example at a time as column vectors; the kit sums
    sum_w, sum_b, all_deltas = None, None, []
    for n in range(ctx.N):
        biases = [ctx.b[l].astype(dtype)[:, None] for l in range(1, L + 1)]
        x = ctx.x[n].astype(dtype)[:, None]
        y = ctx.y[n].astype(dtype)[:, None]
        result = _invoke(fn, [w.copy() for w in weights], biases, x, y)
        gw, gb, deltas = _unpack(result, ctx, "examples")
        sum_w = gw if sum_w is None else [None] + [s + g for s, g in zip(sum_w[1:], gw[1:])]
        sum_b = gb if sum_b is None else [None] + [s + g for s, g in zip(sum_b[1:], gb[1:])]
        all_deltas.append(deltas)
    gw = [None] + [ctx.scale * g for g in sum_w[1:]]
    gb = [None] + [ctx.scale * g for g in sum_b[1:]]
    deltas = None
    if all(d is not None for d in all_deltas):
        deltas = [None] + [np.stack([d[l][:, 0] for d in all_deltas]) for l in range(1, L + 1)]
    return gw, gb, deltas


class UserError(Exception):
    def __init__(self, outcome: Outcome):
        super().__init__(outcome.detail)
        self.outcome = outcome


def _invoke(fn: Callable, weights, biases, x, y):
    try:
        return fn(weights, biases, x, y)
    except Exception as error:  # the user's code: report it with the case, never hide it
        frames = traceback.extract_tb(error.__traceback__)[1:]
        where = f" (at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""
        raise UserError(
            Outcome("exception", detail=f"your function raised {type(error).__name__}: {error}{where}")
        ) from None


def _expected_shapes(ctx: Ctx, layout: str) -> dict:
    sizes, N = ctx.case.sizes, ctx.N
    shapes = {}
    for l in range(1, ctx.L + 1):
        shapes[("W", l)] = (sizes[l], sizes[l - 1])
        shapes[("b", l)] = (sizes[l], 1) if layout == "examples" else (sizes[l],)
        shapes[("delta", l)] = {"columns": (sizes[l], N), "rows": (N, sizes[l]), "examples": (sizes[l], 1)}[layout]
    return shapes


def _shape_hint(ctx: Ctx, kind: str, l: int, got: tuple, expected: tuple, layout: str) -> tuple[str, str | None]:
    n, N = ctx.case.sizes[l], ctx.N
    if kind == "W" and got == expected[::-1]:
        return f" — that is the transpose: BP4 is δ{sup(l)} (a{sup(l - 1)})ᵀ, not a{sup(l - 1)} (δ{sup(l)})ᵀ", (
            "bp4_transposed"
        )
    if kind == "W" and got == (n, n) and n != ctx.case.sizes[l - 1]:
        return f" — δ{sup(l)} (a{sup(l)})ᵀ has that shape: BP4 takes the layer's input a{sup(l - 1)}", (
            "bp4_activation_of_layer_l"
        )
    unsummed = {"columns": (n, N), "rows": (N, n)}.get(layout)
    if kind == "b" and got == unsummed:
        return (
            f" — that is the shape of δ{sup(l)} for every example (N = {N}): sum it over the batch"
            + (" (with N = 1 it may also be a bias kept as a column: return it 1-D)" if N == 1 else ""),
            "bp3_not_summed",
        )
    if kind == "b" and layout != "examples" and got == (N,):
        return f" — that looks like δ{sup(l)} summed over the units: sum over the batch instead", "bp3_wrong_axis"
    if kind == "b" and layout != "examples" and got in ((n, 1), (1, n)):
        return f" — a {got[0]}×{got[1]} matrix; the biases you were given are 1-D {(n,)}, return the same", None
    return "", None


_PRODUCED_BY = {"W": "BP4", "b": "BP3"}


def _unpack(result: object, ctx: Ctx, layout: str) -> tuple:
    L = ctx.L
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise UserError(
            Outcome(
                "return",
                detail=f"your function returned {type(result).__name__}"
                + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
                + "; expected (grad_weights, grad_biases) or (grad_weights, grad_biases, deltas)",
            )
        )
    parts = list(result)
    names = ("grad_weights", "grad_biases", "deltas")
    for i, part in enumerate(parts):
        if not isinstance(part, (tuple, list)) or len(part) != L:
            got = f"a sequence of {len(part)}" if isinstance(part, (tuple, list)) else type(part).__name__
            raise UserError(
                Outcome(
                    "return",
                    detail=f"{names[i]} is {got}; expected a list of {L} arrays, one per layer "
                    f"({names[i]}[l] for the notes' layer l+1)",
                )
            )
    shapes = _expected_shapes(ctx, layout)
    converted = {}
    mismatches = []
    for kind, part in zip(("W", "b", "delta"), parts):
        for l in range(1, L + 1):
            value = part[l - 1]
            try:
                array = to_numpy(value)
            except (TypeError, ValueError) as error:
                raise UserError(
                    Outcome(
                        "return",
                        detail=f"{names[('W', 'b', 'delta').index(kind)]}[{l - 1}] is not an "
                        f"array ({type(value).__name__}: {error})",
                    )
                ) from None
            converted[(kind, l)] = array
            if array.shape != shapes[(kind, l)]:
                mismatches.append((kind, l, array.shape))
    if mismatches:
        # the first wrong one counting from the output: highest layer; at a layer delta, then b, then W
        order = {"delta": 0, "b": 1, "W": 2}
        kind, l, got = min(mismatches, key=lambda m: (-m[1], order[m[0]]))
        expected = shapes[(kind, l)]
        if kind == "delta":
            equation = "BP1" if l == L else "BP2"
            what = f"δ{sup(l)} (deltas[{l - 1}])"
        else:
            equation = _PRODUCED_BY[kind]
            what = f"∂C/∂{kind}{sup(l)} (grad_{'weights' if kind == 'W' else 'biases'}[{l - 1}])"
        hint, mistake = _shape_hint(ctx, kind, l, got, expected, layout)
        raise UserError(
            Outcome(
                "shape",
                layer=l,
                equation=equation,
                mistake=mistake,
                detail=f"{what} has shape {got}, expected {expected}, the shape {equation} "
                f"({EQUATIONS[equation]}) gives in the {layout!r} layout{hint}",
            )
        )
    gw = [None] + [converted[("W", l)] for l in range(1, L + 1)]
    gb = [None] + [converted[("b", l)].reshape(-1) for l in range(1, L + 1)]
    deltas = None
    if len(parts) == 3:
        deltas = [None] + [converted[("delta", l)] for l in range(1, L + 1)]
        if layout == "examples":
            deltas = [None] + [d for d in deltas[1:]]
    return gw, gb, deltas
