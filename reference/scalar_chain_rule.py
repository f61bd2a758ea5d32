"""Oracle (b): the slides' per-neuron chain rule, in plain Python loops and floats.

Shares no code with purebp nor with the NumPy oracle. For one example, neuron
by neuron, exactly as the slides draw it:

    forward pass:   z = sum_k w_k a_k + b          so dz/dw_k = a_k (the input the weight connects)
    backward pass:  dC/dz = sigma'(z) [ w_3 dC/dz' + w_4 dC/dz'' + ... ]   (not an output layer)
                    dC/dz = (dy/dz) (dC/dy)                                (output layer)
    then            dC/dw_k = (dz/dw_k) (dC/dz) = a_k dC/dz,  dC/db = dC/dz
    and             dL/dw = sum_n dC^n/dw  (L = sum_n C^n; divided by N for the mean)

Only for tiny networks: it costs O(N * sum of fan-ins) Python operations.
"""

from __future__ import annotations

import math

LEAKY_SLOPE = 0.01


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _g(name: str, z: float) -> float:
    if name == "identity":
        return z
    if name == "sigmoid":
        return _sigmoid(z)
    if name == "tanh":
        return math.tanh(z)
    if name == "relu":
        return z if z > 0 else 0.0
    if name == "leaky_relu":
        return z if z > 0 else LEAKY_SLOPE * z
    if name == "elu":
        return z if z > 0 else math.expm1(z)
    if name == "softplus":
        return max(z, 0.0) + math.log1p(math.exp(-abs(z)))
    if name == "gelu":
        return z * 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    raise ValueError(name)


def _g_prime(name: str, z: float) -> float:
    if name == "identity":
        return 1.0
    if name == "sigmoid":
        return _sigmoid(z) * (1.0 - _sigmoid(z))
    if name == "tanh":
        return 1.0 - math.tanh(z) ** 2
    if name == "relu":
        return 1.0 if z > 0 else 0.0
    if name == "leaky_relu":
        return 1.0 if z > 0 else LEAKY_SLOPE
    if name == "elu":
        return 1.0 if z > 0 else math.exp(z)
    if name == "softplus":
        return _sigmoid(z)
    if name == "gelu":
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0))) + z * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    raise ValueError(name)


def _cost_and_dc_dy(loss: str, z: list[float], y_out: list[float], target: list[float]):
    """C and dC/dy_j for one example (y_out: the output layer's values)."""
    if loss == "mse":
        return 0.5 * sum((a - t) ** 2 for a, t in zip(y_out, target)), [a - t for a, t in zip(y_out, target)]
    if loss == "cross_entropy":
        return -sum(t * math.log(a) for a, t in zip(y_out, target) if t != 0), [-t / a for a, t in zip(y_out, target)]
    if loss == "softmax_cross_entropy":  # identity output: y_out = z are logits
        top = max(z)
        log_total = top + math.log(sum(math.exp(v - top) for v in z))
        cost = -sum(t * (v - log_total) for v, t in zip(z, target))
        total_target = sum(target)
        return cost, [math.exp(v - log_total) * total_target - t for v, t in zip(z, target)]
    if loss == "binary_cross_entropy":
        cost = -sum(t * math.log(a) + (1 - t) * math.log(1 - a) for a, t in zip(y_out, target))
        return cost, [-(t / a - (1 - t) / (1 - a)) for a, t in zip(y_out, target)]
    raise ValueError(loss)


def loss_and_gradients(weights, biases, activations, x, targets, loss, reduction="mean"):
    """Return (L, dL/dW as nested lists, dL/db as lists) for lists of floats.

    ``weights[l][j][k]`` connects input k to neuron j of layer l; ``x[n]`` is
    example n; ``targets[n]`` is its dense target row.
    """
    num_layers = len(weights)
    grad_w = [[[0.0 for _ in row] for row in layer] for layer in weights]
    grad_b = [[0.0 for _ in layer] for layer in biases]
    total = 0.0
    for example, target in zip(x, targets):
        # forward pass, neuron by neuron: z_j = sum_k w_jk a_k + b_j
        inputs = [list(example)]
        zs = []
        for l in range(num_layers):
            z = [sum(w_jk * a_k for w_jk, a_k in zip(row, inputs[-1])) + b_j for row, b_j in zip(weights[l], biases[l])]
            zs.append(z)
            if activations[l] == "softmax":
                top = max(z)
                e = [math.exp(v - top) for v in z]
                inputs.append([v / sum(e) for v in e])
            else:
                inputs.append([_g(activations[l], v) for v in z])
        cost, dc_dy = _cost_and_dc_dy(loss, zs[-1], inputs[-1], target)
        total += cost
        # output layer: dC/dz_j = sum_i (dy_i/dz_j) dC/dy_i (only i = j unless softmax)
        out = inputs[-1]
        if activations[-1] == "softmax":
            dc_dz = [
                sum(out[i] * ((1.0 if i == j else 0.0) - out[j]) * dc_dy[i] for i in range(len(out)))
                for j in range(len(out))
            ]
        else:
            dc_dz = [_g_prime(activations[-1], zj) * g for zj, g in zip(zs[-1], dc_dy)]
        for l in reversed(range(num_layers)):
            for j, d in enumerate(dc_dz):
                grad_b[l][j] += d  # dC/db = dC/dz
                for k, a_k in enumerate(inputs[l]):
                    grad_w[l][j][k] += a_k * d  # dC/dw = (dz/dw) (dC/dz) = a dC/dz
            if l > 0:
                # dC/dz = sigma'(z) [w_3 dC/dz' + w_4 dC/dz'' + ...]
                dc_dz = [
                    _g_prime(activations[l - 1], zs[l - 1][k])
                    * sum(weights[l][j][k] * dc_dz[j] for j in range(len(dc_dz)))
                    for k in range(len(zs[l - 1]))
                ]
    scale = 1.0 / len(x) if reduction == "mean" else 1.0
    return (
        scale * total,
        [[[scale * v for v in row] for row in layer] for layer in grad_w],
        [[scale * v for v in layer] for layer in grad_b],
    )
