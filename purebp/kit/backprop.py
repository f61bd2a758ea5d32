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
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import math
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from purebp import activations as _activations
from purebp import check as _check
from purebp import losses as _losses
from purebp.network import dense_stack

LAYOUTS = ("columns", "rows", "examples")
DTYPES = ("float64", "float32")
EQUATIONS = {
    "BP1": "δᴸ = ∂C/∂aᴸ ⊙ G'(zᴸ)",
    "BP2": "δˡ = ((Wˡ⁺¹)ᵀ δˡ⁺¹) ⊙ G'(zˡ)",
    "BP3": "∂C/∂bˡ = Σₙ δˡ",
    "BP4": "∂C/∂Wˡ = δˡ (aˡ⁻¹)ᵀ",
}
# a draw keeps every pre-activation at least KINK_MARGIN from 0 (relu's kink; where G'(a) and G'(z) agree
# for relu-like G) and at most SATURATION in magnitude (sigmoid/tanh flat tails hide a missing G')
KINK_MARGIN = 0.05
SATURATION = 3.0
# a catalogue entry matches the user's result when every leaf agrees to this relative error (rounding only)
MATCH_TOLERANCE = {np.dtype("float64"): 1e-8, np.dtype("float32"): 1e-4}
_SUP = str.maketrans("0123456789-+", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺")


def _sup(l: int) -> str:
    return str(l).translate(_SUP)


@dataclasses.dataclass(frozen=True)
class BackpropCase:
    """One drawn test case: widths (n_0, ..., n_L), batch size N and the seed of its weights and data.

    Replayable: ``check_backprop(fn, ..., case=report.case)`` (or the dict the report prints) draws
    exactly the same weights, inputs and targets again.
    """

    sizes: tuple[int, ...]
    batch: int
    seed: int

    @property
    def depth(self) -> int:
        return len(self.sizes) - 1

    def as_dict(self) -> dict:
        return {"sizes": tuple(self.sizes), "batch": self.batch, "seed": self.seed}

    def __str__(self) -> str:
        return f"sizes {tuple(self.sizes)} (n_0..n_L), batch {self.batch}, seed {self.seed}"


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


# ----------------------------------------------------------------------------------------------------------
# the spec and the drawn case


@dataclasses.dataclass(frozen=True)
class _Spec:
    activation: str
    output: str
    loss: str
    reduction: str
    layout: str
    dtype: np.dtype
    max_width: int

    @property
    def min_output_width(self) -> int:
        loss = _losses.get(self.loss)
        return 2 if loss.classification or self.output == "softmax" else 1


class _Ctx:
    """A drawn case and the reference pass on it (index l = the notes' layer; index 0 of W, b, z unused)."""

    def __init__(self, spec: _Spec, case: BackpropCase):
        self.spec, self.case = spec, case
        self.L = case.depth
        self.N = case.batch
        self.hidden = _activations.get(spec.activation)
        self.out = _activations.get(spec.output)
        self.loss = _losses.get(spec.loss)
        self.scale = 1.0 if spec.reduction == "sum" else 1.0 / self.N
        self._draw()
        self.delta = self._deltas()

    def act(self, l: int) -> _activations.Activation:
        return self.out if l == self.L else self.hidden

    def _draw(self) -> None:
        sizes, N = self.case.sizes, self.case.batch
        rng = np.random.default_rng([self.case.seed, N, *sizes])
        for _ in range(1000):
            W = [None] + [
                rng.normal(size=(sizes[l], sizes[l - 1])) / math.sqrt(sizes[l - 1]) for l in range(1, self.L + 1)
            ]
            b = [None] + [0.5 * rng.normal(size=sizes[l]) for l in range(1, self.L + 1)]
            x = rng.normal(size=(N, sizes[0]))
            # the user's arrays in their dtype; the reference runs in float64 on exactly those values
            W = [None] + [w.astype(self.spec.dtype).astype(np.float64) for w in W[1:]]
            b = [None] + [v.astype(self.spec.dtype).astype(np.float64) for v in b[1:]]
            x = x.astype(self.spec.dtype).astype(np.float64)
            z, a = [None], [x]
            ok = True
            for l in range(1, self.L + 1):
                z.append(a[-1] @ W[l].T + b[l])
                a.append(_forward(self.act(l), z[-1]))
                if np.any(np.abs(z[-1]) < KINK_MARGIN) or np.any(np.abs(z[-1]) > SATURATION):
                    ok = False
                    break
            if ok:
                break
        else:
            raise RuntimeError(f"could not draw weights away from kinks and saturation for {self.case}")
        n_out = sizes[-1]
        if self.loss.classification:
            y = np.eye(n_out)[rng.integers(0, n_out, size=N)]
        else:
            y = rng.uniform(0.05, 0.95, size=(N, n_out))
        self.W, self.b, self.x, self.z, self.a = W, b, x, z, a
        self.y = y.astype(self.spec.dtype).astype(np.float64)

    # G'(z^l) of layer l's activation, evaluated where the user might (z, or by mistake a)
    def gprime(self, act: _activations.Activation, z: np.ndarray) -> np.ndarray:
        return _derivative(act, z, _forward(act, z))

    def grad_output(self) -> np.ndarray | None:
        """dC/da^L, hand-written: the loss's grad_output, or the built-in fused costs' own."""
        z, a, y = self.z[self.L], self.a[self.L], self.y
        if self.loss.grad_output is not None:
            return _rowwise(self.loss.grad_output, z, a, y)
        if self.spec.loss == "binary_cross_entropy":
            return (a - y) / (a * (1.0 - a))
        if self.spec.loss == "cross_entropy":
            return -y / a
        return None

    def _deltas(self) -> list:
        L = self.L
        delta = [None] * (L + 1)
        delta[L] = _rowwise(  # BP1
            lambda z, a, y: _losses.output_delta(z, a, y, self.spec.loss, self.out), self.z[L], self.a[L], self.y
        )
        for l in range(L - 1, 0, -1):
            delta[l] = (delta[l + 1] @ self.W[l + 1]) * self.gprime(self.hidden, self.z[l])  # BP2, rows
        return delta

    def grads(self, delta: list) -> tuple[list, list]:
        """BP3 and BP4 from the deltas (rows: delta^l is (N, n_l))."""
        gw = [None] + [self.scale * delta[l].T @ self.a[l - 1] for l in range(1, self.L + 1)]
        gb = [None] + [self.scale * delta[l].sum(axis=0) for l in range(1, self.L + 1)]
        return gw, gb


def _bucket(n: int) -> int:
    return max(8, 1 << (n - 1).bit_length())


def _forward(act: _activations.Activation, z: np.ndarray) -> np.ndarray:
    """G(z) from the registry, evaluated on a padded shape (a handful of compiled shapes, not one per draw)."""
    if act.elementwise:
        return _elementwise(act.forward, z)
    return _rowwise(act.forward, z)


def _derivative(act: _activations.Activation, z: np.ndarray, a: np.ndarray) -> np.ndarray:
    return _elementwise(act.derivative, z, a)


def _elementwise(fn: Callable, *arrays: np.ndarray) -> np.ndarray:
    shape = arrays[0].shape
    size = int(np.prod(shape))
    padded = []
    for array in arrays:
        flat = np.full(_bucket(size), 0.5)  # any value in every G's domain; the padding is sliced off
        flat[:size] = np.reshape(array, -1)
        padded.append(flat)
    return _np(fn(*padded))[:size].reshape(shape)


def _rowwise(fn: Callable, *arrays: np.ndarray) -> np.ndarray:
    # functions over the last axis (softmax, costs): pad the rows with copies of the first row
    n = arrays[0].shape[0]
    padded = [np.concatenate([a, np.repeat(a[:1], _bucket(n) - n, axis=0)]) for a in arrays]
    return _np(fn(*padded))[:n]


def _np(value: object) -> np.ndarray:
    """NumPy float64 from a NumPy, JAX or torch array (torch is never imported here)."""
    if type(value).__module__.split(".")[0] == "torch":
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# the witness: jax.grad of purebp's forward pass and cost (check.py), on the drawn float64 weights


def _output_padding(ctx: _Ctx) -> tuple[float, float] | None:
    """(bias, target) for padded output units that leave every real unit's delta^L unchanged, or None.

    mse and binary cross-entropy are sums over output units with an elementwise G: a padded unit is just
    another term, and it never reaches a real unit (its weights are zero). Softmax outputs: a logit of
    -1e30 has probability exactly 0 and target 0. Registered losses: no padding.
    """
    name = ctx.spec.loss
    if name in ("mse", "binary_cross_entropy") and ctx.out.elementwise:
        return 0.0, float(_forward(ctx.out, np.zeros(1))[0])
    if name in ("cross_entropy", "softmax_cross_entropy"):
        return -1e30, 0.0
    return None


def _witness(ctx: _Ctx) -> tuple[list, list]:
    """Reference (dL/dW^l, dL/db^l) from ``purebp.check.autodiff_value_and_grad``.

    To compile one program per depth instead of one per drawn shape, the widths are padded to
    ``max_width`` with units whose weights in and out are zero (they change no real entry; see
    ``_output_padding`` for the output layer) and examples are taken one at a time (a batch of one,
    summed here; the mean is that sum / N). If the padded program is not finite (an activation with
    G'(0) infinite), the exact shapes are used instead.
    """
    spec, L, sizes = ctx.spec, ctx.L, ctx.case.sizes
    width = max(spec.max_width, *sizes)
    out_pad = _output_padding(ctx)
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


# ----------------------------------------------------------------------------------------------------------
# the catalogue of mistakes: each a NumPy variant of the reference pass


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
    step: Callable[[_Ctx, int, list], np.ndarray | None]
    describe: Callable[[_Ctx, int], str]


def _bp2_base(ctx: _Ctx, l: int, delta: list) -> np.ndarray:
    return delta[l + 1] @ ctx.W[l + 1]  # (W^{l+1})^T delta^{l+1}, rows


def _if(condition: bool, value: Callable[[], np.ndarray]) -> np.ndarray | None:
    return value() if condition else None


def _n(ctx: _Ctx, l: int) -> int:
    return ctx.case.sizes[l]


def _bp1_chain(ctx: _Ctx, g: Callable[[_Ctx], np.ndarray | None]) -> np.ndarray | None:
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
            f"your δ{_sup(l)} equals ∂C/∂a{_sup(l)} without the factor G'(z{_sup(l)}) of the output "
            f"activation ({c.spec.output})"
        ),
    ),
    Mistake(
        "bp1_derivative_at_a",
        "BP1",
        lambda c, l, d: _bp1_chain(c, lambda c: c.gprime(c.out, c.a[l])),
        lambda c, l: (
            f"your δ{_sup(l)} equals ∂C/∂a{_sup(l)} ⊙ G'(a{_sup(l)}), the derivative evaluated at the "
            f"activation instead of z{_sup(l)}"
        ),
    ),
    Mistake(
        "bp1_extra_derivative",
        "BP1",
        lambda c, l, d: _if(
            c.loss.output_delta is not None and c.out.elementwise, lambda: d[l] * c.gprime(c.out, c.z[l])
        ),
        lambda c, l: (
            f"your δ{_sup(l)} is the output error times G'(z{_sup(l)}) once more: with "
            f"{c.spec.loss!r} on a {c.spec.output!r} output the G' is already cancelled, δ{_sup(l)} = a{_sup(l)} − y"
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
            f"your δ{_sup(l)} treats softmax as elementwise, ∂C/∂a ⊙ a(1 − a); its Jacobian is not "
            f"diagonal: δ = a ⊙ (∂C/∂a − ⟨∂C/∂a, a⟩)"
        ),
    ),
    Mistake(
        "bp1_sign",
        "BP1",
        lambda c, l, d: -d[l],
        lambda c, l: f"your δ{_sup(l)} has the wrong sign (y − a instead of a − y)",
    ),
    Mistake(
        "bp1_mse_factor_2",
        "BP1",
        lambda c, l, d: _if(c.spec.loss == "mse", lambda: 2.0 * d[l]),
        lambda c, l: (
            f"your δ{_sup(l)} is twice the expected: 2(a − y) is the derivative of ‖a − y‖², but the "
            f"cost is C = ½‖a − y‖², with ∂C/∂a = a − y"
        ),
    ),
    # BP2: delta^l, l < L, from the correct delta^{l+1}
    Mistake(
        "bp2_no_derivative",
        "BP2",
        lambda c, l, d: _bp2_base(c, l, d),
        lambda c, l: f"your δ{_sup(l)} equals (W{_sup(l + 1)})ᵀ δ{_sup(l + 1)} without the factor G'(z{_sup(l)})",
    ),
    Mistake(
        "bp2_derivative_at_a",
        "BP2",
        lambda c, l, d: _bp2_base(c, l, d) * c.gprime(c.hidden, c.a[l]),
        lambda c, l: (
            f"your δ{_sup(l)} equals ((W{_sup(l + 1)})ᵀ δ{_sup(l + 1)}) ⊙ G'(a{_sup(l)}), the derivative "
            f"evaluated at the activation instead of z{_sup(l)}"
        ),
    ),
    Mistake(
        "bp2_no_transpose",
        "BP2",
        lambda c, l, d: _if(_n(c, l) == _n(c, l + 1), lambda: (d[l + 1] @ c.W[l + 1].T) * c.gprime(c.hidden, c.z[l])),
        lambda c, l: (
            f"your δ{_sup(l)} equals (W{_sup(l + 1)} δ{_sup(l + 1)}) ⊙ G'(z{_sup(l)}): W{_sup(l + 1)} "
            f"is not transposed (this only runs because the layer is square)"
        ),
    ),
    Mistake(
        "bp2_weights_of_layer_l",
        "BP2",
        lambda c, l, d: _if(_n(c, l - 1) == _n(c, l + 1), lambda: (d[l + 1] @ c.W[l].T) * c.gprime(c.hidden, c.z[l])),
        lambda c, l: (
            f"your δ{_sup(l)} equals (W{_sup(l)} δ{_sup(l + 1)}) ⊙ G'(z{_sup(l)}): the weights into "
            f"layer {l} instead of (W{_sup(l + 1)})ᵀ, the weights out of it"
        ),
    ),
    Mistake(
        "bp2_weights_of_layer_l_transposed",
        "BP2",
        lambda c, l, d: _if(
            _n(c, l - 1) == _n(c, l) == _n(c, l + 1), lambda: (d[l + 1] @ c.W[l]) * c.gprime(c.hidden, c.z[l])
        ),
        lambda c, l: (
            f"your δ{_sup(l)} equals ((W{_sup(l)})ᵀ δ{_sup(l + 1)}) ⊙ G'(z{_sup(l)}): W{_sup(l)} "
            f"instead of W{_sup(l + 1)} (an index off by one)"
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
            f"your δ{_sup(l)} equals ((W{_sup(l + 1)})ᵀ δ{_sup(l + 1)}) ⊙ G'(z{_sup(l + 1)}): the "
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
            f"your δ{_sup(l)} equals ((W{_sup(l + 1)})ᵀ δ{_sup(l + 1)}) ⊙ G'(z{_sup(l - 1)}): the "
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
            f"your δ{_sup(l)} uses the output activation's derivative {c.spec.output}'(z{_sup(l)}) "
            f"instead of {c.spec.activation}'(z{_sup(l)})"
        ),
    ),
    Mistake(
        "bp2_sign",
        "BP2",
        lambda c, l, d: -(_bp2_base(c, l, d) * c.gprime(c.hidden, c.z[l])),
        lambda c, l: f"your δ{_sup(l)} has the wrong sign",
    ),
    # BP3: dC/db^l from the correct delta^l
    Mistake(
        "bp3_last_example",
        "BP3",
        lambda c, l, d: _if(c.N >= 2, lambda: c.scale * d[l][-1]),
        lambda c, l: (
            f"your ∂C/∂b{_sup(l)} is δ{_sup(l)} of the last example only, not the sum over the batch "
            f"(an assignment where a += was meant?)"
        ),
    ),
    Mistake(
        "bp3_first_example",
        "BP3",
        lambda c, l, d: _if(c.N >= 2, lambda: c.scale * d[l][0]),
        lambda c, l: f"your ∂C/∂b{_sup(l)} is δ{_sup(l)} of the first example only, not the sum over the batch",
    ),
    Mistake(
        "bp3_wrong_axis",
        "BP3",
        lambda c, l, d: _if(_n(c, l) == c.N and c.N >= 2, lambda: c.scale * d[l].sum(axis=1)),
        lambda c, l: (
            f"your ∂C/∂b{_sup(l)} is δ{_sup(l)} summed over the units (the wrong axis) instead of over "
            f"the batch (this only runs because the batch size equals the layer's width)"
        ),
    ),
    Mistake(
        "bp3_batch_scaling",
        "BP3",
        lambda c, l, d: _if(c.N >= 2, lambda: c.scale * d[l].sum(axis=0) / c.N),
        lambda c, l: (
            f"your ∂C/∂b{_sup(l)} is 1/N of the expected while the weight gradient is right: divided by "
            "the batch size once too often (the mean where the sum was meant)"
        ),
    ),
    Mistake(
        "bp3_batch_scaling_n",
        "BP3",
        lambda c, l, d: _if(c.N >= 2, lambda: c.scale * d[l].sum(axis=0) * c.N),
        lambda c, l: (
            f"your ∂C/∂b{_sup(l)} is N times the expected while the weight gradient is right: "
            "not divided by the batch size (the sum where the mean was meant)"
        ),
    ),
    # BP4: dC/dW^l from the correct delta^l
    Mistake(
        "bp4_transposed",
        "BP4",
        lambda c, l, d: _if(_n(c, l) == _n(c, l - 1), lambda: c.scale * (d[l].T @ c.a[l - 1]).T),
        lambda c, l: (
            f"your ∂C/∂W{_sup(l)} is transposed: a{_sup(l - 1)} (δ{_sup(l)})ᵀ instead of "
            f"δ{_sup(l)} (a{_sup(l - 1)})ᵀ (it only has the right shape because the layer is square)"
        ),
    ),
    Mistake(
        "bp4_activation_of_layer_l",
        "BP4",
        lambda c, l, d: _if(_n(c, l) == _n(c, l - 1), lambda: c.scale * d[l].T @ c.a[l]),
        lambda c, l: (
            f"your ∂C/∂W{_sup(l)} equals δ{_sup(l)} (a{_sup(l)})ᵀ: the layer's own activation instead "
            f"of its input a{_sup(l - 1)}"
        ),
    ),
    Mistake(
        "bp4_pre_activation",
        "BP4",
        lambda c, l, d: _if(l >= 2, lambda: c.scale * d[l].T @ c.z[l - 1]),
        lambda c, l: (
            f"your ∂C/∂W{_sup(l)} equals δ{_sup(l)} (z{_sup(l - 1)})ᵀ: the pre-activation z{_sup(l - 1)} "
            f"instead of a{_sup(l - 1)} = G(z{_sup(l - 1)})"
        ),
    ),
    Mistake(
        "bp4_batch_scaling",
        "BP4",
        lambda c, l, d: _if(c.N >= 2, lambda: c.scale * d[l].T @ c.a[l - 1] / c.N),
        lambda c, l: (
            f"your ∂C/∂W{_sup(l)} is 1/N of the expected while the bias gradient is right: divided by "
            "the batch size once too often (the mean where the sum was meant)"
        ),
    ),
    Mistake(
        "bp4_batch_scaling_n",
        "BP4",
        lambda c, l, d: _if(c.N >= 2, lambda: c.scale * d[l].T @ c.a[l - 1] * c.N),
        lambda c, l: (
            f"your ∂C/∂W{_sup(l)} is N times the expected while the bias gradient is right: "
            "not divided by the batch size (the sum where the mean was meant)"
        ),
    ),
    Mistake(
        "bp4_last_example",
        "BP4",
        lambda c, l, d: _if(c.N >= 2, lambda: c.scale * np.outer(d[l][-1], c.a[l - 1][-1])),
        lambda c, l: (
            f"your ∂C/∂W{_sup(l)} is δ{_sup(l)} (a{_sup(l - 1)})ᵀ of the last example only, not summed over the batch"
        ),
    ),
)


