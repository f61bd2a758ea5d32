"""More from one backward pass: gradient statistics and curvature (BackPACK's set), written by hand.

The hand-written pass holds, for every example n and layer l, a^{l-1}_n and the
deltas. Every quantity here is one more sweep over the same layers, carrying
not one delta per example but M *columns* per example, each backpropagated
exactly as delta is (every layer's backward rule is linear in what it
receives, so a column goes down by the same rule, ``jax.vmap``-ed over the M
columns), and read at each layer by that layer's own rule (``Dense`` and
``Conv1d`` have fast ones; other kinds square their per-example gradients).

Notation: s = 1/N for ``reduction="mean"``, 1 for ``"sum"``, so L = s sum_n C^n;
g_n = dC^n/dtheta; f_n is where the cost is convex (z^L, the logits, for the
cross-entropies; the output a^L for ``mse``); H_n = d^2 C^n / df_n^2 and
J_n = df_n/dtheta. Factor H_n = S_n S_n^T (S_n has C columns: softmax
cross-entropy diag(sqrt p) - p sqrt(p)^T times sqrt(sum_j y_j); binary
cross-entropy diag(sqrt(sigma (1 - sigma))); mse the identity).

- ``sum_grad_squared``  sum_n (s g_n)^2                                    (BackPACK SumGradSquared)
- ``grad_variance``     (1/N) sum_n (s g_n)^2 - ((1/N) sum_n s g_n)^2     (Variance)
- ``diag_ggn``          diag(s sum_n J_n^T H_n J_n): the columns sqrt(s) S_n backpropagated,
                        squared and summed (DiagGGNExact); with ``mc_samples`` = M, S_n is
                        replaced by M sampled gradients dC(f_n, yhat)/df / sqrt(M),
                        yhat ~ p(y | f_n) (DiagGGNMC)
- ``diag_hessian``      diag(d^2 L / dtheta^2): the GGN columns plus, at every activation with
                        G'' != 0, the columns sqrt|r| e_j with sign(r), r = dL/da (.) G''(z),
                        backpropagated from z down (DiagHessian; equal to the GGN for relu)
- ``kflr`` / ``kfac``   per layer (g, a): a = (1/N) sum_n a_n a_n^T, g = sum over columns and
                        examples of delta delta^T, so that the GGN block of vec(W) (row-major)
                        is about kron(g, a) and the bias block g (KFLR exact columns; KFAC
                        sampled ones) (Martens & Grosse 2015; Botev et al. 2017)
- ``ggn_vector_product`` G v = s sum_n J_n^T H_n J_n v: the columns give S_n^T J_n v as
                        <dC^{cn}/dtheta, v>, then one backward pass from sum_c (S_n^T J_n v)_c S_nc

References: Dangel, Kunstner & Hennig, "BackPACK: Packing more into backprop"
(ICLR 2020), whose definitions and scaling these follow number for number;
Dangel, Harmeling & Hennig, "Modular block-diagonal curvature approximations
for feedforward architectures" (AISTATS 2020) for the Hessian backpropagation.

Why one module of ~620 lines: every quantity is one more sweep of the same column machinery (the
columns, the loss Hessian's factor, the residual visit); split, the sweeps would import each other's
internals.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from purebp import activations as _activations
from purebp import engine as _engine
from purebp import inputs as _inputs
from purebp import losses as _losses
from purebp.layers import Conv1d, Dense, Dropout, Flatten, LayerNorm, Residual
from purebp.layers.pool import AvgPool1d, MaxPool1d
from purebp.network import AnyNetwork, Sequential, like

Array = jax.Array

CURVATURE_LOSSES = ("mse", "cross_entropy", "softmax_cross_entropy", "binary_cross_entropy")
_CROSS_ENTROPIES = ("cross_entropy", "softmax_cross_entropy")
_PARAMETERLESS = (Dropout, Flatten, MaxPool1d, AvgPool1d)
_AFFINE_KINDS = (Dense, Conv1d)  # an affine map then an elementwise G: Kronecker factors, Hessian terms


class KroneckerFactors(NamedTuple):
    """One layer's Kronecker factors: its curvature block of vec(W) (row-major) is about kron(g, a), of b about g."""

    g: Array
    a: Array


