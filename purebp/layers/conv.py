"""The 1-D convolution: z = W * a + b, out = G(z), and the notes' four equations in convolution form.

Batch-first with PyTorch's semantics, so a PyTorch model and its weights port
one to one: a is (N, C_in, L), W is (C_out, C_in, K), b is (C_out,), the
product is a cross-correlation over the input zero-padded by p on both sides,
and the output has length L_out = floor((L + 2p - K) / s) + 1:

    z[n, o, t] = b[o] + sum_{i, k} W[o, i, k] a_pad[n, i, s t + k]

The same chain rule as for a dense layer, with the convolution where the
dense layer has its matrix product (W * . where it has W ., the transposed
convolution W *^T . where it has W^T .):

    (BP1/BP2) delta^l = dC/dz^l = dC/da^l (.) G'(z^l)
    (BP2)     dC/da^{l-1} = W^l *^T delta^l: delta dilated by s, correlated with the
              flipped kernel, input and output channels swapped, the padding undone
    (BP3)     dC/db^l[o] = sum over examples n and positions t of delta^l[n, o, t]
    (BP4)     dC/dW^l[o, i, k] = sum_{n, t} delta^l[n, o, t] a_pad^{l-1}[n, i, s t + k]:
              the correlation of the input with delta

Each product is one matrix product over the input windows u[n, i, k, t] =
a_pad[n, i, s t + k] (``layers/windows.py``): z = W . u, dC/dW = delta . u, and
dC/da adds W^T delta back where each window read (the transposed convolution
written as zero-interleaving pads). On XLA's CPU backend this runs several
times faster inside a ``lax.scan`` training loop than ``lax.conv_general_dilated``
(``experiments/benchmark_conv.py``); reference/DERIVATION.md derives the
transposed form.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from purebp import activations as _activations
from purebp.layers import kinds as _kinds
from purebp.layers.dense import HE_ACTIVATIONS
from purebp.layers.windows import output_length, overlap_add, windows

Array = jax.Array


class ConvCache(NamedTuple):
    """What the backward rule needs: the input windows u (dz/dW = u), z^l and a^l (for G'), the input length."""

    windows: Array  # u[n, i, k, t] = a_pad^{l-1}[n, i, s t + k]
    pre_activation: Array
    activation: Array
    input_length: int


@dataclasses.dataclass(frozen=True)
class Conv1d:
    """z = W * a + b (cross-correlation, zero padding), out = G(z): ``w`` (C_out, C_in, K), ``b`` (C_out,).

    ``stride``, ``padding`` and ``activation`` (a registered elementwise name) are static.
    """

    w: Array
    b: Array
    stride: int = dataclasses.field(default=1, metadata={"static": True})
    padding: int = dataclasses.field(default=0, metadata={"static": True})
    activation: str = dataclasses.field(default="identity", metadata={"static": True})

    def forward(self, a: Array, key: Array | None = None) -> tuple[Array, ConvCache]:
        u = windows(a, self.w.shape[2], self.stride, self.padding)  # u[n, i, k, t] = a_pad[n, i, s t + k]
        pre_activation = jnp.einsum("oik,nikt->not", self.w, u) + self.b[None, :, None]  # z^l = W^l * a^{l-1} + b^l
        activation = _activations.get(self.activation).forward(pre_activation)  # a^l = G(z^l)
        return activation, ConvCache(u, pre_activation, activation, a.shape[2])

    def delta(self, cache: ConvCache, grad_out: Array) -> Array:
        """delta^l = dC/da^l (.) G'(z^l), elementwise over channels and positions."""
        if self.activation == "identity":
            return grad_out
        return _activations.get(self.activation).chain(grad_out, cache.pre_activation, cache.activation)

    def backward(self, cache: ConvCache, grad_out: Array) -> tuple[Array, Conv1d]:
        delta = self.delta(cache, grad_out)  # (BP1)/(BP2) delta^l = dC/da^l (.) G'(z^l)
        # (BP4) dC/dW^l[o, i, k] = sum_{n, t} delta^l[n, o, t] a_pad^{l-1}[n, i, s t + k]: input correlated with delta
        grad_w = jnp.einsum("not,nikt->oik", delta, cache.windows)
        grad_b = jnp.sum(delta, axis=(0, 2))  # (BP3) sum over examples and positions of delta^l
        # (BP2) dC/da^{l-1} = W^l *^T delta^l, the transposed convolution: each window's share W^T delta_t,
        # added back where the window read it (delta dilated by s against the flipped kernel, padding undone)
        grad_windows = jnp.einsum("oik,not->nikt", self.w, delta)
        grad_in = overlap_add(grad_windows, cache.input_length, self.stride, self.padding)
        return grad_in, Conv1d(grad_w, grad_b, self.stride, self.padding, self.activation)

    def per_example_grads(self, cache: ConvCache, grad_out: Array) -> Conv1d:
        delta = self.delta(cache, grad_out)
        # (BP4) and (BP3) for one example: sum over positions of delta[n, o, t] a_pad[n, i, s t + k]
        grad_w = jnp.einsum("not,nikt->noik", delta, cache.windows)
        return Conv1d(grad_w, jnp.sum(delta, axis=2), self.stride, self.padding, self.activation)

    def per_example_squared_norms(self, cache: ConvCache, grad_out: Array) -> Conv1d:
        """||dC^n/dW||^2 and ||dC^n/db||^2 per example, by the cheaper of two exact forms.

        The per-example weight gradient is a sum over positions t of delta_t u_t^T
        (u_t the flattened input window at t), so Goodfellow's rank-one trick does not
        apply. Either form it (N C_out C_in K L_out multiply-adds) and square it, or use
        the Gram form ||sum_t delta_t u_t^T||^2 = sum_{t,t'} (delta_t . delta_t')(u_t . u_t')
        (N L_out^2 (C_out + C_in K)); the choice is static, by those two counts.
        """
        delta = self.delta(cache, grad_out)
        out_channels, in_channels, kernel = self.w.shape
        positions = delta.shape[2]
        windows = cache.windows
        if use_gram_form(out_channels, in_channels, kernel, positions):
            delta_gram = jnp.einsum("not,nou->ntu", delta, delta)  # delta_t . delta_t'
            window_gram = jnp.einsum("nikt,niku->ntu", windows, windows)  # u_t . u_t'
            grad_w_sq = jnp.sum(delta_gram * window_gram, axis=(1, 2))
        else:
            grad_w = self.per_example_grads(cache, grad_out).w  # the same delta: one program after CSE
            grad_w_sq = jnp.sum(grad_w * grad_w, axis=(1, 2, 3))
        grad_b = jnp.sum(delta, axis=2)
        return Conv1d(grad_w_sq, jnp.sum(grad_b * grad_b, axis=1), self.stride, self.padding, self.activation)

    # ---- more from the same pass (purebp.extras.curvature): columns (N, M, C_out, L_out), weights (N, M) or None

    def linear(self) -> Conv1d:
        """The same weights with the identity activation: columns that already hold dC/dz^l."""
        return dataclasses.replace(self, activation="identity")

    def column_deltas(self, cache: ConvCache, columns: Array) -> Array:
        """(BP1)/(BP2) for every column: delta_nm = column_nm (.) G'(z^l_n), shape (N, M, C_out, L_out)."""
        if self.activation == "identity":
            return columns
        # z^l_n and a^l_n broadcast over the M columns of example n
        return _activations.get(self.activation).chain(
            columns, cache.pre_activation[:, None], cache.activation[:, None]
        )

    def backward_columns(self, cache: ConvCache, columns: Array) -> Array:
        """(BP2) for every column: dC^{nm}/da^{l-1} = W^l *^T delta_nm, shape (N, M, C_in, L)."""
        delta = self.column_deltas(cache, columns)
        batch, count = delta.shape[:2]
        grad_windows = jnp.einsum("oik,nmot->nmikt", self.w, delta)
        flat = jnp.reshape(grad_windows, (batch * count,) + grad_windows.shape[2:])
        grad_in = overlap_add(flat, cache.input_length, self.stride, self.padding)
        return jnp.reshape(grad_in, (batch, count) + grad_in.shape[1:])

    def sum_squared_grads(self, cache: ConvCache, columns: Array, weights: Array | None = None) -> Conv1d:
        """sum_{m,n} w_mn (dC^{mn}/dtheta)^2, dC^{mn}/dW[o,i,k] = sum_t delta_mn[o,t] u_n[i,k,t] (BP4).

        The per-column gradient is a sum over positions, so it is either formed
        (M N C_out C_in K L_out multiply-adds) or its square is summed in Gram form,
        sum_{n,t,t'} (sum_m w_mn delta_mn[o,t] delta_mn[o,t']) u_n[i,k,t] u_n[i,k,t']
        (N L_out^2 (M C_out + C_out C_in K)); the cheaper is chosen statically.
        """
        delta = self.column_deltas(cache, columns)
        weighted = delta if weights is None else weights[:, :, None, None] * delta
        u = cache.windows
        _, count, out_channels, positions = delta.shape
        in_channels, kernel = u.shape[1], u.shape[2]
        explicit = count * out_channels * in_channels * kernel * positions
        gram = positions * positions * (count * out_channels + out_channels * in_channels * kernel)
        if gram < explicit:
            delta_gram = jnp.einsum("nmot,nmou->notu", weighted, delta)
            half = jnp.einsum("notu,niku->noikt", delta_gram, u)
            grad_w = jnp.einsum("noikt,nikt->oik", half, u)
        else:
            per_column = jnp.einsum("nmot,nikt->nmoik", delta, u)  # (BP4) for one example and column
            squared = per_column * per_column
            if weights is not None:
                squared = weights[:, :, None, None, None] * squared
            grad_w = jnp.sum(squared, axis=(0, 1))
        per_bias = jnp.sum(delta, axis=3)  # (BP3) for one column and example: sum over positions
        squared_b = per_bias * per_bias if weights is None else weights[:, :, None] * per_bias * per_bias
        return Conv1d(grad_w, jnp.sum(squared_b, axis=(0, 1)), self.stride, self.padding, self.activation)

    def kronecker_factors(self, cache: ConvCache, columns: Array) -> tuple[Array, Array]:
        """(g, a) as BackPACK's KFAC for convolutions: g = sum_{n,m} d_nm d_nm^T, a = (1/N) sum_{n,t} u_nt u_nt^T.

        d_nm = sum_t delta_nm[:, t] is the column's bias gradient (BP3), so the bias block is g
        exactly, as for a dense layer; u_nt is the input window at position t flattened in
        (channel, kernel) order, and kron(g, a) approximates the curvature block of
        ``w.reshape(C_out, -1)`` flattened row-major.
        """
        delta = self.column_deltas(cache, columns)
        summed = jnp.sum(delta, axis=3)  # (BP3) per example and column: sum over positions
        g = jnp.einsum("nmo,nmp->op", summed, summed)
        u = cache.windows
        flat = jnp.reshape(u, (u.shape[0], -1, u.shape[3]))  # (N, C_in K, L_out)
        a = jnp.einsum("nit,njt->ij", flat, flat) / np.asarray(u.shape[0], u.dtype)
        return g, a

    def grad_dot(self, cache: ConvCache, columns: Array, tangent: Conv1d) -> Array:
        """<dC^{mn}/dtheta, tangent> per example and column, (N, M): sum_{o,t} delta_nm[o,t] (V * a_n + v_b)[o,t]."""
        delta = self.column_deltas(cache, columns)
        moved = jnp.einsum("oik,nikt->not", tangent.w, cache.windows) + tangent.b[None, :, None]
        return jnp.einsum("nmot,not->nm", delta, moved)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        w, b = self.w, self.b
        if getattr(w, "ndim", None) != 3 or getattr(b, "ndim", None) != 1:
            raise ValueError(
                f"expected w of shape (C_out, C_in, K) and b of shape (C_out,), got w {getattr(w, 'shape', w)} "
                f"and b {getattr(b, 'shape', b)}"
            )
        if w.shape[0] != b.shape[0]:
            raise ValueError(f"w has {w.shape[0]} output channels but b has {b.shape[0]} entries")
        check_conv_settings(int(w.shape[2]), self.stride, self.padding, self.activation)
        return conv_output_shape(
            input_shape, int(w.shape[1]), int(w.shape[0]), int(w.shape[2]), self.stride, self.padding
        )

    def __repr__(self) -> str:
        if not hasattr(self.w, "shape") or len(self.w.shape) != 3:
            return "Conv1d(...)"
        return (
            f"Conv1d({self.w.shape[0]}, kernel={self.w.shape[2]}, stride={self.stride}, padding={self.padding}, "
            f"{self.activation!r})"
        )


jax.tree_util.register_dataclass(Conv1d)  # w, b leaves; stride, padding, activation static


def use_gram_form(out_channels: int, in_channels: int, kernel: int, positions: int) -> bool:
    """True when the Gram form of a conv layer's per-example squared norm takes fewer multiply-adds."""
    explicit = out_channels * in_channels * kernel * positions
    gram = positions * positions * (out_channels + in_channels * kernel)
    return gram < explicit


def check_conv_settings(kernel: int, stride: int, padding: int, activation: str) -> None:
    """Raise a clear error for a kernel, stride, padding or activation a conv1d layer cannot take."""
    for name, value, least in (("kernel", kernel, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"conv1d: {name} must be an int >= {least}, got {value!r}")
    if not _activations.get(activation).elementwise:
        raise ValueError(
            f"conv1d: activation {activation!r} is not elementwise (it would mix positions); use it on a dense "
            "layer after flatten()"
        )


def conv_output_shape(
    input_shape: tuple[int, ...], in_channels: int | None, out_channels: int, kernel: int, stride: int, padding: int
) -> tuple[int, int]:
    """(C_out, L_out) for per-example inputs (C_in, L); a clear error when they do not fit."""
    input_shape = tuple(input_shape)
    if len(input_shape) != 2:
        hint = (
            f": add the channel axis, input_shape=(1, {input_shape[0]}) and x[:, None, :]"
            if len(input_shape) == 1
            else ""
        )
        raise ValueError(
            f"conv1d takes inputs of shape (N, channels, length) but receives per-example shape {input_shape}{hint}"
        )
    channels, length = input_shape
    if in_channels is not None and channels != in_channels:
        raise ValueError(f"w expects {in_channels} input channels but the layer receives {channels}")
    if kernel > length + 2 * padding:
        raise ValueError(
            f"the kernel ({kernel}) is longer than the padded input (length {length} + 2 x padding {padding} = "
            f"{length + 2 * padding})"
        )
    return (out_channels, output_length(length, kernel, stride, padding))


@dataclasses.dataclass(frozen=True)
class Conv1dInit:
    """``conv1d(channels, kernel, ...)`` before its input channels are known."""

    channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    activation: str = "identity"

    def __repr__(self) -> str:
        # the public builder's call, its defaults left out (errors name it, not this class)
        defaults = {"stride": 1, "padding": 0, "activation": "identity"}
        options = [
            f"{name}={getattr(self, name)!r}" for name, value in defaults.items() if getattr(self, name) != value
        ]
        return f"pb.conv1d({', '.join([str(self.channels), str(self.kernel), *options])})"

    def init(self, key: Array, input_shape: tuple[int, ...], dtype: np.dtype) -> Conv1d:
        """W ~ N(0, s^2), b = 0, with fan-in C_in K: He s = sqrt(2 / fan_in) for rectifier-like G, else Glorot."""
        conv_output_shape(input_shape, None, self.channels, self.kernel, self.stride, self.padding)
        in_channels = int(input_shape[0])
        fan_in, fan_out = in_channels * self.kernel, self.channels * self.kernel
        scale = (2.0 / fan_in) ** 0.5 if self.activation in HE_ACTIVATIONS else (2.0 / (fan_in + fan_out)) ** 0.5
        dtype = np.dtype(dtype)
        draw = dtype if dtype.itemsize >= 4 else np.dtype("float32")  # 16-bit: draw in float32, round once
        w = (scale * jax.random.normal(key, (self.channels, in_channels, self.kernel), dtype=draw)).astype(dtype)
        return Conv1d(w, jnp.zeros((self.channels,), dtype=dtype), self.stride, self.padding, self.activation)


def conv1d(
    channels: int, kernel: int, *, stride: int = 1, padding: int = 0, activation: str = "identity"
) -> Conv1dInit:
    """A 1-D convolution with ``channels`` output channels, as ``torch.nn.Conv1d(C_in, channels, kernel, ...)``."""
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels <= 0:
        raise ValueError(f"conv1d: channels must be a positive int, got {channels!r}")
    check_conv_settings(kernel, stride, padding, activation)
    return Conv1dInit(int(channels), int(kernel), int(stride), int(padding), activation)


# ---------------------------------------------------------------- its row in the table of layer kinds


def _validate(description: tuple, where: str, validate_inner) -> None:
    arguments = description[1:]
    counts = _kinds.positive_ints(arguments[:4], (1, 1, 1, 0))
    if len(arguments) != 5 or not counts or not isinstance(arguments[4], str):
        raise _kinds.malformed(CONV1D_KIND, where, description)
    _activations.get(arguments[4])


def _notation(description: tuple, notate_inner) -> str:
    _, channels, kernel, stride, padding, activation = description
    return f"c{channels}k{kernel}s{stride}p{padding}{_kinds.activation_code(activation)}"


def _parse(text: str, parse_inner) -> tuple | None:
    match = re.fullmatch(r"c(\d+)k(\d+)s(\d+)p(\d+)(.*)", text)
    activation = match and _kinds.activation_named(match[5])
    return None if activation is None else ("conv1d", *(int(match[i]) for i in range(1, 5)), activation)


def _shape_after(description: tuple, shape: tuple) -> tuple:
    _, channels, kernel, stride, padding, _ = description
    return (channels, (shape[-1] + 2 * padding - kernel) // stride + 1)


def _draw(description: tuple, shape: tuple, rng: np.random.Generator, dtype, scale: float, draw_inner) -> Conv1d:
    # W ~ N(0, scale^2 / (C_in K)), b ~ N(0, 1/4)
    _, channels, kernel, stride, padding, activation = description
    w = scale * rng.standard_normal((channels, shape[0], kernel)) / np.sqrt(shape[0] * kernel)
    b = 0.5 * rng.standard_normal(channels)
    return Conv1d(_kinds.host_array(w, dtype), _kinds.host_array(b, dtype), stride, padding, activation)


def _describe(layer: Conv1d, where: str, describe_inner) -> dict:
    return {
        "activation": _kinds.static_field(layer, "activation", (str,), where),
        "channels": int(np.shape(layer.w)[0]),
        "kernel": int(np.shape(layer.w)[2]),
        "stride": _kinds.static_field(layer, "stride", (int,), where),
        "padding": _kinds.static_field(layer, "padding", (int,), where),
    }


CONV1D_KIND = _kinds.register_kind(
    _kinds.Kind(
        name="conv1d",
        type=Conv1d,
        describe=_describe,
        rebuild=lambda fields, inner: Conv1d(
            _kinds.LEAF, _kinds.LEAF, fields["stride"], fields["padding"], fields["activation"]
        ),
        form="('conv1d', channels >= 1, kernel >= 1, stride >= 1, padding >= 0, activation)",
        validate=_validate,
        shape_after=_shape_after,
        draw=_draw,
        notation=_notation,
        parse=_parse,
        help="in2x9 = 2 channels of length 9; c3k5s2p1r = conv1d(3, kernel 5, stride 2, padding 1, relu)",
        example=(("conv1d", 2, 3, 2, 1, "tanh"), (2, 7)),
        supports=frozenset({"per_example", "curvature", "diag_hessian", "kronecker"}),
        builtin=True,
    )
)
