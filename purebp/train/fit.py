"""Pure-functional training on the hand-written gradient.

The notes end with gradient descent, theta^{k+1} = theta^k - eta grad L(theta^k).
Here that update is one pure function of (parameters, optimizer state, batch)
(``make_train_step``), any optax ``GradientTransformation`` supplies the rule
(plain gradient descent is ``optax.sgd(eta)``), and one epoch is one jit-compiled
``lax.scan`` over shuffled minibatches (``run_epoch``): no Python loop and no
host round trip per step. ``fit`` validates everything once, checks the
hand-written gradient against jax.grad, then runs epochs, evaluates,
checkpoints and resumes.

Minibatches: each epoch draws a permutation from ``jax.random.fold_in(key,
epoch)`` and cuts it into ``N // batch_size`` batches; the ``N % batch_size``
examples left over that epoch are not used (different ones each epoch). A
full batch (``batch_size == N``) uses the data in order: plain gradient
descent, as in the notes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from purebp import check as _check
from purebp import engine as _engine
from purebp import inputs as _inputs
from purebp import losses as _losses
from purebp import programs
from purebp.extras import rules as _rules
from purebp.layers import Dropout
from purebp.network import AnyNetwork, Sequential, is_mlp, validate_sequential
from purebp.train import precision as _precision

Array = jax.Array
Batch = tuple[Array, Array]
GRADIENTS = ("handwritten", "autodiff")
VERIFY_BATCH = 16  # examples used by the pre-training gradient check
ALIGNMENT_BATCH = 512  # training examples (the first ones) that fit(log_alignment=True) measures angles on
# fold_in constants that separate fit's key streams: epoch e shuffles with fold_in(key, e) (as before
# dropout existed); its step i draws dropout masks from fold_in(fold_in(fold_in(key, e), DROPOUT_STREAM), i)
DROPOUT_STREAM = 0x0D50
VERIFY_STREAM = 0x0C4E


class GradientMismatchError(ValueError):
    """The hand-written gradient disagrees with jax.grad: ``fit`` refuses to train. ``report`` says where."""

    def __init__(self, report: _check.GradientReport, layer_reports: tuple = ()):
        failing = "".join(f"\n{layer_report}" for layer_report in layer_reports if not layer_report.passed)
        super().__init__(
            "refusing to train: the hand-written gradient disagrees with jax.grad on this architecture "
            f"(pass verify=False to train anyway)\n{report}{failing}"
        )
        self.report = report
        self.layer_reports = tuple(layer_reports)


class DivergenceError(FloatingPointError):
    """The training loss became non-finite.

    The loss of step s is computed at the parameters after s updates. When it
    is the first non-finite one, ``step`` is s (global, from 0) and ``epoch``
    its epoch (from 0); ``net`` and ``opt_state`` are the parameters after
    s - 1 updates (the initial ones when s = 0): the last ones whose loss was
    finite, before the update that broke them. ``history`` holds the epochs
    completed before the divergence.
    """

    def __init__(self, message: str, *, net: Sequential, opt_state: Any, step: int, epoch: int, history: dict):
        super().__init__(message)
        self.net, self.opt_state, self.step, self.epoch, self.history = net, opt_state, step, epoch, history


# ---------------------------------------------------------------- the step


def _gradient_function(gradient: str) -> Callable:
    # both are jitted (loss, grads) functions of (net, x, y, loss, reduction, key=None);
    # called inside another jit they inline, with no eager validation per step
    if gradient == "handwritten":
        return _engine.compiled_value_and_grad
    if gradient == "autodiff":
        return _check.compiled_autodiff_value_and_grad
    raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    loss: str,
    reduction: str = "mean",
    gradient: str = "handwritten",
    mesh: jax.sharding.Mesh | None = None,
    compute_dtype: str | None = None,
    rule: _rules.Rule | None = None,
) -> Callable[..., tuple[AnyNetwork, Any, dict[str, Array]]]:
    """Return the pure step ``(net, opt_state, (x, y), key=None, rule=rule) -> (new_net, new_opt_state, {"loss": L})``.

    ``key`` draws the step's dropout masks (None: dropout off).

    ``rule`` (``purebp.extras.rules``; None: backprop) replaces the gradient by the
    rule's update (feedback alignment, direct feedback alignment, sign
    symmetry), which optax then descends along. Inside your own ``jit`` pass
    the rule to the step as an argument (``step(net, s, batch, key, rule=r)``
    with ``r`` an argument of the jitted function): it is then traced, and a
    new rule of the same shapes reuses the program; the one given here is only
    the default. A rule needs the hand-written single-device pass in the
    network's dtype: not ``gradient="autodiff"``, a ``mesh`` or ``compute_dtype``.

    L is the loss at ``net`` (before the update); the update is
    ``optax.apply_updates(net, optimizer.update(grads, opt_state, net))``, so
    ``optax.sgd(eta)`` gives the notes' theta <- theta - eta grad L. The step
    does no input checks (they would run on tracers): check once with
    ``purebp.engine.validate_inputs``. It is jittable, scannable and
    ``gradient="autodiff"`` swaps in jax.grad of the same forward pass and cost.
    With a ``mesh`` the gradient is data-parallel over its "data" axis
    (``purebp.train.distributed``): the batch is split, each device runs the
    hand-written pass on its share, one ``psum`` adds the shares.
    With ``compute_dtype`` ("bfloat16" or "float16") the step is mixed
    precision (``purebp.train.precision.mixed_value_and_grad``): ``net`` and x stay
    in the master dtype (float32), the hand-written pass runs on copies cast
    to ``compute_dtype``, and L, the gradients, the optimizer state and the
    update are in the master dtype; its dtype and shape checks run once per
    trace. Not combined with a ``mesh`` or ``gradient="autodiff"`` yet.
    """
    value_and_grad = _gradient_function(gradient)
    if mesh is not None:
        _check_mesh_gradient(gradient)
        value_and_grad = _data_parallel_gradient(mesh)
    if compute_dtype is not None:
        value_and_grad = _mixed_gradient(compute_dtype, gradient, mesh)
    default_rule = _rules.normalize(rule)
    _check_rule_options(default_rule, gradient, mesh, compute_dtype)

    def train_step(net: AnyNetwork, opt_state: Any, batch: Batch, key: Array | None = None, rule=default_rule):
        x, y = batch
        rule = _rules.check_rule(rule, net)  # shapes only: works on tracers
        if rule is None:
            value, grads = value_and_grad(net, x, y, loss, reduction, key)
        else:
            _check_rule_options(rule, gradient, mesh, compute_dtype)
            value, grads = _engine.compiled_value_and_grad(net, x, y, loss, reduction, key, rule)
        # optax mixes Python scalars with int32 counters (Adam's bias correction):
        # give it the standard promotion rules even when the caller runs strict ones
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, net)
            net = optax.apply_updates(net, updates)
        return net, opt_state, {"loss": value}

    return train_step


def _check_rule_options(rule: object, gradient: str, mesh: object, compute_dtype: str | None) -> None:
    if rule is None:
        return
    if gradient != "handwritten":
        raise ValueError(
            f"a learning rule ({rule.kind}) replaces the hand-written backward pass's feedback path: it needs "
            f"gradient='handwritten', got {gradient!r}"
        )
    if mesh is not None:
        raise ValueError(
            f"a learning rule ({rule.kind}) cannot be combined with a mesh yet: the sharded pass is backprop"
        )
    if compute_dtype is not None:
        raise ValueError(
            f"a learning rule ({rule.kind}) cannot be combined with compute_dtype yet: the mixed pass is backprop"
        )


def _mixed_gradient(compute_dtype: str, gradient: str, mesh: jax.sharding.Mesh | None) -> Callable:
    if gradient != "handwritten":
        raise ValueError(
            f"compute_dtype needs gradient='handwritten' (the mixed pass is hand-written), got {gradient!r}"
        )
    if mesh is not None:
        raise ValueError("compute_dtype cannot be combined with a mesh yet: the data-parallel pass has no mixed mode")
    return _precision.mixed_value_and_grad(compute_dtype)


def _check_mesh_gradient(gradient: str) -> None:
    if gradient != "handwritten":
        raise ValueError(f"a mesh needs gradient='handwritten' (the sharded pass is hand-written), got {gradient!r}")


def _data_parallel_gradient(mesh: jax.sharding.Mesh) -> Callable:
    from purebp.train import distributed

    def value_and_grad(net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str, key: Array | None = None):
        return distributed.sharded_value_and_grad(mesh, distributed.DATA_AXIS, loss, reduction)(net, x, y, key)

    return value_and_grad


# ---------------------------------------------------------------- one epoch


class EpochState(NamedTuple):
    """What one epoch's ``lax.scan`` carries from step to step.

    ``previous_*`` are the parameters before the last update, returned when
    the loss goes non-finite; ``bad_step`` is -1 until then, then the index
    (within the epoch) of the first step whose loss was non-finite, after
    which every step is skipped.
    """

    net: Sequential
    opt_state: Any
    previous_net: Sequential
    previous_opt_state: Any
    bad_step: Array


def run_epoch(
    state: EpochState,
    key: Array,
    x: Array,
    y: Array,
    *,
    optimizer: optax.GradientTransformation,
    loss: str,
    reduction: str,
    gradient: str,
    batch_size: int,
    num_batches: int,
    shuffle: bool,
    mesh: jax.sharding.Mesh | None = None,
    start: int | Array = 0,
    compute_dtype: str | None = None,
    dropout_key: Array | None = None,
    rule: _rules.Rule | None = None,
) -> tuple[EpochState, Array]:
    """Run ``num_batches`` steps from ``state`` as one ``lax.scan``; return (final ``EpochState``, per-step losses).

    ``rule`` (``purebp.extras.rules``, None: backprop) is a traced argument of the
    compiled epoch: a new rule of the same shapes reuses it.

    Batch i is examples ``order[(start + i) * batch_size:(start + i + 1) * batch_size]``
    with ``order = jax.random.permutation(key, N)`` (or 0..N-1 when not
    ``shuffle``): ``start`` > 0 runs the rest of an epoch that was cut short,
    with the same batches the whole epoch would have used. Losses of skipped
    steps (after a non-finite loss) are NaN. With a ``mesh`` each step's
    gradient is data-parallel over its "data" axis (``batch_size`` must divide
    by its size; ``fit`` checks); ``fit`` itself uses ``run_sharded_epoch``,
    which also works across processes. ``compute_dtype`` makes each step mixed
    precision (``make_train_step``). With ``dropout_key``, step i draws its
    dropout masks from ``fold_in(dropout_key, start + i)``, so a cut epoch's
    rest draws what the whole epoch would have drawn.

    The compiled program is keyed on ``programs.program_key(optimizer.update)``,
    not on the optimizer object: a new optax object that computes the same thing
    (``optax.inject_hyperparams`` keeps the numbers in the state) reuses it.
    """
    rule = _rules.normalize(rule)
    extra = () if rule is None else (rule,)  # backprop: the call, and the program, it always was
    return _run_epoch_jit(
        state,
        key,
        x,
        y,
        jnp.asarray(start, dtype=jnp.int32),
        dropout_key,
        *extra,
        update=programs.Static(optimizer.update),
        loss=loss,
        reduction=reduction,
        gradient=gradient,
        batch_size=batch_size,
        num_batches=num_batches,
        shuffle=shuffle,
        mesh=mesh,
        compute_dtype=compute_dtype,
    )


def _with_update(update: programs.Static) -> optax.GradientTransformation:
    # inside the program only update runs: init stays outside, in fit
    def init(params: Any) -> Any:
        raise RuntimeError("the compiled epoch never initialises the optimizer state")

    return optax.GradientTransformation(init, update.value)


@functools.partial(
    jax.jit,
    static_argnames=(
        "update", "loss", "reduction", "gradient", "batch_size", "num_batches", "shuffle", "mesh", "compute_dtype"
    ),
)  # fmt: skip
def _run_epoch_jit(
    state, key, x, y, start, dropout_key, rule=None, *, update, loss, reduction, gradient, batch_size, num_batches,
    shuffle, mesh, compute_dtype,
):  # fmt: skip
    step = make_train_step(
        _with_update(update), loss=loss, reduction=reduction, gradient=gradient, mesh=mesh, compute_dtype=compute_dtype,
        rule=rule,
    )  # fmt: skip
    n = x.shape[0]
    order = jax.random.permutation(key, n) if shuffle else jnp.arange(n)
    used = jax.lax.dynamic_slice_in_dim(order, start * batch_size, num_batches * batch_size)
    batches = used.reshape(num_batches, batch_size)
    step_keys = step_dropout_keys(dropout_key, start, num_batches)
    return _guarded_scan(step, state, batches, lambda indices: (x[indices], y[indices]), step_keys)


def step_dropout_keys(dropout_key: Array | None, start: int | Array, count: int) -> Array | None:
    """One key per step, ``fold_in(dropout_key, start + i)`` for i < count; None without a dropout key."""
    if dropout_key is None:
        return None
    return jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(start + jnp.arange(count, dtype=jnp.int32))


def run_sharded_epoch(
    state: EpochState,
    x_batches: Array,
    y_batches: Array,
    *,
    optimizer: optax.GradientTransformation,
    loss: str,
    reduction: str,
    mesh: jax.sharding.Mesh,
    step_keys: Array | None = None,
) -> tuple[EpochState, Array]:
    """``run_epoch`` on batches already cut and placed: ``x_batches`` is (num_steps, batch_size, n_in).

    ``step_keys`` (num_steps,) draw each step's dropout masks (``step_dropout_keys``).

    The batches are global arrays split over the mesh's "data" axis along
    dimension 1 (``purebp.train.distributed.shard_epoch``: in a multi-process run each
    process holds only its share); ``state`` is replicated. Returns the same as
    ``run_epoch``, replicated; compiled programs are keyed as ``run_epoch``'s.
    """
    return _run_sharded_epoch_jit(
        state,
        x_batches,
        y_batches,
        step_keys,
        update=programs.Static(optimizer.update),
        loss=loss,
        reduction=reduction,
        mesh=mesh,
    )


@functools.partial(jax.jit, static_argnames=("update", "loss", "reduction", "mesh"))
def _run_sharded_epoch_jit(state, x_batches, y_batches, step_keys, *, update, loss, reduction, mesh):
    step = make_train_step(_with_update(update), loss=loss, reduction=reduction, mesh=mesh)
    return _guarded_scan(step, state, (x_batches, y_batches), lambda batch: batch, step_keys)


def _guarded_scan(
    step: Callable, state: EpochState, scanned: Any, get_batch: Callable, step_keys: Array | None = None
) -> tuple[EpochState, Array]:
    """Scan ``step`` over the leading axis of ``scanned``, stopping (NaN losses) after the first non-finite loss."""

    def live(state: EpochState, index: Array, item: tuple) -> tuple[EpochState, Array]:
        indices, step_key = item
        new_net, new_opt_state, metrics = step(state.net, state.opt_state, get_batch(indices), step_key)
        finite = jnp.isfinite(metrics["loss"])
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        # finite loss: previous <- current, current <- updated; otherwise stop where we are
        return EpochState(
            net=keep(new_net, state.net),
            opt_state=keep(new_opt_state, state.opt_state),
            previous_net=keep(state.net, state.previous_net),
            previous_opt_state=keep(state.opt_state, state.previous_opt_state),
            bad_step=jnp.where(finite, state.bad_step, index),
        ), metrics["loss"]

    def skipped(state: EpochState, index: Array, item: tuple) -> tuple[EpochState, Array]:
        return state, jnp.full((), jnp.nan, dtype=jax.tree.leaves(state.net)[0].dtype)

    def body(state: EpochState, scanned: tuple) -> tuple[EpochState, Array]:
        index, item = scanned
        return jax.lax.cond(state.bad_step >= 0, skipped, live, state, index, item)

    steps = jnp.arange(jax.tree.leaves(scanned)[0].shape[0], dtype=jnp.int32)
    return jax.lax.scan(body, state, (steps, (scanned, step_keys)))


def initial_state(net: Sequential, opt_state: Any) -> EpochState:
    """Return the ``EpochState`` that starts training at (net, opt_state)."""
    return EpochState(net, opt_state, net, opt_state, jnp.asarray(-1, dtype=jnp.int32))


# ---------------------------------------------------------------- evaluation


@functools.partial(jax.jit, static_argnames=("loss", "reduction"))
def _evaluate_jit(net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str) -> tuple[Array, Array]:
    activation, caches = _engine.forward_pass(net, x)  # no key: inference, dropout off
    cost = _engine.output_cost(net, activation, caches, y, loss=loss)
    value = jnp.mean(cost) if reduction == "mean" else jnp.sum(cost)
    labels = y if y.ndim == 1 else jnp.argmax(y, axis=-1)
    predicted = jnp.argmax(activation, axis=-1).astype(labels.dtype)  # int64 under x64, labels may be int32
    accuracy = jnp.mean((predicted == labels).astype(activation.dtype))
    return value, accuracy


def evaluate(
    net: Sequential, x: Array, y: Array, *, loss: str, reduction: str = "mean", accuracy: bool | None = None
) -> dict[str, float]:
    """Return {"loss": L, "accuracy": fraction of argmax outputs equal to the labels} on (x, y).

    ``accuracy`` is reported by default only for the classification losses
    (cross_entropy, softmax_cross_entropy); ``accuracy=True`` reports it for
    any loss whose targets are class labels or one-hot rows (e.g. mse on
    one-hot targets), comparing the argmax of the output with the argmax of y.
    """
    x, y = _inputs.coerce_inputs(net, x, y)
    _inputs.validate_inputs(net, x, y, loss=loss, reduction=reduction)
    value, correct = _evaluate_jit(net, x, y, loss, reduction)
    metrics = {"loss": float(value)}
    if accuracy or (accuracy is None and loss in _losses.CLASSIFICATION_LOSSES):
        metrics["accuracy"] = float(correct)
    return metrics


# ---------------------------------------------------------------- validation


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def validate_learning_rate(learning_rate: object) -> float:
    """Return ``learning_rate`` as a float; raise unless it is a finite number > 0."""
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float, np.integer, np.floating)):
        raise TypeError(f"learning rate must be a number, got {learning_rate!r}")
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"learning rate must be finite and > 0, got {learning_rate}")
    return float(learning_rate)


OPTIMIZERS = ("gd", "sgd", "momentum", "adam")


def make_optimizer(name: str, learning_rate: float, *, momentum: float = 0.9) -> optax.GradientTransformation:
    """Return the optax transformation for ``name``: gd and sgd are ``optax.sgd(lr)`` (plain
    theta <- theta - lr grad; gd means full batch), momentum is ``optax.sgd(lr, momentum)``,
    adam is ``optax.adam(lr)``.

    Each is built with ``optax.inject_hyperparams``, so the learning rate (and
    momentum) live in the optimizer state as arrays, not in the compiled
    program: ``fit`` compiles once for a whole learning-rate sweep, and a
    resumed run that changes the rate is told so, with both values.
    """
    learning_rate = validate_learning_rate(learning_rate)
    if name in ("gd", "sgd"):
        return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate)
    if name == "momentum":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=momentum)
    if name == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)
    raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")


def _validate_key(key: object) -> Array:
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
        return key
    if isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)  # a legacy raw key from jax.random.PRNGKey
    raise TypeError(f"key must be a jax.random.key(seed) (a scalar typed key), got {key!r}")


def _as_array(name: str, value: object) -> Array:
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    return jnp.asarray(value)


def _split_pair(name: str, pair: object) -> tuple[Array, Array]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be a pair (x, y) of arrays, got {type(pair).__name__}")
    return _as_array(f"{name}[0] (x)", pair[0]), _as_array(f"{name}[1] (y)", pair[1])


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The validated schedule: ``total_steps`` steps of ``batch_size``, ``steps_per_epoch`` to an epoch.

    Step s (global, from 0) is step ``s % steps_per_epoch`` of epoch
    ``s // steps_per_epoch``, whose shuffle is ``fold_in(key, epoch)``: where a
    run stops, mid-epoch too, the rest is known, so any run can be extended.
    """

    batch_size: int
    steps_per_epoch: int
    total_steps: int
    shuffle: bool

    @property
    def num_epochs(self) -> int:
        """Epochs touched, the last one possibly cut short."""
        return -(-self.total_steps // self.steps_per_epoch)

    def chunks(self, start: int) -> list[tuple[int, int, int]]:
        """Return (epoch, first step in that epoch, number of steps) from global step ``start`` to the end."""
        chunks, step = [], start
        while step < self.total_steps:
            epoch, offset = divmod(step, self.steps_per_epoch)
            count = min(self.steps_per_epoch - offset, self.total_steps - step)
            chunks.append((epoch, offset, count))
            step += count
        return chunks

    def describe(self, steps: int | None = None) -> str:
        """E.g. "40 steps = 0.91 epochs, 44 steps per epoch" or "88 steps = 2 epochs, 44 steps per epoch"."""
        steps = self.total_steps if steps is None else steps
        return f"{steps} step{'s' * (steps != 1)} = {format_epochs(steps, self.steps_per_epoch)}, " + (
            f"{self.steps_per_epoch} step{'s' * (self.steps_per_epoch != 1)} per epoch"
        )


def format_epochs(steps: int, steps_per_epoch: int) -> str:
    """Return "1 epoch", "3 epochs" or "0.91 epochs": ``steps`` counted in epochs."""
    whole, rest = divmod(steps, steps_per_epoch)
    if rest == 0:
        return f"{whole} epoch{'s' * (whole != 1)}"
    return f"{steps / steps_per_epoch:.2f} epochs"


def make_schedule(n: int, batch_size: int | None, epochs: int | None, steps: int | None, key: Array | None) -> Schedule:
    """Validate a training length and batch size for ``n`` examples; return the ``Schedule``."""
    if batch_size is None:
        batch_size = n
    batch_size = _positive_int("batch_size", batch_size)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} examples)")
    if (epochs is None) == (steps is None):
        raise ValueError(f"give exactly one of epochs or steps (got epochs={epochs!r}, steps={steps!r})")
    steps_per_epoch = n // batch_size
    total = _positive_int("epochs", epochs) * steps_per_epoch if epochs is not None else _positive_int("steps", steps)
    shuffle = batch_size < n
    if shuffle and key is None:
        raise ValueError("minibatches are shuffled from a key: pass key=jax.random.key(seed) (or use a full batch)")
    return Schedule(batch_size, steps_per_epoch, total, shuffle)