# ---------------------------------------------------------------- the loss Hessian's factor


def _output_parts(net: AnyNetwork, output: Array, caches: tuple) -> tuple[Array, str | None]:
    """(z^L, G's name) for a dense output layer; (the output, None) for any other output layer."""
    name = _engine.output_layer_activation(net)
    return (output, None) if name is None else (caches[-1].pre_activation, name)


def _output_columns(
    net: AnyNetwork,
    output: Array,
    caches: tuple,
    y: Array,
    loss: str,
    reduction: str,
    mc_samples: int | None,
    key: Array | None,
) -> Array:
    """sqrt(s) S_n as columns (N, M, C) at the point the backward pass starts from (z^L of a dense output layer).

    Exact: M = C columns with S_n S_n^T = H_n. Monte Carlo: M = ``mc_samples``
    sampled gradients of the cost at a target drawn from the model, over sqrt(M),
    whose outer products average to H_n.
    """
    pre_activation, name = _output_parts(net, output, caches)
    batch, width = output.shape
    dtype = output.dtype
    target = _losses.dense_targets(y, width, dtype)
    root_scale = np.asarray((1.0 / batch) ** 0.5 if reduction == "mean" else 1.0, dtype)
    eye = jnp.eye(width, dtype=dtype)
    if loss in _CROSS_ENTROPIES:
        # H = t (diag p - p p^T), t = sum_j y_j: S = sqrt(t) (diag sqrt p - p sqrt(p)^T)
        probabilities = _activations.softmax(pre_activation)
        mass = jnp.sqrt(jnp.sum(target, axis=-1))[:, None, None]
        if mc_samples is None:
            root = jnp.sqrt(probabilities)
            columns = eye[None] * root[:, :, None] - root[:, :, None] * probabilities[:, None, :]  # [n, c, j]
        else:
            # dC/dz at a label drawn from softmax(z): p - e_yhat, with E[(p - e)(p - e)^T] = diag p - p p^T
            drawn = jax.random.categorical(key, pre_activation, axis=-1, shape=(mc_samples, batch)).T
            labels = jnp.arange(width, dtype=drawn.dtype)
            columns = probabilities[:, None, :] - (drawn[:, :, None] == labels[None, None, :]).astype(dtype)
        columns = mass * columns
    elif loss == "binary_cross_entropy":
        probabilities = output  # sigma(z^L); H = diag(sigma (1 - sigma)), whatever the target
        if mc_samples is None:
            columns = eye[None] * jnp.sqrt(probabilities * (1.0 - probabilities))[:, :, None]
        else:
            chances = jnp.broadcast_to(probabilities[None], (mc_samples, batch, width))  # no rank promotion
            drawn = jax.random.bernoulli(key, chances).astype(dtype)
            columns = probabilities[:, None, :] - jnp.transpose(drawn, (1, 0, 2))
    else:  # mse: H = I with respect to the output a^L
        if mc_samples is None:
            columns = jnp.broadcast_to(eye[None], (batch, width, width))
        else:
            drawn = jax.random.normal(key, (mc_samples, batch, width), dtype)  # a - yhat, yhat ~ N(a, I)
            columns = jnp.transpose(drawn, (1, 0, 2))
        if name is not None and name != "identity":
            # through the output activation to z^L: (BP1) column (.) G'(z^L), a Jacobian product for softmax
            activation = _activations.get(name)
            columns = jax.vmap(activation.chain, in_axes=(1, None, None), out_axes=1)(columns, pre_activation, output)
    if mc_samples is not None:
        columns = columns / np.asarray(mc_samples**0.5, dtype)
    return root_scale * columns


