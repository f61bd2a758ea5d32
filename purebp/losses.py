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

Every cost is a ``Loss`` in one table, looked up by name (``get``, ``names``);
the built-ins above are its first entries. Register your own with
``purebp.register_loss`` (purebp/registry.py), which checks its derivative
against autodiff before it enters the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from purebp import activations as _activations
from purebp import programs as _programs

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Loss:
    """One per-example cost C^n(z^L, a^L, y) and how to form delta^L from it.

    - ``cost(z, a, y)``: C^n for every example, shape (N,), from z^L, a^L =
      G(z^L) (both (N, n_out)) and dense targets y (N, n_out).
    - ``output_delta(z, a, y, output)``: delta^L = dC^n/dz^L, shape (N, n_out),
      fused with the output activation ``output``; or None, and then
    - ``grad_output(z, a, y)``: dC^n/da^L, and delta^L = dC/da (.) G'(z^L)
      (``output.chain``, the notes' BP1).
    - ``output_activation``: the output activation the cost is defined on; None: any.
    - ``classification``: takes integer labels (N,) or one-hot rows.
    - ``targets_in_unit_interval``: targets must lie in [0, 1] (binary cross-entropy).
    """

    name: str
    cost: Callable[[Array, Array, Array], Array]
    output_delta: Callable[[Array, Array, Array, _activations.Activation], Array] | None = None
    grad_output: Callable[[Array, Array, Array], Array] | None = None
    output_activation: str | None = None
    classification: bool = False
    targets_in_unit_interval: bool = False


def _mse_cost(z: Array, a: Array, y: Array) -> Array:
    residual = a - y
    return 0.5 * jnp.sum(residual * residual, axis=-1)


def _mse_grad_output(z: Array, a: Array, y: Array) -> Array:
    return a - y  # dC/da = a - y; delta^L = dC/da (.) G'(z^L) by output.chain


def _cross_entropy_cost(z: Array, a: Array, y: Array) -> Array:
    # -sum_j y_j log softmax(z)_j from the logits: finite where a_j underflows to 0
    return -jnp.sum(y * _activations.log_softmax(z), axis=-1)


def _softmax_cross_entropy_delta(z: Array, a: Array, y: Array, output: _activations.Activation) -> Array:
    # delta^L = softmax(z^L) sum_j y_j - y
    probabilities = _activations.softmax(z)
    return probabilities * jnp.sum(y, axis=-1, keepdims=True) - y


def _cross_entropy_delta(z: Array, a: Array, y: Array, output: _activations.Activation) -> Array:
    # delta^L = a^L sum_j y_j - y, a^L = softmax(z^L) already
    return a * jnp.sum(y, axis=-1, keepdims=True) - y


def _binary_cross_entropy_cost(z: Array, a: Array, y: Array) -> Array:
    softplus = _activations.get("softplus").forward
    return jnp.sum(y * softplus(-z) + (1.0 - y) * softplus(z), axis=-1)


def _binary_cross_entropy_delta(z: Array, a: Array, y: Array, output: _activations.Activation) -> Array:
    # delta^L = sigma(z^L) - y
    return a - y


_BUILTIN = (
    Loss("mse", _mse_cost, grad_output=_mse_grad_output),
    Loss("cross_entropy", _cross_entropy_cost, _cross_entropy_delta, output_activation="softmax", classification=True),
    Loss(
        "softmax_cross_entropy",
        _cross_entropy_cost,
        _softmax_cross_entropy_delta,
        output_activation="identity",
        classification=True,
    ),
    Loss(
        "binary_cross_entropy",
        _binary_cross_entropy_cost,
        _binary_cross_entropy_delta,
        output_activation="sigmoid",
        targets_in_unit_interval=True,
    ),
)

_REGISTRY: dict[str, Loss] = {loss.name: loss for loss in _BUILTIN}
# the built-in names; ``names()`` adds the registered ones
LOSSES = tuple(loss.name for loss in _BUILTIN)
REDUCTIONS = ("mean", "sum")
CLASSIFICATION_LOSSES = tuple(loss.name for loss in _BUILTIN if loss.classification)


def names() -> tuple[str, ...]:
    """All loss names, built-in first, then the registered ones in the order they were registered."""
    return tuple(_REGISTRY)


def get(name: str) -> Loss:
    """Return the ``Loss`` registered as ``name``; ValueError listing the valid names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"a loss name must be a string, got {name!r}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(names())}") from None


def install(loss: Loss, *, overwrite: bool = False) -> None:
    """Put ``loss`` in the table under ``loss.name``, unchecked.

    ``purebp.register_loss`` checks the derivative against autodiff first,
    then calls this: use that. A built-in cannot be replaced; another name
    needs ``overwrite=True``, and replacing it clears every compiled program
    (``purebp.programs.clear_caches``), since programs traced for the old
    registration key on the same name.
    """
    name = loss.name
    if name in LOSSES:
        raise ValueError(f"{name!r} is a built-in loss and cannot be replaced")
    replacing = name in _REGISTRY
    if replacing and not overwrite:
        raise ValueError(f"loss {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = loss
    if replacing:
        _programs.clear_caches()


def validate_loss(loss: str, output_activation: str, reduction: str) -> None:
    """Raise ValueError unless ``loss`` and ``reduction`` are known and ``loss`` fits the output layer."""
    if not isinstance(loss, str) or loss not in _REGISTRY:
        raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(names())}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions: {', '.join(REDUCTIONS)}")
    expected = _REGISTRY[loss].output_activation
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
    cost = get(loss).cost(pre_activation, activation, target)
    _check_shape(loss, "cost", cost, pre_activation.shape[:-1])
    return cost


def output_delta(
    pre_activation: Array, activation: Array, target: Array, loss: str, output: _activations.Activation
) -> Array:
    """Return delta^L = dC^n/dz^L for every example, shape (N, n_out).

    The notes' delta^L = dC/da (.) G'(z^L), fused where the cost and the output
    activation cancel (cross-entropy after softmax, binary cross-entropy after sigmoid).
    """
    entry = get(loss)
    if entry.output_delta is not None:
        delta = entry.output_delta(pre_activation, activation, target, output)
        _check_shape(loss, "output_delta", delta, pre_activation.shape)
        return delta
    # (BP1) delta^L = dC/da (.) G'(z^L)
    upstream = entry.grad_output(pre_activation, activation, target)
    _check_shape(loss, "grad_output", upstream, pre_activation.shape)
    return output.chain(upstream, pre_activation, activation)


def _check_shape(loss: str, what: str, value: Array, expected: tuple[int, ...]) -> None:
    # shapes are static: a registered cost that returns the wrong shape fails while tracing, not silently
    shape = getattr(value, "shape", None)
    if shape != tuple(expected):
        raise ValueError(f"loss {loss!r}: {what} returned shape {shape}, expected {tuple(expected)}")