# ---------------------------------------------------------------- fit


@dataclasses.dataclass(frozen=True)
class _Run:
    """Everything ``fit`` validated, before anything compiled."""

    x: Array
    y: Array
    eval: tuple[Array, Array] | None
    loss: str
    reduction: str
    gradient: str
    optimizer: optax.GradientTransformation
    schedule: Schedule
    key: Array
    checkpoint: str | None
    checkpoint_every: int
    callback: Callable[[int, dict[str, float]], None] | None
    mesh: jax.sharding.Mesh | None
    stop: Callable[[], bool] | None
    log: Callable[[str], None]
    compute_dtype: str | None
    random_layers: bool = False  # a Sequential trained with a key: its layers get per-step keys (dropout)
    rule: _rules.Rule | None = None  # None: backprop
    log_alignment: bool = False


def fit(
    net: Sequential,
    train: tuple[Array, Array],
    *,
    loss: str,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    key: Array | None = None,
    eval: tuple[Array, Array] | None = None,
    reduction: str = "mean",
    gradient: str = "handwritten",
    verify: bool = True,
    checkpoint: str | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    stop: Callable[[], bool] | None = None,
    settings: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    compute_dtype: str | None = None,
    rule: _rules.Rule | None = None,
    log_alignment: bool = False,
) -> tuple[Sequential, dict[str, list]]:
    """Train ``net`` on ``train = (x, y)``; return (trained net, history). ``net`` is not modified.

    - ``optimizer``: any optax ``GradientTransformation``; default
      ``optax.sgd(learning_rate)`` with ``learning_rate`` 0.1: the notes'
      theta <- theta - eta grad L. ``learning_rate`` is only for that default.
      Compiled epochs are keyed on what the optimizer's update computes, not on
      the object: build it with ``optax.inject_hyperparams`` (as
      ``make_optimizer`` does) and a sweep over learning rates compiles once.
    - ``epochs`` or ``steps`` (exactly one); ``batch_size`` (default: the whole
      training set, i.e. gradient descent); ``key`` shuffles minibatches
      (epoch e uses ``fold_in(key, e)``), needed when ``batch_size < N``.
    - ``eval = (x_test, y_test)`` is evaluated after every epoch.
    - ``gradient="autodiff"`` trains on jax.grad of the same forward pass and cost.
    - ``verify``: first compare the hand-written gradient with jax.grad on
      ``VERIFY_BATCH`` training examples; raise ``GradientMismatchError`` if they
      differ, log the worst error if they agree.
    - ``checkpoint``: a path saved every ``checkpoint_every`` epochs and at the end
      (and with the last finite parameters on divergence). ``resume=True``
      continues from it: any finished or interrupted run extends to more steps
      or epochs, mid-epoch too, ending bit for bit where the uninterrupted longer
      run ends. A run asked for exactly the steps the checkpoint holds has
      nothing to do and returns it; fewer steps, or any changed setting that
      shapes the trajectory (architecture, dtype, loss, reduction, batch size,
      optimizer, gradient, training data, key, ``settings``), is refused
      naming the setting and both values. Without a file at the path it logs
      that it starts fresh.
    - ``settings``: the caller's own settings that shape the run (``purebp
      train`` passes its command-line flags), saved in the checkpoint and
      compared on resume.
    - ``compute_dtype`` ("bfloat16" or "float16"): mixed precision, the
      parameters (the float32 master copy), optimizer state and update stay in
      the network's dtype, each step's hand-written pass runs on copies cast
      to ``compute_dtype`` (``purebp.train.precision.mixed_value_and_grad``).
    - ``log(message)`` receives what fit has to say (resumed from where, the
      gradient check's worst error, nothing to do); default: the
      ``"purebp.train.fit"`` logger at INFO level.
    - ``callback(epoch, row)`` is called after every epoch with that epoch's history row.
    - ``rule`` (``purebp.extras.rules``; None: backprop): train on the rule's update
      instead of the gradient (feedback alignment, direct feedback alignment,
      sign symmetry). It is a traced argument of the compiled epoch (a new rule
      of the same shapes does not recompile). Checkpoints record its kind and a
      digest of its fixed matrices, so resuming with another rule (or the same
      kind from another key) is refused; pass the same rule to resume. With a
      rule, ``verify`` still checks backprop on this architecture (the forward
      pass, the cost's delta and the dense layers' rules the rule reuses); the
      rule's update is not a gradient, so nothing checks it against jax.grad.
      Not combined with ``mesh``, ``compute_dtype`` or ``gradient="autodiff"``.
    - ``log_alignment``: after every epoch, ``alignment_angles`` on the first
      ``ALIGNMENT_BATCH`` training examples (dropout off); the row gets
      ``update_angles`` and ``feedback_angles``, lists of degrees per layer of
      the stack (NaN where undefined; see ``purebp.extras.rules.Alignment``).
    - ``mesh``: data-parallel training over the mesh's "data" axis
      (``purebp.train.distributed.make_data_mesh()``); ``batch_size`` must divide by
      its size. Each epoch's batches are split over the devices (each process
      loads only its share), the gradient is one ``psum`` of the per-shard
      hand-written gradients, parameters are replicated. Same permutation and
      batches as without a mesh, so the result equals the single-device one to
      float rounding. Works across processes after ``jax.distributed``
      initialisation (``purebp.train.distributed.initialize``): every process calls
      ``fit`` with the same arguments, only process 0 writes checkpoints, and a
      failed collective (a dead process) raises ``ProcessFailureError``.
    - ``stop()`` is called after every epoch; once it returns True (on any
      process: agreed by an all-reduce, so all stop after the same step) fit
      saves the checkpoint and returns early. ``purebp train`` uses it for SIGTERM.

    History is a dict of lists, one entry per epoch: ``epoch``, ``step`` (steps
    done), ``train_loss`` (mean minibatch loss over the epoch; for an epoch
    finished by a resumed run, the step-weighted mean of its two parts),
    ``time`` (seconds of training, summed over resumed runs), and with ``eval``
    ``eval_loss`` and, for classification losses, ``eval_accuracy``. Raises
    ``DivergenceError`` (with the last finite parameters) when the loss becomes
    non-finite; every bad argument, and NaN or inf anywhere in the data, raises
    ValueError/TypeError before anything is compiled.
    """
    run = _validate_fit(
        net, train, loss, optimizer, learning_rate, epochs, steps, batch_size, key, eval, reduction, gradient,
        checkpoint, checkpoint_every, resume, callback, mesh, stop, log, compute_dtype, rule, log_alignment,
    )  # fmt: skip
    with jax.numpy_dtype_promotion("standard"):
        opt_state = run.optimizer.init(net)
    config = _run_config(net, run, opt_state, settings)
    history: dict[str, list] = {"epoch": [], "step": [], "train_loss": [], "time": []}
    if eval is not None:
        history["eval_loss"] = []
        if loss in _losses.CLASSIFICATION_LOSSES:
            history["eval_accuracy"] = []
    if log_alignment:
        history["update_angles"], history["feedback_angles"] = [], []
    start = 0
    if resume:
        restored = _restore(run, config, opt_state, net)
        if restored is not None:
            net, opt_state, start, history = restored
            if start == run.schedule.total_steps:
                run.log(f"{run.checkpoint} already holds all {start} steps: nothing to do")
                return net, history
            run.log(
                f"resumed from step {start} of {run.checkpoint}; training on to step {run.schedule.total_steps} "
                f"({run.schedule.describe()})"
            )
    if verify:
        _verify(run, net)
    return _train(run, net, opt_state, start, history, config)


