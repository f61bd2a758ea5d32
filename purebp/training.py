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
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from purebp import backprop as _backprop
from purebp import check as _check
from purebp import losses as _losses
from purebp import precision as _precision
from purebp.network import Network, validate_network

Array = jax.Array
Batch = tuple[Array, Array]
GRADIENTS = ("handwritten", "autodiff")
VERIFY_BATCH = 16  # examples used by the pre-training gradient check


class GradientMismatchError(ValueError):
    """The hand-written gradient disagrees with jax.grad: ``fit`` refuses to train. ``report`` says where."""

    def __init__(self, report: _check.GradientReport):
        super().__init__(
            "refusing to train: the hand-written gradient disagrees with jax.grad on this architecture "
            f"(pass verify=False to train anyway)\n{report}"
        )
        self.report = report


class DivergenceError(FloatingPointError):
    """The training loss became non-finite.

    The loss of step s is computed at the parameters after s updates. When it
    is the first non-finite one, ``step`` is s (global, from 0) and ``epoch``
    its epoch (from 0); ``net`` and ``opt_state`` are the parameters after
    s - 1 updates (the initial ones when s = 0): the last ones whose loss was
    finite, before the update that broke them. ``history`` holds the epochs
    completed before the divergence.
    """

    def __init__(self, message: str, *, net: Network, opt_state: Any, step: int, epoch: int, history: dict):
        super().__init__(message)
        self.net, self.opt_state, self.step, self.epoch, self.history = net, opt_state, step, epoch, history


# ---------------------------------------------------------------- the step


