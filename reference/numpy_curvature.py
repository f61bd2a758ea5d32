"""Independent NumPy float64 oracle for the curvature quantities of an MLP: explicit Jacobians, one example at a time.

No JAX and no purebp, and none of purebp's column sweeps: for each example n the
Jacobians J^{L<-l} = dz^L/dz^l = W^L D^{L-1} W^{L-1} ... W^{l+1} D^l (D^k =
diag G'(z^k), J^{L<-L} = I) are multiplied out as matrices, and every quantity is
read off its textbook definition:

    dz^L/dW^l_ij = J^{L<-l}[:, i] a^{l-1}_j,       dz^L/db^l_i = J^{L<-l}[:, i]
    GGN            s sum_n J_n^T H_n J_n, J_n the full (n_L, P) Jacobian, H_n = d^2 C^n / (dz^L)^2
    Hessian diag   the GGN diagonal plus, for theta = W^l_ij, s sum_n sum_{k=l}^{L-1}
                   sum_u (dC^n/da^k_u) G_k''(z^k_u) (dz^k_u/dtheta)^2,  dz^k/dtheta = J^{k<-l}[:, i] a_j
                   (z^l is linear in theta, so each second derivative enters through one G'')
    KFLR           a = (1/N) sum_n a^{l-1} a^{l-1}^T,  g = s sum_n (J^{L<-l})^T H_n J^{L<-l}
    statistics     from the per-example gradients s dC^n/dtheta = s (J^{L<-l})^T e_n (x) a^{l-1}

for identity output layers with softmax cross-entropy (H = diag p - p p^T) or mse
(C = 1/2 ||z - y||^2, H = I); s = 1/N for the mean, 1 for the sum. Parameters are
flattened layer by layer as (W^l row-major, then b^l), the order of
``jax.tree.leaves`` of a purebp network.
"""

from __future__ import annotations

import numpy as np

ACTIVATIONS = {
    # name: (G, G', G'')
    "identity": (lambda z: z, lambda z: np.ones_like(z), lambda z: np.zeros_like(z)),
    "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(np.float64), lambda z: np.zeros_like(z)),
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2, lambda z: -2.0 * np.tanh(z) * (1.0 - np.tanh(z) ** 2)),
    "sigmoid": (
        lambda z: 1.0 / (1.0 + np.exp(-z)),
        lambda z: np.exp(-z) / (1.0 + np.exp(-z)) ** 2,
        lambda z: np.exp(-z) * (np.exp(-z) - 1.0) / (1.0 + np.exp(-z)) ** 3,
    ),
    "softplus": (
        lambda z: np.log1p(np.exp(z)),
        lambda z: 1.0 / (1.0 + np.exp(-z)),
        lambda z: np.exp(-z) / (1.0 + np.exp(-z)) ** 2,
    ),
}


def _example(weights, biases, activations, x, target, loss):
    """Forward one example (column vectors); return (inputs a^{l-1}, z^l, dC/dz^L, H, dC/da^l per hidden layer)."""
    inputs, pre = [], []
    a = np.asarray(x, np.float64).reshape(-1, 1)
    for w, b, name in zip(weights, biases, activations):
        inputs.append(a)
        z = w @ a + b.reshape(-1, 1)
        pre.append(z)
        a = ACTIVATIONS[name][0](z)
    z_out = pre[-1]
    if loss == "softmax_cross_entropy":
        e = np.exp(z_out - z_out.max())
        p = e / e.sum()
        grad_out = p - target
        hessian = np.diag(p[:, 0]) - p @ p.T
    else:  # mse on the identity output
        grad_out = z_out - target
        hessian = np.eye(z_out.shape[0])
    return inputs, pre, grad_out, hessian


