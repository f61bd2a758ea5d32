"""Your backprop under test: check a hand-written backward pass against autodiff, and say what is wrong.

``check_backprop(fn, activation=..., output=..., loss=...)`` draws random
networks (depth, widths, batch, weights and inputs away from kinks and
saturation), calls your ``fn(weights, biases, x, y)`` on NumPy arrays, and
compares what it returns with jax.grad of purebp's forward pass and cost
(``purebp.check.autodiff_value_and_grad``, the witness). On a failure it
shrinks the case to the smallest network that still fails, and names where and
which of the notes' four equations is wrong:

- BP1: delta^L = dC/da^L (.) G'(z^L)                  (the output layer's error)
- BP2: delta^l = ((W^{l+1})^T delta^{l+1}) (.) G'(z^l)   (one layer down)
- BP3: dC/db^l = sum_n delta^l                         (the bias gradient)
- BP4: dC/dW^l = delta^l (a^{l-1})^T                   (the weight gradient)

for a loss L = sum_n C^n (``reduction="sum"``, the notes' form) or 1/N sum_n C^n.

The naming works like this: the gradients are compared leaf by leaf from the
output layer down; the first wrong layer counting from the output is where the
mistake is (backprop runs that way). If ``fn`` returns its deltas, they are
compared directly (a wrong delta^L is BP1, a wrong delta^l below it BP2, right
deltas with a wrong bias or weight gradient BP3 or BP4). Otherwise the result is
matched, to rounding, against a catalogue of common mistakes, each a small
NumPy variant of the reference pass written here (``CATALOGUE``); a constant
ratio across every leaf is a scaling mistake (mean vs sum: a factor N).

No autodiff here: the reference gradient comes from the witness in check.py;
the reference deltas and the mistakes are hand-written NumPy, checked against
that witness on every case.

This module is the public face; the pieces live beside it, one idea each: ``cases`` (the drawn case and
the NumPy reference pass on it), ``witness`` (the autodiff reference), ``calling`` (calling ``fn`` and
unpacking what it returns), ``compare`` (leaf-by-leaf errors), ``mistakes`` (the catalogue),
``diagnosis`` (naming the mistake) and ``search`` (one case end to end, and the shrinker).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import numpy as np

from purebp import activations as _activations
from purebp import check as _check
from purebp import losses as _losses
from purebp.kit.cases import KINK_MARGIN, SATURATION, BackpropCase, Spec, coerce_case, draw_case
from purebp.kit.compare import Outcome
from purebp.kit.diagnosis import MATCH_TOLERANCE
from purebp.kit.mistakes import CATALOGUE, Mistake
from purebp.kit.notation import DTYPES, EQUATIONS, LAYOUTS
from purebp.kit.search import evaluate, shrink_case, square_retry

__all__ = [
    "CATALOGUE",
    "DTYPES",
    "EQUATIONS",
    "KINK_MARGIN",
    "LAYOUTS",
    "MATCH_TOLERANCE",
    "SATURATION",
    "BackpropCase",
    "BackpropReport",
    "Mistake",
    "assert_backprop_matches",
    "check_backprop",
]


@dataclasses.dataclass(frozen=True)
class BackpropReport:
    """The verdict of ``check_backprop``.

    - ``passed``: every trial matched autodiff within the tolerance.
    - ``layer``: the notes' l (1..L, L the output layer) where it first goes wrong counting from the output.
    - ``equation``: "BP1".."BP4", the equation the mistake is in, or None (passed, or fn raised).
    - ``case``: the smallest failing case found (a ``BackpropCase``), None when passed.
    - ``kind``: "passed", "mismatch", "shape", "exception" or "return" (fn returned something unusable).
    - ``mistake``: the catalogue key of the named mistake ("bp2_derivative_at_a", "scale", ...) or None.
    - ``detail``: the sentence naming the mistake; ``errors``: (leaf, relative error) on ``case``.
    ``str(report)`` says all of it in words, with a line that replays the case.
    """

    passed: bool
    layer: int | None
    equation: str | None
    case: BackpropCase | None
    kind: str
    mistake: str | None
    detail: str
    trials: int
    settings: Mapping[str, object]
    errors: tuple[tuple[str, float], ...] = ()
    shrunk_from: BackpropCase | None = None
    max_error: float = 0.0
    note: str = ""

    def replay_line(self) -> str:
        s = self.settings
        args = ", ".join(f"{k}={s[k]!r}" for k in ("activation", "output", "loss", "reduction", "layout", "dtype"))
        return f"check_backprop(fn, {args}, case={self.case.as_dict()!r})" if self.case else ""

    def __str__(self) -> str:
        s = self.settings
        if self.passed:
            return (
                f"check_backprop passed: your backprop ({s['layout']} layout) matches autodiff (jax.grad of "
                f"purebp's forward pass and {s['loss']!r} cost, reduction={s['reduction']!r}) on {self.trials} "
                f"random network(s), largest relative error per leaf {self.max_error:.1e} "
                f"(tolerance {s['tolerance']:.0e})."
            )
        where = f"layer {self.layer} ({self.equation})" if self.layer is not None and self.equation else ""
        lines = [f"check_backprop FAILED: {where + ': ' if where else ''}{self.detail}"]
        if self.equation:
            lines.append(f"  {self.equation} in the notes: {EQUATIONS[self.equation]}")
        lines.append(f"  smallest failing case: {self.case}")
        if self.shrunk_from is not None and self.shrunk_from != self.case:
            lines.append(f"  (shrunk from the first failing random case: {self.shrunk_from})")
        if self.errors:
            shown = ", ".join(f"{name} {err:.2g}" for name, err in self.errors)
            lines.append(f"  relative error per gradient vs jax.grad, from the output down: {shown}")
        if self.note:
            lines.append(f"  {self.note}")
        lines.append(f"  replay: {self.replay_line()}")
        return "\n".join(lines)


def _validate(activation, output, loss, reduction, layout, trials, max_depth, max_width, max_batch, dtype, case):
    hidden = _activations.get(activation)
    _activations.get(output)
    if not hidden.elementwise:
        raise ValueError(f"activation {activation!r} is not elementwise; it is allowed on the output layer only")
    _losses.validate_loss(loss, output, reduction)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    if str(np.dtype(dtype)) not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value in (
        ("trials", trials),
        ("max_depth", max_depth),
        ("max_width", max_width),
        ("max_batch", max_batch),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if case is not None:
        case = coerce_case(case)
        if len(case.sizes) < 2 or min(case.sizes) < 1 or case.batch < 1 or case.seed < 0:
            raise ValueError(f"case needs at least two sizes >= 1, batch >= 1 and seed >= 0, got {case}")
    return case


def check_backprop(
    fn: Callable,
    *,
    activation: str,
    output: str,
    loss: str,
    reduction: str = "sum",
    layout: str = "columns",
    trials: int = 50,
    seed: int = 0,
    max_depth: int = 3,
    max_width: int = 6,
    max_batch: int = 5,
    dtype: str = "float64",
    case: BackpropCase | Mapping | tuple | None = None,
    shrink: bool = True,
) -> BackpropReport:
    """Check your backward pass ``fn(weights, biases, x, y)`` against autodiff on random networks.

    ``weights[l]`` is W^{l+1}, shape (n_{l+1}, n_l); z^{l+1} = W^{l+1} a^l + b^{l+1}, a = G(z) with
    ``activation`` in the hidden layers and ``output`` on the last, the cost ``loss`` (purebp's registry,
    registered ones included) reduced by ``reduction`` over the batch. Layouts:

    - ``"columns"`` (the notes): x (n_0, N), y (n_L, N), biases (n,); returns grads of the same shapes.
    - ``"rows"`` (batch-first): x (N, n_0), y (N, n_L), biases (n,).
    - ``"examples"`` (Nielsen's network.py): called once per example with x (n_0, 1), y (n_L, 1) and
      biases (n, 1); returns that example's gradient; the kit sums (or averages) over the batch.

    Targets are one-hot for classification losses, in (0, 1) otherwise. ``fn`` returns
    ``(grad_weights, grad_biases)`` or ``(grad_weights, grad_biases, deltas)``, deltas[l] = delta^{l+1}
    in the layout's shape (columns (n, N), rows (N, n), examples (n, 1)); NumPy, JAX or torch arrays.

    Tolerance: relative error per leaf 1e-10 in float64, 1e-5 in float32 (check.py's, with its floor).
    ``case=`` replays one case (``report.case``); ``shrink=False`` reports the first failing case as drawn.
    """
    replay = _validate(
        activation, output, loss, reduction, layout, trials, max_depth, max_width, max_batch, dtype, case
    )
    spec = Spec(activation, output, loss, reduction, layout, np.dtype(dtype), int(max_width))
    settings = _settings(spec)
    with jax.enable_x64(True):  # the witness runs in float64 whatever the caller's setting
        cases = [replay] if replay is not None else None
        rng = np.random.default_rng(seed)
        worst = 0.0
        count = len(cases) if cases else trials
        for t in range(count):
            current = cases[t] if cases else draw_case(rng, spec, max_depth, max_batch)
            outcome = evaluate(fn, spec, current)
            if outcome.kind == "passed":
                worst = max(worst, outcome.max_error)
                continue
            return _failure(fn, spec, current, outcome, t + 1, settings, shrink and replay is None, max_batch)
    return BackpropReport(True, None, None, None, "passed", None, "", count, settings, max_error=worst)


def _settings(spec: Spec) -> dict:
    # what the report repeats (and replays with): the caller's choices and the verdict's tolerance
    return {
        "activation": spec.activation,
        "output": spec.output,
        "loss": spec.loss,
        "reduction": spec.reduction,
        "layout": spec.layout,
        "dtype": str(spec.dtype),
        "tolerance": _check.TOLERANCE[spec.dtype],
    }


def _failure(
    fn: Callable, spec: Spec, first: BackpropCase, outcome: Outcome, trials: int, settings: dict, shrink: bool,
    max_batch: int,
) -> BackpropReport:  # fmt: skip
    """The report on the first failing case: shrunk to the smallest that fails the same way (and, where fn
    raised, retried on layers of equal width) unless ``shrink`` is off or the case was replayed."""
    current, note = first, ""
    if shrink:
        current, outcome = shrink_case(fn, spec, first, outcome)
        if outcome.kind == "exception":
            current, outcome, note = square_retry(fn, spec, current, outcome, max_batch)
    return BackpropReport(
        passed=False,
        layer=outcome.layer,
        equation=outcome.equation,
        case=current,
        kind=outcome.kind,
        mistake=outcome.mistake,
        detail=outcome.detail,
        trials=trials,
        settings=settings,
        errors=outcome.errors,
        shrunk_from=first,
        max_error=max((e for _, e in outcome.errors), default=math.inf),
        note=note,
    )


def assert_backprop_matches(fn: Callable, **kwargs) -> BackpropReport:
    """``check_backprop(fn, **kwargs)``; raise AssertionError with the report's text unless it passed."""
    report = check_backprop(fn, **kwargs)
    if not report.passed:
        raise AssertionError(str(report))
    return report