def _validate_fit(
    net, train, loss, optimizer, learning_rate, epochs, steps, batch_size, key, eval, reduction, gradient,
    checkpoint, checkpoint_every, resume, callback, mesh, stop, log, compute_dtype, rule=None, log_alignment=False,
) -> _Run:  # fmt: skip
    """Check every argument of ``fit`` (and the data's values) before anything compiles; return a ``_Run``."""
    validate_sequential(net)
    x, y = _split_pair("train", train)
    x, y = _inputs.coerce_inputs(net, x, y)
    _inputs.check_finite("the training data", x=x, y=y)  # first: a NaN label is not a bad label
    _inputs.validate_inputs(net, x, y, loss=loss, reduction=reduction)
    eval_data = None
    if eval is not None:
        x_eval, y_eval = _inputs.coerce_inputs(net, *_split_pair("eval", eval))
        _inputs.check_finite("the eval data", x=x_eval, y=y_eval)
        _inputs.validate_inputs(net, x_eval, y_eval, loss=loss, reduction=reduction)
        eval_data = (x_eval, y_eval)
    _gradient_function(gradient)
    if optimizer is None:
        optimizer = optax.sgd(validate_learning_rate(0.1 if learning_rate is None else learning_rate))
    elif learning_rate is not None:
        raise ValueError("learning_rate is only used for the default optimizer; put it in your optax optimizer")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    key = None if key is None else _validate_key(key)
    if key is None and has_dropout(net):
        raise ValueError(
            "the network has dropout, whose masks are drawn from a key: pass key=jax.random.key(seed) "
            "(to train without dropout, use rate 0)"
        )
    schedule = make_schedule(int(x.shape[0]), batch_size, epochs, steps, key)
    if mesh is not None:
        from purebp.train import distributed

        distributed.validate_mesh(mesh, distributed.DATA_AXIS, schedule.batch_size)
        _check_mesh_gradient(gradient)
    if stop is not None and not callable(stop):
        raise TypeError(f"stop must be a callable returning bool, got {type(stop).__name__}")
    if log is not None and not callable(log):
        raise TypeError(f"log must be a callable taking a message, got {type(log).__name__}")
    if compute_dtype is not None:  # a static name, so that equal dtypes share a program
        from purebp.network import supported_dtype

        compute_dtype = supported_dtype(compute_dtype).name
        # raises on a combination the mixed step does not support (a mesh, autodiff)
        make_train_step(optimizer, loss=loss, reduction=reduction, gradient=gradient, mesh=mesh,
                        compute_dtype=compute_dtype)  # fmt: skip
    rule = _rules.check_rule(rule, net)
    _check_rule_options(rule, gradient, mesh, compute_dtype)
    if not isinstance(log_alignment, bool):
        raise TypeError(f"log_alignment must be True or False, got {log_alignment!r}")
    checkpoint_every = _positive_int("checkpoint_every", checkpoint_every)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        directory = os.path.dirname(os.path.abspath(checkpoint))
        if not os.path.isdir(directory):
            raise ValueError(f"checkpoint {checkpoint}: the directory {directory} does not exist")
    return _Run(
        x=x,
        y=y,
        eval=eval_data,
        loss=loss,
        reduction=reduction,
        gradient=gradient,
        optimizer=optimizer,
        schedule=schedule,
        key=jax.random.key(0) if key is None else key,  # full batch: never used for shuffling
        random_layers=isinstance(net, Sequential) and key is not None,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        callback=callback,
        mesh=mesh,
        stop=stop,
        log=log if log is not None else logging.getLogger("purebp.train.fit").info,
        compute_dtype=compute_dtype,
        rule=rule,
        log_alignment=log_alignment,
    )


