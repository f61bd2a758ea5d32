"""The drawn case: ``BackpropCase`` (replayable), the spec it is drawn under, and the reference pass on it.

A case is widths (n_0, ..., n_L), a batch size N and a seed; ``Ctx`` draws its weights, inputs and targets
(every pre-activation z with KINK_MARGIN <= |z| <= SATURATION) and runs the hand-written NumPy reference
pass: delta^L by BP1, delta^l = ((W^{l+1})^T delta^{l+1}) (.) G'(z^l) by BP2, the gradients by BP3 and BP4.
The shrinker's smaller candidates and the replay argument's coercion live here too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from purebp import activations as _activations
from purebp import losses as _losses

# a draw keeps every pre-activation at least KINK_MARGIN from 0 (relu's kink; where G'(a) and G'(z) agree
# for relu-like G) and at most SATURATION in magnitude (sigmoid/tanh flat tails hide a missing G')
KINK_MARGIN = 0.05
SATURATION = 3.0


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
class Spec:
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


class Ctx:
    """A drawn case and the reference pass on it (index l = the notes' layer; index 0 of W, b, z unused)."""

    def __init__(self, spec: Spec, case: BackpropCase):
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
                a.append(forward(self.act(l), z[-1]))
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
        return _derivative(act, z, forward(act, z))

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


def forward(act: _activations.Activation, z: np.ndarray) -> np.ndarray:
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
    return to_numpy(fn(*padded))[:size].reshape(shape)


def _rowwise(fn: Callable, *arrays: np.ndarray) -> np.ndarray:
    # functions over the last axis (softmax, costs): pad the rows with copies of the first row
    n = arrays[0].shape[0]
    padded = [np.concatenate([a, np.repeat(a[:1], _bucket(n) - n, axis=0)]) for a in arrays]
    return to_numpy(fn(*padded))[:n]


def to_numpy(value: object) -> np.ndarray:
    """NumPy float64 from a NumPy, JAX or torch array (torch is never imported here)."""
    if type(value).__module__.split(".")[0] == "torch":
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def draw_case(rng: np.random.Generator, spec: Spec, max_depth: int, max_batch: int) -> BackpropCase:
    depth = int(rng.integers(1, max_depth + 1))
    sizes = [int(v) for v in rng.integers(1, spec.max_width + 1, size=depth + 1)]
    sizes[-1] = max(sizes[-1], spec.min_output_width)
    batch = int(rng.integers(1, max_batch + 1))
    return BackpropCase(tuple(sizes), batch, int(rng.integers(0, 2**31)))


def candidates(case: BackpropCase, spec: Spec) -> Iterator[BackpropCase]:
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


def coerce_case(case: object) -> BackpropCase:
    if isinstance(case, BackpropCase):
        return case
    if isinstance(case, Mapping):
        return BackpropCase(tuple(int(v) for v in case["sizes"]), int(case["batch"]), int(case["seed"]))
    if isinstance(case, (tuple, list)) and len(case) == 3:
        return BackpropCase(tuple(int(v) for v in case[0]), int(case[1]), int(case[2]))
    raise TypeError(f"case must be a BackpropCase, a dict(sizes=, batch=, seed=) or (sizes, batch, seed), got {case!r}")
