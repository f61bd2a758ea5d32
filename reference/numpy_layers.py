"""Oracle (d): forward and backward passes of layer stacks (dense, residual, layer norm, dropout, 1-D convolution,
pooling, flatten) in NumPy float64.

Shares no code with purebp. Batch-first, as purebp's code: the network input x is (N, n_0), a row per example, or
(N, C, L) (channels, length) for the 1-D convolution and pooling layers; a layer's input ``a`` may have any shape
whose last axis is the feature axis (dense layers need (N, n); layer norm and dropout take (N, C, L) too, layer
norm normalising the last, length, axis). A stack is a list of plain dicts:

- ``{"kind": "dense", "w": (n_out, n_in), "b": (n_out,), "activation": name}``:
  z = a W^T + b, out = G(z). G is identity, sigmoid, tanh, relu, leaky_relu (slope 0.01), elu (alpha 1),
  softplus, gelu (exact: z Phi(z)) or softmax (over the last axis, allowed on any layer here).
- ``{"kind": "residual", "layers": [...]}``: out = a + F(a), F the nested stack, which must keep the shape.
- ``{"kind": "layer_norm", "scale": (n,), "offset": (n,), "eps": e}``: over the last axis, with the biased
  variance, mu = mean_j a_j, sigma = sqrt(mean_j (a_j - mu)^2 + e), xhat = (a - mu) / sigma,
  out = xhat (.) scale + offset.
- ``{"kind": "dropout", "rate": r, "mask": m}``: inverted dropout, out = a (.) m / (1 - r) with m a 0/1 keep-mask of
  the input's shape; with no mask (``None`` or absent) the layer is the identity (inference).
- ``{"kind": "conv1d", "w": (C_out, C_in, K), "b": (C_out,), "stride": s, "padding": p, "activation": name}`` on
  a (N, C_in, L): cross-correlation (torch.nn.functional.conv1d) of the input zero-padded by p on both sides,
  a_pad (N, C_in, L + 2p), z[n,o,t] = b[o] + sum_{i,k} w[o,i,k] a_pad[n,i,t s + k] for t < T =
  floor((L + 2p - K) / s) + 1, out = G(z) (N, C_out, T) with G elementwise (any activation above but softmax).
  s >= 1 and p >= 0 are ints; K <= L + 2p.
- ``{"kind": "max_pool1d", "kernel": k, "stride": s}`` on (N, C, L), no padding (torch's max_pool1d):
  out[n,c,t] = max_{0 <= j < k} a[n,c,t s + j], T = floor((L - k) / s) + 1, k <= L. Ties: the FIRST maximum of a
  window (smallest j) is the one selected, and it alone receives the gradient (PyTorch's choice).
- ``{"kind": "avg_pool1d", "kernel": k, "stride": s}``: out[n,c,t] = 1/k sum_{0 <= j < k} a[n,c,t s + j], same T.
- ``{"kind": "flatten"}``: (N, d_1, ..., d_r) -> (N, d_1 ... d_r) row-major, so (N, C, L) -> (N, C L) with index
  c L + l (torch.flatten(x, 1)); a 2-D input passes unchanged.

Costs on the final output a, which must be 2-D (N, n_out) (end a convolutional stack with a flatten), and the
last dense layer's pre-activation z where the cost needs it, per example C^n, then L = sum_n C^n
(``reduction="sum"``) or L = 1/N sum_n C^n (``"mean"``):

- ``mse``: C = 1/2 sum_j (a_j - y_j)^2 on any output; dC/da = a - y.
- ``cross_entropy``: C = -sum_j y_j log a_j, the last layer dense softmax; dC/da_j = -y_j / a_j.
- ``softmax_cross_entropy``: C = -sum_j y_j log softmax(a)_j, the output taken as logits whatever the last
  layer is; dC/da = softmax(a) sum_j y_j - y (the derivative with respect to the logits a themselves).
- ``binary_cross_entropy``: C = -sum_j [y_j log a_j + (1 - y_j) log(1 - a_j)], the last layer dense sigmoid;
  dC/da_j = -(y_j / a_j - (1 - y_j) / (1 - a_j)).

Integer labels (N,) become one-hot rows for the two cross-entropies. For a sum over examples the per-example
costs are not summed here before differentiating: dL/da = s dC/da row by row, s = 1 (sum) or 1/N (mean).

The backward pass, in the notes' notation (BP1-BP4), batch-first: each layer receives dC/d(out) and returns
dC/d(in), with its parameter gradients.

- output: dC/da^L is formed first, never fused with the output activation; for a dense output layer
  delta^L = dC/da (.) G'(z^L) (BP1), softmax through its full Jacobian per example, delta^L = J(z^L)^T dC/da,
  J_ij = a_i (delta_ij - a_j).
- dense: delta^l = dC/da^l (.) G'(z^l) with G' written from z (textbook formulas), and dC/da^l =
  (W^{l+1})^T delta^{l+1} handed down by the layer above, so delta^l = ((W^{l+1})^T delta^{l+1}) (.) G'(z^l)
  (BP2) when two dense layers meet; dC/db = sum_n delta (BP3); dC/dW = delta^T a_prev, (n_out, n_in) (BP4);
  dC/d(in) = delta W.
- residual (the chain rule's Case 2, two paths from a to C): dC/da = dC/d(out) + F's backward of dC/d(out).
- layer norm: g = dC/d(out) (.) scale is dC/dxhat; dC/da = J^T g per example, with the full Jacobian
  d xhat_i / d a_j = (delta_ij - 1/n) / sigma - (a_i - mu)(a_j - mu) / (n sigma^3) (``layer_norm_jacobian``);
  dC/dscale = sum over every leading axis of dC/d(out) (.) xhat, dC/doffset = the same sum of dC/d(out).
- dropout: dC/d(in) = dC/d(out) (.) m / (1 - r); no parameters.
- conv1d, loops over the output positions t: delta = dC/dz = dC/d(out) (.) G'(z); dC/da_pad[n,i,t s + k] +=
  sum_o delta[n,o,t] w[o,i,k], then dC/da = dC/da_pad with the p padded positions cropped from each side
  (``conv1d_input_gradient``); dC/dw[o,i,k] = sum_{n,t} delta[n,o,t] a_pad[n,i,t s + k] and dC/db[o] =
  sum_{n,t} delta[n,o,t] (``conv1d_parameter_gradients``). The input gradient is a transposed convolution
  (reference/DERIVATION.md section 7); it is computed here straight from the chain rule, not in that form.
- max_pool1d: dC/da[n,c,t s + j*] += dC/d(out)[n,c,t], j* the first maximum of window t; other positions get 0.
- avg_pool1d: dC/da[n,c,t s + j] += dC/d(out)[n,c,t] / k for every j < k (overlapping windows, s < k, add up).
- flatten: dC/d(in) = dC/d(out) reshaped back to the input's shape.

Gradients come back with the structure of ``layers``: dense -> {"w", "b"}, layer_norm -> {"scale", "offset"},
residual -> {"layers": [...]}, dropout -> {}, conv1d -> {"w", "b"}, max_pool1d, avg_pool1d, flatten -> {}.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LEAKY_SLOPE = 0.01
ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "softplus", "gelu", "softmax")
LOSSES = ("mse", "cross_entropy", "softmax_cross_entropy", "binary_cross_entropy")
REDUCTIONS = ("mean", "sum")
KINDS = ("dense", "residual", "layer_norm", "dropout", "conv1d", "max_pool1d", "avg_pool1d", "flatten")
# the last layer each cost needs: (kind, activation); None: any layer
_OUTPUT_LAYER = {
    "mse": None,
    "cross_entropy": ("dense", "softmax"),
    "softmax_cross_entropy": None,
    "binary_cross_entropy": ("dense", "sigmoid"),
}

_erf = np.vectorize(math.erf, otypes=[np.float64])


# ---------------------------------------------------------------- activations, from z


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # split by sign so that exp never overflows
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - np.max(z, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - np.max(z, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))


def activation(name: str, z: np.ndarray) -> np.ndarray:
    """G(z); softmax over the last axis."""
    if name == "identity":
        return z.copy()
    if name == "sigmoid":
        return _sigmoid(z)
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.where(z > 0, z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, LEAKY_SLOPE * z)
    if name == "elu":
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0.0)))
    if name == "softplus":
        return np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))
    if name == "gelu":
        return z * _normal_cdf(z)
    if name == "softmax":
        return _softmax(z)
    raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(ACTIVATIONS)}")


def activation_derivative(name: str, z: np.ndarray) -> np.ndarray:
    """G'(z) elementwise, from z (softmax is not elementwise: see ``softmax_jacobian``).

    At the kinks the values are purebp's: relu'(0) = 0, leaky_relu'(0) = 0.01, elu'(0) = 1.
    """
    if name == "identity":
        return np.ones_like(z)
    if name == "sigmoid":
        s = _sigmoid(z)
        return s * (1.0 - s)
    if name == "tanh":
        return 1.0 - np.tanh(z) ** 2
    if name == "relu":
        return np.where(z > 0, 1.0, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, LEAKY_SLOPE)
    if name == "elu":
        return np.where(z > 0, 1.0, np.exp(np.minimum(z, 0.0)))
    if name == "softplus":
        return _sigmoid(z)
    if name == "gelu":
        # d/dz [z Phi(z)] = Phi(z) + z phi(z)
        return _normal_cdf(z) + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    raise ValueError(f"activation {name!r} has no elementwise derivative")


def softmax_jacobian(z_row: np.ndarray) -> np.ndarray:
    """J_ij = d softmax(z)_i / d z_j = a_i (delta_ij - a_j) for one example's z (n,)."""
    a = _softmax(z_row)
    return np.diag(a) - np.outer(a, a)