def has_dropout(net: AnyNetwork) -> bool:
    """True if ``net`` holds a ``Dropout`` layer with a nonzero rate (at any depth)."""
    leaves = jax.tree.leaves(net, is_leaf=lambda node: isinstance(node, Dropout))
    return any(isinstance(leaf, Dropout) and leaf.rate > 0 for leaf in leaves)


def _architecture(net: AnyNetwork) -> dict:
    if is_mlp(net):  # the run description of earlier versions: an old checkpoint still resumes
        return {"sizes": list(net.sizes), "activations": list(net.activations)}
    from purebp.train import checkpoint as _checkpoint

    return {"architecture": _checkpoint.describe_network(net)}


def _run_config(net: AnyNetwork, run: _Run, opt_state: Any, settings: dict | None) -> dict:
    """The settings that shape the trajectory, as JSON values: saved in checkpoints, compared on resume."""
    config = {
        **_architecture(net),
        "dtype": str(net.dtype),
        "loss": run.loss,
        "reduction": run.reduction,
        "batch_size": run.schedule.batch_size,
        "total_steps": run.schedule.total_steps,
        "gradient": run.gradient,
        "compute_dtype": run.compute_dtype,
        "rule": _rules.describe(run.rule),
        "optimizer": programs.describe(run.optimizer.update, "update") | _initial_state_scalars(opt_state),
        "settings": dict(settings or {}),
    }
    if run.checkpoint is not None:  # a digest of the data costs a pass over it: only when it is compared
        config["data"] = {
            "examples": int(run.x.shape[0]),
            "sha256": _digest(run.x, run.y),
        }
    return json.loads(json.dumps(config, default=repr))  # as it reads back from a checkpoint


