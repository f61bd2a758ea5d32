"""The witness: jax.grad of purebp's forward pass and cost (check.py), on the drawn float64 weights."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from purebp import check as _check
from purebp.kit.cases import Ctx, forward
from purebp.network import dense_stack


def output_padding(ctx: Ctx) -> tuple[float, float] | None:
    """(bias, target) for padded output units that leave every real unit's delta^L unchanged, or None.

    mse and binary cross-entropy are sums over output units with an elementwise G: a padded unit is just
    another term, and it never reaches a real unit (its weights are zero). Softmax outputs: a logit of
    -1e30 has probability exactly 0 and target 0. Registered losses: no padding.
    """
    name = ctx.spec.loss
    if name in ("mse", "binary_cross_entropy") and ctx.out.elementwise:
        return 0.0, float(forward(ctx.out, np.zeros(1))[0])
    if name in ("cross_entropy", "softmax_cross_entropy"):
        return -1e30, 0.0
    return None


def witness(ctx: Ctx) -> tuple[list, list]:
    """Reference (dL/dW^l, dL/db^l) from ``purebp.check.autodiff_value_and_grad``.

    To compile one program per depth instead of one per drawn shape, the widths are padded to
    ``max_width`` with units whose weights in and out are zero (they change no real entry; see
    ``output_padding`` for the output layer) and examples are taken one at a time (a batch of one,
    summed here; the mean is that sum / N). If the padded program is not finite (an activation with
    G'(0) infinite), the exact shapes are used instead.
    """
    spec, L, sizes = ctx.spec, ctx.L, ctx.case.sizes
    width = max(spec.max_width, *sizes)
    out_pad = output_padding(ctx)
    padded = [width] * L + [width if out_pad is not None else sizes[-1]]
    layers = []
    for l in range(1, L + 1):
        w = np.zeros((padded[l], padded[l - 1]))
        w[: sizes[l], : sizes[l - 1]] = ctx.W[l]
        bias = np.zeros(padded[l])
        if l == L and out_pad is not None:
            bias[:] = out_pad[0]
        bias[: sizes[l]] = ctx.b[l]
        layers.append((jnp.asarray(w), jnp.asarray(bias)))
    net = dense_stack(*zip(*layers), (spec.activation,) * (L - 1) + (spec.output,))
    y = ctx.y
    if out_pad is not None:
        y = np.full((ctx.N, padded[L]), out_pad[1])
        y[:, : sizes[L]] = ctx.y
    gw = [np.zeros((padded[l], padded[l - 1])) for l in range(1, L + 1)]
    gb = [np.zeros(padded[l]) for l in range(1, L + 1)]
    for n in range(ctx.N):
        xp = np.zeros((1, width))
        xp[0, : sizes[0]] = ctx.x[n]
        _, grads = _check.autodiff_value_and_grad(net, xp, y[n : n + 1], loss=spec.loss, reduction="sum")
        for l in range(L):
            gw[l] += np.asarray(grads.layers[l].w)
            gb[l] += np.asarray(grads.layers[l].b)
    gw = [None] + [ctx.scale * g[: sizes[l + 1], : sizes[l]] for l, g in enumerate(gw)]
    gb = [None] + [ctx.scale * g[: sizes[l + 1]] for l, g in enumerate(gb)]
    if all(np.all(np.isfinite(g)) for g in gw[1:] + gb[1:]):
        return gw, gb
    exact = dense_stack(
        [jnp.asarray(ctx.W[l]) for l in range(1, L + 1)],
        [jnp.asarray(ctx.b[l]) for l in range(1, L + 1)],
        net.activations,
    )
    _, grads = _check.autodiff_value_and_grad(exact, ctx.x, ctx.y, loss=spec.loss, reduction=spec.reduction)
    return [None] + [np.asarray(g.w) for g in grads.layers], [None] + [np.asarray(g.b) for g in grads.layers]
