"""Inverted dropout: out = a (.) m / (1 - rate), m_i ~ Bernoulli(1 - rate), drawn per example from its key.

With no key (inference) the layer is the identity. The backward rule is the
same mask: dC/da = dC/d(out) (.) m / (1 - rate). No parameters.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np

from purebp.layers import kinds as _kinds

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Dropout:
    """Drop each input with probability ``rate`` (static) while training; identity without a key."""

    rate: float = dataclasses.field(metadata={"static": True})

    def forward(self, a: Array, key: Array | None = None) -> tuple[Array, Array | None]:
        if key is None or self.rate == 0.0:
            return a, None
        # the keep probability in float32 whatever the network's dtype and jax_enable_x64: the same key draws the
        # same mask for a float32 network and its float64 copy (check_gradients' truth)
        keep_probability = np.float32(1.0 - self.rate)
        keep = jax.vmap(lambda k: jax.random.bernoulli(k, keep_probability, a.shape[1:]))(key)
        mask = keep.astype(a.dtype) / np.asarray(1.0 - self.rate, dtype=a.dtype)  # m / (1 - rate)
        return a * mask, mask

    def backward(self, mask: Array | None, grad_out: Array) -> tuple[Array, Dropout]:
        grad_in = grad_out if mask is None else grad_out * mask  # dC/da = dC/d(out) (.) m / (1 - rate)
        return grad_in, self

    def per_example_grads(self, mask: Array | None, grad_out: Array) -> Dropout:
        return self

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {self.rate!r}")
        return tuple(input_shape)

    def __repr__(self) -> str:
        return f"Dropout({self.rate})"


jax.tree_util.register_dataclass(Dropout)  # no leaves; rate static


@dataclasses.dataclass(frozen=True)
class DropoutInit:
    rate: float

    def __repr__(self) -> str:
        return f"pb.dropout({self.rate!r})"  # the public builder's call (errors name it, not this class)

    def init(self, key: Array, input_shape: tuple[int, ...], dtype: np.dtype) -> Dropout:
        return Dropout(self.rate)


def dropout(rate: float) -> DropoutInit:
    """Inverted dropout with drop probability ``rate`` in [0, 1)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout: rate must be a number in [0, 1), got {rate!r}")
    return DropoutInit(float(rate))


# ---------------------------------------------------------------- its row in the table of layer kinds


def _validate(description: tuple, where: str, validate_inner) -> None:
    arguments = description[1:]
    if len(arguments) != 1 or isinstance(arguments[0], bool) or not 0.0 <= arguments[0] < 1.0:
        raise _kinds.malformed(DROPOUT_KIND, where, description)


def _notation(description: tuple, notate_inner) -> str:
    rate = f"{description[1]:g}"
    return "do" + (rate[1:] if rate.startswith("0.") else rate)  # do.25 is dropout(0.25)


def _parse(text: str, parse_inner) -> tuple | None:
    match = re.fullmatch(r"do(\.\d+|\d+(?:\.\d*)?(?:e-?\d+)?)", text)
    return None if match is None else ("dropout", float(match[1]))


DROPOUT_KIND = _kinds.register_kind(
    _kinds.Kind(
        name="dropout",
        type=Dropout,
        describe=lambda layer, where, inner: {"rate": _kinds.static_field(layer, "rate", (float, int), where)},
        rebuild=lambda fields, inner: Dropout(fields["rate"]),
        form="('dropout', rate in [0, 1))",
        validate=_validate,
        shape_after=lambda description, shape: shape,
        draw=lambda description, shape, rng, dtype, scale, inner: Dropout(float(description[1])),
        notation=_notation,
        parse=_parse,
        help="do.25 = dropout(0.25)",
        example=(("dropout", 0.25), (5,)),
        supports=frozenset({"per_example", "curvature", "diag_hessian", "kronecker", "rules"}),
        builtin=True,
    )
)
