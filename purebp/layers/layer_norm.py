"""Layer normalisation over the last axis, with a learned scale and offset, and its backward written out.

For one example's feature vector a (length n):

    mu = mean(a),  var = mean((a - mu)^2)       (biased variance)
    xhat = (a - mu) / sqrt(var + eps),  out = scale (.) xhat + offset

Backward, with g = dC/d(out) and ghat = g (.) scale = dC/dxhat:

    dC/da = (ghat - mean(ghat) - xhat mean(ghat (.) xhat)) / sqrt(var + eps)
    dC/dscale = sum over the batch of g (.) xhat,   dC/doffset = sum over the batch of g

(reference/DERIVATION.md derives the first line from the Jacobian of xhat.)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from purebp.layers import kinds as _kinds
from purebp.layers.base import along_last, sum_inner, sum_leading

Array = jax.Array


class LayerNormCache(NamedTuple):
    normalized: Array  # xhat
    inverse_std: Array  # 1 / sqrt(var + eps), shape (..., 1)


@dataclasses.dataclass(frozen=True)
class LayerNorm:
    """Normalise the last axis to mean 0, variance 1, then ``scale`` (n,) and ``offset`` (n,); ``eps`` static."""

    scale: Array
    offset: Array
    eps: float = dataclasses.field(default=1e-5, metadata={"static": True})

    def forward(self, a: Array, key: Array | None = None) -> tuple[Array, LayerNormCache]:
        centered = a - jnp.mean(a, axis=-1, keepdims=True)  # a - mu
        variance = jnp.mean(centered * centered, axis=-1, keepdims=True)  # biased
        inverse_std = jax.lax.rsqrt(variance + self.eps)
        normalized = centered * inverse_std  # xhat
        out = normalized * along_last(self.scale, a.ndim) + along_last(self.offset, a.ndim)
        return out, LayerNormCache(normalized, inverse_std)

    def backward(self, cache: LayerNormCache, grad_out: Array) -> tuple[Array, LayerNorm]:
        xhat = cache.normalized
        grad_xhat = grad_out * along_last(self.scale, grad_out.ndim)  # dC/dxhat = g (.) scale
        grad_in = cache.inverse_std * (  # dC/da = (ghat - mean(ghat) - xhat mean(ghat (.) xhat)) / sigma
            grad_xhat
            - jnp.mean(grad_xhat, axis=-1, keepdims=True)
            - xhat * jnp.mean(grad_xhat * xhat, axis=-1, keepdims=True)
        )
        grads = LayerNorm(sum_leading(grad_out * xhat), sum_leading(grad_out), self.eps)  # dC/dscale, dC/doffset
        return grad_in, grads

    def per_example_grads(self, cache: LayerNormCache, grad_out: Array) -> LayerNorm:
        return LayerNorm(sum_inner(grad_out * cache.normalized), sum_inner(grad_out), self.eps)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        for name in ("scale", "offset"):
            leaf = getattr(self, name)
            if getattr(leaf, "ndim", None) != 1:
                raise ValueError(f"{name} must have shape (n,), got {getattr(leaf, 'shape', leaf)}")
            if not input_shape or leaf.shape[0] != input_shape[-1]:
                raise ValueError(
                    f"{name} has {leaf.shape[0]} entries but the layer normalises a last axis of "
                    f"{input_shape[-1] if input_shape else 'nothing'} (per-example shape {tuple(input_shape)})"
                )
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps!r}")
        return tuple(input_shape)

    def __repr__(self) -> str:
        return f"LayerNorm(eps={self.eps})"


jax.tree_util.register_dataclass(LayerNorm)  # scale, offset leaves; eps static


@dataclasses.dataclass(frozen=True)
class LayerNormInit:
    eps: float = 1e-5

    def __repr__(self) -> str:
        # the public builder's call (errors name it, not this class)
        return "pb.layer_norm()" if self.eps == 1e-5 else f"pb.layer_norm(eps={self.eps!r})"

    def init(self, key: Array, input_shape: tuple[int, ...], dtype: np.dtype) -> LayerNorm:
        """scale = 1, offset = 0 (the identity map on normalised inputs)."""
        if not input_shape:
            raise ValueError("layer_norm needs at least one feature axis to normalise")
        n = input_shape[-1]
        return LayerNorm(jnp.ones((n,), dtype=dtype), jnp.zeros((n,), dtype=dtype), self.eps)


def layer_norm(eps: float = 1e-5) -> LayerNormInit:
    """Layer normalisation over the last axis (biased variance, ``eps`` inside the square root)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"layer_norm: eps must be a positive number, got {eps!r}")
    return LayerNormInit(float(eps))


# ---------------------------------------------------------------- its row in the table of layer kinds


def _validate(description: tuple, where: str, validate_inner) -> None:
    if len(description) != 1:
        raise _kinds.malformed(LAYER_NORM_KIND, where, description)


def _draw(description: tuple, shape: tuple, rng: np.random.Generator, dtype, scale: float, draw_inner) -> LayerNorm:
    # scale ~ N(1, 1/16), offset ~ N(0, 1/16): not 1 and 0, so that both parameter paths are exercised
    layer_scale = 1.0 + 0.25 * rng.standard_normal(shape[-1])
    offset = 0.25 * rng.standard_normal(shape[-1])
    return LayerNorm(_kinds.host_array(layer_scale, dtype), _kinds.host_array(offset, dtype))


LAYER_NORM_KIND = _kinds.register_kind(
    _kinds.Kind(
        name="layer_norm",
        type=LayerNorm,
        describe=lambda layer, where, inner: {"eps": _kinds.static_field(layer, "eps", (float, int), where)},
        rebuild=lambda fields, inner: LayerNorm(_kinds.LEAF, _kinds.LEAF, fields["eps"]),
        form="('layer_norm',)",
        validate=_validate,
        shape_after=lambda description, shape: shape,
        draw=_draw,
        notation=lambda description, inner: "ln",
        parse=lambda text, inner: ("layer_norm",) if text == "ln" else None,
        help="ln = layer_norm",
        example=(("layer_norm",), (4,)),
        supports=frozenset({"per_example", "curvature"}),
        builtin=True,
    )
)