def _layers_of(mistake: Mistake, L: int) -> range:
    if mistake.equation == "BP1":
        return range(L, L + 1)
    if mistake.equation == "BP2":
        return range(L - 1, 0, -1)
    return range(L, 0, -1)


def _variant(ctx: _Ctx, mistake: Mistake, at: Sequence[int]) -> tuple[list, list, list] | None:
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


# ----------------------------------------------------------------------------------------------------------
# comparing


def _leaves(gw: list, gb: list, L: int) -> list[tuple[str, int, np.ndarray]]:
    """(name, layer, array) from the output layer down: W^L, b^L, W^{L-1}, ..."""
    out = []
    for l in range(L, 0, -1):
        out.append((f"W{_sup(l)}", l, gw[l]))
        out.append((f"b{_sup(l)}", l, gb[l]))
    return out


def _errors(user: list[np.ndarray], ref: list[np.ndarray], floor: float) -> list[float]:
    """Relative error per leaf, ||u - r|| / max(||r||, floor * ||whole reference||) (check.py's rule)."""
    total = math.sqrt(sum(float(np.sum(r * r)) for r in ref))
    out = []
    for u, r in zip(user, ref):
        denominator = max(float(np.linalg.norm(r)), floor * total, 1e-300)
        out.append(float(np.linalg.norm(u - r)) / denominator)
    return out


