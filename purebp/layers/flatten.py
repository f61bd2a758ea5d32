"""Flatten every axis but the batch: (N, C, L) -> (N, C L) in (channel, position) order, as ``torch.flatten(x, 1)``.

The backward rule is the inverse reshape: dC/da = dC/d(out) laid back out as (N, C, L).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from purebp.layers import kinds as _kinds

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Flatten:
    """Row-major flattening of each example (channel-major for (C, L) inputs). No parameters."""

    def forward(self, a: Array, key: Array | None = None) -> tuple[Array, tuple[int, ...]]:
        return jnp.reshape(a, (a.shape[0], -1)), a.shape

    def backward(self, shape: tuple[int, ...], grad_out: Array) -> tuple[Array, Flatten]:
        return jnp.reshape(grad_out, shape), self  # dC/da: the same numbers, back in the input's shape

    def per_example_grads(self, shape: tuple[int, ...], grad_out: Array) -> Flatten:
        return self

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(input_shape),)

    def __repr__(self) -> str:
        return "Flatten()"


jax.tree_util.register_dataclass(Flatten)  # no leaves


def flatten() -> Flatten:
    """Flatten each example to one feature axis, in row-major ((channel, position)) order."""
    return Flatten()


# ---------------------------------------------------------------- its row in the table of layer kinds


def _validate(description: tuple, where: str, validate_inner) -> None:
    if len(description) != 1:
        raise _kinds.malformed(FLATTEN_KIND, where, description)


FLATTEN_KIND = _kinds.register_kind(
    _kinds.Kind(
        name="flatten",
        type=Flatten,
        describe=lambda layer, where, inner: {},
        rebuild=lambda fields, inner: Flatten(),
        form="('flatten',)",
        validate=_validate,
        shape_after=lambda description, shape: (math.prod(shape),),
        draw=lambda description, shape, rng, dtype, scale, inner: Flatten(),
        notation=lambda description, inner: "fl",
        parse=lambda text, inner: ("flatten",) if text == "fl" else None,
        help="fl = flatten",
        example=(("flatten",), (2, 3)),
        supports=frozenset({"per_example", "curvature", "diag_hessian", "kronecker"}),
        builtin=True,
    )
)
