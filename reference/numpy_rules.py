"""Independent NumPy float64 oracle for the learning rules: one example at a time, column vectors, Lillicrap's B.

No JAX and no purebp: the rules written from the papers' equations, per example n
with column vectors and the sums over the batch taken last, in Lillicrap's and
Nokland's orientation (B^l maps the error of layer l+1 to layer l, D^l maps the
output error e to layer l):

    z^l = W^l a^{l-1} + b^l,  a^l = g_l(z^l),  e = delta^L = (softmax(z^L) - onehot(y)) / N
    backprop:            delta^l = (W^{l+1})^T delta^{l+1} * g_l'(z^l)
    feedback alignment:  delta^l = B^l delta^{l+1} * g_l'(z^l)              (B^l fixed)
    direct FA:           delta^l = D^l e * g_l'(z^l)                          (D^l fixed)
    sign symmetry:       delta^l = sign(W^{l+1})^T delta^{l+1} * g_l'(z^l)
    update:              dW^l = sum_n delta^l_n (a^{l-1}_n)^T,  db^l = sum_n delta^l_n

for an MLP with a softmax cross-entropy cost on identity outputs (mean over the batch).
"""

from __future__ import annotations

import numpy as np

DERIVATIVES = {
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
    "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(np.float64)),
    "identity": (lambda z: z, lambda z: np.ones_like(z)),
}


def rule_update(
    weights: list[np.ndarray],
    biases: list[np.ndarray],
    activations: list[str],
    x: np.ndarray,
    labels: np.ndarray,
    rule: str,
    feedback: list[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Return (dW per layer, db per layer) under ``rule`` ("backprop", "fa", "dfa", "sign").

    ``feedback``: for "fa", B^l for l = 0..L-2 (B^l of shape (n_l, n_{l+1}): layer l's
    width by the next layer's); for "dfa", D^l for l = 0..L-2 (shape (n_l, n_L)).
    """
    count = len(weights)
    n_examples = x.shape[0]
    grads_w = [np.zeros_like(w, dtype=np.float64) for w in weights]
    grads_b = [np.zeros_like(b, dtype=np.float64) for b in biases]
    for n in range(n_examples):
        a = [np.asarray(x[n], np.float64).reshape(-1, 1)]
        zs = []
        for w, b, name in zip(weights, biases, activations):
            z = np.asarray(w, np.float64) @ a[-1] + np.asarray(b, np.float64).reshape(-1, 1)
            zs.append(z)
            a.append(DERIVATIVES[name][0](z))
        logits = zs[-1] - zs[-1].max()
        probabilities = np.exp(logits) / np.exp(logits).sum()
        target = np.zeros_like(probabilities)
        target[int(labels[n])] = 1.0
        error = (probabilities - target) / n_examples  # e = delta^L, the mean's 1/N included
        deltas = [None] * count
        deltas[-1] = error
        for l in range(count - 2, -1, -1):
            derivative = DERIVATIVES[activations[l]][1](zs[l])
            above = np.asarray(weights[l + 1], np.float64)
            if rule == "backprop":
                carried = above.T @ deltas[l + 1]
            elif rule == "fa":
                carried = np.asarray(feedback[l], np.float64) @ deltas[l + 1]
            elif rule == "dfa":
                carried = np.asarray(feedback[l], np.float64) @ error
            elif rule == "sign":
                carried = np.sign(above).T @ deltas[l + 1]
            else:
                raise ValueError(f"unknown rule {rule!r}")
            deltas[l] = carried * derivative
        for l in range(count):
            grads_w[l] += deltas[l] @ a[l].T
            grads_b[l] += deltas[l].ravel()
    return grads_w, grads_b


def angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    """arccos(<a, b> / (|a| |b|)) in degrees, both flattened."""
    a, b = np.ravel(a), np.ravel(b)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))
