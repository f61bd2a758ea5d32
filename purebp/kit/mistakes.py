"""The catalogue of mistakes: each a NumPy variant of one step of the reference pass (``CATALOGUE``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from purebp.kit.cases import Ctx
from purebp.kit.notation import sup


@dataclasses.dataclass(frozen=True)
class Mistake:
    """A known backprop mistake: ``key``, the equation it is in, and its variant of one step of the pass.

    ``step(ctx, l, delta)`` returns the wrong quantity at layer l (delta^l for BP1/BP2, given the correct
    deltas above it; dC/db^l for BP3; dC/dW^l for BP4), or None where the shapes do not allow the mistake.
    ``describe(ctx, l)`` says it in words. ``every_layer``: also tried at every layer it applies to at once
    (a mistake inside the loop); always tried at one layer at a time.
    """

    key: str
    equation: str
    step: Callable[[Ctx, int, list], np.ndarray | None]
    describe: Callable[[Ctx, int], str]


def _bp2_base(ctx: Ctx, l: int, delta: list) -> np.ndarray:
    return delta[l + 1] @ ctx.W[l + 1]  # (W^{l+1})^T delta^{l+1}, rows


def _if(condition: bool, value: Callable[[], np.ndarray]) -> np.ndarray | None:
    return value() if condition else None


def _n(ctx: Ctx, l: int) -> int:
    return ctx.case.sizes[l]


def _bp1_chain(ctx: Ctx, g: Callable[[Ctx], np.ndarray | None]) -> np.ndarray | None:
    upstream = ctx.grad_output()
    if upstream is None or not ctx.out.elementwise:
        return None
    return upstream * g(ctx)


CATALOGUE: tuple[Mistake, ...] = (
    # BP1: delta^L
    Mistake(
        "bp1_no_derivative",
        "BP1",
        lambda c, l, d: _if(c.grad_output() is not None, lambda: c.grad_output()),
        lambda c, l: (
            f"your δ{sup(l)} equals ∂C/∂a{sup(l)} without the factor G'(z{sup(l)}) of the output "
            f"activation ({c.spec.output})"
        ),
    ),
    Mistake(
        "bp1_derivative_at_a",
        "BP1",
        lambda c, l, d: _bp1_chain(c, lambda c: c.gprime(c.out, c.a[l])),
        lambda c, l: (
            f"your δ{sup(l)} equals ∂C/∂a{sup(l)} ⊙ G'(a{sup(l)}), the derivative evaluated at the "
            f"activation instead of z{sup(l)}"
        ),
    ),
    Mistake(
        "bp1_extra_derivative",
        "BP1",
        lambda c, l, d: _if(
            c.loss.output_delta is not None and c.out.elementwise, lambda: d[l] * c.gprime(c.out, c.z[l])
        ),
        lambda c, l: (
            f"your δ{sup(l)} is the output error times G'(z{sup(l)}) once more: with "
            f"{c.spec.loss!r} on a {c.spec.output!r} output the G' is already cancelled, δ{sup(l)} = a{sup(l)} − y"
        ),
    ),
    Mistake(
        "bp1_softmax_diagonal",
        "BP1",
        lambda c, l, d: _if(
            c.spec.output == "softmax" and c.grad_output() is not None,
            lambda: c.grad_output() * c.a[l] * (1.0 - c.a[l]),
        ),
        lambda c, l: (
            f"your δ{sup(l)} treats softmax as elementwise, ∂C/∂a ⊙ a(1 − a); its Jacobian is not "
            f"diagonal: δ = a ⊙ (∂C/∂a − ⟨∂C/∂a, a⟩)"
        ),
    ),
    Mistake(
        "bp1_sign",
        "BP1",
        lambda c, l, d: -d[l],
        lambda c, l: f"your δ{sup(l)} has the wrong sign (y − a instead of a − y)",
    ),
    Mistake(
        "bp1_mse_factor_2",
        "BP1",
        lambda c, l, d: _if(c.spec.loss == "mse", lambda: 2.0 * d[l]),
        lambda c, l: (
            f"your δ{sup(l)} is twice the expected: 2(a − y) is the derivative of ‖a − y‖², but the "
            f"cost is C = ½‖a − y‖², with ∂C/∂a = a − y"
        ),
    ),
    # BP2: delta^l, l < L, from the correct delta^{l+1}
    Mistake(
        "bp2_no_derivative",
        "BP2",
        lambda c, l, d: _bp2_base(c, l, d),
        lambda c, l: f"your δ{sup(l)} equals (W{sup(l + 1)})ᵀ δ{sup(l + 1)} without the factor G'(z{sup(l)})",
    ),
    Mistake(
        "bp2_derivative_at_a",
        "BP2",
        lambda c, l, d: _bp2_base(c, l, d) * c.gprime(c.hidden, c.a[l]),
        lambda c, l: (
            f"your δ{sup(l)} equals ((W{sup(l + 1)})ᵀ δ{sup(l + 1)}) ⊙ G'(a{sup(l)}), the derivative "
            f"evaluated at the activation instead of z{sup(l)}"
        ),
    ),
    Mistake(
        "bp2_no_transpose",
        "BP2",
        lambda c, l, d: _if(_n(c, l) == _n(c, l + 1), lambda: (d[l + 1] @ c.W[l + 1].T) * c.gprime(c.hidden, c.z[l])),
        lambda c, l: (
            f"your δ{sup(l)} equals (W{sup(l + 1)} δ{sup(l + 1)}) ⊙ G'(z{sup(l)}): W{sup(l + 1)} "
            f"is not transposed (this only runs because the layer is square)"
        ),
    ),
    Mistake(
        "bp2_weights_of_layer_l",
        "BP2",
        lambda c, l, d: _if(_n(c, l - 1) == _n(c, l + 1), lambda: (d[l + 1] @ c.W[l].T) * c.gprime(c.hidden, c.z[l])),
        lambda c, l: (
            f"your δ{sup(l)} equals (W{sup(l)} δ{sup(l + 1)}) ⊙ G'(z{sup(l)}): the weights into "
            f"layer {l} instead of (W{sup(l + 1)})ᵀ, the weights out of it"
        ),
    ),
    Mistake(
        "bp2_weights_of_layer_l_transposed",
        "BP2",
        lambda c, l, d: _if(
            _n(c, l - 1) == _n(c, l) == _n(c, l + 1), lambda: (d[l + 1] @ c.W[l]) * c.gprime(c.hidden, c.z[l])
        ),
        lambda c, l: (
            f"your δ{sup(l)} equals ((W{sup(l)})ᵀ δ{sup(l + 1)}) ⊙ G'(z{sup(l)}): W{sup(l)} "
            f"instead of W{sup(l + 1)} (an index off by one)"
        ),
    ),
    Mistake(
        "bp2_derivative_of_layer_above",
        "BP2",
        lambda c, l, d: _if(
            _n(c, l) == _n(c, l + 1) and c.act(l + 1).elementwise,
            lambda: _bp2_base(c, l, d) * c.gprime(c.act(l + 1), c.z[l + 1]),
        ),
        lambda c, l: (
            f"your δ{sup(l)} equals ((W{sup(l + 1)})ᵀ δ{sup(l + 1)}) ⊙ G'(z{sup(l + 1)}): the "
            f"derivative of layer {l + 1} instead of layer {l}"
        ),
    ),
    Mistake(
        "bp2_derivative_of_layer_below",
        "BP2",
        lambda c, l, d: _if(
            l >= 2 and _n(c, l) == _n(c, l - 1), lambda: _bp2_base(c, l, d) * c.gprime(c.hidden, c.z[l - 1])
        ),
        lambda c, l: (
            f"your δ{sup(l)} equals ((W{sup(l + 1)})ᵀ δ{sup(l + 1)}) ⊙ G'(z{sup(l - 1)}): the "
            f"derivative of layer {l - 1} instead of layer {l}"
        ),
    ),
    Mistake(
        "bp2_output_activation",
        "BP2",
        lambda c, l, d: _if(
            c.spec.output != c.spec.activation and c.out.elementwise,
            lambda: _bp2_base(c, l, d) * c.gprime(c.out, c.z[l]),
        ),
        lambda c, l: (
            f"your δ{sup(l)} uses the output activation's derivative {c.spec.output}'(z{sup(l)}) "
            f"instead of {c.spec.activation}'(z{sup(l)})"
        ),
    ),
    Mistake(
        "bp2_sign",
        "BP2",
        lambda c, l, d: -(_bp2_base(c, l, d) * c.gprime(c.hidden, c.z[l])),
        lambda c, l: f"your δ{sup(l)} has the wrong sign",
    ),
    # BP3: dC/db^l from the correct delta^l
    Mistake(
        "bp3_last_example",
        "BP3",
        lambda c, l, d: _if(c.N >= 2, lambda: c.scale * d[l][-1]),
        lambda c, l: (
            f"your ∂C/∂b{sup(l)} is δ{sup(l)} of the last example only, not the sum over the batch "
            f"(an assignment where a += was meant?)"
        ),
    ),
    Mistake(
        "bp3_first_example",
        "BP3",
        lambda c, l, d: _if(c.N >= 2, lambda: c.scale * d[l][0]),
        lambda c, l: f"your ∂C/∂b{sup(l)} is δ{sup(l)} of the first example only, not the sum over the batch",
    ),
    Mistake(
        "bp3_wrong_axis",
        "BP3",
        lambda c, l, d: _if(_n(c, l) == c.N and c.N >= 2, lambda: c.scale * d[l].sum(axis=1)),
        lambda c, l: (
            f"your ∂C/∂b{sup(l)} is δ{sup(l)} summed over the units (the wrong axis) instead of over "
            f"the batch (this only runs because the batch size equals the layer's width)"
        ),
    ),
    Mistake(
        "bp3_batch_scaling",
        "BP3",
        lambda c, l, d: _if(c.N >= 2, lambda: c.scale * d[l].sum(axis=0) / c.N),
        lambda c, l: (
            f"your ∂C/∂b{sup(l)} is 1/N of the expected while the weight gradient is right: divided by "
            "the batch size once too often (the mean where the sum was meant)"
        ),
    ),
    Mistake(
        "bp3_batch_scaling_n",
        "BP3",
        lambda c, l, d: _if(c.N >= 2, lambda: c.scale * d[l].sum(axis=0) * c.N),
        lambda c, l: (
            f"your ∂C/∂b{sup(l)} is N times the expected while the weight gradient is right: "
            "not divided by the batch size (the sum where the mean was meant)"
        ),
    ),
    # BP4: dC/dW^l from the correct delta^l
    Mistake(
        "bp4_transposed",
        "BP4",
        lambda c, l, d: _if(_n(c, l) == _n(c, l - 1), lambda: c.scale * (d[l].T @ c.a[l - 1]).T),
        lambda c, l: (
            f"your ∂C/∂W{sup(l)} is transposed: a{sup(l - 1)} (δ{sup(l)})ᵀ instead of "
            f"δ{sup(l)} (a{sup(l - 1)})ᵀ (it only has the right shape because the layer is square)"
        ),
    ),
    Mistake(
        "bp4_activation_of_layer_l",
        "BP4",
        lambda c, l, d: _if(_n(c, l) == _n(c, l - 1), lambda: c.scale * d[l].T @ c.a[l]),
        lambda c, l: (
            f"your ∂C/∂W{sup(l)} equals δ{sup(l)} (a{sup(l)})ᵀ: the layer's own activation instead "
            f"of its input a{sup(l - 1)}"
        ),
    ),
    Mistake(
        "bp4_pre_activation",
        "BP4",
        lambda c, l, d: _if(l >= 2, lambda: c.scale * d[l].T @ c.z[l - 1]),
        lambda c, l: (
            f"your ∂C/∂W{sup(l)} equals δ{sup(l)} (z{sup(l - 1)})ᵀ: the pre-activation z{sup(l - 1)} "
            f"instead of a{sup(l - 1)} = G(z{sup(l - 1)})"
        ),
    ),
    Mistake(
        "bp4_batch_scaling",
        "BP4",
        lambda c, l, d: _if(c.N >= 2, lambda: c.scale * d[l].T @ c.a[l - 1] / c.N),
        lambda c, l: (
            f"your ∂C/∂W{sup(l)} is 1/N of the expected while the bias gradient is right: divided by "
            "the batch size once too often (the mean where the sum was meant)"
        ),
    ),
    Mistake(
        "bp4_batch_scaling_n",
        "BP4",
        lambda c, l, d: _if(c.N >= 2, lambda: c.scale * d[l].T @ c.a[l - 1] * c.N),
        lambda c, l: (
            f"your ∂C/∂W{sup(l)} is N times the expected while the bias gradient is right: "
            "not divided by the batch size (the sum where the mean was meant)"
        ),
    ),
    Mistake(
        "bp4_last_example",
        "BP4",
        lambda c, l, d: _if(c.N >= 2, lambda: c.scale * np.outer(d[l][-1], c.a[l - 1][-1])),
        lambda c, l: (
            f"your ∂C/∂W{sup(l)} is δ{sup(l)} (a{sup(l - 1)})ᵀ of the last example only, not summed over the batch"
        ),
    ),
)


def layers_of(mistake: Mistake, L: int) -> range:
    if mistake.equation == "BP1":
        return range(L, L + 1)
    if mistake.equation == "BP2":
        return range(L - 1, 0, -1)
    return range(L, 0, -1)


def variant_pass(ctx: Ctx, mistake: Mistake, at: Sequence[int]) -> tuple[list, list, list] | None:
    """The reference pass with ``mistake`` made at the layers ``at``; None where shapes do not allow it."""
    L = ctx.L
    delta = [None] * (L + 1)
    delta[L] = ctx.delta[L]
    applied = []  # at several layers (a mistake in the loop): made wherever the shapes allow it
    if mistake.equation == "BP1":
        value = mistake.step(ctx, L, ctx.delta)
        if value is not None:
            delta[L] = value
            applied.append(L)
    for l in range(L - 1, 0, -1):
        delta[l] = (delta[l + 1] @ ctx.W[l + 1]) * ctx.gprime(ctx.hidden, ctx.z[l])
        if mistake.equation == "BP2" and l in at:
            value = mistake.step(ctx, l, delta)
            if value is not None:
                delta[l] = value
                applied.append(l)
    gw, gb = ctx.grads(delta)
    if mistake.equation in ("BP3", "BP4"):
        for l in at:
            value = mistake.step(ctx, l, delta)
            if value is not None:
                (gb if mistake.equation == "BP3" else gw)[l] = value
                applied.append(l)
    if not applied:
        return None
    return gw, gb, delta, applied