def _output_residual(
    net: AnyNetwork, output: Array, caches: tuple, y: Array, loss: str, reduction: str
) -> Array | None:
    """r = s (a - y) (.) G''(z^L) for mse on a curved output activation (a Hessian term the GGN lacks), or None."""
    pre_activation, name = _output_parts(net, output, caches)
    if loss != "mse" or name is None or _activations.get(name).piecewise_linear:
        return None
    scale = np.asarray(1.0 / output.shape[0] if reduction == "mean" else 1.0, output.dtype)
    target = _losses.dense_targets(y, output.shape[-1], output.dtype)
    return scale * (output - target) * _activations.get(name).second_derivative(pre_activation, output)


# ---------------------------------------------------------------- the sweep


def _diagonal_columns(residual: Array) -> tuple[Array, Array]:
    """Columns and signs for diag(r) per example: sqrt|r_j| e_j (P columns, P = r's size per example), sign(r_j)."""
    batch, shape = residual.shape[0], residual.shape[1:]
    flat = jnp.reshape(residual, (batch, -1))
    size = flat.shape[1]
    eye = jnp.eye(size, dtype=flat.dtype)
    columns = eye[None] * jnp.sqrt(jnp.abs(flat))[:, :, None]  # column j of example n: sqrt|r_nj| e_j
    return jnp.reshape(columns, (batch, size) + shape), jnp.sign(flat)


def _propagate(layer: object, cache: object, columns: Array) -> Array:
    """dC/da^{l-1} for every column: the layer's column rule, or its backward rule once per column (linear in it)."""
    if hasattr(layer, "backward_columns"):
        return layer.backward_columns(cache, columns)
    return jax.vmap(lambda column: layer.backward(cache, column)[0], in_axes=1, out_axes=1)(columns)


def _join(columns: Array, weights: Array | None, more: Array, more_weights: Array) -> tuple[Array, Array]:
    if weights is None:
        weights = jnp.ones(columns.shape[:2], columns.dtype)
    return jnp.concatenate([columns, more], axis=1), jnp.concatenate([weights, more_weights], axis=1)


def _residual_of(layer: object, cache: object, grad_out: Array) -> Array | None:
    """r = dL/da^l (.) G''(z^l) for a dense or conv layer with a curved activation, else None."""
    if not isinstance(layer, _AFFINE_KINDS):
        return None
    activation = _activations.get(layer.activation)
    if activation.piecewise_linear:
        return None
    return grad_out * activation.second_derivative(cache.pre_activation, cache.activation)


def _sweep(layers, caches, columns, weights, visit, combine, *, grad_outs=None, propagate_first=True):
    """Carry columns (N, M, ...) down ``layers`` from the top; return (columns at the input, weights, results).

    ``visit(layer, cache, columns, weights)`` reads one layer; ``combine(block, results)``
    folds a residual block's body results. With ``grad_outs`` (what each layer's
    backward got in the first-order pass) every curved activation adds its
    Hessian columns at its pre-activation, so the weights become signs.
    """
    results = [None] * len(layers)
    for index in reversed(range(len(layers))):
        layer, cache = layers[index], caches[index]
        last = index == 0 and not propagate_first
        if isinstance(layer, Residual):
            body_grad_outs = None if grad_outs is None else layer.body_backward(cache, grad_outs[index])[2]
            body_columns, body_weights, body = _sweep(
                layer.layers, cache, columns, weights, visit, combine, grad_outs=body_grad_outs
            )
            results[index] = combine(layer, body)
            # Case 2: the incoming columns come back along the identity too; the body's own new ones do not
            count = columns.shape[1]
            columns = jnp.concatenate([body_columns[:, :count] + columns, body_columns[:, count:]], axis=1)
            weights = body_weights
            continue
        residual = None if grad_outs is None else _residual_of(layer, cache, grad_outs[index])
        results[index] = visit(layer, cache, columns, weights)
        if residual is not None:
            # the Hessian's own term at z^l: columns sqrt|r_j| e_j that already hold dC/dz, so they skip G'
            linear = layer.linear()
            if hasattr(linear, "diagonal_backward"):  # one-hot columns in closed form (Dense): no (N, P, P) products
                own = linear.diagonal_sum_squared_grads(cache, residual)
                more_weights = jnp.sign(jnp.reshape(residual, (residual.shape[0], -1)))
                more = None if last else linear.diagonal_backward(residual)
            else:
                more, more_weights = _diagonal_columns(residual)
                own = visit(linear, cache, more, more_weights)
                more = None if last else _propagate(linear, cache, more)
            # a tree of the linear layer: the same leaves as the layer's, its static G aside
            total = [a + b for a, b in zip(jax.tree.leaves(results[index]), jax.tree.leaves(own))]
            results[index] = jax.tree.unflatten(jax.tree.structure(results[index]), total)
        if last:
            continue
        columns = _propagate(layer, cache, columns)
        if residual is not None:
            columns, weights = _join(columns, weights, more, more_weights)
    return columns, weights, results