def layer_norm_jacobian(a_row: np.ndarray, eps: float) -> np.ndarray:
    """d xhat_i / d a_j = (delta_ij - 1/n) / sigma - (a_i - mu)(a_j - mu) / (n sigma^3) for one example's a (n,)."""
    n = a_row.shape[0]
    centred = a_row - np.mean(a_row)
    sigma = math.sqrt(float(np.mean(centred * centred)) + eps)
    return (np.eye(n) - np.full((n, n), 1.0 / n)) / sigma - np.outer(centred, centred) / (n * sigma**3)


# ---------------------------------------------------------------- 1-D convolution and pooling, loops over t


def conv1d_pre_activation(a_pad: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """z[n,o,t] = b[o] + sum_{i,k} w[o,i,k] a_pad[n,i,t s + k] for the padded input a_pad (N, C_in, L_pad)."""
    kernel = w.shape[2]
    length = (a_pad.shape[2] - kernel) // stride + 1
    z = np.empty((a_pad.shape[0], w.shape[0], length))
    for t in range(length):
        window = a_pad[:, :, t * stride : t * stride + kernel]  # (N, C_in, K)
        z[:, :, t] = np.einsum("nik,oik->no", window, w) + b[None, :]
    return z


def conv1d_input_gradient(delta: np.ndarray, w: np.ndarray, stride: int, padding: int, length: int) -> np.ndarray:
    """dC/da (N, C_in, L) from delta = dC/dz (N, C_out, T): dC/da_pad[n,i,t s + k] += sum_o delta[n,o,t] w[o,i,k],
    then the p padded positions cropped from each side (positions of a_pad no window reaches get 0)."""
    kernel = w.shape[2]
    grad_pad = np.zeros((delta.shape[0], w.shape[1], length + 2 * padding))
    for t in range(delta.shape[2]):
        grad_pad[:, :, t * stride : t * stride + kernel] += np.einsum("no,oik->nik", delta[:, :, t], w)
    return grad_pad[:, :, padding : padding + length]


def conv1d_parameter_gradients(delta: np.ndarray, a_pad: np.ndarray, kernel: int, stride: int):
    """(dC/dw, dC/db): dC/dw[o,i,k] = sum_{n,t} delta[n,o,t] a_pad[n,i,t s + k], dC/db[o] = sum_{n,t} delta[n,o,t]."""
    grad_w = np.zeros((delta.shape[1], a_pad.shape[1], kernel))
    for t in range(delta.shape[2]):
        grad_w += np.einsum("no,nik->oik", delta[:, :, t], a_pad[:, :, t * stride : t * stride + kernel])
    return grad_w, np.sum(delta, axis=(0, 2))


def max_pool1d_argmax(a: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """j*[n,c,t]: the offset in window t of its FIRST maximum (np.argmax returns the first occurrence)."""
    length = (a.shape[2] - kernel) // stride + 1
    chosen = np.empty((a.shape[0], a.shape[1], length), dtype=np.intp)
    for t in range(length):
        chosen[:, :, t] = np.argmax(a[:, :, t * stride : t * stride + kernel], axis=2)
    return chosen


def max_pool1d_input_gradient(grad_out: np.ndarray, chosen: np.ndarray, stride: int, length: int) -> np.ndarray:
    """dC/da[n,c,t s + j*] += dC/d(out)[n,c,t]: only the selected (first maximal) element of a window has
    d out / d a = 1, every other has 0."""
    grad_in = np.zeros(grad_out.shape[:2] + (length,))
    rows, channels = np.indices(grad_out.shape[:2])
    for t in range(grad_out.shape[2]):
        grad_in[rows, channels, t * stride + chosen[:, :, t]] += grad_out[:, :, t]
    return grad_in


def avg_pool1d_input_gradient(grad_out: np.ndarray, kernel: int, stride: int, length: int) -> np.ndarray:
    """dC/da[n,c,t s + j] += dC/d(out)[n,c,t] / k for j < k; overlapping windows (s < k) add up."""
    grad_in = np.zeros(grad_out.shape[:2] + (length,))
    for t in range(grad_out.shape[2]):
        grad_in[:, :, t * stride : t * stride + kernel] += grad_out[:, :, t, None] / kernel
    return grad_in


# ---------------------------------------------------------------- checks


def _as_float(value, what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise TypeError(f"{what} must be a numeric array, got {type(value).__name__} of dtype {array.dtype}")
    if np.iscomplexobj(array):
        raise TypeError(f"{what} must be real, got dtype {array.dtype}")
    return array.astype(np.float64)


def _check_layer(layer, where: str) -> str:
    if not isinstance(layer, dict):
        raise TypeError(f"{where} must be a dict describing a layer, got {type(layer).__name__}")
    kind = layer.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where} has kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    required = {
        "dense": ("w", "b", "activation"),
        "residual": ("layers",),
        "layer_norm": ("scale", "offset", "eps"),
        "dropout": ("rate",),
        "conv1d": ("w", "b", "stride", "padding", "activation"),
        "max_pool1d": ("kernel", "stride"),
        "avg_pool1d": ("kernel", "stride"),
        "flatten": (),
    }[kind]
    missing = [key for key in required if key not in layer]
    if missing:
        raise ValueError(f"{where} ({kind}) lacks the key(s) {', '.join(missing)}; a {kind} needs {required}")
    return kind


def _check_input(a: np.ndarray, n_in: int, where: str, kind: str, *, two_d: bool) -> None:
    if two_d and a.ndim != 2:
        hint = "; put a flatten layer before it" if a.ndim == 3 else ""
        raise ValueError(f"{where} (dense) needs a 2-D input (N, {n_in}), got shape {a.shape}{hint}")
    if a.ndim < 1 or a.shape[-1] != n_in:
        raise ValueError(f"{where} ({kind}) expects {n_in} features on the last axis, got input shape {a.shape}")


def _dropout_mask(layer: dict, a: np.ndarray, where: str, override) -> np.ndarray | None:
    rate = layer["rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0.0 <= rate < 1.0):
        raise ValueError(f"{where} (dropout) has rate {rate!r}; expected a number in [0, 1)")
    mask = layer.get("mask")
    if override is not _NO_OVERRIDE:
        if mask is not None and override is not None:
            raise ValueError(f"{where} (dropout) has a mask in its dict and one in masks=; give only one")
        mask = override if override is not None else mask
    if mask is None:
        return None
    mask = _as_float(mask, f"{where} (dropout) mask")
    if mask.shape != a.shape:
        raise ValueError(f"{where} (dropout) mask has shape {mask.shape}, its input has shape {a.shape}")
    if not np.all((mask == 0.0) | (mask == 1.0)):
        bad = mask[(mask != 0.0) & (mask != 1.0)].flat[0]
        raise ValueError(f"{where} (dropout) mask must hold only 0 and 1 (keep), found {bad!r}")
    return mask


_NO_OVERRIDE = object()


def _positive_int(layer: dict, key: str, where: str, kind: str, *, minimum: int) -> int:
    value = layer[key]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{where} ({kind}) has {key} {value!r}; expected an int >= {minimum}")
    return int(value)


def _check_rank3(a: np.ndarray, where: str, kind: str, layout: str) -> None:
    if a.ndim == 2:
        raise ValueError(
            f"{where} ({kind}) needs a 3-D input {layout}, got the 2-D shape {a.shape}; "
            "add the channel axis (x[:, None, :] for one channel)"
        )
    if a.ndim != 3:
        raise ValueError(f"{where} ({kind}) needs a 3-D input {layout}, got shape {a.shape}")


# ---------------------------------------------------------------- forward


def _forward(layers, a: np.ndarray, masks: list | None, where: str):
    """Run the stack on a; return (out, caches), a cache per layer for the backward pass."""
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"{where} must be a list of layer dicts, got {type(layers).__name__}")
    caches = []
    for index, layer in enumerate(layers):
        here = f"{where}[{index}]"
        kind = _check_layer(layer, here)
        if kind == "dense":
            w = _as_float(layer["w"], f"{here} w")
            b = _as_float(layer["b"], f"{here} b")
            name = layer["activation"]
            if name not in ACTIVATIONS:
                raise ValueError(f"{here} has activation {name!r}; valid names: {', '.join(ACTIVATIONS)}")
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise ValueError(f"{here} needs w (n_out, n_in) and b (n_out,), got w {w.shape} and b {b.shape}")
            _check_input(a, w.shape[1], here, kind, two_d=True)
            z = a @ w.T + b[None, :]  # z = a W^T + b, batch-first
            out = activation(name, z)
            caches.append({"a": a, "z": z, "w": w, "activation": name})
        elif kind == "residual":
            body_out, body_caches = _forward(layer["layers"], a, masks, f"{here}.layers")
            if body_out.shape != a.shape:
                raise ValueError(f"{here} (residual) body maps shape {a.shape} to {body_out.shape}; it must keep it")
            out = a + body_out
            caches.append({"body": body_caches})
        elif kind == "layer_norm":
            scale = _as_float(layer["scale"], f"{here} scale")
            offset = _as_float(layer["offset"], f"{here} offset")
            eps = layer["eps"]
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 <= eps < math.inf):
                raise ValueError(f"{here} (layer_norm) has eps {eps!r}; expected a finite number >= 0")
            if scale.ndim != 1 or offset.shape != scale.shape:
                raise ValueError(f"{here} needs scale (n,) and offset (n,), got {scale.shape} and {offset.shape}")
            _check_input(a, scale.shape[0], here, kind, two_d=False)
            mu = np.mean(a, axis=-1, keepdims=True)
            var = np.mean((a - mu) ** 2, axis=-1, keepdims=True)  # biased
            xhat = (a - mu) / np.sqrt(var + eps)
            out = xhat * scale + offset
            caches.append({"a": a, "xhat": xhat, "scale": scale, "eps": float(eps)})
        elif kind == "conv1d":
            w = _as_float(layer["w"], f"{here} w")
            b = _as_float(layer["b"], f"{here} b")
            name = layer["activation"]
            if name == "softmax":
                raise ValueError(
                    f"{here} (conv1d) has activation 'softmax'; a conv1d's activation must be elementwise: use "
                    "identity, then flatten and a dense softmax layer (or the softmax_cross_entropy cost)"
                )
            if name not in ACTIVATIONS:
                raise ValueError(f"{here} has activation {name!r}; valid names: {', '.join(ACTIVATIONS)}")
            if w.ndim != 3 or b.shape != (w.shape[0],):
                raise ValueError(f"{here} needs w (C_out, C_in, K) and b (C_out,), got w {w.shape} and b {b.shape}")
            stride = _positive_int(layer, "stride", here, kind, minimum=1)
            padding = _positive_int(layer, "padding", here, kind, minimum=0)
            c_out, c_in, kernel = w.shape
            _check_rank3(a, here, kind, f"(N, C_in={c_in}, L)")
            if a.shape[1] != c_in:
                raise ValueError(
                    f"{here} (conv1d) has C_in={c_in} input channels (w {w.shape}), got input shape {a.shape} "
                    f"with {a.shape[1]} channels"
                )
            if kernel < 1 or c_in < 1 or c_out < 1:
                raise ValueError(f"{here} (conv1d) has an empty w {w.shape}; expected C_out, C_in, K >= 1")
            if kernel > a.shape[2] + 2 * padding:
                raise ValueError(
                    f"{here} (conv1d) kernel length K={kernel} is longer than the padded input length "
                    f"L + 2p = {a.shape[2] + 2 * padding} (L={a.shape[2]}, p={padding})"
                )
            a_pad = np.pad(a, ((0, 0), (0, 0), (padding, padding)))  # zeros on both sides
            z = conv1d_pre_activation(a_pad, w, b, stride)
            out = activation(name, z)
            caches.append({"a_pad": a_pad, "z": z, "w": w, "activation": name, "stride": stride, "padding": padding})
        elif kind in ("max_pool1d", "avg_pool1d"):
            kernel = _positive_int(layer, "kernel", here, kind, minimum=1)
            stride = _positive_int(layer, "stride", here, kind, minimum=1)
            _check_rank3(a, here, kind, "(N, C, L)")
            if kernel > a.shape[2]:
                raise ValueError(
                    f"{here} ({kind}) kernel length {kernel} is longer than the input length L={a.shape[2]} "
                    f"(input shape {a.shape}; no padding)"
                )
            length = (a.shape[2] - kernel) // stride + 1
            if kind == "max_pool1d":
                chosen = max_pool1d_argmax(a, kernel, stride)
                starts = np.arange(length) * stride
                out = np.take_along_axis(a, starts[None, None, :] + chosen, axis=2)
                caches.append({"chosen": chosen, "stride": stride, "length": a.shape[2]})
            else:
                out = np.stack(
                    [np.mean(a[:, :, t * stride : t * stride + kernel], axis=2) for t in range(length)], axis=2
                )
                caches.append({"kernel": kernel, "stride": stride, "length": a.shape[2]})
        elif kind == "flatten":
            if a.ndim < 2:
                raise ValueError(f"{here} (flatten) needs a batch-first input of rank >= 2, got shape {a.shape}")
            out = a.reshape(a.shape[0], -1)  # row-major: (c, l) -> c L + l
            caches.append({"shape": a.shape})
        else:  # dropout
            override = masks.pop(0) if masks is not None and masks else _NO_OVERRIDE
            if masks is not None and override is _NO_OVERRIDE:
                raise ValueError(f"masks= has fewer entries than the stack has dropout layers (short at {here})")
            mask = _dropout_mask(layer, a, here, override)
            keep_scale = 1.0 / (1.0 - float(layer["rate"]))
            out = a.copy() if mask is None else a * mask * keep_scale
            caches.append({"mask": mask, "keep_scale": keep_scale})
        a = out
    return a, caches


def _run(layers, x, masks):
    x = _as_float(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must be batch-first (N, n_0), got shape {x.shape}")
    queue = None if masks is None else list(masks)
    out, caches = _forward(layers, x, queue, "layers")
    if queue:
        raise ValueError(f"masks= has {len(queue)} more entries than the stack has dropout layers")
    return x, out, caches


def forward(layers: Sequence[dict], x, *, masks: Sequence | None = None) -> np.ndarray:
    """Return the network output for batch-first x (N, n_0), float64.

    Dropout layers use the ``"mask"`` in their dicts; ``masks``, if given, is a list with one entry per dropout
    layer in the order a depth-first walk meets them (residual bodies included): a keep-mask, or None to leave
    the layer's own (or none). A layer with no mask is the identity. A mask in both places for one layer, or a
    list longer or shorter than the dropout layers, is an error.
    """
    return _run(layers, x, masks)[1]


# ---------------------------------------------------------------- backward


def _backward(layers, caches, grad_out: np.ndarray):
    """From dC/d(out) of the stack return (dC/d(in), parameter gradients with the stack's structure)."""
    grads = [None] * len(layers)
    for index in reversed(range(len(layers))):
        layer, cache = layers[index], caches[index]
        kind = layer["kind"]
        if kind == "dense":
            z, name = cache["z"], cache["activation"]
            if name == "softmax":  # delta = J(z)^T dC/da, example by example
                delta = np.stack([softmax_jacobian(z[k]).T @ grad_out[k] for k in range(z.shape[0])])
            else:  # delta = dC/da (.) G'(z)  (BP1 at the output, BP2 below it)
                delta = grad_out * activation_derivative(name, z)
            grads[index] = {
                "w": delta.T @ cache["a"],  # (BP4) dC/dW = delta^T a_prev
                "b": np.sum(delta, axis=0),  # (BP3) dC/db = sum_n delta
            }
            grad_out = delta @ cache["w"]  # dC/da_prev = delta W, the (W^T delta) of BP2
        elif kind == "residual":
            # Case 2: a reaches C along the skip (identity) and through the body F
            body_grad_in, body_grads = _backward(layer["layers"], cache["body"], grad_out)
            grads[index] = {"layers": body_grads}
            grad_out = grad_out + body_grad_in
        elif kind == "layer_norm":
            a, xhat, scale, eps = cache["a"], cache["xhat"], cache["scale"], cache["eps"]
            leading = tuple(range(a.ndim - 1))
            grads[index] = {"scale": np.sum(grad_out * xhat, axis=leading), "offset": np.sum(grad_out, axis=leading)}
            n = a.shape[-1]
            rows_a = a.reshape(-1, n)
            rows_g = (grad_out * scale).reshape(-1, n)  # dC/dxhat
            rows_in = np.stack([layer_norm_jacobian(rows_a[k], eps).T @ rows_g[k] for k in range(rows_a.shape[0])])
            grad_out = rows_in.reshape(a.shape)
        elif kind == "conv1d":
            delta = grad_out * activation_derivative(cache["activation"], cache["z"])  # dC/dz
            a_pad, w, stride, padding = cache["a_pad"], cache["w"], cache["stride"], cache["padding"]
            grad_w, grad_b = conv1d_parameter_gradients(delta, a_pad, w.shape[2], stride)
            grads[index] = {"w": grad_w, "b": grad_b}
            grad_out = conv1d_input_gradient(delta, w, stride, padding, a_pad.shape[2] - 2 * padding)
        elif kind == "max_pool1d":
            grads[index] = {}
            grad_out = max_pool1d_input_gradient(grad_out, cache["chosen"], cache["stride"], cache["length"])
        elif kind == "avg_pool1d":
            grads[index] = {}
            grad_out = avg_pool1d_input_gradient(grad_out, cache["kernel"], cache["stride"], cache["length"])
        elif kind == "flatten":
            grads[index] = {}
            grad_out = grad_out.reshape(cache["shape"])
        else:  # dropout
            grads[index] = {}
            if cache["mask"] is not None:
                grad_out = grad_out * cache["mask"] * cache["keep_scale"]
    return grad_out, grads


def dense_targets(y, n_out: int, loss: str, n: int) -> np.ndarray:
    """Float targets as float64; integer labels (N,) as one-hot rows (cross-entropies only)."""
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.integer):
        if loss not in ("cross_entropy", "softmax_cross_entropy"):
            raise ValueError(f"integer labels are for the cross-entropies only, not {loss!r}; give float targets")
        if y.shape != (n,):
            raise ValueError(f"integer labels must have shape ({n},), got {y.shape}")
        bad = (y < 0) | (y >= n_out)
        if np.any(bad):
            raise ValueError(f"label {int(y[bad][0])} is outside [0, {n_out}) for {n_out} outputs")
        return np.eye(n_out)[y]
    return _as_float(y, "y")


def cost_and_output_gradient(loss: str, out: np.ndarray, z: np.ndarray | None, y: np.ndarray):
    """Per-example C^n (N,) and dC^n/da for the final output a = ``out``; z is the last dense layer's z or None.

    The costs' values use z where a log of a probability could underflow (log a = log_softmax(z),
    log sigma(z) = -softplus(-z)); the gradients are the textbook dC/da, not fused with G'.
    """
    per_example = tuple(range(1, out.ndim))
    if loss == "mse":
        return 0.5 * np.sum((out - y) ** 2, axis=per_example), out - y
    if loss == "cross_entropy":
        # dC/da_j = -y_j / a_j; 0 where y_j = 0 even if a_j underflowed to 0
        safe = np.where(y != 0.0, out, 1.0)
        return -np.sum(y * _log_softmax(z), axis=per_example), np.where(y != 0.0, -y / safe, 0.0)
    if loss == "softmax_cross_entropy":
        cost = -np.sum(y * _log_softmax(out), axis=per_example)
        return cost, _softmax(out) * np.sum(y, axis=-1, keepdims=True) - y
    if loss == "binary_cross_entropy":
        softplus_z, softplus_minus_z = activation("softplus", z), activation("softplus", -z)
        cost = np.sum(y * softplus_minus_z + (1.0 - y) * softplus_z, axis=per_example)
        return cost, -(y / out - (1.0 - y) / (1.0 - out))
    raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(LOSSES)}")