class _Outcome:
    def __init__(self, kind, layer=None, equation=None, mistake=None, detail="", errors=(), max_error=0.0):
        self.kind, self.layer, self.equation, self.mistake = kind, layer, equation, mistake
        self.detail, self.errors, self.max_error = detail, tuple(errors), max_error

    @property
    def signature(self) -> tuple:
        # what a shrunk case must keep: the same kind of failure, in the same equation, by the same mistake
        return self.kind, self.equation, self.mistake


def _call_user(fn: Callable, ctx: _Ctx) -> tuple:
    """Call fn in its layout; return (gw, gb, deltas or None) in the kit's layout, or raise _UserError."""
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


class _UserError(Exception):
    def __init__(self, outcome: _Outcome):
        super().__init__(outcome.detail)
        self.outcome = outcome


def _invoke(fn: Callable, weights, biases, x, y):
    try:
        return fn(weights, biases, x, y)
    except Exception as error:  # the user's code: report it with the case, never hide it
        frames = traceback.extract_tb(error.__traceback__)[1:]
        where = f" (at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""
        raise _UserError(
            _Outcome("exception", detail=f"your function raised {type(error).__name__}: {error}{where}")
        ) from None


def _expected_shapes(ctx: _Ctx, layout: str) -> dict:
    sizes, N = ctx.case.sizes, ctx.N
    shapes = {}
    for l in range(1, ctx.L + 1):
        shapes[("W", l)] = (sizes[l], sizes[l - 1])
        shapes[("b", l)] = (sizes[l], 1) if layout == "examples" else (sizes[l],)
        shapes[("delta", l)] = {"columns": (sizes[l], N), "rows": (N, sizes[l]), "examples": (sizes[l], 1)}[layout]
    return shapes


