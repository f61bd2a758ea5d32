"""Oracle (c): central finite differences in float64.

dL/dtheta_i ~ (L(theta + h e_i) - L(theta - h e_i)) / (2h), one parameter at a
time. Error O(h^2) truncation + O(eps L / h) rounding; h = 1e-6 balances
them for O(1) losses. Knows nothing of backpropagation: it only evaluates L.
"""

from __future__ import annotations

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
