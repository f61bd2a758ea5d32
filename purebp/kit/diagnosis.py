"""Naming the mistake: deltas compared directly, then the catalogue, a constant ratio, or the first wrong leaf."""

from __future__ import annotations

import numpy as np

from purebp.kit.cases import Ctx
from purebp.kit.compare import Outcome, delta_scale, leaf_errors, named_leaves
from purebp.kit.mistakes import CATALOGUE, layers_of, variant_pass
from purebp.kit.notation import EQUATIONS, sup

# a catalogue entry matches the user's result when every leaf agrees to this relative error (rounding only)
MATCH_TOLERANCE = {np.dtype("float64"): 1e-8, np.dtype("float32"): 1e-4}


def diagnose(ctx: Ctx, gw, gb, deltas, ref_w, ref_b, table, tolerance, floor) -> Outcome:
    L, spec = ctx.L, ctx.spec
    match_tol = MATCH_TOLERANCE[spec.dtype]
    user = [a for _, _, a in named_leaves(gw, gb, L)]
    ref = [a for _, _, a in named_leaves(ref_w, ref_b, L)]
    wrong = [(name, l) for (name, l, _), (_, err) in zip(named_leaves(gw, gb, L), table) if not err <= tolerance]
    top = max((l for _, l in wrong), default=L)

    def same(a_list, b_list) -> bool:
        return max(leaf_errors(a_list, b_list, floor)) <= match_tol

    # 1. deltas returned: compare them directly, from the output down
    if deltas is not None:
        user_delta = deltas
        scale = delta_scale(ctx, deltas, match_tol, floor)
        for l in range(L, 0, -1):
            if not same([user_delta[l]], [scale * ctx.delta[l]]):
                equation = "BP1" if l == L else "BP2"
                for mistake in CATALOGUE:
                    if mistake.equation != equation:
                        continue
                    variant = variant_pass(ctx, mistake, [l])
                    if variant is not None and same([user_delta[l]], [scale * variant[2][l]]):
                        return Outcome("mismatch", l, equation, mistake.key, mistake.describe(ctx, l), table)
                return Outcome(
                    "mismatch",
                    l,
                    equation,
                    None,
                    f"your δ{sup(l)} (deltas[{l - 1}]) differs from {EQUATIONS[equation]}"
                    + (f", while δ{sup(l + 1)} above it is right" if l < L else "")
                    + " (not one of the mistakes the kit knows by name)",
                    table,
                )
    # 2. the catalogue: the reference pass with one known mistake, at one layer or at every layer it fits
    for mistake in CATALOGUE:
        layers = list(layers_of(mistake, L))
        attempts = [layers] + ([[l] for l in layers] if len(layers) > 1 else [])
        for at in attempts:
            variant = variant_pass(ctx, mistake, at)
            if variant is None:
                continue
            leaves = [a for _, _, a in named_leaves(variant[0], variant[1], L)]
            if same(leaves, ref):
                continue  # not a mistake for these activations (relu'(a) = relu'(z), ...)
            if same(user, leaves):
                applied = sorted(variant[3], reverse=True)
                detail = mistake.describe(ctx, applied[0])
                if len(applied) > 1:
                    detail += f" (the same in layers {', '.join(str(l) for l in applied)})"
                return Outcome("mismatch", applied[0], mistake.equation, mistake.key, detail, table)
    # 3. a constant ratio across every leaf: a scaling mistake (mean vs sum, a factor 2, a sign)
    dot = sum(float(np.sum(u * r)) for u, r in zip(user, ref))
    norm = sum(float(np.sum(r * r)) for r in ref)
    if norm > 0 and all(np.all(np.isfinite(u)) for u in user):
        ratio = dot / norm
        if abs(ratio - 1.0) > match_tol and same(user, [ratio * r for r in ref]) and ratio != 0.0:
            return Outcome("mismatch", L, "BP1", "scale", describe_ratio(ctx, ratio, match_tol), table)
    # 4. unnamed: say which leaves of the first wrong layer are wrong, and what that points to
    wrong_here = {name[0] for name, l in wrong if l == top}
    if wrong_here == {"b"}:
        equation, what = "BP3", f"only ∂C/∂b{sup(top)} is wrong at layer {top}"
    elif wrong_here == {"W"}:
        equation, what = "BP4", f"only ∂C/∂W{sup(top)} is wrong at layer {top}"
    else:
        equation = "BP1" if top == L else "BP2"
        what = f"both ∂C/∂W{sup(top)} and ∂C/∂b{sup(top)} are wrong, so δ{sup(top)} is"
    layers_above = f"; every layer above {top} is right" if top < L else ""
    return Outcome(
        "mismatch",
        top,
        equation,
        None,
        f"{what}{layers_above} (not one of the mistakes the kit knows by name; return your deltas as a third "
        "item to have them compared directly)",
        table,
    )


def describe_ratio(ctx: Ctx, ratio: float, tol: float) -> str:
    N, layout, reduction = ctx.N, ctx.spec.layout, ctx.spec.reduction
    if layout != "examples" and N > 1 and abs(ratio * N - 1.0) < 1e-6:
        return (
            f"every gradient is 1/N = 1/{N} of the expected: you averaged over the batch (the mean) but the "
            f"check asked for reduction={reduction!r} (the sum); pass reduction='mean' if the mean is what you meant"
        )
    if layout != "examples" and N > 1 and abs(ratio / N - 1.0) < 1e-6:
        return (
            f"every gradient is N = {N} times the expected: you summed over the batch but the check asked for "
            f"reduction={reduction!r} (the mean); pass reduction='sum' if the sum is what you meant"
        )
    if abs(ratio + 1.0) < 1e-6:
        return (
            "every gradient has the wrong sign: δᴸ = y − a instead of a − y, or you return the descent step "
            "−∇C instead of the gradient"
        )
    if abs(ratio - 2.0) < 1e-6 and ctx.spec.loss == "mse":
        return (
            "every gradient is twice the expected: 2(a − y) is the derivative of ‖a − y‖², but the cost is "
            "C = ½‖a − y‖², with ∂C/∂a = a − y"
        )
    return f"every gradient is {ratio:.6g} times the expected: a constant factor, most likely in δᴸ or in the cost"