def _shape_hint(ctx: _Ctx, kind: str, l: int, got: tuple, expected: tuple, layout: str) -> tuple[str, str | None]:
    n, N = ctx.case.sizes[l], ctx.N
    if kind == "W" and got == expected[::-1]:
        return f" — that is the transpose: BP4 is δ{_sup(l)} (a{_sup(l - 1)})ᵀ, not a{_sup(l - 1)} (δ{_sup(l)})ᵀ", (
            "bp4_transposed"
        )
    if kind == "W" and got == (n, n) and n != ctx.case.sizes[l - 1]:
        return f" — δ{_sup(l)} (a{_sup(l)})ᵀ has that shape: BP4 takes the layer's input a{_sup(l - 1)}", (
            "bp4_activation_of_layer_l"
        )
    unsummed = {"columns": (n, N), "rows": (N, n)}.get(layout)
    if kind == "b" and got == unsummed:
        return (
            f" — that is the shape of δ{_sup(l)} for every example (N = {N}): sum it over the batch"
            + (" (with N = 1 it may also be a bias kept as a column: return it 1-D)" if N == 1 else ""),
            "bp3_not_summed",
        )
    if kind == "b" and layout != "examples" and got == (N,):
        return f" — that looks like δ{_sup(l)} summed over the units: sum over the batch instead", "bp3_wrong_axis"
    if kind == "b" and layout != "examples" and got in ((n, 1), (1, n)):
        return f" — a {got[0]}×{got[1]} matrix; the biases you were given are 1-D {(n,)}, return the same", None
    return "", None


