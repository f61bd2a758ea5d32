"""1-D max and average pooling over the length axis, and their backward rules: route or spread delta.

Batch-first (N, C, L) with PyTorch's semantics (no padding, floor mode): window t
covers positions s t .. s t + k - 1 and the output has floor((L - k) / s) + 1
positions. ``stride=None`` means stride = kernel, as in PyTorch.

- max: out[n, c, t] = max_j a[n, c, s t + j]. The backward rule routes
  dC/d(out) to the arg-max of each window; on ties, to the first maximum
  (PyTorch's choice). The forward is written as a gather at that arg-max, so
  autodiff of it (the witness in check.py) routes ties the same way.
- average: out[n, c, t] = (1/k) sum_j a[n, c, s t + j]. The backward rule spreads
  dC/d(out) / k over the window; overlapping windows (s < k) add up.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from purebp.layers import kinds as _kinds
from purebp.layers.windows import output_length, overlap_add, windows

Array = jax.Array


def _check_pool(name: str, kernel: object, stride: object) -> None:
    for what, value in (("kernel", kernel), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: {what} must be an int >= 1, got {value!r}")


def _pool_output_shape(name: str, input_shape: tuple[int, ...], kernel: int, stride: int) -> tuple[int, int]:
    _check_pool(name, kernel, stride)
    input_shape = tuple(input_shape)
    if len(input_shape) != 2:
        raise ValueError(
            f"{name} takes inputs of shape (N, channels, length) but receives per-example shape {input_shape}"
        )
    channels, length = input_shape
    if kernel > length:
        raise ValueError(f"the pooling window ({kernel}) is longer than the input (length {length})")
    return (channels, output_length(length, kernel, stride))


@dataclasses.dataclass(frozen=True)
class MaxPool1d:
    """The maximum over windows of ``kernel`` positions, every ``stride`` positions (both static). No parameters."""

    kernel: int = dataclasses.field(metadata={"static": True})
    stride: int = dataclasses.field(metadata={"static": True})

    def forward(self, a: Array, key: Array | None = None) -> tuple[Array, Array]:
        u = windows(a, self.kernel, self.stride)  # u[n, c, j, t] = a[n, c, s t + j]
        argmax = jnp.argmax(u, axis=2)[:, :, None, :]  # the first maximum of each window
        out = jnp.take_along_axis(u, argmax, axis=2)[:, :, 0, :]  # out = max_j a[s t + j]
        return out, (argmax, a.shape[-1])

    def backward(self, cache: tuple, grad_out: Array) -> tuple[Array, MaxPool1d]:
        argmax, length = cache
        offsets = jnp.reshape(jnp.arange(self.kernel), (1, 1, self.kernel, 1))
        routed = jnp.where(offsets == argmax, grad_out[:, :, None, :], jnp.zeros((), grad_out.dtype))  # to the arg-max
        return overlap_add(routed, length, self.stride), self

    def per_example_grads(self, cache: tuple, grad_out: Array) -> MaxPool1d:
        return self

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return _pool_output_shape("max_pool1d", input_shape, self.kernel, self.stride)

    def __repr__(self) -> str:
        return f"MaxPool1d({self.kernel}, stride={self.stride})"


@dataclasses.dataclass(frozen=True)
class AvgPool1d:
    """The mean over windows of ``kernel`` positions, every ``stride`` positions (both static). No parameters."""

    kernel: int = dataclasses.field(metadata={"static": True})
    stride: int = dataclasses.field(metadata={"static": True})

    def forward(self, a: Array, key: Array | None = None) -> tuple[Array, int]:
        u = windows(a, self.kernel, self.stride)
        return jnp.sum(u, axis=2) / np.asarray(self.kernel, a.dtype), a.shape[-1]  # (1/k) sum_j a[s t + j]

    def backward(self, length: int, grad_out: Array) -> tuple[Array, AvgPool1d]:
        share = grad_out / np.asarray(self.kernel, grad_out.dtype)  # each position of a window gets dC/d(out) / k
        spread = jnp.broadcast_to(share[:, :, None, :], share.shape[:2] + (self.kernel,) + share.shape[2:])
        return overlap_add(spread, length, self.stride), self

    def per_example_grads(self, cache: int, grad_out: Array) -> AvgPool1d:
        return self

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return _pool_output_shape("avg_pool1d", input_shape, self.kernel, self.stride)

    def __repr__(self) -> str:
        return f"AvgPool1d({self.kernel}, stride={self.stride})"


jax.tree_util.register_dataclass(MaxPool1d)  # no leaves; kernel, stride static
jax.tree_util.register_dataclass(AvgPool1d)


def max_pool1d(kernel: int, stride: int | None = None) -> MaxPool1d:
    """Max pooling over ``kernel`` positions every ``stride`` (default: ``kernel``), as ``torch.nn.MaxPool1d``."""
    stride = kernel if stride is None else stride
    _check_pool("max_pool1d", kernel, stride)
    return MaxPool1d(int(kernel), int(stride))


def avg_pool1d(kernel: int, stride: int | None = None) -> AvgPool1d:
    """Average pooling over ``kernel`` positions every ``stride`` (default: ``kernel``), as ``torch.nn.AvgPool1d``."""
    stride = kernel if stride is None else stride
    _check_pool("avg_pool1d", kernel, stride)
    return AvgPool1d(int(kernel), int(stride))


# ---------------------------------------------------------------- their rows in the table of layer kinds


def _pool_kind(name: str, layer_type: type, letter: str, what: str) -> _kinds.Kind:
    def validate(description: tuple, where: str, validate_inner) -> None:
        if not _kinds.positive_ints(description[1:], (1, 1)):
            raise _kinds.malformed(row, where, description)

    def parse(text: str, parse_inner) -> tuple | None:
        match = re.fullmatch(letter + r"p(\d+)s(\d+)", text)
        return None if match is None else (name, int(match[1]), int(match[2]))

    row = _kinds.Kind(
        name=name,
        type=layer_type,
        describe=lambda layer, where, inner: {
            "kernel": _kinds.static_field(layer, "kernel", (int,), where),
            "stride": _kinds.static_field(layer, "stride", (int,), where),
        },
        rebuild=lambda fields, inner: layer_type(kernel=fields["kernel"], stride=fields["stride"]),
        form=f"('{name}', kernel >= 1, stride >= 1)",
        validate=validate,
        shape_after=lambda description, shape: (shape[0], (shape[-1] - description[1]) // description[2] + 1),
        draw=lambda description, shape, rng, dtype, scale, inner: layer_type(description[1], description[2]),
        notation=lambda description, inner: f"{letter}p{description[1]}s{description[2]}",
        parse=parse,
        help=f"{letter}p2s1 = {what} pool (kernel 2, stride 1)",
        example=((name, 2, 1), (2, 5)),
        supports=frozenset({"per_example", "curvature", "diag_hessian", "kronecker"}),
        builtin=True,
    )
    return _kinds.register_kind(row)


MAX_POOL1D_KIND = _pool_kind("max_pool1d", MaxPool1d, "m", "max")
AVG_POOL1D_KIND = _pool_kind("avg_pool1d", AvgPool1d, "a", "avg")