def _gradient_function(gradient: str) -> Callable:
    # both are jitted (loss, grads) functions of (net, x, y, loss, reduction);
    # called inside another jit they inline, with no eager validation per step
    if gradient == "handwritten":
        return _backprop._value_and_grad_jit
    if gradient == "autodiff":
        return _check._autodiff_value_and_grad_jit
    raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    loss: str,
    reduction: str = "mean",
    gradient: str = "handwritten",
    mesh: jax.sharding.Mesh | None = None,
    compute_dtype: str | None = None,
) -> Callable[[Network, Any, Batch], tuple[Network, Any, dict[str, Array]]]:
    """Return the pure step ``(net, opt_state, (x, y)) -> (new_net, new_opt_state, {"loss": L})``.

    L is the loss at ``net`` (before the update); the update is
    ``optax.apply_updates(net, optimizer.update(grads, opt_state, net))``, so
    ``optax.sgd(eta)`` gives the notes' theta <- theta - eta grad L. The step
    does no input checks (they would run on tracers): check once with
    ``purebp.backprop.validate_inputs``. It is jittable, scannable and
    ``gradient="autodiff"`` swaps in jax.grad of the same forward pass and cost.
    With a ``mesh`` the gradient is data-parallel over its "data" axis
    (``purebp.distributed``): the batch is split, each device runs the
    hand-written pass on its share, one ``psum`` adds the shares.
    With ``compute_dtype`` ("bfloat16" or "float16") the step is mixed
    precision (``purebp.precision.mixed_value_and_grad``): ``net`` and x stay
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

    def train_step(net: Network, opt_state: Any, batch: Batch):
        x, y = batch
        value, grads = value_and_grad(net, x, y, loss, reduction)
        # optax mixes Python scalars with int32 counters (Adam's bias correction):
        # give it the standard promotion rules even when the caller runs strict ones
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, net)
            net = optax.apply_updates(net, updates)
        return net, opt_state, {"loss": value}

    return train_step


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
    from purebp import distributed

    def value_and_grad(net: Network, x: Array, y: Array, loss: str, reduction: str):
        return distributed._sharded_value_and_grad(mesh, distributed.DATA_AXIS, loss, reduction)(net, x, y)

    return value_and_grad


# ---------------------------------------------------------------- one epoch


class EpochState(NamedTuple):
    """What one epoch's ``lax.scan`` carries from step to step.

    ``previous_*`` are the parameters before the last update, returned when
    the loss goes non-finite; ``bad_step`` is -1 until then, then the index
    (within the epoch) of the first step whose loss was non-finite, after
    which every step is skipped.
    """

    net: Network
    opt_state: Any
    previous_net: Network
    previous_opt_state: Any
    bad_step: Array


@functools.partial(
    jax.jit,
    static_argnames=("optimizer", "loss", "reduction", "gradient", "batch_size", "num_batches", "shuffle", "mesh"),
)
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
) -> tuple[EpochState, Array]:
    """Run ``num_batches`` steps from ``state`` as one ``lax.scan``; return (final ``EpochState``, per-step losses).

    Batch i is examples ``order[i * batch_size:(i + 1) * batch_size]`` with
    ``order = jax.random.permutation(key, N)`` (or 0..N-1 when not
    ``shuffle``). Losses of skipped steps (after a non-finite loss) are NaN.
    With a ``mesh`` each step's gradient is data-parallel over its "data" axis
    (``batch_size`` must divide by its size; ``fit`` checks); ``fit`` itself
    uses ``run_sharded_epoch``, which also works across processes.
    """
    step = make_train_step(optimizer, loss=loss, reduction=reduction, gradient=gradient, mesh=mesh)
    n = x.shape[0]
    order = jax.random.permutation(key, n) if shuffle else jnp.arange(n)
    batches = order[: num_batches * batch_size].reshape(num_batches, batch_size)
    return _guarded_scan(step, state, batches, lambda indices: (x[indices], y[indices]))


@functools.partial(jax.jit, static_argnames=("optimizer", "loss", "reduction", "mesh"))
def run_sharded_epoch(
    state: EpochState,
    x_batches: Array,
    y_batches: Array,
    *,
    optimizer: optax.GradientTransformation,
    loss: str,
    reduction: str,
    mesh: jax.sharding.Mesh,
) -> tuple[EpochState, Array]:
    """``run_epoch`` on batches already cut and placed: ``x_batches`` is (num_steps, batch_size, n_in).

    The batches are global arrays split over the mesh's "data" axis along
    dimension 1 (``purebp.distributed.shard_epoch``: in a multi-process run each
    process holds only its share); ``state`` is replicated. Returns the same as
    ``run_epoch``, replicated.
    """
    step = make_train_step(optimizer, loss=loss, reduction=reduction, mesh=mesh)
    return _guarded_scan(step, state, (x_batches, y_batches), lambda batch: batch)


def _guarded_scan(step: Callable, state: EpochState, scanned: Any, get_batch: Callable) -> tuple[EpochState, Array]:
    """Scan ``step`` over the leading axis of ``scanned``, stopping (NaN losses) after the first non-finite loss."""

    def live(state: EpochState, index: Array, indices: Array) -> tuple[EpochState, Array]:
        new_net, new_opt_state, metrics = step(state.net, state.opt_state, get_batch(indices))
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

    def skipped(state: EpochState, index: Array, indices: Array) -> tuple[EpochState, Array]:
        return state, jnp.full((), jnp.nan, dtype=jax.tree.leaves(state.net)[0].dtype)

    def body(state: EpochState, scanned: tuple[Array, Array]) -> tuple[EpochState, Array]:
        index, indices = scanned
        return jax.lax.cond(state.bad_step >= 0, skipped, live, state, index, indices)

    steps = jnp.arange(jax.tree.leaves(scanned)[0].shape[0], dtype=jnp.int32)
    return jax.lax.scan(body, state, (steps, scanned))


def initial_state(net: Network, opt_state: Any) -> EpochState:
    """Return the ``EpochState`` that starts training at (net, opt_state)."""
    return EpochState(net, opt_state, net, opt_state, jnp.asarray(-1, dtype=jnp.int32))


# ---------------------------------------------------------------- evaluation


@functools.partial(jax.jit, static_argnames=("loss", "reduction"))
def _evaluate_jit(net: Network, x: Array, y: Array, loss: str, reduction: str) -> tuple[Array, Array]:
    pre_activation, activation = _backprop.forward_pass(net, x)[-1]
    target = _losses.dense_targets(y, net.layers[-1].w.shape[0], activation.dtype)
    cost = _losses.per_example_cost(pre_activation, activation, target, loss)
    value = jnp.mean(cost) if reduction == "mean" else jnp.sum(cost)
    labels = y if y.ndim == 1 else jnp.argmax(y, axis=-1)
    predicted = jnp.argmax(activation, axis=-1).astype(labels.dtype)  # int64 under x64, labels may be int32
    accuracy = jnp.mean((predicted == labels).astype(activation.dtype))
    return value, accuracy


def evaluate(net: Network, x: Array, y: Array, *, loss: str, reduction: str = "mean") -> dict[str, float]:
    """Return {"loss": L, "accuracy": fraction of argmax outputs equal to the labels} on (x, y).

    ``accuracy`` is present only for the classification losses (cross_entropy,
    softmax_cross_entropy); y may be integer labels or one-hot rows.
    """
    _backprop.validate_inputs(net, x, y, loss=loss, reduction=reduction)
    value, accuracy = _evaluate_jit(net, x, y, loss, reduction)
    metrics = {"loss": float(value)}
    if loss in _losses.CLASSIFICATION_LOSSES:
        metrics["accuracy"] = float(accuracy)
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
    adam is ``optax.adam(lr)``."""
    learning_rate = validate_learning_rate(learning_rate)
    if name in ("gd", "sgd"):
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=momentum)
    if name == "adam":
        return optax.adam(learning_rate)
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
class _Plan:
    """The validated schedule: how many epochs, and how many steps in each."""

    batch_size: int
    steps_per_epoch: int
    num_epochs: int
    total_steps: int
    shuffle: bool

    def steps_in(self, epoch: int) -> int:
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)