def _initial_state_scalars(opt_state: Any) -> dict[str, str]:
    # hyperparameters that optax.inject_hyperparams keeps in the state
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return {f"state{jax.tree_util.keystr(path)}": str(np.asarray(leaf)[()]) for path, leaf in leaves
            if np.size(leaf) == 1}  # fmt: skip


def _digest(*arrays: Array) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        host = np.ascontiguousarray(np.asarray(array))
        digest.update(f"{host.dtype}{host.shape}".encode())
        digest.update(host.tobytes())
    return digest.hexdigest()[:16]


def _restore(run: _Run, config: dict, opt_state: Any, net: AnyNetwork) -> tuple[AnyNetwork, Any, int, dict] | None:
    """Load ``run.checkpoint`` if it exists and belongs to this run; return (net, opt_state, step, history)."""
    from purebp.train import checkpoint as _checkpoint

    if not os.path.exists(run.checkpoint):
        run.log(f"no checkpoint at {run.checkpoint}: starting fresh")
        return None
    # a Sequential may hold layers of the user's own, which only the network given to fit can rebuild
    template = net
    saved = _checkpoint.load_checkpoint(run.checkpoint, net_template=template)  # settings first: they name what differs
    _check_resumable(saved, config, run)
    restored = _checkpoint.load_checkpoint(run.checkpoint, opt_state_template=opt_state, net_template=template)
    history = {name: list(values) for name, values in restored.metadata["history"].items()}
    return restored.net, restored.opt_state, restored.step, history


