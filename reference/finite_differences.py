"""Oracle (c): finite differences in float64. Knows nothing of backpropagation: it only evaluates L.

``central_differences``: dL/dtheta_i ~ (L(theta + h e_i) - L(theta - h e_i)) / (2h), one parameter at a
time, fixed step. Error O(h^2) truncation + O(eps L / h) rounding; h = 1e-6 balances them for O(1) losses
with O(1) derivatives, and no fixed step does for every loss scale.

``directional_derivative``: phi'(0) for phi(t) = L(theta + t v), by Ridders' method (Richardson
extrapolation of central differences): the central difference D(h) = (phi(h) - phi(-h)) / 2h has the error
expansion c_1 h^2 + c_2 h^4 + ..., so D(h) and D(h/s) combine into (s^2 D(h/s) - D(h)) / (s^2 - 1) with the
h^2 term gone, and repeating removes h^4, h^6, ... (Neville's tableau). Starting from a large step (where
rounding, ~eps |L| / h, is negligible) and shrinking by s per column, every tableau entry comes with an
error estimate (its distance to the two entries it was formed from); the entry with the smallest estimate
is returned, and the tableau stops once its diagonal grows by more than ``safe`` times that estimate
(rounding has taken over). So the step adapts to the loss scale (rounding) and to how fast phi curves
(truncation) instead of being fixed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np


def central_differences(
    loss: Callable[[list[np.ndarray]], float], parameters: Sequence[np.ndarray], step: float = 1e-6
) -> list[np.ndarray]:
    """Return dL/dp for every array p in ``parameters`` (float64 copies; the inputs are not changed)."""
    parameters = [np.array(p, dtype=np.float64) for p in parameters]
    gradients = []
    for index, p in enumerate(parameters):
        gradient = np.zeros_like(p)
        for position in np.ndindex(p.shape):
            original = p[position]
            p[position] = original + step
            plus = loss(parameters)
            p[position] = original - step
            minus = loss(parameters)
            p[position] = original
            gradient[position] = (plus - minus) / (2.0 * step)
        gradients.append(gradient)
        parameters[index] = p
    return gradients


@dataclasses.dataclass(frozen=True)
class Derivative:
    """An estimate of phi'(0). ``smooth`` False: no step >= ``min_step`` avoided a kink (value is NaN)."""

    value: float
    error: float  # estimated absolute error of ``value`` (Ridders: distance to the entries it came from)
    step: float  # the smallest central-difference step h that went into ``value``
    first_step: float  # the largest one (``step`` unless a kink made it shrink first)
    evaluations: int  # calls of phi
    smooth: bool = True


def directional_derivative(
    phi: Callable[[float], float],
    step: float = 0.1,
    *,
    shrink: float = 2.0,
    columns: int = 12,
    safe: float = 2.0,
    smooth: Callable[[float], bool] | None = None,
    min_step: float = 1e-7,
) -> Derivative:
    """Return phi'(0) by Ridders' extrapolation of central differences from step ``step`` down.

    ``phi(t)`` is L(theta + t v) in float64. The steps are step, step/shrink, ..., at most ``columns`` of
    them. ``smooth(t)``, if given, says whether phi is smooth between 0 and t (no kink, e.g. no relu
    pre-activation changing sign): the first step is halved until it is at +step and -step, and the
    tableau stops before a step where it is not. Raises ValueError for a step, shrink or column count
    that cannot work.
    """
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite number, got {step!r}")
    if not (math.isfinite(shrink) and shrink > 1):
        raise ValueError(f"shrink must be a finite number > 1, got {shrink!r}")
    if columns < 2:
        raise ValueError(f"columns must be >= 2 (one extrapolation needs two steps), got {columns!r}")
    evaluations = 0

    def central(h: float) -> float:
        nonlocal evaluations
        evaluations += 2
        return (float(phi(h)) - float(phi(-h))) / (2.0 * h)

    def is_smooth(h: float) -> bool:
        return smooth is None or (smooth(h) and smooth(-h))

    h = float(step)
    while not is_smooth(h):
        h /= 2.0
        if h < min_step:
            return Derivative(math.nan, math.inf, h, h, evaluations, smooth=False)
    first_step = h
    previous = [central(h)]
    best, error, best_step = previous[0], math.inf, h
    ratio = shrink * shrink
    for column in range(1, columns):
        h /= shrink
        if not is_smooth(h):
            break
        row = [central(h)]
        factor = ratio
        for order in range(1, column + 1):
            # Richardson: remove the h^(2 order) term from the two estimates at h*shrink and h
            row.append((factor * row[order - 1] - previous[order - 1]) / (factor - 1.0))
            factor *= ratio
            estimate = max(abs(row[order] - row[order - 1]), abs(row[order] - previous[order - 1]))
            if estimate <= error:
                best, error, best_step = row[order], estimate, h
        if abs(row[column] - previous[column - 1]) >= safe * error:
            break  # higher orders got worse: rounding dominates from here on
        previous = row
    return Derivative(best, error, best_step, first_step, evaluations)
