"""Running one case against the witness, and the shrinker: the smallest case that fails the same way."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from purebp import check as _check
from purebp.kit.calling import UserError, call_user
from purebp.kit.cases import BackpropCase, Ctx, Spec, candidates
from purebp.kit.compare import Outcome, deltas_match, leaf_errors, named_leaves
from purebp.kit.diagnosis import diagnose
from purebp.kit.witness import witness


def evaluate(fn: Callable, spec: Spec, case: BackpropCase) -> Outcome:
    """Run one case: the user's pass vs the witness; on a mismatch, the diagnosis."""
    ctx = Ctx(spec, case)
    ref_w, ref_b = witness(ctx)
    own_w, own_b = ctx.grads(ctx.delta)
    ref_leaves = [a for _, _, a in named_leaves(ref_w, ref_b, ctx.L)]
    own_error = max(leaf_errors([a for _, _, a in named_leaves(own_w, own_b, ctx.L)], ref_leaves, 1e-6))
    if own_error > 1e-8:
        raise RuntimeError(
            f"internal: the kit's NumPy reference pass disagrees with jax.grad by {own_error:.2e} on {case} "
            f"(activation {spec.activation!r}, output {spec.output!r}, loss {spec.loss!r}); please report this"
        )
    try:
        gw, gb, deltas = call_user(fn, ctx)
    except UserError as error:
        return error.outcome
    tolerance = _check.TOLERANCE[spec.dtype]
    floor = _check.FLOOR[spec.dtype]
    named = named_leaves(gw, gb, ctx.L)
    errors = leaf_errors([a for _, _, a in named], ref_leaves, floor)
    table = [(name, err) for (name, _, _), err in zip(named, errors)]
    finite = all(np.all(np.isfinite(a)) for _, _, a in named)
    deltas_right = deltas is None or deltas_match(ctx, deltas, tolerance, floor)
    if finite and max(errors) <= tolerance and deltas_right:
        return Outcome("passed", max_error=max(errors))
    return diagnose(ctx, gw, gb, deltas, ref_w, ref_b, table, tolerance, floor)


def shrink_case(
    fn: Callable, spec: Spec, case: BackpropCase, outcome: Outcome, budget: int = 300
) -> tuple[BackpropCase, Outcome]:
    """Greedy, deterministic: take the first smaller case with the same kind of failure, until none is."""
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        for candidate in candidates(case, spec):
            tries += 1
            result = evaluate(fn, spec, candidate)
            if result.kind != "passed" and result.signature == outcome.signature:
                case, outcome, improved = candidate, result, True
                break
            if tries >= budget:
                break
    return case, outcome


def square_retry(
    fn: Callable, spec: Spec, case: BackpropCase, outcome: Outcome, max_batch: int
) -> tuple[BackpropCase, Outcome, str]:
    """fn raised: a mistake like W instead of Wᵀ only runs on square layers. Try networks of equal widths
    (and a batch equal to the width, for a sum over the wrong axis); if one runs and fails, diagnose that."""
    for width in range(max(2, spec.min_output_width), spec.max_width + 1):
        for batch in dict.fromkeys((case.batch, width)):
            square = BackpropCase((width,) * len(case.sizes), batch, case.seed)
            result = evaluate(fn, spec, square)
            if result.kind in ("mismatch", "shape"):
                square, result = shrink_case(fn, spec, square, result)
                note = (
                    f"on {case} {outcome.detail[0].lower() + outcome.detail[1:]}; on layers of equal width it "
                    f"runs, and the diagnosis above is from such a case (replay the raising one with "
                    f"case={case.as_dict()!r})"
                )
                return square, result, note
    return case, outcome, ""