def _squared_visit(layer: object, cache: object, columns: Array, weights: Array | None) -> object:
    """sum_{n,m} w_nm (dC^{nm}/dtheta)^2 leaf by leaf, by the layer's rule or from its per-example gradients."""
    if hasattr(layer, "sum_squared_grads"):
        return layer.sum_squared_grads(cache, columns, weights)
    per_column = jax.vmap(layer.per_example_grads, in_axes=(None, 1), out_axes=1)(cache, columns)

    def reduce(leaf: Array) -> Array:
        squared = leaf * leaf
        if weights is not None:
            squared = jnp.reshape(weights, weights.shape + (1,) * (leaf.ndim - 2)) * squared
        return jnp.sum(squared, axis=(0, 1))

    return jax.tree.map(reduce, per_column)


def _residual_tree(block: Residual, results: list) -> Residual:
    return Residual(tuple(results))


def _top_layers(net: AnyNetwork) -> tuple:
    return _engine.backward_layers(net)  # the dense output layer as its linear part: columns start at z^L


def _diagonal(net, x, y, loss, reduction, mc_samples, key, dropout_key, hessian):
    output, caches = _engine.forward_pass(net, x, dropout_key)
    layers = _top_layers(net)
    columns = _output_columns(net, output, caches, y, loss, reduction, mc_samples, key)
    weights, grad_outs = None, None
    if hessian:
        _, delta = _engine.loss_and_output_delta(net, output, caches, y, loss=loss, reduction=reduction)
        _, grad_outs = _engine.backward_pass(net, caches, delta)
        residual = _output_residual(net, output, caches, y, loss, reduction)
        if residual is not None:
            more, more_weights = _diagonal_columns(residual)
            columns, weights = _join(columns, weights, more, more_weights)
    _, _, results = _sweep(
        layers, caches, columns, weights, _squared_visit, _residual_tree, grad_outs=grad_outs, propagate_first=False
    )
    return like(net, results)


@functools.partial(jax.jit, static_argnames=("loss", "reduction", "mc_samples", "hessian"))
def _diagonal_jit(net, x, y, key, dropout_key, *, loss, reduction, mc_samples, hessian):
    return _diagonal(net, x, y, loss, reduction, mc_samples, key, dropout_key, hessian)


def _squares_of_grads(layers, caches, grad_outs) -> list:
    """sum_n ghat_n^2 per layer from what each layer's backward got in the first-order pass (one column each)."""
    results = []
    for layer, cache, grad_out in zip(layers, caches, grad_outs):
        if isinstance(layer, Residual):
            body_grad_outs = layer.body_backward(cache, grad_out)[2]
            results.append(Residual(tuple(_squares_of_grads(layer.layers, cache, body_grad_outs))))
        else:
            results.append(_squared_visit(layer, cache, grad_out[:, None], None))
    return results


def _statistics(net, x, y, loss, reduction, dropout_key):
    """(sum_n ghat_n^2, sum_n ghat_n) with ghat_n = s g_n, from the deltas of one ordinary backward pass."""
    output, caches = _engine.forward_pass(net, x, dropout_key)
    _, delta = _engine.loss_and_output_delta(net, output, caches, y, loss=loss, reduction=reduction)
    grads, grad_outs = _engine.backward_pass(net, caches, delta)
    return like(net, _squares_of_grads(_top_layers(net), caches, grad_outs)), grads


