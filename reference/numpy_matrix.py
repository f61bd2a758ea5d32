"""Oracle (a): the notes' matrix form of backpropagation in plain NumPy float64.

Shares no code with purebp. Column-major as in the notes: a^{l} is (n_l, N),
one column per example, W^l is (n_out, n_in), and

    z^l = W^l a^{l-1} + b^l,  a^l = G(z^l)                       forward pass
    delta^L = dC/da (.) G'(z^L)      (softmax: J(z^L)^T dC/da, the full Jacobian)
    delta^l = ((W^{l+1})^T delta^{l+1}) (.) G'(z^l)
    dC/dW^l = delta^l (a^{l-1})^T,  dC/db^l = sum(delta^l, axis=1)

The derivatives are written from z with their textbook formulas (not from a,
as purebp does), and the output layer is never fused with the cost: dC/da is
formed first, then multiplied by G'(z^L) or the softmax Jacobian.
"""

from __future__ import annotations

import math

import numpy as np

LEAKY_SLOPE = 0.01


def _phi(z):
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _cdf(z):
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def activation(name: str, z: np.ndarray) -> np.ndarray:
    """G(z), columns are examples."""
    if name == "identity":
        return z
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.where(z > 0, z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, LEAKY_SLOPE * z)
    if name == "elu":
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0.0)))
    if name == "softplus":
        return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0.0)
    if name == "gelu":
        return z * _cdf(z)
    if name == "softmax":
        e = np.exp(z - z.max(axis=0, keepdims=True))
        return e / e.sum(axis=0, keepdims=True)
    raise ValueError(name)


def activation_derivative(name: str, z: np.ndarray) -> np.ndarray:
    """G'(z) elementwise, from z (softmax excluded: see ``softmax_jacobian``)."""
    if name == "identity":
        return np.ones_like(z)
    if name == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 - s)
    if name == "tanh":
        return 1.0 / np.cosh(z) ** 2
    if name == "relu":
        return (z > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, LEAKY_SLOPE)
    if name == "elu":
        return np.where(z > 0, 1.0, np.exp(np.minimum(z, 0.0)))
    if name == "softplus":
        return 1.0 / (1.0 + np.exp(-z))
    if name == "gelu":
        return _cdf(z) + z * _phi(z)
    raise ValueError(name)


def softmax_jacobian(a_column: np.ndarray) -> np.ndarray:
    """da_i/dz_j = a_i (delta_ij - a_j) for one example."""
    return np.diag(a_column) - np.outer(a_column, a_column)


def cost_and_output_gradient(loss: str, z: np.ndarray, a: np.ndarray, y: np.ndarray):
    """Per-example C^n (N,) and dC^n/da^L (n_out, N) for dense targets y (n_out, N)."""
    if loss == "mse":
        return 0.5 * np.sum((a - y) ** 2, axis=0), a - y
    if loss == "cross_entropy":  # on probabilities a
        return -np.sum(y * np.log(a), axis=0), -y / a
    if loss == "softmax_cross_entropy":  # on logits a = z
        shifted = z - z.max(axis=0, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=0, keepdims=True))
        probabilities = np.exp(log_probabilities)
        return -np.sum(y * log_probabilities, axis=0), probabilities * y.sum(axis=0, keepdims=True) - y
    if loss == "binary_cross_entropy":  # on sigmoid outputs a
        cost = -np.sum(y * np.log(a) + (1.0 - y) * np.log(1.0 - a), axis=0)
        return cost, -(y / a - (1.0 - y) / (1.0 - a))
    raise ValueError(loss)


def dense_targets(y: np.ndarray, n_out: int) -> np.ndarray:
    """(N,) integer labels -> (N, n_out) one-hot; anything else as float64."""
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.integer):
        return np.eye(n_out)[y]
    return y.astype(np.float64)


def loss_and_gradients(weights, biases, activations, x, y, loss, reduction="mean"):
    """Return (L, [dL/dW^l], [dL/db^l]) for batch-first x (N, n_in) and targets y.

    ``weights[l]`` is (n_out, n_in), ``biases[l]`` is (n_out,), all converted to float64.
    """
    weights = [np.asarray(w, dtype=np.float64) for w in weights]
    biases = [np.asarray(b, dtype=np.float64) for b in biases]
    a = np.asarray(x, dtype=np.float64).T  # a^0, (n_in, N)
    n = a.shape[1]
    y = dense_targets(y, weights[-1].shape[0]).T  # (n_out, N)
    zs, activations_ = [], [a]
    for w, b, name in zip(weights, biases, activations):
        z = w @ activations_[-1] + b[:, None]  # z^l = W^l a^{l-1} + b^l
        zs.append(z)
        activations_.append(activation(name, z))  # a^l = G(z^l)
    cost, dc_da = cost_and_output_gradient(loss, zs[-1], activations_[-1], y)
    scale = 1.0 / n if reduction == "mean" else 1.0
    if activations[-1] == "softmax":  # delta^L = J^T dC/da, column by column
        delta = np.stack([softmax_jacobian(activations_[-1][:, k]).T @ dc_da[:, k] for k in range(n)], axis=1)
    else:  # delta^L = dC/da (.) G'(z^L)
        delta = dc_da * activation_derivative(activations[-1], zs[-1])
    delta = scale * delta
    grad_w, grad_b = [None] * len(weights), [None] * len(weights)
    for l in reversed(range(len(weights))):
        grad_w[l] = delta @ activations_[l].T  # dC/dW^l = delta^l (a^{l-1})^T
        grad_b[l] = np.sum(delta, axis=1)  # dC/db^l = sum(delta^l, axis=1)
        if l > 0:  # delta^{l-1} = ((W^l)^T delta^l) (.) G'(z^{l-1})
            delta = (weights[l].T @ delta) * activation_derivative(activations[l - 1], zs[l - 1])
    return scale * float(np.sum(cost)), grad_w, grad_b