def _jacobians(weights, activations, pre) -> list[list[np.ndarray]]:
    """J[k][l] = dz^k/dz^l for l <= k (identity for k = l)."""
    count = len(weights)
    J = [[None] * count for _ in range(count)]
    for k in range(count):
        J[k][k] = np.eye(weights[k].shape[0])
        for l in reversed(range(k)):
            slope = ACTIVATIONS[activations[l]][1](pre[l])[:, 0]
            J[k][l] = J[k][l + 1] @ weights[l + 1] * slope[None, :]  # ... W^{l+1} D^l
    return J


def quantities(
    weights: list[np.ndarray],
    biases: list[np.ndarray],
    activations: list[str],
    x: np.ndarray,
    targets: np.ndarray,
    *,
    loss: str,
    reduction: str,
) -> dict:
    """Return every quantity, flattened over the parameters, plus per-layer KFLR factors.

    Keys: "ggn" (P, P), "diag_ggn", "diag_hessian", "sum_grad_squared",
    "grad_variance" (all (P,)), "kflr" (list of (g, a) per layer).
    ``targets`` is (N, n_L): one-hot rows for cross-entropy.
    """
    weights = [np.asarray(w, np.float64) for w in weights]
    biases = [np.asarray(b, np.float64) for b in biases]
    assert activations[-1] == "identity", "the oracle takes identity output layers"
    count, batch = len(weights), x.shape[0]
    s = 1.0 / batch if reduction == "mean" else 1.0
    sizes = [w.size + b.size for w, b in zip(weights, biases)]
    total = sum(sizes)
    ggn = np.zeros((total, total))
    hess_extra = np.zeros(total)
    per_example = np.zeros((batch, total))
    g_factors = [np.zeros((w.shape[0], w.shape[0])) for w in weights]
    a_factors = [np.zeros((w.shape[1], w.shape[1])) for w in weights]
    for n in range(batch):
        inputs, pre, grad_out, hessian = _example(
            weights, biases, activations, x[n], np.asarray(targets[n], np.float64).reshape(-1, 1), loss
        )
        J = _jacobians(weights, activations, pre)
        # the full Jacobian dz^L/dtheta, (n_L, P), block by block
        blocks = []
        for l in range(count):
            a = inputs[l][:, 0]
            jl = J[count - 1][l]
            blocks.append(np.einsum("ki,j->kij", jl, a).reshape(jl.shape[0], -1))  # dz^L/dW^l_ij
            blocks.append(jl)  # dz^L/db^l_i
            g_factors[l] += s * jl.T @ hessian @ jl
            a_factors[l] += np.outer(a, a) / batch
        full = np.concatenate(blocks, axis=1)
        ggn += s * full.T @ hessian @ full
        per_example[n] = s * (full.T @ grad_out)[:, 0]
        # dC^n/da^k for the hidden layers, by the chain through the Jacobians
        offset = 0
        for l in range(count):
            a = inputs[l][:, 0]
            w_size = weights[l].size
            extra_w = np.zeros(weights[l].shape)
            extra_b = np.zeros(weights[l].shape[0])
            for k in range(l, count - 1):
                grad_a = (J[count - 1][k + 1] @ weights[k + 1]).T @ grad_out  # dC/da^k = (dz^L/da^k)^T dC/dz^L
                curvature = grad_a[:, 0] * ACTIVATIONS[activations[k]][2](pre[k])[:, 0]  # dC/da^k (.) G''(z^k)
                moved = J[k][l]  # dz^k/dz^l: column i is dz^k/dz^l_i
                extra_b += curvature @ (moved * moved)
                extra_w += np.outer(curvature @ (moved * moved), a * a)
            hess_extra[offset : offset + w_size] += s * extra_w.reshape(-1)
            hess_extra[offset + w_size : offset + sizes[l]] += s * extra_b
            offset += sizes[l]
    diag = np.diag(ggn).copy()
    return {
        "ggn": ggn,
        "diag_ggn": diag,
        "diag_hessian": diag + hess_extra,
        "sum_grad_squared": np.sum(per_example**2, axis=0),
        "grad_variance": np.mean(per_example**2, axis=0) - np.mean(per_example, axis=0) ** 2,
        "kflr": list(zip(g_factors, a_factors)),
    }
