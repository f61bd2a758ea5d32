"""Activation functions G and their derivatives G', by name.

Every activation is a pair: ``forward(z) -> a = G(z)`` and
``derivative(z, a) -> G'(z)``. The derivative receives both z and the stored
a = G(z) from the forward pass, so it can use whichever is cheaper
(sigma' = a (1 - a), tanh' = 1 - a^2). The backward pass then forms
dC/dz = dC/da (.) G'(z).

softmax is the one exception: its Jacobian is not diagonal, so its
``chain(upstream, z, a)`` is a Jacobian-transpose product,
dC/dz = a (.) (dC/da - <dC/da, a>), and it is allowed on the output layer only.

None of these use ``jax.nn`` helpers that carry a ``custom_jvp`` (softmax,
softplus via logaddexp): the library's forward pass is plain jnp.

Register your own with ``purebp.register_activation`` (purebp/registry.py),
which checks G' against autodiff before it enters this table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from purebp import programs as _programs

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Activation:
    """G and G' for one activation name.

    ``forward(z)`` returns G(z); ``derivative(z, a)`` returns G'(z) elementwise
    (``None`` for softmax, whose Jacobian is not diagonal).
    ``second_derivative(z, a)`` returns G''(z) elementwise, for the Hessian
    diagonal (``purebp.diag_hessian``); ``None`` where it is not known.
    ``piecewise_linear``: G'' = 0 wherever it exists (identity, relu, leaky
    relu), so the Hessian has no term from this activation.
    """

    name: str
    forward: Callable[[Array], Array]
    derivative: Callable[[Array, Array], Array] | None
    elementwise: bool = True
    second_derivative: Callable[[Array, Array], Array] | None = None
    piecewise_linear: bool = False

    def chain(self, upstream: Array, z: Array, a: Array) -> Array:
        """Return dC/dz from dC/da = ``upstream`` (the notes' dC/dz = dC/da (.) G'(z))."""
        if self.elementwise:
            return upstream * self.derivative(z, a)
        # softmax: (J^T g)_i = a_i (g_i - sum_j g_j a_j)
        return a * (upstream - jnp.sum(upstream * a, axis=-1, keepdims=True))


def _sigmoid(z: Array) -> Array:
    # lax.logistic is a primitive: stable for |z| large, no custom_jvp
    return jax.lax.logistic(z)


def _relu(z: Array) -> Array:
    # where, not maximum: jnp.maximum splits the derivative 1/2-1/2 at z = 0. Selecting 0 where z <= 0
    # (rather than z where z > 0) keeps NaN as NaN, as jax.nn.relu does: NaN <= 0 and NaN > 0 are both false
    return jnp.where(z <= 0, jnp.zeros_like(z), z)


def _leaky_relu(z: Array) -> Array:
    return jnp.where(z > 0, z, LEAKY_RELU_SLOPE * z)


def _elu(z: Array) -> Array:
    # inner where keeps expm1 away from large z, so autodiff of this has no inf * 0
    return jnp.where(z > 0, z, jnp.expm1(jnp.where(z > 0, jnp.zeros_like(z), z)))


def _softplus(z: Array) -> Array:
    # log(1 + e^z), as z + log1p(e^-z) for z > 0 and log1p(e^z) otherwise: finite for any
    # z, and written so that autodiff of it (the witness in check.py) gives sigma(0) at 0
    positive = z > 0
    zero = jnp.zeros_like(z)
    return jnp.where(
        positive,
        z + jnp.log1p(jnp.exp(-jnp.where(positive, z, zero))),
        jnp.log1p(jnp.exp(jnp.where(positive, zero, z))),
    )


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu(z: Array) -> Array:
    # the exact form G(z) = z Phi(z), Phi the standard normal CDF (not the tanh approximation)
    return z * (0.5 * (1.0 + erf(z * _INV_SQRT2)))


def _gelu_derivative(z: Array, a: Array) -> Array:
    # G'(z) = Phi(z) + z phi(z)
    return 0.5 * (1.0 + erf(z * _INV_SQRT2)) + z * (_INV_SQRT_2PI * jnp.exp(-0.5 * z * z))


def _row_max(z: Array) -> Array:
    # the shift cancels in softmax and log_softmax, so it is held out of autodiff (the witness in check.py):
    # jax.grad through jnp.max's tie mask has given NaN at XLA CPU -O0 (check_gradients(fast_compile=True))
    return jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))


def _gelu_second_derivative(z: Array, a: Array) -> Array:
    # G''(z) = 2 phi(z) + z phi'(z) = phi(z) (2 - z^2)
    return (_INV_SQRT_2PI * jnp.exp(-0.5 * z * z)) * (2.0 - z * z)


def _zero(z: Array, a: Array) -> Array:
    return jnp.zeros_like(z)


def softmax(z: Array) -> Array:
    """Softmax over the last axis, shifted by the row max so exp never overflows."""
    shifted = z - _row_max(z)
    e = jnp.exp(shifted)
    return e / jnp.sum(e, axis=-1, keepdims=True)


def log_softmax(z: Array) -> Array:
    """log softmax(z) over the last axis by log-sum-exp: finite wherever z is."""
    shifted = z - _row_max(z)
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


LEAKY_RELU_SLOPE = 0.01

_BUILTIN = (
    Activation("identity", lambda z: z, lambda z, a: jnp.ones_like(z), second_derivative=_zero, piecewise_linear=True),
    # sigma'' = sigma' (1 - 2 sigma); tanh'' = -2 tanh (1 - tanh^2)
    Activation(
        "sigmoid", _sigmoid, lambda z, a: a * (1.0 - a), second_derivative=lambda z, a: a * (1.0 - a) * (1.0 - 2.0 * a)
    ),
    Activation("tanh", jnp.tanh, lambda z, a: 1.0 - a * a, second_derivative=lambda z, a: -2.0 * a * (1.0 - a * a)),
    # relu, leaky_relu, elu: a > 0 exactly when z > 0 (NaN included), so G' reads only the stored a and
    # z^l need not stay alive until the backward pass (measured: a 10% faster mid training epoch).
    # relu's G' is 1 unless a <= 0, so it is 1 at NaN (as autodiff of _relu): XLA rewrites g * G' into
    # select(G' != 0, g, 0), and a G' of 0 at NaN would turn a NaN dC/da into a finite delta
    Activation("relu", _relu, lambda z, a: (~(a <= 0)).astype(a.dtype), second_derivative=_zero, piecewise_linear=True),
    Activation(
        "leaky_relu",
        _leaky_relu,
        lambda z, a: jnp.where(a > 0, jnp.ones_like(a), jnp.full_like(a, LEAKY_RELU_SLOPE)),
        second_derivative=_zero,
        piecewise_linear=True,
    ),
    # for z <= 0, G'(z) = G''(z) = e^z = a + 1
    Activation(
        "elu",
        _elu,
        lambda z, a: jnp.where(a > 0, jnp.ones_like(a), a + 1.0),
        second_derivative=lambda z, a: jnp.where(a > 0, jnp.zeros_like(a), a + 1.0),
    ),
    # softplus'' = sigma' = sigma (1 - sigma)
    Activation(
        "softplus",
        _softplus,
        lambda z, a: _sigmoid(z),
        second_derivative=lambda z, a: _sigmoid(z) * (1.0 - _sigmoid(z)),
    ),
    Activation("gelu", _gelu, _gelu_derivative, second_derivative=_gelu_second_derivative),
    Activation("softmax", softmax, None, elementwise=False),
)

_REGISTRY: dict[str, Activation] = {act.name: act for act in _BUILTIN}
BUILTIN_NAMES = tuple(act.name for act in _BUILTIN)


def names() -> tuple[str, ...]:
    """All registered activation names, built-in first."""
    return tuple(_REGISTRY)


def get(name: str) -> Activation:
    """Return the ``Activation`` registered as ``name``; ValueError listing the valid names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"an activation name must be a string, got {name!r}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(names())}") from None


def install(activation: Activation, *, overwrite: bool = False) -> None:
    """Put ``activation`` in the table under ``activation.name``, unchecked.

    ``purebp.register_activation`` checks G' against autodiff first, then calls
    this: use that. A built-in cannot be replaced; another name needs
    ``overwrite=True``, and replacing it clears every compiled program
    (``purebp.programs.clear_caches``), since programs traced for the old
    registration key on the same name.
    """
    name = activation.name
    if name in BUILTIN_NAMES:
        raise ValueError(f"{name!r} is a built-in activation and cannot be replaced")
    replacing = name in _REGISTRY
    if replacing and not overwrite:
        raise ValueError(f"activation {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = activation
    if replacing:
        _programs.clear_caches()