def _differences(saved: Any, now: Any, name: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        found = []
        for entry in sorted(set(saved) | set(now)):
            label = f"{name} {entry}" if name else entry
            found += _differences(saved.get(entry, "<absent>"), now.get(entry, "<absent>"), label)
        return found
    return [] if saved == now else [f"{name}: checkpoint {saved!r}, now {now!r}"]


def _check_resumable(saved: Any, config: dict, run: _Run) -> None:
    """Refuse a checkpoint from a different run, or one that already holds more steps than asked for.

    Every setting in the checkpoint's config must match except the total step
    count (a setting the checkpoint does not record, from an older purebp, is
    not compared). Settings the caller passed come first in the message.
    """
    path, recorded = run.checkpoint, saved.metadata.get("config", {})
    order = ["settings"] + [name for name in config if name not in ("settings", "total_steps")]
    different = []
    for name in order:
        if name in recorded:
            different += _differences(recorded[name], config[name], "" if name == "settings" else name)
    if saved.key is None or not np.array_equal(jax.random.key_data(saved.key), jax.random.key_data(run.key)):
        saved_key = None if saved.key is None else np.asarray(jax.random.key_data(saved.key)).tolist()
        now_key = np.asarray(jax.random.key_data(run.key)).tolist()
        different.append(f"key: checkpoint key data {saved_key}, now {now_key} (a different key or seed)")
    if different:
        raise ValueError(f"cannot resume from {path}: it was written by a different run ({'; '.join(different)})")
    if saved.step > run.schedule.total_steps:
        raise ValueError(
            f"cannot resume from {path}: it already holds {saved.step} steps, more than the "
            f"{run.schedule.total_steps} asked for ({run.schedule.describe()})"
        )


def _verify(run: _Run, net: AnyNetwork) -> None:
    count = min(VERIFY_BATCH, int(run.x.shape[0]))
    # training mode when the layers get keys: dropout's backward is checked with its masks on
    key = jax.random.fold_in(run.key, VERIFY_STREAM) if run.random_layers else None
    x, y = run.x[:count], run.y[:count]
    report = _check.check_gradients(net, x, y, loss=run.loss, reduction=run.reduction, key=key)
    if not report.passed:
        layer_reports = _check.check_layers_of(net, x, key=key) if isinstance(net, Sequential) else ()
        raise GradientMismatchError(report, layer_reports)
    run.log(
        f"gradient check passed: hand-written vs JAX autodiff on {count} training examples, max relative error "
        f"{report.max_relative_error:.1e} (tolerance {report.tolerance:.0e})"
        + (
            ""
            if run.rule is None
            else f"; this checks backprop on this architecture: the {run.rule.kind} rule's update is not a "
            "gradient and is not checked"
        )
    )


def _train(run: _Run, net: Sequential, opt_state: Any, start: int, history: dict, config: dict):
    """Run the schedule from global step ``start``: one compiled scan per (part of an) epoch."""
    schedule = run.schedule
    started = time.perf_counter()
    time_offset = history["time"][-1] if history["time"] else 0.0
    if run.mesh is None:
        state = initial_state(net, opt_state)
    else:
        from purebp.train import distributed

        x_host, y_host = np.asarray(run.x), np.asarray(run.y)
        state = initial_state(*distributed.replicate((net, opt_state), run.mesh))
    chunks = schedule.chunks(start)
    for index, (epoch, offset, count) in enumerate(chunks):
        epoch_key = jax.random.fold_in(run.key, epoch)
        dropout_key = jax.random.fold_in(epoch_key, DROPOUT_STREAM) if run.random_layers else None
        steps_before = epoch * schedule.steps_per_epoch + offset
        options = dict(loss=run.loss, reduction=run.reduction, optimizer=run.optimizer)
        if run.mesh is None:
            state, step_losses = run_epoch(
                state, epoch_key, run.x, run.y, gradient=run.gradient, batch_size=schedule.batch_size,
                num_batches=count, shuffle=schedule.shuffle, start=offset, compute_dtype=run.compute_dtype,
                dropout_key=dropout_key, rule=run.rule, **options,
            )  # fmt: skip
            bad_step, mean_loss = int(state.bad_step), float(jnp.mean(step_losses))
            local_state = state
        else:
            with distributed.peer_failures(f"in epoch {epoch}"):
                # the same permutation run_epoch draws inside its jit, so the same batches
                n = x_host.shape[0]
                order = np.asarray(jax.random.permutation(epoch_key, n)) if schedule.shuffle else np.arange(n)
                order = order[offset * schedule.batch_size :]
                x_batches, y_batches = distributed.shard_epoch(
                    x_host, y_host, order, count, schedule.batch_size, run.mesh
                )
                step_keys = step_dropout_keys(dropout_key, offset, count)
                state, step_losses = run_sharded_epoch(
                    state, x_batches, y_batches, mesh=run.mesh, step_keys=step_keys, **options
                )
                bad_step, mean_loss = int(state.bad_step), float(jnp.mean(distributed.to_local(step_losses)))
                local_state = distributed.to_local(state)
        if bad_step >= 0:
            _diverged(local_state, epoch, steps_before + bad_step, history, config, run.key, run.checkpoint)
        # state.previous_* now hold the parameters before the last step: kept for the next epoch
        net, opt_state = local_state.net, local_state.opt_state
        row = {"epoch": epoch, "step": steps_before + count, "train_loss": mean_loss}
        if offset > 0 and history["epoch"] and history["epoch"][-1] == epoch:
            # the rest of an epoch a previous run cut short: one row for the whole epoch
            done = history["step"][-1] - epoch * schedule.steps_per_epoch
            row["train_loss"] = (history["train_loss"][-1] * done + mean_loss * count) / (done + count)
            for values in history.values():
                values.pop()
        if run.eval is not None:
            value, accuracy = _evaluate_jit(net, *run.eval, run.loss, run.reduction)
            row["eval_loss"] = float(value)
            if "eval_accuracy" in history:
                row["eval_accuracy"] = float(accuracy)
        row["time"] = time_offset + time.perf_counter() - started
        if run.log_alignment:  # after the clock: the angles are a measurement, not training
            measuring = time.perf_counter()
            count_alignment = min(ALIGNMENT_BATCH, int(run.x.shape[0]))
            angles = _engine.alignment_angles(
                net, run.x[:count_alignment], run.y[:count_alignment], loss=run.loss, reduction=run.reduction,
                rule=run.rule,
            )  # fmt: skip
            row["update_angles"] = [float(a) for a in np.asarray(angles.update)]
            row["feedback_angles"] = [float(a) for a in np.asarray(angles.feedback)]
            for name in ("update_angles", "feedback_angles"):
                history.setdefault(name, [None] * (len(history["epoch"])))  # resumed from a run without them
            started += time.perf_counter() - measuring  # kept out of the next epochs' training time
        for name, value in row.items():
            history[name].append(value)
        last = index == len(chunks) - 1
        stopping = False
        if run.stop is not None and not last:
            stopping = bool(run.stop())
            if run.mesh is not None:
                with distributed.peer_failures(f"after epoch {epoch}"):
                    stopping = distributed.any_process(stopping, run.mesh)
        epoch_done = offset + count == schedule.steps_per_epoch
        every = epoch_done and (epoch + 1) % run.checkpoint_every == 0
        if run.checkpoint is not None and (last or stopping or every):
            _save(run.checkpoint, net, opt_state, row["step"], run.key, config, epoch, history)
        if run.callback is not None:
            run.callback(epoch, row)
        if stopping:
            break
    return net, history


def _save(path, net, opt_state, step, key, config, epoch, history) -> None:
    from purebp.train import checkpoint as _checkpoint

    if jax.process_index() != 0:  # multi-process: one writer; the parameters are identical everywhere
        return
    metadata = {"config": config, "epoch": epoch, "history": history}
    _checkpoint.save_checkpoint(path, net, opt_state, step=step, key=key, metadata=metadata)


def _diverged(state: EpochState, epoch: int, step: int, history: dict, config: dict, key, path) -> None:
    message = (
        f"training diverged: the loss became non-finite at step {step} (epoch {epoch}); "
        "the last parameters with a finite loss are in DivergenceError.net"
    )
    if path is not None and jax.process_index() == 0:
        # a separate file: the regular checkpoint keeps the last finite state a run can resume from
        from purebp.train import checkpoint as _checkpoint

        diverged_path = f"{path}.diverged"
        metadata = {"config": config, "diverged_at_step": step, "diverged_in_epoch": epoch, "history": history}
        _checkpoint.save_checkpoint(
            diverged_path, state.previous_net, state.previous_opt_state, step=step, key=key, metadata=metadata
        )
        message += f" and saved to {diverged_path}"
    raise DivergenceError(
        message, net=state.previous_net, opt_state=state.previous_opt_state, step=step, epoch=epoch, history=history
    )
