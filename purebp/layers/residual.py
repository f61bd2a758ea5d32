"""The residual block, out = a + F(a): the chain rule's Case 2.

a feeds two paths, the identity and the body F, so dC/da is the sum of what
comes back along both: dC/da = dC/d(out) + (the body's backward of dC/d(out)).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from purebp.layers import kinds as _kinds
from purebp.layers.base import layer_keys, per_example_squared_norms

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Residual:
    """out = a + F(a), F = ``layers`` applied in order; F must keep the shape of a."""

    layers: tuple

    def forward(self, a: Array, key: Array | None = None) -> tuple[Array, tuple]:
        hidden, caches = a, []
        for index, layer in enumerate(self.layers):
            hidden, cache = layer.forward(hidden, layer_keys(key, index))
            caches.append(cache)
        if hidden.shape != a.shape:
            raise ValueError(f"residual: the body maps shape {a.shape} to {hidden.shape}; a + F(a) needs the same")
        return a + hidden, tuple(caches)  # out = a + F(a)

    def body_backward(self, caches: tuple, grad_out: Array) -> tuple[Array, list, list]:
        """Run the body F backward from dC/d(out); return (F's dC/da, its layers' grads, what each body layer got)."""
        grad, grads, grad_outs = grad_out, [None] * len(self.layers), [None] * len(self.layers)
        for index in reversed(range(len(self.layers))):
            grad_outs[index] = grad
            grad, grads[index] = self.layers[index].backward(caches[index], grad)
        return grad, grads, grad_outs

    def backward(self, caches: tuple, grad_out: Array) -> tuple[Array, Residual]:
        grad_body, grads, _ = self.body_backward(caches, grad_out)
        grad_in = grad_out + grad_body  # Case 2: dC/da = dC/d(out) (identity path) + F's backward (body path)
        return grad_in, Residual(tuple(grads))

    def per_example_grads(self, caches: tuple, grad_out: Array) -> Residual:
        _, _, grad_outs = self.body_backward(caches, grad_out)
        return Residual(tuple(layer.per_example_grads(c, g) for layer, c, g in zip(self.layers, caches, grad_outs)))

    def per_example_squared_norms(self, caches: tuple, grad_out: Array) -> Residual:
        # the block's parameters are its body's, so its squared norm is the sum of the body layers' squared
        # norms, each computed by that layer's own rule (Goodfellow's trick for a dense body layer)
        _, _, grad_outs = self.body_backward(caches, grad_out)
        return Residual(
            tuple(per_example_squared_norms(layer, c, g) for layer, c, g in zip(self.layers, caches, grad_outs))
        )

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        from purebp.layers.shapes import output_shape  # the generic walk, shared with Sequential

        shape = tuple(input_shape)
        for index, layer in enumerate(self.layers):
            try:
                shape = output_shape(layer, shape)
            except (ValueError, TypeError) as error:
                raise type(error)(f"body layer {index} ({layer!r}): {error}") from None
        if shape != tuple(input_shape):
            raise ValueError(
                f"the body maps per-example shape {tuple(input_shape)} to {shape}; a + F(a) needs F to keep the shape"
            )
        return shape

    def __repr__(self) -> str:
        return f"Residual({', '.join(map(repr, self.layers))})"


jax.tree_util.register_dataclass(Residual)  # the body layers' leaves


@dataclasses.dataclass(frozen=True)
class ResidualInit:
    body: tuple

    def __repr__(self) -> str:
        # the public builder's call with its body's reprs (errors name it, not this class)
        return f"pb.residual({', '.join(map(repr, self.body))})"

    def init(self, key: Array, input_shape: tuple[int, ...], dtype: np.dtype) -> Residual:
        from purebp.layers.shapes import init_stack

        layers, shape = init_stack(key, tuple(input_shape), self.body, dtype)
        if shape != tuple(input_shape):
            raise ValueError(
                f"residual: its body maps per-example shape {tuple(input_shape)} to {shape}; "
                "a + F(a) needs F to keep the shape"
            )
        return Residual(layers)


def residual(*layers: object) -> ResidualInit:
    """A residual block a + F(a), F the given layers in order (builders or initialised layers)."""
    if not layers:
        raise ValueError("residual() needs at least one layer for its body F")
    return ResidualInit(tuple(layers))


# ---------------------------------------------------------------- its row in the table of layer kinds


def _validate(description: tuple, where: str, validate_inner) -> None:
    arguments = description[1:]
    if len(arguments) != 1 or not isinstance(arguments[0], tuple) or not arguments[0]:
        raise _kinds.malformed(RESIDUAL_KIND, where, description)
    for index, inner in enumerate(arguments[0]):
        validate_inner(inner, f"{where} body[{index}]")


def _parse(text: str, parse_inner) -> tuple | None:
    if not (text.startswith("r(") and text.endswith(")")):
        return None
    return ("residual", parse_inner(text[2:-1]))


def _draw(description: tuple, shape: tuple, rng: np.random.Generator, dtype, scale: float, draw_inner) -> Residual:
    # a + F(a) adds the body's variance to the input's: a body scaled by 1/sqrt(2) keeps deep stacks of blocks
    # out of sigmoid/tanh saturation
    return Residual(tuple(draw_inner(description[1], shape, scale / np.sqrt(2.0))))


def _describe(layer: Residual, where: str, describe_inner) -> dict:
    if not isinstance(layer.layers, tuple):
        raise TypeError(f"{where}: layers is a {type(layer.layers).__name__}; a checkpoint needs a tuple of layers")
    return {"layers": [describe_inner(item, f"{where}.layers[{i}]") for i, item in enumerate(layer.layers)]}


RESIDUAL_KIND = _kinds.register_kind(
    _kinds.Kind(
        name="residual",
        type=Residual,
        describe=_describe,
        rebuild=lambda fields, inner: Residual(tuple(inner(item, i) for i, item in enumerate(fields["layers"]))),
        form="('residual', (body description, ...))",
        validate=_validate,
        shape_after=lambda description, shape: shape,
        draw=_draw,
        notation=lambda description, inner: "r(" + ",".join(inner(item) for item in description[1]) + ")",
        parse=_parse,
        help="r(...) = residual a + F(a), its body inside",
        example=(("residual", (("dense", 3, "tanh"), ("layer_norm",))), (3,)),
        # a block supports what its body supports (the curvature rules walk into it); rules take no blocks
        supports=frozenset({"per_example", "curvature", "diag_hessian", "kronecker"}),
        builtin=True,
    )
)
