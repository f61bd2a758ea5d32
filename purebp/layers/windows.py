"""Sliding windows over the length axis, and their adjoint: what conv1d and the pooling layers share.

``windows(a, K, s, p)[n, c, k, t] = a_pad[n, c, s t + k]`` (one gather from the
zero-padded input at a static index) turns a 1-D convolution into one matrix product per layer
(z = W . u), and ``overlap_add`` is its transpose, g[n, c, s t + k - p] +=
window_grads[n, c, k, t], written as K zero-interleaving pads, so dC/da of a
convolution and of a pooling layer is a sum of pads. On XLA's CPU backend these
products run several times faster inside a ``lax.scan`` training loop than
``lax.conv_general_dilated`` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def output_length(length: int, kernel: int, stride: int, padding: int = 0) -> int:
    """floor((L + 2p - K) / s) + 1, PyTorch's output length (no dilation)."""
    return (length + 2 * padding - kernel) // stride + 1


def windows(a: Array, kernel: int, stride: int, padding: int = 0) -> Array:
    """u[n, c, k, t] = a_pad[n, c, s t + k], shape (N, C, K, L_out), a_pad zero-padded by p on both sides."""
    padded = jnp.pad(a, ((0, 0), (0, 0), (padding, padding))) if padding else a
    positions = output_length(a.shape[2], kernel, stride, padding)
    # one gather with a static (K, L_out) index: faster on XLA's CPU backend than K strided slices stacked
    index = np.arange(kernel)[:, None] + stride * np.arange(positions)[None, :]
    return padded[:, :, index]


def overlap_add(window_grads: Array, length: int, stride: int, padding: int = 0) -> Array:
    """The adjoint of ``windows``: g[n, c, l] = sum over (k, t) with s t + k - p = l of window_grads[n, c, k, t].

    Row k of the windows sits at padded positions k, k + s, ..., so it goes back
    by one pad: s - 1 zeros between its entries, k - p before (a negative pad
    crops the zero padding, which gets no gradient) and the rest after.
    """
    kernel, positions = window_grads.shape[2], window_grads.shape[3]
    span = stride * (positions - 1) + 1
    zero = jnp.zeros((), window_grads.dtype)
    total = None
    for k in range(kernel):
        low = k - padding
        high = length - low - span
        placed = jax.lax.pad(window_grads[:, :, k, :], zero, ((0, 0, 0), (0, 0, 0), (low, high, stride - 1)))
        total = placed if total is None else total + placed
    return total
