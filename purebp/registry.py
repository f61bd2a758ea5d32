"""Your own activations and costs: checked against autodiff, then put in their tables.

``register_activation`` and ``register_loss`` are the public way into the
tables of ``purebp.activations`` and ``purebp.losses``. Each checks the
hand-written derivative against autodiff (``purebp.check``) before the entry
is accepted; replacing an entry (``overwrite=True``) clears every compiled
program (``purebp.clear_caches``), so nothing traced with the old functions
is reused. This module sits above all three, so none of them imports another
in a cycle.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from purebp import activations as _activations
from purebp import check as _check
from purebp import losses as _losses

Array = jax.Array


def register_activation(
    name: str,
    forward: Callable[[Array], Array],
    derivative: Callable[[Array], Array],
    *,
    second_derivative: Callable[[Array], Array] | None = None,
    overwrite: bool = False,
) -> _activations.Activation:
    """Register an elementwise activation ``G = forward`` with ``G' = derivative`` (and optionally G'').

    ``derivative(z)`` must return G'(z) elementwise. Before it is accepted it is
    compared with ``jax.grad(forward)`` at sample points in [-6, 6] (see
    ``purebp.check.check_activation_derivative``); a wrong derivative raises
    ValueError naming the worst point. ``second_derivative(z)``, G''(z)
    elementwise, is what ``purebp.diag_hessian`` needs for this activation;
    it is checked the same way against ``jax.grad(derivative)``. Replacing a registered name needs
    ``overwrite=True`` and clears every compiled program. Returns the
    registered ``Activation``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"an activation name must be a non-empty string, got {name!r}")
    if name in _activations.BUILTIN_NAMES:
        raise ValueError(f"{name!r} is a built-in activation and cannot be replaced")
    if name in _activations.names() and not overwrite:
        raise ValueError(f"activation {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(forward) or not callable(derivative):
        raise TypeError("forward and derivative must both be callables of one array")
    if second_derivative is not None and not callable(second_derivative):
        raise TypeError(f"second_derivative must be a callable of one array or None, got {second_derivative!r}")
    _check.check_activation_derivative(name, forward, derivative)
    if second_derivative is not None:
        # G'' against jax.grad of the G' just accepted
        _check.check_activation_derivative(
            f"{name}: second_derivative vs jax.grad of its derivative", derivative, second_derivative
        )
    activation = _activations.Activation(
        name,
        forward,
        lambda z, a: derivative(z),
        second_derivative=None if second_derivative is None else (lambda z, a: second_derivative(z)),
    )
    _activations.install(activation, overwrite=overwrite)
    return activation


def register_loss(
    name: str,
    cost: Callable[[Array, Array, Array], Array],
    *,
    output_delta: Callable[[Array, Array, Array], Array] | None = None,
    grad_output: Callable[[Array, Array, Array], Array] | None = None,
    output_activation: str | None = None,
    overwrite: bool = False,
) -> _losses.Loss:
    """Register a per-example cost ``cost(z, a, y) -> C^n``, shape (N,), with its derivative.

    z = z^L and a = a^L = G(z^L) are (N, n_out); y holds float targets
    (N, n_out). Give exactly one derivative:

    - ``grad_output(z, a, y)``: dC^n/da^L, (N, n_out); the backward pass forms
      delta^L = dC/da (.) G'(z^L) (BP1) with the output layer's G. With
      ``output_activation=None`` the cost fits any output layer and must read
      a only.
    - ``output_delta(z, a, y)``: delta^L = dC^n/dz^L itself, fused with G
      (as softmax + cross-entropy is): it needs ``output_activation``.

    ``output_activation`` names the output activation the cost is defined on
    (a network with another one is refused); None: any. Before it is
    accepted the derivative is compared with autodiff of ``cost`` at sample
    points (``purebp.check.check_loss_derivative`` says what it draws and the
    tolerance: relative 1e-8 in float64, 1e-4 in float32); a wrong one raises
    ValueError naming the worst point (example, output, the two values).
    Built-in names cannot be replaced; a registered one needs
    ``overwrite=True``, which clears every compiled program. The name then
    works wherever a built-in loss does (``value_and_grad``,
    ``check_gradients``, ``fit``, ...). Returns the registered ``Loss``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a loss name must be a non-empty string, got {name!r}")
    if name in _losses.LOSSES:
        raise ValueError(f"{name!r} is a built-in loss and cannot be replaced")
    if name in _losses.names() and not overwrite:
        raise ValueError(f"loss {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(cost):
        raise TypeError(f"cost must be a callable cost(z, a, y) -> (N,) per-example costs, got {cost!r}")
    if (output_delta is None) == (grad_output is None):
        given = "both" if output_delta is not None else "neither"
        raise TypeError(
            f"give exactly one of output_delta=(z, a, y) -> delta^L = dC/dz^L or grad_output=(z, a, y) -> dC/da; "
            f"got {given}"
        )
    derivative, which = (output_delta, "output_delta") if output_delta is not None else (grad_output, "grad_output")
    if not callable(derivative):
        raise TypeError(f"{which} must be a callable of (z, a, y), got {derivative!r}")
    if output_activation is not None:
        if not isinstance(output_activation, str):
            raise TypeError(f"output_activation must be an activation name or None, got {output_activation!r}")
        if output_activation not in _activations.names():
            raise ValueError(
                f"unknown output_activation {output_activation!r}; valid names: {', '.join(_activations.names())}"
            )
    elif output_delta is not None:
        raise ValueError(
            "output_delta gives delta^L = dC/dz^L, which depends on the output activation: name it with "
            "output_activation=..., or give grad_output (dC/da) for a cost on any output layer"
        )
    _check.check_loss_derivative(
        name, cost, output_delta=output_delta, grad_output=grad_output, output_activation=output_activation
    )
    loss = _losses.Loss(
        name,
        cost,
        output_delta=None if output_delta is None else (lambda z, a, y, output: output_delta(z, a, y)),
        grad_output=grad_output,
        output_activation=output_activation,
    )
    _losses.install(loss, overwrite=overwrite)
    return loss
