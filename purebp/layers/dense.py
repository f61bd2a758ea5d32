"""The dense layer: z = W a + b, a_out = G(z), and the notes' four equations as its backward rule.

Batch-first, one row per example: a is (N, n_in), W is (n_out, n_in), so the
notes' z^l = W^l a^{l-1} + b^l is ``a @ W.T + b`` and their column sums over
the batch are sums over axis 0.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from purebp import activations as _activations
from purebp.layers import kinds as _kinds

Array = jax.Array

# He (Kaiming) normal for rectifier-like units, whose G' is ~1 on half the line;
# Glorot (Xavier) normal for units symmetric around 0 and for output layers.
HE_ACTIVATIONS = frozenset({"relu", "leaky_relu", "elu", "gelu", "softplus"})


class DenseCache(NamedTuple):
    """What the backward rule needs: a^{l-1} (dz/dW = a), z^l and a^l (for G')."""

    input: Array
    pre_activation: Array
    activation: Array


@dataclasses.dataclass(frozen=True)
class Dense:
    """z = a W^T + b, out = G(z): ``w`` (n_out, n_in), ``b`` (n_out,), ``activation`` a registered name (static)."""

    w: Array
    b: Array
    activation: str = dataclasses.field(default="identity", metadata={"static": True})

    def forward(self, a: Array, key: Array | None = None) -> tuple[Array, DenseCache]:
        pre_activation = a @ self.w.T + self.b[None, :]  # z^l = W^l a^{l-1} + b^l
        activation = _activations.get(self.activation).forward(pre_activation)  # a^l = G(z^l)
        return activation, DenseCache(a, pre_activation, activation)

    def delta(self, cache: DenseCache, grad_out: Array) -> Array:
        """delta^l = dC/da^l (.) G'(z^l): (BP1) at the output layer, the second factor of (BP2) below it."""
        if self.activation == "identity":
            return grad_out
        return _activations.get(self.activation).chain(grad_out, cache.pre_activation, cache.activation)

    def backward(self, cache: DenseCache, grad_out: Array) -> tuple[Array, Dense]:
        delta = self.delta(cache, grad_out)  # (BP1)/(BP2) delta^l = dC/da^l (.) G'(z^l)
        grad_w = delta.T @ cache.input  # (BP4) dC/dW^l = delta^l (a^{l-1})^T, summed over the batch
        grad_b = jnp.sum(delta, axis=0)  # (BP3) dC/db^l = sum_n delta^l_n
        grad_in = delta @ self.w  # (BP2) dC/da^{l-1} = (W^l)^T delta^l, before the layer below applies its G'
        return grad_in, Dense(grad_w, grad_b, self.activation)

    def per_example_grads(self, cache: DenseCache, grad_out: Array) -> Dense:
        delta = self.delta(cache, grad_out)
        # (BP4) and (BP3) for one example: delta_n (a_n)^T and delta_n
        return Dense(jnp.einsum("ni,nj->nij", delta, cache.input), delta, self.activation)

    def per_example_squared_norms(self, cache: DenseCache, grad_out: Array) -> Dense:
        delta = self.delta(cache, grad_out)
        delta_sq = jnp.sum(delta * delta, axis=1)
        # Goodfellow's trick: ||delta_n a_n^T||_F^2 = ||delta_n||^2 ||a_n||^2, no (N, n_out, n_in) tensor
        return Dense(delta_sq * jnp.sum(cache.input * cache.input, axis=1), delta_sq, self.activation)

    # ---- more from the same pass (purebp.extras.curvature): columns are M backpropagated vectors per example,
    # shape (N, M, n_out), each a dC/da^l of its own; weights (N, M) or None (all +1)

    def column_deltas(self, cache: DenseCache, columns: Array) -> Array:
        """(BP1)/(BP2) for every column: delta_nm = column_nm (.) G'(z^l_n), shape (N, M, n_out)."""
        if self.activation == "identity":
            return columns
        # z^l_n and a^l_n broadcast over the M columns of example n
        return _activations.get(self.activation).chain(
            columns, cache.pre_activation[:, None, :], cache.activation[:, None, :]
        )

    def backward_columns(self, cache: DenseCache, columns: Array) -> Array:
        """(BP2) for every column: dC^{nm}/da^{l-1} = (W^l)^T delta_nm, shape (N, M, n_in)."""
        return self.column_deltas(cache, columns) @ self.w

    def sum_squared_grads(self, cache: DenseCache, columns: Array, weights: Array | None = None) -> Dense:
        """sum_{n,m} w_nm (dC^{nm}/dtheta)^2 by leaf: dC^{nm}/dW = delta_nm a_n^T (BP4), dC^{nm}/db = delta_nm (BP3)."""
        delta = self.column_deltas(cache, columns)
        squared = delta * delta if weights is None else weights[:, :, None] * delta * delta
        per_unit = jnp.sum(squared, axis=1)  # q_n = sum_m w_nm delta_nm^2, (N, n_out)
        # sum_{n,m} w_nm (delta_nm a_n^T)^2 = sum_n q_n (a_n^2)^T: one product, no per-example gradient
        grad_w = per_unit.T @ (cache.input * cache.input)
        return Dense(grad_w, jnp.sum(per_unit, axis=0), self.activation)

    def diagonal_sum_squared_grads(self, cache: DenseCache, residual: Array) -> Dense:
        """``sum_squared_grads`` of the columns sqrt|r_nj| e_j at z^l with signs sign(r_nj), in closed form.

        Column j of example n has delta = sqrt|r_nj| e_j, so the signed sum of its squared
        (BP4) outer products is r_nj (a_n^2)^T in row j: r^T (a^2), and sum_n r for b.
        """
        return Dense(residual.T @ (cache.input * cache.input), jnp.sum(residual, axis=0), self.activation)

    def diagonal_backward(self, residual: Array) -> Array:
        """(BP2) for columns sqrt|r_nj| e_j at z^l: (W^l)^T sqrt|r_nj| e_j = sqrt|r_nj| W^l[j, :], (N, n_out, n_in)."""
        return jnp.sqrt(jnp.abs(residual))[:, :, None] * self.w[None, :, :]

    def kronecker_factors(self, cache: DenseCache, columns: Array) -> tuple[Array, Array]:
        """(g, a): g = sum_{n,m} delta_nm delta_nm^T (n_out, n_out), a = (1/N) sum_n a_n a_n^T (n_in, n_in)."""
        delta = self.column_deltas(cache, columns)
        flat = jnp.reshape(delta, (-1, delta.shape[-1]))
        inputs = cache.input
        return flat.T @ flat, (inputs.T @ inputs) / np.asarray(inputs.shape[0], inputs.dtype)

    def grad_dot(self, cache: DenseCache, columns: Array, tangent: Dense) -> Array:
        """<dC^{nm}/dtheta, tangent> for every example and column, (N, M): delta_nm . (V a_n + v_b)."""
        delta = self.column_deltas(cache, columns)
        moved = cache.input @ tangent.w.T + tangent.b[None, :]  # the change of z^l_n along the tangent
        return jnp.einsum("nmo,no->nm", delta, moved)

    def linear(self) -> Dense:
        """The same weights with the identity activation: the output layer once delta^L is fused with the cost."""
        return dataclasses.replace(self, activation="identity")

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        w, b = self.w, self.b
        if getattr(w, "ndim", None) != 2 or getattr(b, "ndim", None) != 1:
            raise ValueError(
                f"expected w of shape (n_out, n_in) and b of shape (n_out,), got w {getattr(w, 'shape', w)} "
                f"and b {getattr(b, 'shape', b)}"
            )
        if w.shape[0] != b.shape[0]:
            raise ValueError(f"w has {w.shape[0]} rows but b has {b.shape[0]} entries")
        if len(input_shape) != 1:
            raise ValueError(
                f"a dense layer takes one feature axis, inputs (N, n_in); it got per-example shape {input_shape}: "
                "flatten it first"
            )
        if input_shape[0] != w.shape[1]:
            raise ValueError(f"w expects {w.shape[1]} inputs but the layer receives {input_shape[0]}")
        _activations.get(self.activation)
        return (w.shape[0],)

    def __repr__(self) -> str:
        return f"Dense({self.w.shape[0]}, {self.activation!r})" if hasattr(self.w, "shape") else "Dense(...)"


jax.tree_util.register_dataclass(Dense)  # w, b leaves; activation static (its field metadata)


@dataclasses.dataclass(frozen=True)
class DenseInit:
    """``dense(n_out, activation)`` before its input width is known."""

    n_out: int
    activation: str = "identity"

    def __repr__(self) -> str:
        # the public builder's call, as the user wrote it (errors name it, not this class)
        activation = "" if self.activation == "identity" else f", {self.activation!r}"
        return f"pb.dense({self.n_out}{activation})"

    def init(self, key: Array, input_shape: tuple[int, ...], dtype: np.dtype) -> Dense:
        """W ~ N(0, s^2), b = 0; s = sqrt(2 / n_in) (He) for rectifier-like G, sqrt(2 / (n_in + n_out)) else."""
        if len(input_shape) != 1:
            raise ValueError(
                f"dense({self.n_out}) takes inputs of shape (N, n_in) but receives per-example shape "
                f"{tuple(input_shape)}: flatten it first"
            )
        w, b = init_dense(key, int(input_shape[0]), self.n_out, self.activation, np.dtype(dtype))
        return Dense(w, b, self.activation)


@functools.partial(jax.jit, static_argnames=("n_in", "n_out", "activation", "dtype"))
def init_dense(key: Array, n_in: int, n_out: int, activation: str, dtype: np.dtype) -> tuple[Array, Array]:
    """(W, b) for one dense layer: W ~ N(0, s^2) by the He/Glorot rule for ``activation``, b = 0.

    Jitted, as ``init_mlp``'s draw is, so that both give the same bits for the same key.
    """
    # He: Var W = 2 / n_in; Glorot: Var W = 2 / (n_in + n_out)
    scale = (2.0 / n_in) ** 0.5 if activation in HE_ACTIVATIONS else (2.0 / (n_in + n_out)) ** 0.5
    # 16-bit: draw in float32 and round once (a normal drawn in bfloat16 has 128 distinct values)
    draw = dtype if dtype.itemsize >= 4 else np.dtype("float32")
    w = (scale * jax.random.normal(key, (n_out, n_in), dtype=draw)).astype(dtype)
    return w, jnp.zeros((n_out,), dtype=dtype)


def dense(n_out: int, activation: str = "identity") -> DenseInit:
    """A dense layer of ``n_out`` units with activation G = ``activation`` (a registered name)."""
    if isinstance(n_out, bool) or not isinstance(n_out, (int, np.integer)) or n_out <= 0:
        raise ValueError(f"dense: n_out must be a positive int, got {n_out!r}")
    _activations.get(activation)
    return DenseInit(int(n_out), activation)


# ---------------------------------------------------------------- its row in the table of layer kinds


def _validate(description: tuple, where: str, validate_inner) -> None:
    arguments = description[1:]
    if len(arguments) != 2 or not _kinds.positive_ints(arguments[:1], (1,)) or not isinstance(arguments[1], str):
        raise _kinds.malformed(DENSE_KIND, where, description)
    _activations.get(arguments[1])


def _parse(text: str, parse_inner) -> tuple | None:
    match = re.fullmatch(r"d(\d+)(.*)", text)
    activation = match and _kinds.activation_named(match[2])
    return None if activation is None else ("dense", int(match[1]), activation)


def _draw(description: tuple, shape: tuple, rng: np.random.Generator, dtype, scale: float, draw_inner) -> Dense:
    # W ~ N(0, scale^2 / n_in), b ~ N(0, 1/4): non-zero biases exercise the b-paths
    _, n_out, activation = description
    w = scale * rng.standard_normal((n_out, shape[-1])) / np.sqrt(shape[-1])
    b = 0.5 * rng.standard_normal(n_out)
    return Dense(_kinds.host_array(w, dtype), _kinds.host_array(b, dtype), activation)


DENSE_KIND = _kinds.register_kind(
    _kinds.Kind(
        name="dense",
        type=Dense,
        describe=lambda layer, where, inner: {
            "activation": _kinds.static_field(layer, "activation", (str,), where),
            "n_out": int(np.shape(layer.w)[0]),
        },
        rebuild=lambda fields, inner: Dense(_kinds.LEAF, _kinds.LEAF, fields["activation"]),
        form="('dense', n_out >= 1, activation name)",
        validate=_validate,
        shape_after=lambda description, shape: (description[1],),
        draw=_draw,
        notation=lambda description, inner: f"d{description[1]}{_kinds.activation_code(description[2])}",
        parse=_parse,
        help="d5t = dense(5, tanh), activation letters: (none) identity, s sigmoid, t tanh, r relu, lr leaky_relu, "
        "e elu, sp softplus, g gelu, sm softmax",
        example=(("dense", 3, "tanh"), (4,)),
        supports=frozenset({"per_example", "curvature", "diag_hessian", "kronecker", "rules"}),
        builtin=True,
    )
)
