"""Per-example costs C^n and the output-layer delta^L = dC^n/dz^L.

The costs, for one example with output a = G(z^L) and target y:

- ``mse``: C = 1/2 sum_j (a_j - y_j)^2, any output activation;
  dC/da = a - y, then delta^L = dC/da (.) G'(z^L) (a Jacobian product for softmax).
- ``cross_entropy``: C = -sum_j y_j log a_j on softmax probabilities, computed
  as -sum_j y_j log_softmax(z)_j so that it is finite when a_j underflows;
  delta^L = a sum_j y_j - y (= a - y for one-hot y).
- ``softmax_cross_entropy``: the same C on logits (identity output);
  delta^L = softmax(z) sum_j y_j - y, fused: no Jacobian is ever formed.
- ``binary_cross_entropy``: C = -sum_j [y_j log a_j + (1 - y_j) log(1 - a_j)]
  on sigmoid outputs, computed as sum_j [y_j softplus(-z_j) + (1 - y_j) softplus(z_j)];
  delta^L = a - y.

The loss over a batch is L = sum_n C^n (``reduction="sum"``, the notes' form)
or L = 1/N sum_n C^n (``reduction="mean"``, the default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from purebp import activations as _activations

Array = jax.Array

LOSSES = ("mse", "cross_entropy", "softmax_cross_entropy", "binary_cross_entropy")
REDUCTIONS = ("mean", "sum")
CLASSIFICATION_LOSSES = ("cross_entropy", "softmax_cross_entropy")
# the output activation each cost is defined on; None: any activation
OUTPUT_ACTIVATION = {
    "mse": None,
    "cross_entropy": "softmax",
    "softmax_cross_entropy": "identity",
    "binary_cross_entropy": "sigmoid",
}


def validate_loss(loss: str, output_activation: str, reduction: str) -> None:
    """Raise ValueError unless ``loss`` and ``reduction`` are known and ``loss`` fits the output layer."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(LOSSES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions: {', '.join(REDUCTIONS)}")
    expected = OUTPUT_ACTIVATION[loss]
    if expected is not None and output_activation != expected:
        raise ValueError(
            f"loss {loss!r} needs a {expected!r} output layer, but the network's output activation "
            f"is {output_activation!r}"
        )


def dense_targets(y: Array, n_out: int, dtype: jnp.dtype) -> Array:
    """Return targets as an (N, n_out) float array: integer labels become one-hot rows.

    A label outside [0, n_out) becomes a row of NaN, so that under a user's
    ``jax.jit`` (where labels cannot be checked before compiling) a bad label
    poisons the loss instead of being silently clamped or zeroed.
    """
    if jnp.issubdtype(y.dtype, jnp.integer):
        valid = (y >= 0) & (y < n_out)
        one_hot = (y[:, None] == jnp.arange(n_out, dtype=y.dtype)[None, :]).astype(dtype)
        return jnp.where(valid[:, None], one_hot, jnp.full_like(one_hot, jnp.nan))
    return y


def per_example_cost(pre_activation: Array, activation: Array, target: Array, loss: str) -> Array:
    """Return C^n for every example, shape (N,), from z^L, a^L = G(z^L) and dense targets."""
    if loss == "mse":
        residual = activation - target
        return 0.5 * jnp.sum(residual * residual, axis=-1)
    if loss in CLASSIFICATION_LOSSES:
        return -jnp.sum(target * _activations.log_softmax(pre_activation), axis=-1)
    if loss == "binary_cross_entropy":
        softplus = _activations.get("softplus").forward
        return jnp.sum(target * softplus(-pre_activation) + (1.0 - target) * softplus(pre_activation), axis=-1)
    raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(LOSSES)}")


def output_delta(
    pre_activation: Array, activation: Array, target: Array, loss: str, output: _activations.Activation
) -> Array:
    """Return delta^L = dC^n/dz^L for every example, shape (N, n_out).

    The notes' delta^L = dC/da (.) G'(z^L), fused where the cost and the output
    activation cancel (cross-entropy after softmax, binary cross-entropy after sigmoid).
    """
    if loss == "mse":
        # delta^L = dC/da (.) G'(z^L), dC/da = a - y
        return output.chain(activation - target, pre_activation, activation)
    if loss == "softmax_cross_entropy":
        # delta^L = softmax(z^L) sum_j y_j - y
        probabilities = _activations.softmax(pre_activation)
        return probabilities * jnp.sum(target, axis=-1, keepdims=True) - target
    if loss == "cross_entropy":
        # delta^L = a^L sum_j y_j - y, a^L = softmax(z^L) already
        return activation * jnp.sum(target, axis=-1, keepdims=True) - target
    if loss == "binary_cross_entropy":
        # delta^L = sigma(z^L) - y
        return activation - target
    raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(LOSSES)}")
