"""The engine: forward through the layers, backward in reverse, and the cost in between.

Every rule lives in its layer (``purebp.layers``): the engine only runs
``layer.forward`` in order, keeping each layer's cache, forms the output
delta with the cost, and runs ``layer.backward`` in reverse. For a chain of
dense layers (an ``init_mlp`` network, batch-first, x is (N, n_0), a^0 = x)
that is exactly the notes' algorithm:

    z^l = a^{l-1} W^l^T + b^l,  a^l = G_l(z^l)         forward, caching a^{l-1}, z^l, a^l
    (BP1) delta^L = dC/da (.) G'(z^L)                  (fused with the cost: losses.py)
    (BP2) delta^l = ((W^{l+1})^T delta^{l+1}) (.) G'(z^l)
    (BP3) dC/db^l = sum_n delta^l_n
    (BP4) dC/dW^l = delta^l (a^{l-1})^T               (batch-first: delta^T @ a_prev)

summed over the batch because L = sum_n C^n (divided by N for ``reduction="mean"``).
The first layer's input gradient is never used, so under jit it is never formed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from purebp import activations as _activations
from purebp import inputs as _inputs
from purebp import losses as _losses
from purebp import programs as _programs
from purebp.layers import Dense, example_keys, layer_keys
from purebp.network import AnyNetwork, like

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BackpropTrace:
    """Everything one forward + backward pass computes, as a pytree.

    Per top-level layer l = 0..L-1 (the notes' layer l + 1), for a batch of N:

    - ``inputs[l]``: what the layer received (``inputs[0]`` is x)
    - ``activations[l]``: its output (a^l = G(z^l) for a dense layer)
    - ``pre_activations[l]``: z^l for a dense layer, the output for any other layer
    - ``deltas[l]``: delta^l = dC/dz^l for a dense layer, dC/d(output) for any
      other layer; already scaled by 1/N when ``reduction="mean"``
    - ``loss``: the scalar L; ``grads``: dL/dtheta, the same tree as the network
    """

    pre_activations: tuple[Array, ...]
    activations: tuple[Array, ...]
    deltas: tuple[Array, ...]
    loss: Array
    grads: AnyNetwork
    inputs: tuple[Array, ...] = ()


jax.tree_util.register_dataclass(
    BackpropTrace,
    data_fields=["pre_activations", "activations", "deltas", "loss", "grads", "inputs"],
    meta_fields=[],
)


# ---------------------------------------------------------------- the engine


def forward_layers(
    net: AnyNetwork, x: Array, key: Array | None = None, *, example_offset: int | Array = 0
) -> tuple[tuple[Array, ...], tuple]:
    """Run ``layer.forward`` in order; return (every layer's output, one cache per layer).

    ``key`` (a PRNG key, or None for inference) becomes one key per example,
    ``fold_in(key, example_offset + n)``, then one per layer,
    ``fold_in(., l)``: a shard of a batch that starts at example
    ``example_offset`` draws what the whole batch draws for those examples.
    """
    keys = None if key is None else example_keys(key, x.shape[0], example_offset)
    outputs, caches, activation = [], [], x
    for index, layer in enumerate(net.layers):
        activation, cache = layer.forward(activation, layer_keys(keys, index))
        outputs.append(activation)
        caches.append(cache)
    return tuple(outputs), tuple(caches)


def forward_pass(
    net: AnyNetwork, x: Array, key: Array | None = None, *, example_offset: int | Array = 0
) -> tuple[Array, tuple]:
    """Return (the network's output, one cache per layer): ``forward_layers`` without the hidden outputs."""
    outputs, caches = forward_layers(net, x, key, example_offset=example_offset)
    return outputs[-1], caches


def output_layer_activation(net: AnyNetwork) -> str | None:
    """G of the output layer when it is dense (its delta^L is fused with the cost), else None."""
    last = net.layers[-1]
    return last.activation if isinstance(last, Dense) else None


def _output_parts(net: AnyNetwork, output: Array, caches: tuple) -> tuple[Array, _activations.Activation]:
    # the cost sees (z^L, G) of a dense output layer; any other output layer as an identity output
    name = output_layer_activation(net)
    if name is None:
        return output, _activations.get("identity")
    return caches[-1].pre_activation, _activations.get(name)


def output_cost(net: AnyNetwork, output: Array, caches: tuple, y: Array, *, loss: str) -> Array:
    """Return the per-example costs C^n, shape (N,), of the network's output (``forward_pass``'s result)."""
    pre_activation, _ = _output_parts(net, output, caches)
    target = _losses.dense_targets(y, output.shape[-1], output.dtype)
    return _losses.per_example_cost(pre_activation, output, target, loss)


def loss_and_output_delta(
    net: AnyNetwork, output: Array, caches: tuple, y: Array, *, loss: str, reduction: str
) -> tuple[Array, Array]:
    """Return (L, the gradient the backward pass starts from).

    For a dense output layer that is (BP1) delta^L = dC/dz^L, fused with the
    cost where they cancel; for any other output layer, dC/d(output) (the
    cost sees the output as logits or values, an identity output).
    """
    scale = 1.0 / output.shape[0] if reduction == "mean" else 1.0  # L = (1/N) sum_n C^n or sum_n C^n
    target = _losses.dense_targets(y, output.shape[-1], output.dtype)
    pre_activation, output_activation = _output_parts(net, output, caches)
    cost = _losses.per_example_cost(pre_activation, output, target, loss)
    # (BP1) delta^L = dC/da (.) G'(z^L), times dL/dC^n
    delta = scale * _losses.output_delta(pre_activation, output, target, loss, output_activation)
    return scale * jnp.sum(cost), delta


def backward_pass(net: AnyNetwork, caches: tuple, output_delta: Array) -> tuple[AnyNetwork, tuple[Array, ...]]:
    """Run ``layer.backward`` in reverse from ``output_delta``; return (grads like ``net``, what each layer got).

    ``output_delta`` is what ``loss_and_output_delta`` returns: delta^L for a
    dense output layer (which then runs as its linear part, G' already
    applied), dC/d(output) otherwise.
    """
    layers = list(net.layers)
    if isinstance(layers[-1], Dense):
        layers[-1] = layers[-1].linear()
    grads, grad_outputs = [None] * len(layers), [None] * len(layers)
    grad = output_delta
    for index in reversed(range(len(layers))):
        grad_outputs[index] = grad
        grad, grads[index] = layers[index].backward(caches[index], grad)  # the first layer's grad is dead code
    return like(net, grads), tuple(grad_outputs)


def backward_layers(net: AnyNetwork) -> tuple:
    """The layers as ``backward_pass`` runs them (the dense output layer as its linear part)."""
    layers = list(net.layers)
    if isinstance(layers[-1], Dense):
        layers[-1] = layers[-1].linear()
    return tuple(layers)


def loss_and_grads(
    net: AnyNetwork,
    x: Array,
    y: Array,
    *,
    loss: str,
    reduction: str = "mean",
    key: Array | None = None,
    example_offset: int | Array = 0,
    rule: object = None,
) -> tuple[Array, AnyNetwork]:
    """(L, dL/dtheta) by the engine, unjitted and unchecked: for use inside a caller's own jit/scan/shard_map.

    With a ``rule`` other than backprop (``purebp.extras.rules``) the second output
    is that rule's update, not dL/dtheta.
    """
    output, caches = forward_pass(net, x, key, example_offset=example_offset)
    value, delta = loss_and_output_delta(net, output, caches, y, loss=loss, reduction=reduction)
    if rule is not None:  # a learning rule (purebp.extras.rules) makes the update from the same caches and delta^L
        return value, rule.backward_pass(net, caches, delta)
    grads, _ = backward_pass(net, caches, delta)
    return value, grads


def _trace(net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str, key: Array | None = None) -> BackpropTrace:
    outputs, caches = forward_layers(net, x, key)
    value, delta = loss_and_output_delta(net, outputs[-1], caches, y, loss=loss, reduction=reduction)
    grads, grad_outputs = backward_pass(net, caches, delta)
    layers = backward_layers(net)
    is_dense = [isinstance(layer, Dense) for layer in layers]
    return BackpropTrace(
        pre_activations=tuple(c.pre_activation if d else o for c, d, o in zip(caches, is_dense, outputs)),
        activations=outputs,
        deltas=tuple(layer.delta(c, g) if d else g for layer, c, g, d in zip(layers, caches, grad_outputs, is_dense)),
        loss=value,
        grads=grads,
        inputs=(x,) + outputs[:-1],
    )


@functools.partial(jax.jit, static_argnames=("loss", "reduction"))
def _value_and_grad_jit(
    net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str, key: Array | None = None, rule=None
):  # the rule is a traced argument: a new rule of the same shapes reuses the program
    return loss_and_grads(net, x, y, loss=loss, reduction=reduction, key=key, rule=rule)


def compiled_value_and_grad(
    net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str, key: Array | None = None, rule=None
) -> tuple[Array, AnyNetwork]:
    """The jitted (L, grads) program, unchecked: what training steps and gradient checks call.

    ``rule`` (None: backprop, the program it always was) is checked by the caller (``prepare_rule``).
    """
    if rule is None:
        return _value_and_grad_jit(net, x, y, loss, reduction, key)
    return _value_and_grad_jit(net, x, y, loss, reduction, key, rule)


_backprop_trace_jit = jax.jit(_trace, static_argnames=("loss", "reduction"))


@jax.jit
def _forward_jit(net: AnyNetwork, x: Array, key: Array | None = None) -> Array:
    return forward_pass(net, x, key)[0]


# ---------------------------------------------------------------- public API


def forward(net: AnyNetwork, x: Array, *, key: Array | None = None) -> Array:
    """Return the network's output for a batch x (batch first): (N, n_out) for an MLP.

    No ``key``: inference (dropout off). With a key, training mode: the same
    dropout masks that ``value_and_grad(..., key=key)`` uses.
    """
    x, _ = _inputs.coerce_inputs(net, x)
    _inputs.validate_inputs(net, x)
    _inputs.check_key(key)
    return _forward_jit(net, x, key)


def value_and_grad(
    net: AnyNetwork,
    x: Array,
    y: Array,
    *,
    loss: str,
    reduction: str = "mean",
    key: Array | None = None,
    rule: object = None,
) -> tuple[Array, AnyNetwork]:
    """Return (L, dL/dtheta) computed by the hand-written backward pass.

    ``rule`` (``purebp.extras.rules``; None or ``rules.backprop()``: the gradient):
    with feedback alignment, direct feedback alignment or sign symmetry the
    second output is that rule's update (same tree as ``net``), which is NOT
    the gradient of L; its output layer's part still is. The rule is a traced
    argument: a new rule of the same shapes does not recompile.

    ``grads`` has the same tree structure as ``net``, so it lines up leaf for
    leaf with ``net``, optax updates and ``jax.grad``. x is (N,) + the input
    shape; y is integer labels (N,) or one-hot (N, C) for the classification
    losses and (N, n_out) targets otherwise. ``key`` draws the dropout masks
    (none: inference, dropout off). One compile per architecture, shape,
    dtype, loss and reduction.
    """
    return checked_call(_value_and_grad_jit, net, x, y, loss, reduction, key, rule=rule)


def grad(
    net: AnyNetwork,
    x: Array,
    y: Array,
    *,
    loss: str,
    reduction: str = "mean",
    key: Array | None = None,
    rule: object = None,
) -> AnyNetwork:
    """Return dL/dtheta only (see ``value_and_grad``; with a ``rule``, the rule's update)."""
    return value_and_grad(net, x, y, loss=loss, reduction=reduction, key=key, rule=rule)[1]


def backprop_trace(
    net: AnyNetwork, x: Array, y: Array, *, loss: str, reduction: str = "mean", key: Array | None = None
) -> BackpropTrace:
    """Return a ``BackpropTrace``: per layer its input, output, z and delta, the loss and grads, from one pass."""
    return checked_call(_backprop_trace_jit, net, x, y, loss, reduction, key)


# ---------------------------------------------------------------- checked calls


# (jitted function, signature) pairs already called once, so already compiled
_CALLED: set[tuple] = set()


def checked_call(
    jitted,
    net: AnyNetwork,
    x: Array,
    y: Array,
    loss: str,
    reduction: str,
    key: Array | None = None,
    *,
    rule: object = None,
    always_rule: bool = False,
):
    """Return ``jitted(net, x, y, loss, reduction, key)`` with every check of ``validate_inputs`` done.

    A ``rule`` other than backprop is checked against the network
    (``prepare_rule``) and passed as a seventh, traced argument;
    backprop passes none unless ``always_rule`` (then None), so its programs
    are the ones it always had.

    The static checks come first, always. On the first call for a signature
    the label values are checked too before anything is dispatched, so bad
    input does not cost a compile (after ``purebp.clear_caches()`` a signature
    seen before may compile again before its labels are checked). On later
    calls the computation is dispatched first and the labels are checked
    while it runs: a bad label still raises and no result is returned, but
    the host work hides behind the computation.
    """
    x, y = _inputs.coerce_inputs(net, x, y)
    signature, n_out = _inputs.check_static(net, x, y, loss, reduction)
    _inputs.check_key(key)
    rule = prepare_rule(rule, net)
    extra = (rule,) if rule is not None or always_rule else ()
    called = (jitted, signature, key is None)
    if called not in _CALLED:
        _inputs.check_values(n_out, y, loss)
        result = jitted(net, x, y, loss, reduction, key, *extra)
        if len(_CALLED) > 4096:  # bounded: a long sweep over shapes does not grow it forever
            _CALLED.clear()
        _CALLED.add(called)
        return result
    result = jitted(net, x, y, loss, reduction, key, *extra)
    _inputs.check_values(n_out, y, loss)
    return result


_programs.on_clear(lambda: _CALLED.clear())


def prepare_rule(rule: object, net: AnyNetwork) -> object:
    """Return ``rule.prepare(net)``: the rule checked against ``net``, or None for plain backprop.

    A learning rule (``purebp.rules``) is any object with ``prepare(net)`` and
    ``backward_pass(net, caches, output_delta)``; the engine knows nothing else of it.
    """
    if rule is None:
        return None
    if not (callable(getattr(rule, "prepare", None)) and callable(getattr(rule, "backward_pass", None))):
        raise TypeError(
            "rule must be None or a rule from purebp.rules (backprop(), feedback_alignment(key, net), "
            f"direct_feedback_alignment(key, net), sign_symmetry()), got {type(rule).__name__}"
        )
    return rule.prepare(net)