def loss_and_grads(
    layers: Sequence[dict], x, y, *, loss: str, reduction: str, masks: Sequence | None = None
) -> tuple[float, list]:
    """Return (L, dL/dparams) for batch-first x (N, n_0) and targets y; the gradients mirror ``layers``.

    y is (N, n_out) float (targets, one-hot or soft labels) or, for the two cross-entropies, integer
    labels (N,). ``masks`` as in ``forward``. L = sum_n C^n (``"sum"``) or 1/N sum_n C^n (``"mean"``).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(LOSSES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions: {', '.join(REDUCTIONS)}")
    if not layers:
        raise ValueError("layers is empty; a loss needs at least one layer")
    needed = _OUTPUT_LAYER[loss]
    if needed is not None:
        last = layers[-1]
        found = (last.get("kind"), last.get("activation")) if isinstance(last, dict) else (type(last).__name__, None)
        if found != needed:
            raise ValueError(f"loss {loss!r} needs a last layer {needed[0]} {needed[1]!r}, got {found[0]} {found[1]!r}")
    x, out, caches = _run(layers, x, masks)
    if out.ndim != 2:
        hint = "; end the stack with a {'kind': 'flatten'} layer" if out.ndim == 3 else ""
        raise ValueError(f"the costs need a 2-D network output (N, n_out), the stack gives shape {out.shape}{hint}")
    n = x.shape[0]
    if n == 0 and reduction == "mean":
        raise ValueError("x holds no examples (N = 0); the mean over them is undefined")
    targets = dense_targets(y, out.shape[-1], loss, n)
    if targets.shape != out.shape:
        raise ValueError(f"targets have shape {targets.shape}, the network output has shape {out.shape}")
    z = caches[-1]["z"] if layers[-1]["kind"] == "dense" else None
    cost, dc_da = cost_and_output_gradient(loss, out, z, targets)
    scale = 1.0 / n if reduction == "mean" else 1.0  # dL/dC^n
    _, grads = _backward(layers, caches, scale * dc_da)
    return scale * float(np.sum(cost)), grads