_PRODUCED_BY = {"W": "BP4", "b": "BP3"}


def _unpack(result: object, ctx: _Ctx, layout: str) -> tuple:
    L = ctx.L
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise _UserError(
            _Outcome(
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
            raise _UserError(
                _Outcome(
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
                array = _np(value)
            except (TypeError, ValueError) as error:
                raise _UserError(
                    _Outcome(
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
            what = f"δ{_sup(l)} (deltas[{l - 1}])"
        else:
            equation = _PRODUCED_BY[kind]
            what = f"∂C/∂{kind}{_sup(l)} (grad_{'weights' if kind == 'W' else 'biases'}[{l - 1}])"
        hint, mistake = _shape_hint(ctx, kind, l, got, expected, layout)
        raise _UserError(
            _Outcome(
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


def _evaluate(fn: Callable, spec: _Spec, case: BackpropCase) -> _Outcome:
    """Run one case: the user's pass vs the witness; on a mismatch, the diagnosis."""
    ctx = _Ctx(spec, case)
    ref_w, ref_b = _witness(ctx)
    own_w, own_b = ctx.grads(ctx.delta)
    ref_leaves = [a for _, _, a in _leaves(ref_w, ref_b, ctx.L)]
    own_error = max(_errors([a for _, _, a in _leaves(own_w, own_b, ctx.L)], ref_leaves, 1e-6))
    if own_error > 1e-8:
        raise RuntimeError(
            f"internal: the kit's NumPy reference pass disagrees with jax.grad by {own_error:.2e} on {case} "
            f"(activation {spec.activation!r}, output {spec.output!r}, loss {spec.loss!r}); please report this"
        )
    try:
        gw, gb, deltas = _call_user(fn, ctx)
    except _UserError as error:
        return error.outcome
    tolerance = _check.TOLERANCE[spec.dtype]
    floor = _check.FLOOR[spec.dtype]
    named = _leaves(gw, gb, ctx.L)
    errors = _errors([a for _, _, a in named], ref_leaves, floor)
    table = [(name, err) for (name, _, _), err in zip(named, errors)]
    finite = all(np.all(np.isfinite(a)) for _, _, a in named)
    deltas_right = deltas is None or _deltas_match(ctx, deltas, tolerance, floor)
    if finite and max(errors) <= tolerance and deltas_right:
        return _Outcome("passed", max_error=max(errors))
    return _diagnose(ctx, gw, gb, deltas, ref_w, ref_b, table, tolerance, floor)


def _delta_scale(ctx: _Ctx, deltas: list, tolerance: float, floor: float) -> float:
    # per-example deltas dC^n/dz, or dL/dz = those / N under reduction="mean": whichever delta^L fits
    if ctx.scale != 1.0 and max(_errors([deltas[ctx.L]], [ctx.scale * ctx.delta[ctx.L]], floor)) <= tolerance:
        return ctx.scale
    return 1.0


def _deltas_match(ctx: _Ctx, deltas: list, tolerance: float, floor: float) -> bool:
    scale = _delta_scale(ctx, deltas, tolerance, floor)
    reference = [scale * ctx.delta[l] for l in range(1, ctx.L + 1)]
    return all(np.all(np.isfinite(d)) for d in deltas[1:]) and max(_errors(deltas[1:], reference, floor)) <= tolerance


def _diagnose(ctx: _Ctx, gw, gb, deltas, ref_w, ref_b, table, tolerance, floor) -> _Outcome:
    L, spec = ctx.L, ctx.spec
    match_tol = MATCH_TOLERANCE[spec.dtype]
    user = [a for _, _, a in _leaves(gw, gb, L)]
    ref = [a for _, _, a in _leaves(ref_w, ref_b, L)]
    wrong = [(name, l) for (name, l, _), (_, err) in zip(_leaves(gw, gb, L), table) if not err <= tolerance]
    top = max((l for _, l in wrong), default=L)

    def same(a_list, b_list) -> bool:
        return max(_errors(a_list, b_list, floor)) <= match_tol

    # 1. deltas returned: compare them directly, from the output down
    if deltas is not None:
        user_delta = deltas
        scale = _delta_scale(ctx, deltas, match_tol, floor)
        for l in range(L, 0, -1):
            if not same([user_delta[l]], [scale * ctx.delta[l]]):
                equation = "BP1" if l == L else "BP2"
                for mistake in CATALOGUE:
                    if mistake.equation != equation:
                        continue
                    variant = _variant(ctx, mistake, [l])
                    if variant is not None and same([user_delta[l]], [scale * variant[2][l]]):
                        return _Outcome("mismatch", l, equation, mistake.key, mistake.describe(ctx, l), table)
                return _Outcome(
                    "mismatch",
                    l,
                    equation,
                    None,
                    f"your δ{_sup(l)} (deltas[{l - 1}]) differs from {EQUATIONS[equation]}"
                    + (f", while δ{_sup(l + 1)} above it is right" if l < L else "")
                    + " (not one of the mistakes the kit knows by name)",
                    table,
                )
    # 2. the catalogue: the reference pass with one known mistake, at one layer or at every layer it fits
    for mistake in CATALOGUE:
        layers = list(_layers_of(mistake, L))
        attempts = [layers] + ([[l] for l in layers] if len(layers) > 1 else [])
        for at in attempts:
            variant = _variant(ctx, mistake, at)
            if variant is None:
                continue
            leaves = [a for _, _, a in _leaves(variant[0], variant[1], L)]
            if same(leaves, ref):
                continue  # not a mistake for these activations (relu'(a) = relu'(z), ...)
            if same(user, leaves):
                applied = sorted(variant[3], reverse=True)
                detail = mistake.describe(ctx, applied[0])
                if len(applied) > 1:
                    detail += f" (the same in layers {', '.join(str(l) for l in applied)})"
                return _Outcome("mismatch", applied[0], mistake.equation, mistake.key, detail, table)
    # 3. a constant ratio across every leaf: a scaling mistake (mean vs sum, a factor 2, a sign)
    dot = sum(float(np.sum(u * r)) for u, r in zip(user, ref))
    norm = sum(float(np.sum(r * r)) for r in ref)
    if norm > 0 and all(np.all(np.isfinite(u)) for u in user):
        ratio = dot / norm
        if abs(ratio - 1.0) > match_tol and same(user, [ratio * r for r in ref]) and ratio != 0.0:
            return _Outcome("mismatch", L, "BP1", "scale", _describe_ratio(ctx, ratio, match_tol), table)
    # 4. unnamed: say which leaves of the first wrong layer are wrong, and what that points to
    wrong_here = {name[0] for name, l in wrong if l == top}
    if wrong_here == {"b"}:
        equation, what = "BP3", f"only ∂C/∂b{_sup(top)} is wrong at layer {top}"
    elif wrong_here == {"W"}:
        equation, what = "BP4", f"only ∂C/∂W{_sup(top)} is wrong at layer {top}"
    else:
        equation = "BP1" if top == L else "BP2"
        what = f"both ∂C/∂W{_sup(top)} and ∂C/∂b{_sup(top)} are wrong, so δ{_sup(top)} is"
    layers_above = f"; every layer above {top} is right" if top < L else ""
    return _Outcome(
        "mismatch",
        top,
        equation,
        None,
        f"{what}{layers_above} (not one of the mistakes the kit knows by name; return your deltas as a third "
        "item to have them compared directly)",
        table,
    )


def _describe_ratio(ctx: _Ctx, ratio: float, tol: float) -> str:
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


# ----------------------------------------------------------------------------------------------------------
# the search and the shrinker


def _draw_case(rng: np.random.Generator, spec: _Spec, max_depth: int, max_batch: int) -> BackpropCase:
    depth = int(rng.integers(1, max_depth + 1))
    sizes = [int(v) for v in rng.integers(1, spec.max_width + 1, size=depth + 1)]
    sizes[-1] = max(sizes[-1], spec.min_output_width)
    batch = int(rng.integers(1, max_batch + 1))
    return BackpropCase(tuple(sizes), batch, int(rng.integers(0, 2**31)))


def _candidates(case: BackpropCase, spec: _Spec):
    """Smaller cases, in the order the shrinker tries them: fewer layers, narrower widths, smaller batch."""
    sizes = list(case.sizes)
    for i in range(1, len(sizes) - 1):
        yield BackpropCase(tuple(sizes[:i] + sizes[i + 1 :]), case.batch, case.seed)
    for i in range(len(sizes)):
        low = spec.min_output_width if i == len(sizes) - 1 else 1
        for width in range(low, sizes[i]):
            yield BackpropCase(tuple(sizes[:i] + [width] + sizes[i + 1 :]), case.batch, case.seed)
    for batch in range(1, case.batch):
        yield BackpropCase(case.sizes, batch, case.seed)


def _shrink(fn: Callable, spec: _Spec, case: BackpropCase, outcome: _Outcome, budget: int = 300):
    """Greedy, deterministic: take the first smaller case with the same kind of failure, until none is."""
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        for candidate in _candidates(case, spec):
            tries += 1
            result = _evaluate(fn, spec, candidate)
            if result.kind != "passed" and result.signature == outcome.signature:
                case, outcome, improved = candidate, result, True
                break
            if tries >= budget:
                break
    return case, outcome


def _square_retry(fn: Callable, spec: _Spec, case: BackpropCase, outcome: _Outcome, max_batch: int):
    """fn raised: a mistake like W instead of Wᵀ only runs on square layers. Try networks of equal widths
    (and a batch equal to the width, for a sum over the wrong axis); if one runs and fails, diagnose that."""
    for width in range(max(2, spec.min_output_width), spec.max_width + 1):
        for batch in dict.fromkeys((case.batch, width)):
            square = BackpropCase((width,) * len(case.sizes), batch, case.seed)
            result = _evaluate(fn, spec, square)
            if result.kind in ("mismatch", "shape"):
                square, result = _shrink(fn, spec, square, result)
                note = (
                    f"on {case} {outcome.detail[0].lower() + outcome.detail[1:]}; on layers of equal width it "
                    f"runs, and the diagnosis above is from such a case (replay the raising one with "
                    f"case={case.as_dict()!r})"
                )
                return square, result, note
    return case, outcome, ""


def _coerce_case(case: object) -> BackpropCase:
    if isinstance(case, BackpropCase):
        return case
    if isinstance(case, Mapping):
        return BackpropCase(tuple(int(v) for v in case["sizes"]), int(case["batch"]), int(case["seed"]))
    if isinstance(case, (tuple, list)) and len(case) == 3:
        return BackpropCase(tuple(int(v) for v in case[0]), int(case[1]), int(case[2]))
    raise TypeError(f"case must be a BackpropCase, a dict(sizes=, batch=, seed=) or (sizes, batch, seed), got {case!r}")


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
        case = _coerce_case(case)
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
    spec = _Spec(activation, output, loss, reduction, layout, np.dtype(dtype), int(max_width))
    settings = {
        "activation": activation,
        "output": output,
        "loss": loss,
        "reduction": reduction,
        "layout": layout,
        "dtype": str(np.dtype(dtype)),
        "tolerance": _check.TOLERANCE[spec.dtype],
    }
    with jax.enable_x64(True):  # the witness runs in float64 whatever the caller's setting
        cases = [replay] if replay is not None else None
        rng = np.random.default_rng(seed)
        worst = 0.0
        count = len(cases) if cases else trials
        for t in range(count):
            current = cases[t] if cases else _draw_case(rng, spec, max_depth, max_batch)
            outcome = _evaluate(fn, spec, current)
            if outcome.kind == "passed":
                worst = max(worst, outcome.max_error)
                continue
            first = current
            note = ""
            if shrink and replay is None:
                current, outcome = _shrink(fn, spec, current, outcome)
                if outcome.kind == "exception":
                    current, outcome, note = _square_retry(fn, spec, current, outcome, max_batch)
            return BackpropReport(
                passed=False,
                layer=outcome.layer,
                equation=outcome.equation,
                case=current,
                kind=outcome.kind,
                mistake=outcome.mistake,
                detail=outcome.detail,
                trials=t + 1,
                settings=settings,
                errors=outcome.errors,
                shrunk_from=first,
                max_error=max((e for _, e in outcome.errors), default=math.inf),
                note=note,
            )
    return BackpropReport(True, None, None, None, "passed", None, "", count, settings, max_error=worst)


def assert_backprop_matches(fn: Callable, **kwargs) -> BackpropReport:
    """``check_backprop(fn, **kwargs)``; raise AssertionError with the report's text unless it passed."""
    report = check_backprop(fn, **kwargs)
    if not report.passed:
        raise AssertionError(str(report))
    return report


def _load_function(target: str) -> Callable:
    """``module:function`` or ``path/to/file.py:function``, imported from the current directory."""
    module_name, sep, function_name = target.rpartition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"expected MODULE:FUNCTION (or path/to/file.py:FUNCTION), got {target!r}")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(module_name[:-3].replace("/", "_"), module_name)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot load {module_name!r}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if "" not in sys.path:
            sys.path.insert(0, "")  # a module next to the caller, as `python -m` would find it
        module = importlib.import_module(module_name)
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ValueError(f"{module_name!r} has no function {function_name!r}")
    return fn


def main_check_backprop(argv: Sequence[str] | None = None) -> int:
    """``purebp check-backprop MODULE:FUNCTION --activation sigmoid --loss mse --layout columns``.

    Prints the report; exit status 0 when it passed, 1 on a mismatch (or an exception in the function),
    2 on bad arguments.
    """
    parser = argparse.ArgumentParser(
        prog="purebp check-backprop",
        description="Check your own backward pass fn(weights, biases, x, y) against autodiff on random networks.",
    )
    parser.add_argument("target", help="MODULE:FUNCTION or path/to/file.py:FUNCTION")
    parser.add_argument("--activation", required=True, help="hidden-layer activation (purebp's registry)")
    parser.add_argument("--output", default=None, help="output activation (default: the loss's, else --activation)")
    parser.add_argument("--loss", required=True, help="cost (purebp's registry)")
    parser.add_argument("--reduction", default="sum", choices=("sum", "mean"))
    parser.add_argument("--layout", default="columns", choices=LAYOUTS)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-depth", type=int, default=3)
    parser.add_argument("--max-width", type=int, default=6)
    parser.add_argument("--max-batch", type=int, default=5)
    parser.add_argument("--dtype", default="float64", choices=DTYPES)
    args = parser.parse_args(argv)
    try:
        fn = _load_function(args.target)
        output = args.output
        if output is None:
            output = _losses.get(args.loss).output_activation or args.activation
        report = check_backprop(
            fn,
            activation=args.activation,
            output=output,
            loss=args.loss,
            reduction=args.reduction,
            layout=args.layout,
            trials=args.trials,
            seed=args.seed,
            max_depth=args.max_depth,
            max_width=args.max_width,
            max_batch=args.max_batch,
            dtype=args.dtype,
        )
    except (ValueError, TypeError, ImportError) as error:
        print(f"purebp check-backprop: error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.passed else 1