def _plan(n: int, batch_size: int | None, epochs: int | None, steps: int | None, key: Array | None) -> _Plan:
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
    return _Plan(batch_size, steps_per_epoch, -(-total // steps_per_epoch), total, shuffle)


# ---------------------------------------------------------------- fit


def fit(
    net: Network,
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
) -> tuple[Network, dict[str, list]]:
    """Train ``net`` on ``train = (x, y)``; return (trained net, history). ``net`` is not modified.

    - ``optimizer``: any optax ``GradientTransformation``; default
      ``optax.sgd(learning_rate)`` with ``learning_rate`` 0.1: the notes'
      theta <- theta - eta grad L. ``learning_rate`` is only for that default.
    - ``epochs`` or ``steps`` (exactly one); ``batch_size`` (default: the whole
      training set, i.e. gradient descent); ``key`` shuffles minibatches
      (epoch e uses ``fold_in(key, e)``), needed when ``batch_size < N``.
    - ``eval = (x_test, y_test)`` is evaluated after every epoch.
    - ``gradient="autodiff"`` trains on jax.grad of the same forward pass and cost.
    - ``verify``: first compare the hand-written gradient with jax.grad on
      ``VERIFY_BATCH`` training examples; raise ``GradientMismatchError`` if they differ.
    - ``checkpoint``: a path saved every ``checkpoint_every`` epochs and at the end
      (and with the last finite parameters on divergence); ``resume=True`` continues
      from it when it exists, giving bit for bit the parameters of an uninterrupted run.
      A larger ``epochs`` or ``steps`` extends a finished run that ended on a whole
      epoch, bit for bit as if the longer run had been asked for from the start.
    - ``callback(epoch, row)`` is called after every epoch with that epoch's history row.
    - ``mesh``: data-parallel training over the mesh's "data" axis
      (``purebp.distributed.make_data_mesh()``); ``batch_size`` must divide by
      its size. Each epoch's batches are split over the devices (each process
      loads only its share), the gradient is one ``psum`` of the per-shard
      hand-written gradients, parameters are replicated. Same permutation and
      batches as without a mesh, so the result equals the single-device one to
      float rounding. Works across processes after ``jax.distributed``
      initialisation (``purebp.distributed.initialize``): every process calls
      ``fit`` with the same arguments, only process 0 writes checkpoints, and a
      failed collective (a dead process) raises ``ProcessFailureError``.
    - ``stop()`` is called after every epoch; once it returns True (on any
      process: agreed by an all-reduce, so all stop after the same step) fit
      saves the checkpoint and returns early. ``purebp train`` uses it for SIGTERM.

    History is a dict of lists, one entry per epoch: ``epoch``, ``step`` (steps
    done), ``train_loss`` (mean minibatch loss over the epoch), ``time`` (seconds
    since the start of this call), and with ``eval`` ``eval_loss`` and, for
    classification losses, ``eval_accuracy``. Raises ``DivergenceError`` (with the
    last finite parameters) when the loss becomes non-finite; every bad argument
    raises ValueError/TypeError before anything is compiled.
    """
    # ---- validate everything, before compiling anything
    validate_network(net)
    x, y = _split_pair("train", train)
    _backprop.validate_inputs(net, x, y, loss=loss, reduction=reduction)
    if eval is not None:
        x_eval, y_eval = _split_pair("eval", eval)
        _backprop.validate_inputs(net, x_eval, y_eval, loss=loss, reduction=reduction)
    _gradient_function(gradient)
    if optimizer is None:
        optimizer = optax.sgd(validate_learning_rate(0.1 if learning_rate is None else learning_rate))
    elif learning_rate is not None:
        raise ValueError("learning_rate is only used for the default optimizer; put it in your optax optimizer")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    key = None if key is None else _validate_key(key)
    plan = _plan(int(x.shape[0]), batch_size, epochs, steps, key)
    if mesh is not None:
        from purebp import distributed

        distributed.validate_mesh(mesh, distributed.DATA_AXIS, plan.batch_size)
        _check_mesh_gradient(gradient)
    if stop is not None and not callable(stop):
        raise TypeError(f"stop must be a callable returning bool, got {type(stop).__name__}")
    checkpoint_every = _positive_int("checkpoint_every", checkpoint_every)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    if checkpoint is not None:
        directory = os.path.dirname(os.path.abspath(os.fspath(checkpoint)))
        if not os.path.isdir(directory):
            raise ValueError(f"checkpoint {checkpoint}: the directory {directory} does not exist")
    if key is None:
        key = jax.random.key(0)  # full batch: never used for shuffling

    config = {
        "sizes": list(net.sizes),
        "activations": list(net.activations),
        "dtype": str(net.dtype),
        "loss": loss,
        "reduction": reduction,
        "batch_size": plan.batch_size,
        "total_steps": plan.total_steps,
        "gradient": gradient,
    }
    history: dict[str, list] = {"epoch": [], "step": [], "train_loss": [], "time": []}
    if eval is not None:
        history["eval_loss"] = []
        if loss in _losses.CLASSIFICATION_LOSSES:
            history["eval_accuracy"] = []

    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(net)
    start_epoch = 0
    if resume:
        from purebp import checkpoint as _checkpoint

        restored = _checkpoint.load_checkpoint_if_exists(checkpoint, opt_state_template=opt_state)
        if restored is not None:
            _check_resumable(restored, config, key, checkpoint, plan)
            net, opt_state = restored.net, restored.opt_state
            start_epoch = restored.metadata["epoch"] + 1
            history = {name: list(values) for name, values in restored.metadata["history"].items()}

    if verify:
        count = min(VERIFY_BATCH, int(x.shape[0]))
        report = _check.check_gradients(net, x[:count], y[:count], loss=loss, reduction=reduction)
        if not report.passed:
            raise GradientMismatchError(report)

    # ---- train: one compiled scan per epoch, one host round trip per epoch
    started = time.perf_counter()
    time_offset = history["time"][-1] if history["time"] else 0.0
    if mesh is None:
        state = initial_state(net, opt_state)
    else:
        x_host, y_host = np.asarray(x), np.asarray(y)
        state = initial_state(*distributed.replicate((net, opt_state), mesh))
    for epoch in range(start_epoch, plan.num_epochs):
        num_steps = plan.steps_in(epoch)
        epoch_key = jax.random.fold_in(key, epoch)
        steps_before = epoch * plan.steps_per_epoch
        if mesh is None:
            state, step_losses = run_epoch(
                state,
                epoch_key,
                x,
                y,
                optimizer=optimizer,
                loss=loss,
                reduction=reduction,
                gradient=gradient,
                batch_size=plan.batch_size,
                num_batches=num_steps,
                shuffle=plan.shuffle,
            )
            bad_step, mean_loss = int(state.bad_step), float(jnp.mean(step_losses))
            local_state = state
        else:
            with distributed.peer_failures(f"in epoch {epoch}"):
                # the same permutation run_epoch draws inside its jit, so the same batches
                n = x_host.shape[0]
                order = np.asarray(jax.random.permutation(epoch_key, n)) if plan.shuffle else np.arange(n)
                x_batches, y_batches = distributed.shard_epoch(x_host, y_host, order, num_steps, plan.batch_size, mesh)
                state, step_losses = run_sharded_epoch(
                    state, x_batches, y_batches, optimizer=optimizer, loss=loss, reduction=reduction, mesh=mesh
                )
                bad_step, mean_loss = int(state.bad_step), float(jnp.mean(distributed.to_local(step_losses)))
                local_state = distributed.to_local(state)
        if bad_step >= 0:
            _diverged(local_state, epoch, steps_before + bad_step, history, config, key, checkpoint)
        # state.previous_* now hold the parameters before the last step: kept for the next epoch
        net, opt_state = local_state.net, local_state.opt_state
        row = {"epoch": epoch, "step": steps_before + num_steps, "train_loss": mean_loss}
        if eval is not None:
            value, accuracy = _evaluate_jit(net, x_eval, y_eval, loss, reduction)
            row["eval_loss"] = float(value)
            if "eval_accuracy" in history:
                row["eval_accuracy"] = float(accuracy)
        row["time"] = time_offset + time.perf_counter() - started
        for name, value in row.items():
            history[name].append(value)
        last = epoch == plan.num_epochs - 1
        stopping = False
        if stop is not None and not last:
            stopping = bool(stop())
            if mesh is not None:
                with distributed.peer_failures(f"after epoch {epoch}"):
                    stopping = distributed.any_process(stopping, mesh)
        if checkpoint is not None and (last or stopping or (epoch + 1) % checkpoint_every == 0):
            _save(checkpoint, net, opt_state, row["step"], key, config, epoch, history)
        if callback is not None:
            callback(epoch, row)
        if stopping:
            break
    return net, history


def _check_resumable(restored: Any, config: dict, key: Array, path: str, plan: _Plan) -> None:
    """Refuse a checkpoint from a different run; a longer run may extend one that ended on a full epoch.

    Every setting must match except the total step count. A different total
    is accepted when this run's schedule reproduces every step the checkpoint
    holds (same epochs, each as long as it was) and asks for at least as many:
    the extended run then equals one that was asked for the longer total from
    the start, bit for bit.
    """
    saved = restored.metadata.get("config", {})
    different = sorted(name for name in config if name != "total_steps" and saved.get(name) != config[name])
    if different:
        details = "; ".join(f"{name}: checkpoint {saved.get(name)!r}, now {config[name]!r}" for name in different)
        raise ValueError(f"cannot resume from {path}: it was written by a different run ({details})")
    if restored.key is None or not np.array_equal(jax.random.key_data(restored.key), jax.random.key_data(key)):
        raise ValueError(f"cannot resume from {path}: it was written with a different key")
    epoch = restored.metadata["epoch"]
    if restored.step > plan.total_steps:
        raise ValueError(
            f"cannot resume from {path}: it already holds {restored.step} steps, more than the "
            f"{plan.total_steps} asked for"
        )
    expected = sum(plan.steps_in(e) for e in range(epoch + 1))
    if expected != restored.step and saved.get("total_steps") != plan.total_steps:
        raise ValueError(
            f"cannot resume from {path}: its {restored.step} steps end in epoch {epoch}, which was cut short "
            f"by its total of {saved.get('total_steps')} steps; a run of {plan.total_steps} steps would have "
            f"taken {plan.steps_per_epoch} steps in that epoch (resume with the same total, or start afresh)"
        )
    if expected != restored.step:
        raise ValueError(
            f"cannot resume from {path}: it holds {restored.step} steps through epoch {epoch}, but this run "
            f"takes {expected} steps through that epoch (a training set of a different size?)"
        )


def _save(path, net, opt_state, step, key, config, epoch, history) -> None:
    from purebp import checkpoint as _checkpoint

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
        # a separate file: the regular checkpoint stays a clean epoch boundary to resume from
        from purebp import checkpoint as _checkpoint

        diverged_path = f"{path}.diverged"
        metadata = {"config": config, "diverged_at_step": step, "diverged_in_epoch": epoch, "history": history}
        _checkpoint.save_checkpoint(
            diverged_path, state.previous_net, state.previous_opt_state, step=step, key=key, metadata=metadata
        )
        message += f" and saved to {diverged_path}"
    raise DivergenceError(
        message, net=state.previous_net, opt_state=state.previous_opt_state, step=step, epoch=epoch, history=history
    )