@functools.partial(jax.jit, static_argnames=("loss", "reduction", "variance"))
def _statistics_jit(net, x, y, dropout_key, *, loss, reduction, variance):
    squares, grads = _statistics(net, x, y, loss, reduction, dropout_key)
    if not variance:
        return squares
    batch = x.shape[0]

    def variance_of(squared: Array, grad: Array) -> Array:
        # BackPACK's Variance: the mean of ghat_n^2 minus the square of the mean of ghat_n
        count = np.asarray(batch, squared.dtype)
        return squared / count - (grad / count) * (grad / count)

    return jax.tree.map(variance_of, squares, grads)


def _kronecker_visit(layer: object, cache: object, columns: Array, weights: Array | None) -> KroneckerFactors | None:
    if isinstance(layer, _AFFINE_KINDS):
        return KroneckerFactors(*layer.kronecker_factors(cache, columns))
    return None


@functools.partial(jax.jit, static_argnames=("loss", "reduction", "mc_samples"))
def _kronecker_jit(net, x, y, key, dropout_key, *, loss, reduction, mc_samples):
    output, caches = _engine.forward_pass(net, x, dropout_key)
    columns = _output_columns(net, output, caches, y, loss, reduction, mc_samples, key)
    _, _, results = _sweep(
        _top_layers(net),
        caches,
        columns,
        None,
        _kronecker_visit,
        lambda block, body: tuple(body),
        propagate_first=False,
    )
    return tuple(results)


@functools.partial(jax.jit, static_argnames=("loss", "reduction"))
def _ggn_vector_product_jit(net, x, y, v, dropout_key, *, loss, reduction):
    output, caches = _engine.forward_pass(net, x, dropout_key)
    columns = _output_columns(net, output, caches, y, loss, reduction, None, None)
    tangents = {}

    def collect(layers, tangent_layers):
        for layer, tangent in zip(layers, tangent_layers):
            tangents[id(layer)] = tangent
            if isinstance(layer, Residual):
                collect(layer.layers, tangent.layers)

    layers = _top_layers(net)
    collect(layers, v.layers)

    def dot_visit(layer, cache, columns, weights):
        # <dC^{nm}/dtheta^l, v^l>: the layer's rule, or its per-example gradients dotted with v^l
        tangent = tangents[id(layer)]
        if hasattr(layer, "grad_dot"):
            return layer.grad_dot(cache, columns, tangent)
        per_column = jax.vmap(layer.per_example_grads, in_axes=(None, 1), out_axes=1)(cache, columns)
        total = jnp.zeros(columns.shape[:2], columns.dtype)
        for leaf, direction in zip(jax.tree.leaves(per_column), jax.tree.leaves(tangent)):
            moved = jnp.reshape(direction, (1, 1) + direction.shape)  # broadcast over examples and columns
            total = total + jnp.sum(jnp.reshape(leaf * moved, leaf.shape[:2] + (-1,)), axis=2)
        return total

    def add_body(block, body):
        return sum(part for part in body if part is not None)

    _, _, dots = _sweep(layers, caches, columns, None, dot_visit, add_body, propagate_first=False)
    projected = sum(part for part in dots if part is not None)  # (S_n^T J_n v)_m, (N, M)
    # G v = sum_n J_n^T S_n (S_n^T J_n v): one backward pass from sum_m (S^T J v)_nm S_nm
    start = jnp.einsum("nm,nm...->n...", projected, columns)
    product, _ = _engine.backward_pass(net, caches, start)
    return product


# ---------------------------------------------------------------- input checks


def _layer_name(path: tuple[int, ...], layer: object) -> str:
    where = "layer " + " body layer ".join(str(i) for i in path)
    return f"{where} ({layer!r})"


