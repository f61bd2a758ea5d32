"""Learning rules other than backprop: the feedback path of (BP2) replaced, everything else kept.

Backprop's hidden deltas come down the chain (BP2), batch-first
``grad_in = delta^{l+1} @ W^{l+1}``, i.e. delta^l = ((W^{l+1})^T delta^{l+1}) (.) G'(z^l).
A rule keeps the forward pass, the cost, the output delta (BP1) and the
weight and bias updates (BP3, BP4) of every layer, and changes only which
matrix carries the error down:

- ``backprop()``: W^{l+1} itself (the default; ``rule=None`` is the same).
- ``feedback_alignment(key, net)``: a fixed matrix M^{l+1} of W^{l+1}'s shape in its
  place, delta^l = (B^l delta^{l+1}) (.) G'(z^l) with B^l = (M^{l+1})^T fixed
  (Lillicrap, Cownden, Tweed & Akerman 2016, Nature Communications 7:13276).
- ``direct_feedback_alignment(key, net)``: the output delta e = delta^L sent straight to
  every hidden layer, delta^l = (D^l e) (.) G'(z^l) with fixed D^l of shape (n_l, n_L),
  stored as its transpose (n_L, n_l): no chain at all (Nokland 2016, NeurIPS,
  "Direct Feedback Alignment Provides Learning in Deep Neural Networks").
- ``sign_symmetry()``: sign(W^{l+1}) in W^{l+1}'s place (Liao, Leibo & Poggio 2016,
  "How Important Is Weight Symmetry in Backpropagation?", AAAI): the signs of the
  forward weights, tracking them, without their magnitudes.

The output layer's update is always the true gradient (nothing lies between it
and the cost). With any rule but backprop, the hidden layers' updates are not
the gradient of anything in general: ``value_and_grad(..., rule=)`` returns
(L, the rule's update), and the update is what optax descends along.

A rule is a pytree: its fixed matrices are leaves (one entry per layer of the
network's stack, None where a layer has none), its kind is the class and any
option is static. It passes through ``jax.jit`` as an argument (a new rule of
the same shapes reuses the compiled program), through ``lax.scan`` and
through ``jax.tree`` round trips. Rules run on stacks of ``Dense`` layers,
with ``Dropout`` between them allowed (its mask gates the error as in
backprop); any other layer kind (residual, layer norm, your own) is refused,
naming its index and kind, before anything compiles.

Initialisation and scaling of the fixed matrices: Lillicrap et al. drew B
uniformly with a range chosen by hand per experiment; here every M^{l+1} of
feedback alignment is drawn exactly as the weights it stands in for are
(``init_dense``: N(0, s^2) with He s = sqrt(2 / n_in) for rectifier-like G and
Glorot s = sqrt(2 / (n_in + n_out)) otherwise, from the layer's activation), so
that at initialisation the error carried down has backprop's magnitude and a
learning rate tuned for backprop is in range. Direct feedback alignment's D^l
(stored (n_L, n_l)) is N(0, 1 / n_L): each hidden unit receives a mix of the
n_L output errors of the errors' own scale. The draws: layer l uses
``jax.random.split(key, len(stack))[l]``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from purebp import engine as _engine
from purebp import inputs as _inputs
from purebp.layers import Dense, Dropout
from purebp.layers.dense import init_dense
from purebp.network import AnyNetwork, Sequential, like

Array = jax.Array

KINDS = ("backprop", "feedback_alignment", "direct_feedback_alignment", "sign_symmetry")


# ---------------------------------------------------------------- the rules


class _Plug:
    """What the engine calls on a rule: ``prepare(net)`` (checked, or None for backprop) and ``backward_pass``."""

    def prepare(self, net: AnyNetwork) -> Rule | None:
        return check_rule(self, net)

    def backward_pass(self, net: AnyNetwork, caches: tuple, output_delta: Array) -> AnyNetwork:
        return backward_pass(self, net, caches, output_delta)


@dataclasses.dataclass(frozen=True)
class Backprop(_Plug):
    """The true gradient: (BP2) with W^{l+1}. ``rule=None`` means the same; no leaves."""

    kind = "backprop"


@dataclasses.dataclass(frozen=True)
class FeedbackAlignment(_Plug):
    """(BP2) with a fixed M^{l+1} (W^{l+1}'s shape) in place of W^{l+1}: ``grad_in = delta @ M``.

    ``feedback[l]`` is M for layer l of the stack (None for the first dense
    layer, whose W never carries an error down, and for dropout layers).
    ``track_weights`` (static): M^{l+1} is the current W^{l+1} at every call,
    and ``feedback`` is all None: backprop exactly, a control.
    """

    feedback: tuple
    track_weights: bool = dataclasses.field(default=False, metadata={"static": True})
    kind = "feedback_alignment"


@dataclasses.dataclass(frozen=True)
class DirectFeedbackAlignment(_Plug):
    """Each hidden dense layer l gets ``grad = e @ feedback[l]``, e = delta^L (N, n_L), ``feedback[l]`` (n_L, n_l).

    None for the output layer and for dropout layers.
    """

    feedback: tuple
    kind = "direct_feedback_alignment"


@dataclasses.dataclass(frozen=True)
class SignSymmetry(_Plug):
    """(BP2) with sign(W^{l+1}) in place of W^{l+1}; no leaves (the signs are read off the current weights)."""

    kind = "sign_symmetry"


jax.tree_util.register_dataclass(Backprop, data_fields=[], meta_fields=[])
jax.tree_util.register_dataclass(FeedbackAlignment, data_fields=["feedback"], meta_fields=["track_weights"])
jax.tree_util.register_dataclass(DirectFeedbackAlignment, data_fields=["feedback"], meta_fields=[])
jax.tree_util.register_dataclass(SignSymmetry, data_fields=[], meta_fields=[])

Rule = Backprop | FeedbackAlignment | DirectFeedbackAlignment | SignSymmetry
RULE_TYPES = (Backprop, FeedbackAlignment, DirectFeedbackAlignment, SignSymmetry)


# ---------------------------------------------------------------- constructors


def backprop() -> Backprop:
    """The default rule, the true gradient. Passing it is the same as passing ``rule=None``: the same program."""
    return Backprop()


def sign_symmetry() -> SignSymmetry:
    """Sign symmetry (Liao, Leibo & Poggio 2016): sign(W^{l+1}) in place of W^{l+1} in (BP2).

    The feedback has the forward weights' signs and unit magnitude, so the
    hidden deltas are larger than backprop's by roughly 1 / mean|W| per layer
    above: use an optimizer that is invariant to a leaf's scale (Adam) or a
    smaller learning rate.
    """
    return SignSymmetry()


def feedback_alignment(
    key: Array, net: AnyNetwork, *, feedback: str | AnyNetwork | Sequence[Array] | None = None
) -> FeedbackAlignment:
    """Feedback alignment (Lillicrap et al. 2016): a fixed M^{l+1} in place of W^{l+1} in (BP2).

    ``feedback``:

    - None: M^{l+1} drawn from ``key`` as W^{l+1} is drawn (``init_dense``'s
      He/Glorot normal for that layer's activation; see the module docstring).
    - ``"weights"``: M^{l+1} is the current W^{l+1} at every step, so the rule
      is backprop, bit for bit, for a whole training run (a control; ``key`` is
      unused). This is how "feedback = the network's own weights" is spelled
      for training: a rule's matrices are fixed leaves and never follow the
      weights, so passing today's weights as matrices gives backprop at the
      first step only, and a fixed-feedback run from then on.
    - a network with ``net``'s structure (e.g. ``net`` itself): its dense
      weights, fixed from now on.
    - a sequence with one matrix per dense layer after the first, each of
      that layer's W shape (n_out, n_in), fixed.
    """
    layers = _dense_stack(net, "feedback_alignment")
    if isinstance(feedback, str):
        if feedback != "weights":
            raise ValueError(f"feedback must be None, 'weights', a network or a sequence of matrices; got {feedback!r}")
        return FeedbackAlignment(feedback=tuple(None for _ in layers), track_weights=True)
    dense_indices = [i for i, layer in enumerate(layers) if isinstance(layer, Dense)]
    above_first = dense_indices[1:]
    if feedback is None:
        keys = jax.random.split(key, len(layers))
        matrices = {
            i: init_dense(keys[i], int(layers[i].w.shape[1]), int(layers[i].w.shape[0]), layers[i].activation,
                          np.dtype(layers[i].w.dtype))[0]
            for i in above_first
        }  # fmt: skip
    else:
        if isinstance(feedback, Sequential):
            given = [layer.w for layer in _dense_stack(feedback, "feedback_alignment") if isinstance(layer, Dense)][1:]
        elif isinstance(feedback, Sequence):
            given = list(feedback)
        else:
            raise TypeError(
                f"feedback must be None, 'weights', a network or a sequence of matrices; got {type(feedback).__name__}"
            )
        if len(given) != len(above_first):
            raise ValueError(
                f"feedback has {len(given)} matrices but the network has {len(above_first)} dense layers after "
                "the first (one matrix each, of that layer's weight shape)"
            )
        matrices = dict(zip(above_first, [jnp.asarray(m) for m in given]))
    rule = FeedbackAlignment(feedback=tuple(matrices.get(i) for i in range(len(layers))))
    check_rule(rule, net)
    return rule


def direct_feedback_alignment(key: Array, net: AnyNetwork, *, feedback: Sequence[Array] | None = None):
    """Direct feedback alignment (Nokland 2016): delta^l = (D^l e) (.) G'(z^l) for every hidden layer, e = delta^L.

    Batch-first, hidden dense layer l receives ``e @ F^l`` with F^l = (D^l)^T of
    shape (n_L, n_l), fixed. ``feedback``: None draws F^l ~ N(0, 1 / n_L) from
    ``key``; or one matrix per hidden dense layer (every dense layer but the
    last), each (n_L, n_l). With one hidden layer F^1 has the output weights'
    shape and the rule is feedback alignment with M^2 = F^1, exactly.
    """
    layers = _dense_stack(net, "direct_feedback_alignment")
    dense_indices = [i for i, layer in enumerate(layers) if isinstance(layer, Dense)]
    hidden, n_out = dense_indices[:-1], int(layers[dense_indices[-1]].w.shape[0])
    if feedback is None:
        keys = jax.random.split(key, len(layers))
        dtype = np.dtype(layers[hidden[0]].w.dtype) if hidden else None
        matrices = {i: _dfa_draw(keys[i], n_out, int(layers[i].w.shape[0]), dtype) for i in hidden}
    else:
        if isinstance(feedback, (str, Sequential)) or not isinstance(feedback, Sequence):
            raise TypeError(f"feedback must be None or a sequence of matrices; got {type(feedback).__name__}")
        if len(feedback) != len(hidden):
            raise ValueError(
                f"feedback has {len(feedback)} matrices but the network has {len(hidden)} hidden dense layers "
                f"(one matrix each, of shape (n_outputs, that layer's width))"
            )
        matrices = dict(zip(hidden, [jnp.asarray(m) for m in feedback]))
    rule = DirectFeedbackAlignment(feedback=tuple(matrices.get(i) for i in range(len(layers))))
    check_rule(rule, net)
    return rule


@functools.partial(jax.jit, static_argnames=("n_out", "width", "dtype"))
def _dfa_draw(key: Array, n_out: int, width: int, dtype: np.dtype) -> Array:
    draw = dtype if dtype.itemsize >= 4 else np.dtype("float32")
    return (jax.random.normal(key, (n_out, width), dtype=draw) / np.sqrt(n_out).astype(draw)).astype(dtype)


# ---------------------------------------------------------------- validation


def _dense_stack(net: AnyNetwork, kind: str) -> tuple:
    if not isinstance(net, Sequential):
        raise TypeError(f"expected a purebp.Sequential, got {type(net).__name__}")
    layers = net.layers
    for index, layer in enumerate(layers):
        if not isinstance(layer, (Dense, Dropout)):
            raise TypeError(
                f"the {kind} rule is defined for dense layers (and dropout between them), but layer {index} is "
                f"{type(layer).__name__} ({layer!r}); use backprop (rule=None) for this network"
            )
    if not isinstance(layers[-1], Dense):
        raise TypeError(f"the {kind} rule needs a dense output layer; the last layer is {type(layers[-1]).__name__}")
    return layers


def is_backprop(rule: object) -> bool:
    """True for ``None`` and ``Backprop()``: the default path, the true gradient."""
    return rule is None or isinstance(rule, Backprop)


def normalize(rule: object) -> Rule | None:
    """Return None for backprop (so that it shares backprop's compiled programs), the rule otherwise; check its type."""
    if is_backprop(rule):
        return None
    if not isinstance(rule, RULE_TYPES):
        raise TypeError(
            "rule must be None or a rule from purebp.rules (backprop(), feedback_alignment(key, net), "
            f"direct_feedback_alignment(key, net), sign_symmetry()), got {type(rule).__name__}"
        )
    return rule


def check_rule(rule: object, net: AnyNetwork) -> Rule | None:
    """Raise TypeError/ValueError, before anything compiles, unless ``rule`` runs on ``net``; return it normalized.

    The network's layers must be dense (dropout allowed between), and the
    rule's matrices must have the shapes and dtype its constructor gives for
    this network. Cached per (rule, network) signature, so eager calls stay cheap.
    """
    rule = normalize(rule)
    if rule is None:
        return None
    leaves = jax.tree.leaves(rule)
    _check_signature(  # shapes and dtypes only: static, so this works on tracers under a user's jit too
        type(rule),
        jax.tree.structure(rule),
        tuple((tuple(np.shape(leaf)), str(jnp.result_type(leaf))) for leaf in leaves),
        _network_signature(net),
    )
    return rule


def _network_signature(net: AnyNetwork) -> tuple:
    if not isinstance(net, Sequential):
        raise TypeError(f"expected a purebp.Sequential, got {type(net).__name__}")
    signature = []
    for layer in net.layers:
        if isinstance(layer, Dense):
            signature.append(("Dense", tuple(np.shape(layer.w)), str(jnp.result_type(layer.w))))
        else:
            signature.append((type(layer).__name__, repr(layer)))
    return tuple(signature)


@functools.lru_cache(maxsize=256)
def _check_signature(rule_type: type, structure, leaf_signature: tuple, net_signature: tuple) -> None:
    kind = rule_type.kind
    for index, entry in enumerate(net_signature):
        if entry[0] not in ("Dense", "Dropout"):
            raise TypeError(
                f"the {kind} rule is defined for dense layers (and dropout between them), but layer {index} is "
                f"{entry[0]} ({entry[1]}); use backprop (rule=None) for this network"
            )
    if net_signature[-1][0] != "Dense":
        raise TypeError(f"the {kind} rule needs a dense output layer; the last layer is {net_signature[-1][0]}")
    if rule_type is SignSymmetry:
        return
    dense = [i for i, entry in enumerate(net_signature) if entry[0] == "Dense"]
    if rule_type is FeedbackAlignment:
        expected = {i: net_signature[i][1] for i in dense[1:]}
    else:
        n_out = net_signature[dense[-1]][1][0]
        expected = {i: (n_out, net_signature[i][1][0]) for i in dense[:-1]}
    placed = jax.tree.unflatten(structure, list(range(len(leaf_signature))))
    feedback = placed.feedback
    if placed.__class__ is FeedbackAlignment and placed.track_weights:
        expected = {}
    if len(feedback) != len(net_signature):
        raise ValueError(
            f"the {kind} rule was made for a network of {len(feedback)} layers, but this network has "
            f"{len(net_signature)}: make the rule from this network"
        )
    dtype = net_signature[dense[0]][2]
    for index, slot in enumerate(feedback):
        if index not in expected:
            if slot is not None:
                raise ValueError(f"the {kind} rule has a feedback matrix for layer {index}, which takes none")
            continue
        if slot is None:
            raise ValueError(
                f"the {kind} rule has no feedback matrix for layer {index}: make the rule from this network"
            )
        shape, leaf_dtype = leaf_signature[slot]
        if shape != tuple(expected[index]):
            raise ValueError(
                f"the {kind} rule's feedback matrix for layer {index} has shape {shape}, expected "
                f"{tuple(expected[index])} for this network"
            )
        if leaf_dtype != dtype:
            raise TypeError(
                f"the {kind} rule's feedback matrix for layer {index} is {leaf_dtype} but the network's "
                f"parameters are {dtype}"
            )


def describe(rule: object) -> dict:
    """The rule as JSON values, for checkpoints: its kind, options and a digest of its fixed matrices."""
    rule = normalize(rule)
    if rule is None:
        return {"kind": "backprop"}
    description = {"kind": rule.kind}
    if isinstance(rule, FeedbackAlignment):
        description["track_weights"] = rule.track_weights
    leaves = jax.tree.leaves(rule)
    if leaves:
        description["feedback_sha256"] = _inputs.digest(*leaves)
    return description


# ---------------------------------------------------------------- the backward pass under a rule


def feedback_matrix(rule: Rule, layer: Dense, index: int) -> Array:
    """The matrix standing in for W in layer ``index``'s (BP2) line ``grad_in = delta @ W`` (FA, sign symmetry)."""
    if isinstance(rule, FeedbackAlignment):
        # the first dense layer has no matrix: its grad_in is never used (dead code under jit)
        fixed = None if rule.track_weights else rule.feedback[index]
        return layer.w if fixed is None else fixed
    if isinstance(rule, SignSymmetry):
        return jnp.sign(layer.w)
    return layer.w


def backward_pass(rule: Rule | None, net: AnyNetwork, caches: tuple, output_delta: Array) -> AnyNetwork:
    """The rule's update, the tree of ``net``, from ``forward_pass``'s caches and delta^L (``loss_and_output_delta``).

    Every dense layer runs its own backward rule (BP3, BP4 from its delta, the
    delta from the error it receives); only the error it receives changes:
    under FA and sign symmetry the layer above passed ``delta @ M`` instead of
    ``delta @ W``; under DFA it is ``e @ F^l``, gated by the masks of any
    dropout layers above it (as backprop's error would be).
    """
    layers = list(net.layers)
    layers[-1] = layers[-1].linear()  # delta^L is fused with the cost
    direct = isinstance(rule, DirectFeedbackAlignment)
    grads, grad = [None] * len(layers), output_delta
    for index in reversed(range(len(layers))):
        layer = layers[index]
        if isinstance(layer, Dropout):
            grad, grads[index] = layer.backward(caches[index], grad)
            continue
        if direct and index != len(layers) - 1:
            grad = output_delta @ rule.feedback[index]  # delta^l's first factor is D^l e, not (W^{l+1})^T delta^{l+1}
            above = index + 1
            while isinstance(layers[above], Dropout):
                above += 1
            for gate in reversed(range(index + 1, above)):  # the dropout masks between this layer and the next
                grad, _ = layers[gate].backward(caches[gate], grad)
            grad, grads[index] = layer.backward(caches[index], grad)  # this grad_in is never used: dead code
            continue
        carrier = layer if rule is None else dataclasses.replace(layer, w=feedback_matrix(rule, layer, index))
        grad, grads[index] = carrier.backward(caches[index], grad)  # (BP2) with M in place of W; BP3/BP4 unchanged
    return like(net, grads)


# ---------------------------------------------------------------- alignment


class Alignment(NamedTuple):
    """Angles in degrees, one entry per layer of the network's stack (NaN where not defined).

    - ``update[l]``: between the rule's update of W^l and the true dL/dW^l,
      both flattened (0 for backprop and for the output layer under every rule).
    - ``feedback[l]``: between W^l and the matrix that stands in for it in
      (BP2), flattened (FA: M^l, i.e. between (W^l)^T and B^{l-1}; sign
      symmetry: sign(W^l); backprop and ``feedback="weights"``: 0); NaN for the
      first dense layer, for dropout layers and under DFA (whose F^l maps from
      the output, standing in for no single W).
    """

    update: Array
    feedback: Array


def angle_degrees(a: Array, b: Array) -> Array:
    """The angle between two arrays, flattened, in degrees: arccos(<a, b> / (|a| |b|)); NaN if either is zero.

    Computed as 2 atan2(|u - v|, |u + v|) with u = a / |a|, v = b / |b| (Kahan's
    form): accurate near 0 and 180 degrees, where arccos loses half the digits,
    and exactly 0 for equal arrays.
    """
    a, b = jnp.ravel(a), jnp.ravel(b)
    norm_a, norm_b = jnp.linalg.norm(a), jnp.linalg.norm(b)
    defined = (norm_a > 0) & (norm_b > 0)
    u = a / jnp.where(defined, norm_a, 1)
    v = b / jnp.where(defined, norm_b, 1)
    angle = 2 * jnp.arctan2(jnp.linalg.norm(u - v), jnp.linalg.norm(u + v))
    return jnp.where(defined, jnp.degrees(angle), jnp.nan)


def _alignment(net: AnyNetwork, true_grads: AnyNetwork, update: AnyNetwork, rule: Rule | None) -> Alignment:
    layers, true_layers, rule_layers = net.layers, true_grads.layers, update.layers
    nan = jnp.full((), jnp.nan, dtype=jax.tree.leaves(net)[0].dtype)
    first_dense = next(i for i, layer in enumerate(layers) if isinstance(layer, Dense))
    updates, feedbacks = [], []
    for index, layer in enumerate(layers):
        if not isinstance(layer, Dense):
            updates.append(nan)
            feedbacks.append(nan)
            continue
        updates.append(angle_degrees(rule_layers[index].w, true_layers[index].w))
        if index == first_dense or isinstance(rule, DirectFeedbackAlignment):
            feedbacks.append(nan)
        else:
            matrix = layer.w if rule is None else feedback_matrix(rule, layer, index)
            feedbacks.append(angle_degrees(matrix, layer.w))
    return Alignment(jnp.stack(updates), jnp.stack(feedbacks))


def alignment(net: AnyNetwork, true_grads: AnyNetwork, update: AnyNetwork, rule: object) -> Alignment:
    """``Alignment`` from the true gradient and the rule's update, already computed (unjitted, unchecked)."""
    return _alignment(net, true_grads, update, normalize(rule))


@functools.partial(jax.jit, static_argnames=("loss", "reduction"))
def _alignment_jit(net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str, key: Array | None, rule):
    # one forward pass; the true gradient and the rule's update both start from its caches and delta^L
    output, caches = _engine.forward_pass(net, x, key)
    _, delta = _engine.loss_and_output_delta(net, output, caches, y, loss=loss, reduction=reduction)
    true_grads, _ = _engine.backward_pass(net, caches, delta)
    update = true_grads if rule is None else backward_pass(rule, net, caches, delta)
    return alignment(net, true_grads, update, rule)


def alignment_angles(
    net: AnyNetwork,
    x: Array,
    y: Array,
    *,
    loss: str,
    reduction: str = "mean",
    rule: Rule | None,
    key: Array | None = None,
) -> Alignment:
    """Return ``rules.Alignment(update, feedback)``: angles in degrees per layer of the stack, on the batch (x, y).

    ``update[l]`` is the angle between the rule's update of W^l and the true
    gradient dL/dW^l (flattened); ``feedback[l]`` the angle between W^l and the
    matrix standing in for it in (BP2) (feedback alignment: between (W^l)^T
    and B^{l-1}); NaN where undefined (see ``rules.Alignment``). One jitted
    program, one forward pass and two backward passes; the rule is a traced
    argument, so calling it every epoch costs no compile after the first.
    """
    return _engine.checked_call(_alignment_jit, net, x, y, loss, reduction, key, rule=rule, always_rule=True)


def alignment_callback(
    x: Array, y: Array, *, loss: str, reduction: str = "mean", rule: object = None, count: int = 512
):
    """A ``fit`` callback that measures ``alignment_angles`` after every epoch on the first ``count`` examples.

    Pass it as ``fit(..., callback=rules.alignment_callback(x, y, loss=..., rule=r))``
    with the training data and the rule being trained: each history row gets
    ``update_angles`` and ``feedback_angles``, lists of degrees per layer of the
    stack (NaN where undefined; see ``Alignment``), measured with dropout off
    and outside the epoch's training time (``fit`` calls its ``measure(net)``
    before recording the row).
    """
    import types

    rule = normalize(rule)
    x, y = x[:count], y[:count]

    def measure(net: AnyNetwork) -> dict[str, list[float]]:
        angles = alignment_angles(net, x, y, loss=loss, reduction=reduction, rule=rule)
        return {
            "update_angles": [float(a) for a in np.asarray(angles.update)],
            "feedback_angles": [float(a) for a in np.asarray(angles.feedback)],
        }

    return types.SimpleNamespace(measure=measure)
