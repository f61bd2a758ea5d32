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

import jax
import jax.numpy as jnp
import numpy as np

from purebp.layers.conv import output_length

Array = jax.Array


def window_stack(a: Array, kernel: int, stride: int) -> Array:
    """u[n, c, t, j] = a[n, c, s t + j], shape (N, C, L_out, k): k strided slices, no gather."""
    positions = output_length(a.shape[-1], kernel, stride)
    span = stride * (positions - 1) + 1
    return jnp.stack([a[..., j : j + span : stride] for j in range(kernel)], axis=-1)


def scatter_windows(window_grads: Array, length: int, stride: int) -> Array:
    """The adjoint of ``window_stack``: g[n, c, s t + j] += window_grads[n, c, t, j], shape (N, C, L)."""
    positions, kernel = window_grads.shape[-2:]
    span = stride * (positions - 1) + 1
    grad_in = jnp.zeros(window_grads.shape[:-2] + (length,), window_grads.dtype)
    for j in range(kernel):
        grad_in = grad_in.at[..., j : j + span : stride].add(window_grads[..., j])
    return grad_in


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
        windows = window_stack(a, self.kernel, self.stride)
        argmax = jnp.argmax(windows, axis=-1)[..., None]  # the first maximum of each window
        out = jnp.take_along_axis(windows, argmax, axis=-1)[..., 0]  # out = max_j a[s t + j]
        return out, (argmax, a.shape[-1])

    def backward(self, cache: tuple, grad_out: Array) -> tuple[Array, MaxPool1d]:
        argmax, length = cache
        positions = jnp.reshape(jnp.arange(self.kernel), (1,) * (argmax.ndim - 1) + (self.kernel,))
        routed = jnp.where(positions == argmax, grad_out[..., None], jnp.zeros((), grad_out.dtype))  # to the arg-max
        return scatter_windows(routed, length, self.stride), self

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
        windows = window_stack(a, self.kernel, self.stride)
        return jnp.sum(windows, axis=-1) / np.asarray(self.kernel, a.dtype), a.shape[-1]  # (1/k) sum_j a[s t + j]

    def backward(self, length: int, grad_out: Array) -> tuple[Array, AvgPool1d]:
        share = grad_out / np.asarray(self.kernel, grad_out.dtype)  # each position of a window gets dC/d(out) / k
        spread = jnp.broadcast_to(share[..., None], share.shape + (self.kernel,))
        return scatter_windows(spread, length, self.stride), self

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