def _walk(layers, path=()):
    for index, layer in enumerate(layers):
        yield path + (index,), layer
        if isinstance(layer, Residual):
            yield from _walk(layer.layers, path + (index,))


def _has_parameters(layer: object) -> bool:
    return bool(jax.tree.leaves(layer))


def _validate(net: AnyNetwork, x, y, loss: str, reduction: str, quantity: str) -> None:
    _inputs.validate_inputs(net, x, y, loss=loss, reduction=reduction)
    if loss not in CURVATURE_LOSSES:
        raise ValueError(
            f"{quantity}: loss {loss!r} has no factorised output Hessian in purebp, so its curvature is not "
            f"defined here; curvature takes the built-in losses {', '.join(CURVATURE_LOSSES)}"
        )
    # the dense output layer as its linear part: its G is fused into the columns (and checked below for mse)
    for path, layer in _walk(_top_layers(net)):
        known = isinstance(layer, (*_AFFINE_KINDS, LayerNorm, Residual, *_PARAMETERLESS))
        if not known and not hasattr(layer, "per_example_grads"):
            raise ValueError(
                f"{quantity}: {_layer_name(path, layer)} has no per_example_grads(cache, grad_out) method, so "
                "its per-example gradients, and the curvature built from them, are not defined"
            )
        if quantity == "diag_hessian":
            _check_hessian_layer(path, layer, known)
        if (
            quantity in ("kflr", "kfac")
            and _has_parameters(layer)
            and not isinstance(layer, (*_AFFINE_KINDS, Residual))
        ):
            raise ValueError(
                f"{quantity}: {_layer_name(path, layer)} has parameters but no Kronecker-factored curvature "
                "block; Kronecker factors are defined for dense and conv1d layers"
            )
    if quantity == "diag_hessian" and loss == "mse":
        name = _engine.output_layer_activation(net)
        output = None if name is None else _activations.get(name)
        if output is not None and not output.elementwise:
            raise ValueError(
                f"diag_hessian: mse on a {name!r} output layer: that activation's second derivative is not "
                "diagonal, which the Hessian backpropagation here needs; use softmax_cross_entropy or an "
                "elementwise output activation"
            )
        if output is not None and not output.piecewise_linear and output.second_derivative is None:
            raise ValueError(
                f"diag_hessian: mse on a {name!r} output layer: that activation has no second derivative G'' "
                "registered, so its Hessian term is unknown (register it with second_derivative=...)"
            )


def _check_hessian_layer(path: tuple[int, ...], layer: object, known: bool) -> None:
    name = _layer_name(path, layer)
    if isinstance(layer, LayerNorm):
        raise ValueError(
            f"diag_hessian: {name}: a layer norm's second derivative with respect to its input is not diagonal, "
            "which the Hessian backpropagation here needs (BackPACK's DiagHessian has no layer norm either); "
            "diag_ggn is defined for it"
        )
    if not known:
        raise ValueError(
            f"diag_hessian: {name} is not a built-in layer kind, so its second derivative is unknown; "
            "diag_ggn is defined for it"
        )
    if isinstance(layer, _AFFINE_KINDS):
        activation = _activations.get(layer.activation)
        if not activation.piecewise_linear and activation.second_derivative is None:
            raise ValueError(
                f"diag_hessian: {name}: activation {layer.activation!r} has no second derivative G'' registered, "
                "so its Hessian term is unknown (register it with second_derivative=...)"
            )


def _validate_samples(mc_samples: object, key: object, quantity: str, *, required: bool) -> None:
    if mc_samples is None:
        if required:
            raise ValueError(f"{quantity}: mc_samples must be a positive int, got None")
        if key is not None:
            raise ValueError(
                f"{quantity}: key is only used with mc_samples (the Monte-Carlo estimate); the exact one "
                "draws nothing, so pass mc_samples=M or no key"
            )
        return
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, numbers.Integral) or mc_samples < 1:
        raise ValueError(f"{quantity}: mc_samples must be a positive int, got {mc_samples!r}")
    if key is None:
        raise ValueError(f"{quantity}: mc_samples={mc_samples} draws targets, so it needs key=jax.random.key(...)")
    _inputs.check_key(key)


def _prepare(net, x, y, loss, reduction, dropout_key, quantity):
    x, y = _inputs.coerce_inputs(net, x, y)
    _validate(net, x, y, loss, reduction, quantity)
    if dropout_key is not None:
        _inputs.check_key(dropout_key)
    return x, y


# ---------------------------------------------------------------- public API


def sum_grad_squared(
    net: AnyNetwork, x: Array, y: Array, *, loss: str, reduction: str = "mean", dropout_key: Array | None = None
) -> AnyNetwork:
    """Return sum_n (s g_n)^2 leaf by leaf (BackPACK's SumGradSquared), a tree like ``net``.

    g_n = dC^n/dtheta, s = 1/N for ``reduction="mean"`` (BackPACK's scaling of
    individual gradients), 1 for ``"sum"``. For a dense layer
    sum_n (delta_n a_n^T)^2 = (delta^2)^T (a^2): one matrix product on top of the
    backward pass, no per-example gradient in memory.
    """
    x, y = _prepare(net, x, y, loss, reduction, dropout_key, "sum_grad_squared")
    return _statistics_jit(net, x, y, dropout_key, loss=loss, reduction=reduction, variance=False)


def grad_variance(
    net: AnyNetwork, x: Array, y: Array, *, loss: str, reduction: str = "mean", dropout_key: Array | None = None
) -> AnyNetwork:
    """Return (1/N) sum_n (s g_n)^2 - ((1/N) sum_n s g_n)^2 leaf by leaf (BackPACK's Variance).

    The (biased) variance over the batch of the individual gradients s g_n, with
    BackPACK's scaling (s = 1/N for ``reduction="mean"``).
    """
    x, y = _prepare(net, x, y, loss, reduction, dropout_key, "grad_variance")
    return _statistics_jit(net, x, y, dropout_key, loss=loss, reduction=reduction, variance=True)


def diag_ggn(
    net: AnyNetwork,
    x: Array,
    y: Array,
    *,
    loss: str,
    reduction: str = "mean",
    mc_samples: int | None = None,
    key: Array | None = None,
    dropout_key: Array | None = None,
) -> AnyNetwork:
    """Return the diagonal of the generalised Gauss-Newton matrix, diag(s sum_n J_n^T H_n J_n), a tree like ``net``.

    Exact (BackPACK's DiagGGNExact) when ``mc_samples`` is None: the C columns of
    sqrt(s) S_n (S_n S_n^T = H_n) are backpropagated as delta is and squared at
    every layer. With ``mc_samples=M`` and a PRNG ``key`` (DiagGGNMC), S_n is
    replaced by M gradients of the cost at targets drawn from the model
    (categorical softmax(z^L); Bernoulli(sigma(z^L)); N(a^L, I) for mse), over
    sqrt(M): unbiased, with error falling as 1/sqrt(M), for M backward columns
    instead of C. ``dropout_key`` draws dropout masks as in ``value_and_grad``.
    """
    x, y = _prepare(net, x, y, loss, reduction, dropout_key, "diag_ggn")
    _validate_samples(mc_samples, key, "diag_ggn", required=False)
    samples = None if mc_samples is None else int(mc_samples)
    return _diagonal_jit(net, x, y, key, dropout_key, loss=loss, reduction=reduction, mc_samples=samples, hessian=False)


def diag_hessian(
    net: AnyNetwork, x: Array, y: Array, *, loss: str, reduction: str = "mean", dropout_key: Array | None = None
) -> AnyNetwork:
    """Return the diagonal of the Hessian of L, d^2 L / dtheta^2 leaf by leaf (BackPACK's DiagHessian).

    The GGN's columns plus, at each activation with G'' != 0 (sigmoid, tanh,
    softplus, gelu, elu; not relu), the residual r = dL/da^l (.) G''(z^l) as
    columns sqrt|r_j| e_j with signs, backpropagated from z^l down. For
    piecewise-linear activations it equals ``diag_ggn``. A layer norm, a
    user-defined layer kind, and mse on a softmax output are refused (their
    second derivatives are not diagonal or not known).
    """
    x, y = _prepare(net, x, y, loss, reduction, dropout_key, "diag_hessian")
    return _diagonal_jit(net, x, y, None, dropout_key, loss=loss, reduction=reduction, mc_samples=None, hessian=True)


def kflr(
    net: AnyNetwork, x: Array, y: Array, *, loss: str, reduction: str = "mean", dropout_key: Array | None = None
) -> tuple:
    """Return one ``KroneckerFactors(g, a)`` per dense or conv1d layer (BackPACK's KFLR), the exact columns.

    a = (1/N) sum_n a^{l-1}_n (a^{l-1}_n)^T and g = sum_{c,n} delta_cn delta_cn^T, delta_cn
    the column sqrt(s) S_nc backpropagated to z^l: the GGN block of vec(W^l) (row-major)
    is about kron(g, a), the bias block g. The tuple has one entry per layer of
    the stack: None for a layer without parameters, a tuple of its body's entries
    for a residual block.
    """
    x, y = _prepare(net, x, y, loss, reduction, dropout_key, "kflr")
    return _kronecker_jit(net, x, y, None, dropout_key, loss=loss, reduction=reduction, mc_samples=None)


def kfac(
    net: AnyNetwork,
    x: Array,
    y: Array,
    *,
    loss: str,
    key: Array,
    reduction: str = "mean",
    mc_samples: int = 1,
    dropout_key: Array | None = None,
) -> tuple:
    """Return ``kflr``'s factors with g from ``mc_samples`` sampled columns per example (BackPACK's KFAC).

    The columns are those of ``diag_ggn(..., mc_samples=M, key=key)``, so g is an
    unbiased estimate of ``kflr``'s g at M backward columns instead of C.
    """
    x, y = _prepare(net, x, y, loss, reduction, dropout_key, "kfac")
    _validate_samples(mc_samples, key, "kfac", required=True)
    return _kronecker_jit(net, x, y, key, dropout_key, loss=loss, reduction=reduction, mc_samples=int(mc_samples))


def ggn_vector_product(
    net: AnyNetwork,
    x: Array,
    y: Array,
    v: AnyNetwork,
    *,
    loss: str,
    reduction: str = "mean",
    dropout_key: Array | None = None,
) -> AnyNetwork:
    """Return G v = s sum_n J_n^T H_n J_n v, v and the result trees like ``net`` (the full GGN, not its diagonal).

    The C columns give S_n^T J_n v entry by entry as <dC^{cn}/dtheta, v> (for a
    dense layer delta_cn . (V a_n + v_b)); one more backward pass from
    sum_c (S_n^T J_n v)_c sqrt(s) S_nc then gives the product.
    """
    x, y = _prepare(net, x, y, loss, reduction, dropout_key, "ggn_vector_product")
    _validate_tangent(net, v)
    return _ggn_vector_product_jit(net, x, y, v, dropout_key, loss=loss, reduction=reduction)


def _validate_tangent(net: AnyNetwork, v: object) -> None:
    if not isinstance(v, Sequential) or jax.tree.structure(v) != jax.tree.structure(net):
        raise ValueError(
            "ggn_vector_product: v must be a tree like the network (e.g. pb.grad(...) or "
            f"jax.tree.map(jnp.ones_like, net)), got {type(v).__name__} with structure {jax.tree.structure(v)}"
        )
    for index, (leaf, param) in enumerate(zip(jax.tree.leaves(v), jax.tree.leaves(net))):
        if getattr(leaf, "shape", None) != param.shape or getattr(leaf, "dtype", None) != param.dtype:
            raise ValueError(
                f"ggn_vector_product: leaf {index} of v has shape {getattr(leaf, 'shape', None)} and dtype "
                f"{getattr(leaf, 'dtype', None)}; the network's has {param.shape} and {param.dtype}"
            )
