"""``fit``: validate once, check the hand-written gradient against jax.grad, then train, evaluate and checkpoint.

The pieces live beside it: ``step`` (the train step and the scanned epoch),
``schedule`` (steps, batches, epochs), ``optimizers`` (the default optimizer
and the update a compiled epoch is keyed on), ``gradients`` (how the gradient
is made), ``resume`` (``Checkpointing``, the run's settings, resume's
refusals) and ``progress`` (what fit prints). This module validates the
arguments (``_validate``), runs the epochs (``_train``) and keeps the history.

Minibatches: each epoch draws a permutation from ``jax.random.fold_in(key,
epoch)`` and cuts it into ``N // batch_size`` batches; the ``N % batch_size``
examples left over that epoch are not used (different ones each epoch). A
full batch (``batch_size == N``) uses the data in order: plain gradient
descent, as in the notes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from purebp import check as _check
from purebp import engine as _engine
from purebp import inputs as _inputs
from purebp import losses as _losses
from purebp.extras import rules as _rules
from purebp.layers import Dropout
from purebp.network import AnyNetwork, Sequential
from purebp.train import deprecated as _deprecated
from purebp.train import gradients as _gradients
from purebp.train import progress as _progress
from purebp.train import resume as _resume
from purebp.train.gradients import SOURCES as GRADIENTS
from purebp.train.optimizers import OPTIMIZERS, make_optimizer, validate_learning_rate
from purebp.train.resume import Checkpointing
from purebp.train.schedule import Schedule, format_epochs, make_schedule
from purebp.train.step import (
    EpochState,
    _run_epoch_jit,
    _run_sharded_epoch_jit,
    initial_state,
    make_train_step,
    run_epoch,
    run_sharded_epoch,
    step_dropout_keys,
)

__all__ = [
    "ALIGNMENT_BATCH",
    "GRADIENTS",
    "OPTIMIZERS",
    "VERIFY_BATCH",
    "Checkpointing",
    "DivergenceError",
    "EpochState",
    "GradientMismatchError",
    "Schedule",
    "_run_epoch_jit",
    "_run_sharded_epoch_jit",
    "evaluate",
    "fit",
    "format_epochs",
    "has_dropout",
    "initial_state",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "run_epoch",
    "run_sharded_epoch",
    "step_dropout_keys",
    "validate_learning_rate",
]  # fmt: skip

Array = jax.Array
VERIFY_BATCH = 16  # examples used by the pre-training gradient check
ALIGNMENT_BATCH = 512  # training examples (the first ones) that the deprecated log_alignment=True measures angles on
# fold_in constants that separate fit's key streams: epoch e shuffles with fold_in(key, e) (as before
# dropout existed); its step i draws dropout masks from fold_in(fold_in(fold_in(key, e), DROPOUT_STREAM), i)
DROPOUT_STREAM = 0x0D50
VERIFY_STREAM = 0x0C4E
# fit's old keyword arguments, and what replaces each
FIT_ALIASES = {
    **_deprecated.GRADIENT_ALIASES,
    "verify": "gradient=purebp.train.gradients.handwritten(verify=False)",
    "log": "progress=True (messages printed) or the 'purebp.train.fit' logger",
    "log_alignment": "callback=purebp.extras.rules.alignment_callback(x, y, loss=..., rule=...)",
    "resume": "checkpoint=Checkpointing(path, resume=True)",
    "checkpoint_every": "checkpoint=Checkpointing(path, every=n)",
    "stop": "checkpoint=Checkpointing(path, stop=stop)",
    "settings": "checkpoint=Checkpointing(path, settings=settings)",
}


class GradientMismatchError(ValueError):
    """The hand-written gradient disagrees with jax.grad: ``fit`` refuses to train. ``report`` says where."""

    def __init__(self, report: _check.GradientReport, layer_reports: tuple = ()):
        failing = "".join(f"\n{layer_report}" for layer_report in layer_reports if not layer_report.passed)
        super().__init__(
            "refusing to train: the hand-written gradient disagrees with jax.grad on this architecture "
            f"(pass gradient=purebp.train.gradients.handwritten(verify=False) to train anyway)\n{report}{failing}"
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


# ---------------------------------------------------------------- evaluation


@functools.partial(jax.jit, static_argnames=("loss", "reduction"))
def _evaluate_jit(net: AnyNetwork, x: Array, y: Array, loss: str, reduction: str) -> tuple[Array, Array]:
    activation, caches = _engine.forward_pass(net, x)  # no key: inference, dropout off
    cost = _engine.output_cost(net, activation, caches, y, loss=loss)
    value = jnp.mean(cost) if reduction == "mean" else jnp.sum(cost)
    labels = y if y.ndim == 1 else jnp.argmax(y, axis=-1)
    predicted = jnp.argmax(activation, axis=-1).astype(labels.dtype)  # int64 under x64, labels may be int32
    correct = (predicted == labels).astype(activation.dtype)
    # NaN in, NaN out: argmax of a non-finite row is no prediction, so it makes the accuracy NaN, not a score
    scored = jnp.all(jnp.isfinite(activation), axis=-1)
    accuracy = jnp.mean(jnp.where(scored, correct, jnp.full_like(correct, jnp.nan)))
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


def has_dropout(net: AnyNetwork) -> bool:
    """True if ``net`` holds a ``Dropout`` layer with a nonzero rate (at any depth)."""
    leaves = jax.tree.leaves(net, is_leaf=lambda node: isinstance(node, Dropout))
    return any(isinstance(leaf, Dropout) and leaf.rate > 0 for leaf in leaves)


# ---------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class _Run:
    """Everything ``fit`` validated, before anything compiled."""

    x: Array
    y: Array
    eval: tuple[Array, Array] | None
    loss: str
    reduction: str
    gradient: _gradients.Gradient
    optimizer: optax.GradientTransformation
    schedule: Schedule
    key: Array
    checkpoint: Checkpointing
    callbacks: tuple
    reporter: _progress.Reporter
    random_layers: bool = False  # a Sequential trained with a key: its layers get per-step keys (dropout)

    def say(self, message: str) -> None:
        self.reporter.say(message)


def _validate_key(key: object) -> Array:
    _inputs.check_key(key, required=True)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(jnp.asarray(key))  # a legacy raw key from jax.random.PRNGKey


def _as_array(name: str, value: object) -> Array:
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    return jnp.asarray(value)


def _data(net: AnyNetwork, name: str, pair: object, loss: str, reduction: str) -> tuple[Array, Array]:
    """(x, y) of ``pair`` cast and checked against ``net``: finite first (a NaN label is not a bad label)."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be a pair (x, y) of arrays, got {type(pair).__name__}")
    x, y = _as_array(f"{name}[0] (x)", pair[0]), _as_array(f"{name}[1] (y)", pair[1])
    x, y = _inputs.coerce_inputs(net, x, y)
    _inputs.check_finite(f"the {'training' if name == 'train' else name} data", x=x, y=y)
    # the network's own structure is checked here, once, with the first data it meets (cached per shape)
    _inputs.validate_inputs(net, x, y, loss=loss, reduction=reduction)
    return x, y


def _optimizer(optimizer: object, learning_rate: object) -> optax.GradientTransformation:
    from purebp.train.optimizers import default_optimizer

    if optimizer is None:
        return default_optimizer(None if learning_rate is None else validate_learning_rate(learning_rate))
    if learning_rate is not None:
        raise ValueError("learning_rate is only used for the default optimizer; put it in your optax optimizer")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    return optimizer


def _callbacks(callback: object) -> tuple:
    callbacks = tuple(callback) if isinstance(callback, (tuple, list)) else (() if callback is None else (callback,))
    for item in callbacks:
        if not callable(item) and not callable(getattr(item, "measure", None)):
            raise TypeError(
                f"callback must be a callable (epoch, row) or an object with a measure(net) method, got {item!r}"
            )
    return callbacks


def _old_options(options: dict, deprecated: dict) -> dict:
    """Map fit's deprecated keyword arguments onto the new ones (``options``: gradient, checkpoint, callback)."""
    old = _deprecated.take(deprecated, FIT_ALIASES, "fit", stacklevel=4)
    gradient = _deprecated.gradient_with(options["gradient"], old)
    if "verify" in old:
        gradient = _gradients.combine(gradient, _gradients.Gradient(verify=old["verify"]))
    checkpoint = options["checkpoint"]
    moved = {name: old[name] for name in ("resume", "checkpoint_every", "stop", "settings") if name in old}
    if moved:
        if isinstance(checkpoint, Checkpointing):
            raise TypeError(f"give {', '.join(moved)} inside the Checkpointing, not beside it")
        fields = {"every" if name == "checkpoint_every" else name: value for name, value in moved.items()}
        checkpoint = Checkpointing(checkpoint, **fields)
    callbacks = _callbacks(options["callback"])
    alignment = old.get("log_alignment", False)
    if not isinstance(alignment, bool):
        raise TypeError(f"log_alignment must be True or False, got {alignment!r}")
    return dict(gradient=gradient, checkpoint=checkpoint, callbacks=callbacks, log=old.get("log"), alignment=alignment)


def _validate(net: AnyNetwork, train: object, given: dict, new: dict) -> _Run:
    """Check every argument of ``fit`` (and the data's values) once, before anything compiles; return a ``_Run``.

    ``given``: fit's own arguments by name; ``new``: gradient, checkpoint and callbacks with the deprecated ones mapped.
    """
    loss, reduction, key = given["loss"], given["reduction"], given["key"]
    x, y = _data(net, "train", train, loss, reduction)
    eval_data = None if given["eval"] is None else _data(net, "eval", given["eval"], loss, reduction)
    gradient = _gradients.as_gradient(new["gradient"])
    optimizer = _optimizer(given["optimizer"], given["learning_rate"])
    key = None if key is None else _validate_key(key)
    if key is None and has_dropout(net):
        raise ValueError(
            "the network has dropout, whose masks are drawn from a key: pass key=jax.random.key(seed) "
            "(to train without dropout, use rate 0)"
        )
    schedule = make_schedule(int(x.shape[0]), given["batch_size"], given["epochs"], given["steps"], key)
    if gradient.mesh is not None:
        from purebp.train import distributed

        distributed.validate_mesh(gradient.mesh, distributed.DATA_AXIS, schedule.batch_size)
    gradient = dataclasses.replace(gradient, rule=_rules.check_rule(gradient.rule, net))
    checkpoint = _resume.as_checkpointing(new["checkpoint"])
    callbacks = new["callbacks"]
    if new["alignment"]:
        count = min(ALIGNMENT_BATCH, int(x.shape[0]))
        measure = _rules.alignment_callback(x, y, loss=loss, reduction=reduction, rule=gradient.rule, count=count)
        callbacks = (measure, *callbacks)
    reporter = _progress.reporter(given["progress"], schedule.num_epochs, new["log"])
    return _Run(
        x=x, y=y, eval=eval_data, loss=loss, reduction=reduction, gradient=gradient, optimizer=optimizer,
        schedule=schedule, key=jax.random.key(0) if key is None else key,  # full batch: never used for shuffling
        checkpoint=checkpoint, callbacks=callbacks, reporter=reporter,
        random_layers=isinstance(net, Sequential) and key is not None,
    )  # fmt: skip


# ---------------------------------------------------------------- fit


def fit(
    net: AnyNetwork,
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
    gradient: object = "handwritten",
    checkpoint: str | Checkpointing | None = None,
    callback: Callable | Sequence[Callable] | None = None,
    progress: bool = False,
    **deprecated: Any,
) -> tuple[AnyNetwork, dict[str, list]]:
    """Train ``net`` on ``train = (x, y)``; return (trained net, history). ``net`` is not modified.

    - ``optimizer``: any optax ``GradientTransformation``; default theta <-
      theta - eta grad L with eta = ``learning_rate`` (0.1, only for this
      default) held in the optimizer state, so a sweep over
      ``fit(learning_rate=r)`` compiles the epoch once; so does one over an
      ``optax.inject_hyperparams`` optimizer (``purebp.train.optimizers``).
    - ``epochs`` or ``steps`` (exactly one); ``batch_size`` (default: the whole
      training set, i.e. gradient descent); ``key`` shuffles minibatches
      (epoch e uses ``fold_in(key, e)``), needed when ``batch_size < N``.
    - ``eval = (x_test, y_test)`` is evaluated after every epoch.
    - ``gradient``: how each step's gradient is made (``purebp.train.gradients``):
      "handwritten" (default), "autodiff", a learning rule (``purebp.extras.rules``),
      ``gradients.mixed("bfloat16")``, a ``jax.sharding.Mesh`` (data parallel,
      across processes too), or a tuple of these where the passes combine.
      First fit compares the hand-written gradient with jax.grad on
      ``VERIFY_BATCH`` training examples and raises ``GradientMismatchError``
      if they differ (``gradients.handwritten(verify=False)`` skips it).
    - ``checkpoint``: a path, saved every epoch and at the end, or a
      ``Checkpointing(path, every, resume, stop, settings)``
      (``purebp.train.resume``): resume continues any run bit for bit like
      the longer run and refuses a changed setting, naming it. A directory,
      or a path whose directory is missing, is refused before training.
    - ``callback``: one or a sequence of ``callback(epoch, row)``, called after
      every epoch with its history row; an object with ``measure(net) -> dict``
      (``purebp.extras.rules.alignment_callback``) adds entries to the row
      before it is recorded, outside the training time.
    - ``progress=True``: print fit's messages, a tqdm bar (extra ``cli``) and
      each epoch's metrics; otherwise messages go to the ``"purebp.train.fit"`` logger.

    Deprecated keyword shorthands, still accepted with a ``DeprecationWarning``:
    ``mesh=m`` (``gradient=m``), ``rule=r`` (``gradient=r``), ``compute_dtype``,
    ``verify``, ``log``, ``log_alignment``, ``resume``, ``checkpoint_every``,
    ``stop`` and ``settings``; any other keyword is a TypeError.

    History is a dict of lists, one entry per epoch: ``epoch``, ``step`` (steps
    done), ``train_loss`` (mean minibatch loss over the epoch; for an epoch
    finished by a resumed run, the step-weighted mean of its two parts),
    ``time`` (seconds of training, summed over resumed runs), and with ``eval``
    ``eval_loss`` and, for classification losses, ``eval_accuracy``. Raises
    ``DivergenceError`` (with the last finite parameters) when the loss becomes
    non-finite; every bad argument, and NaN or inf anywhere in the data, raises
    ValueError/TypeError before anything is compiled.
    """
    new = _old_options(dict(gradient=gradient, checkpoint=checkpoint, callback=callback), deprecated)
    given = dict(loss=loss, optimizer=optimizer, learning_rate=learning_rate, epochs=epochs, steps=steps,
                 batch_size=batch_size, key=key, eval=eval, reduction=reduction, progress=progress)  # fmt: skip
    run = _validate(net, train, given, new)
    try:
        return _fit(run, net)
    finally:
        run.reporter.close()


def _fit(run: _Run, net: AnyNetwork) -> tuple[AnyNetwork, dict[str, list]]:
    with jax.numpy_dtype_promotion("standard"):
        opt_state = run.optimizer.init(net)
    config = _resume.run_config(net, run, opt_state)
    history: dict[str, list] = {"epoch": [], "step": [], "train_loss": [], "time": []}
    if run.eval is not None:
        history["eval_loss"] = []
        if run.loss in _losses.CLASSIFICATION_LOSSES:
            history["eval_accuracy"] = []
    start = 0
    if run.checkpoint.resume:
        restored = _resume.restore(run, config, opt_state, net)
        if restored is not None:
            net, opt_state, start, history = restored
            if start == run.schedule.total_steps:
                run.say(f"{run.checkpoint.path} already holds all {start} steps: nothing to do")
                return net, history
            run.say(
                f"resumed from step {start} of {run.checkpoint.path}; training on to step "
                f"{run.schedule.total_steps} ({run.schedule.describe()})"
            )
    if run.gradient.verify:
        _verify(run, net)
    return _train(run, net, opt_state, start, history, config)


def _verify(run: _Run, net: AnyNetwork) -> None:
    count = min(VERIFY_BATCH, int(run.x.shape[0]))
    # training mode when the layers get keys: dropout's backward is checked with its masks on
    key = jax.random.fold_in(run.key, VERIFY_STREAM) if run.random_layers else None
    x, y = run.x[:count], run.y[:count]
    report = _check.check_gradients(net, x, y, loss=run.loss, reduction=run.reduction, key=key)
    if not report.passed:
        layer_reports = _check.check_layers_of(net, x, key=key) if isinstance(net, Sequential) else ()
        raise GradientMismatchError(report, layer_reports)
    rule = run.gradient.rule
    run.say(
        f"gradient check passed: hand-written vs JAX autodiff on {count} training examples, max relative error "
        f"{report.max_relative_error:.1e} (tolerance {report.tolerance:.0e})"
        + (
            ""
            if rule is None
            else f"; this checks backprop on this architecture: the {rule.kind} rule's update is not a "
            "gradient and is not checked"
        )
    )


# ---------------------------------------------------------------- the epochs


def _train(run: _Run, net: AnyNetwork, opt_state: Any, start: int, history: dict, config: dict):
    """Run the schedule from global step ``start``: one compiled scan per (part of an) epoch."""
    schedule, mesh = run.schedule, run.gradient.mesh
    clock = {"started": time.perf_counter(), "offset": history["time"][-1] if history["time"] else 0.0}
    if mesh is None:
        state = initial_state(net, opt_state)
    else:
        from purebp.train import distributed

        state = initial_state(*distributed.replicate((net, opt_state), mesh))
    chunks = schedule.chunks(start)
    for index, (epoch, offset, count) in enumerate(chunks):
        epoch_key = jax.random.fold_in(run.key, epoch)
        state, local_state, mean_loss = _run_chunk(run, state, epoch, epoch_key, offset, count)
        steps_before = epoch * schedule.steps_per_epoch + offset
        if int(local_state.bad_step) >= 0:
            _diverged(run, local_state, epoch, steps_before + int(local_state.bad_step), history, config)
        # state.previous_* now hold the parameters before the last step: kept for the next epoch
        net, opt_state = local_state.net, local_state.opt_state
        row = _record(run, net, history, clock, epoch, offset, steps_before + count, mean_loss, count)
        stopping = index < len(chunks) - 1 and _stop_requested(run, epoch)
        epoch_done = offset + count == schedule.steps_per_epoch
        every = epoch_done and (epoch + 1) % run.checkpoint.every == 0
        if run.checkpoint.path is not None and (index == len(chunks) - 1 or stopping or every):
            metadata = {"config": config, "epoch": epoch, "history": history}
            _resume.save(run.checkpoint.path, net, opt_state, row["step"], run.key, metadata)
        for callback in run.callbacks:
            if callable(callback):
                callback(epoch, row)
        if stopping:
            break
    return net, history


def _run_chunk(run: _Run, state: EpochState, epoch: int, epoch_key: Array, offset: int, count: int):
    """Run ``count`` steps of ``epoch`` from its step ``offset``; return (state, state on this host, mean loss)."""
    schedule, mesh = run.schedule, run.gradient.mesh
    dropout_key = jax.random.fold_in(epoch_key, DROPOUT_STREAM) if run.random_layers else None
    options = dict(loss=run.loss, reduction=run.reduction, optimizer=run.optimizer)
    if mesh is None:
        state, step_losses = run_epoch(
            state, epoch_key, run.x, run.y, gradient=run.gradient, batch_size=schedule.batch_size,
            num_batches=count, shuffle=schedule.shuffle, start=offset, dropout_key=dropout_key, **options,
        )  # fmt: skip
        return state, state, float(jnp.mean(step_losses))
    from purebp.train import distributed

    with distributed.peer_failures(f"in epoch {epoch}"):
        # the same permutation run_epoch draws inside its jit, so the same batches
        x_host, y_host = np.asarray(run.x), np.asarray(run.y)
        n = x_host.shape[0]
        order = np.asarray(jax.random.permutation(epoch_key, n)) if schedule.shuffle else np.arange(n)
        order = order[offset * schedule.batch_size :]
        x_batches, y_batches = distributed.shard_epoch(x_host, y_host, order, count, schedule.batch_size, mesh)
        step_keys = step_dropout_keys(dropout_key, offset, count)
        state, step_losses = run_sharded_epoch(state, x_batches, y_batches, mesh=mesh, step_keys=step_keys, **options)
        mean_loss = float(jnp.mean(distributed.to_local(step_losses)))
        return state, distributed.to_local(state), mean_loss


def _record(run: _Run, net, history: dict, clock: dict, epoch: int, offset: int, step: int, mean_loss: float,
            count: int) -> dict:  # fmt: skip
    """Append the epoch's row (metrics, time, measurements) to ``history``; return it."""
    row = {"epoch": epoch, "step": step, "train_loss": mean_loss}
    if offset > 0 and history["epoch"] and history["epoch"][-1] == epoch:
        # the rest of an epoch a previous run cut short: one row for the whole epoch
        done = history["step"][-1] - epoch * run.schedule.steps_per_epoch
        row["train_loss"] = (history["train_loss"][-1] * done + mean_loss * count) / (done + count)
        for values in history.values():
            values.pop()
    if run.eval is not None:
        value, accuracy = _evaluate_jit(net, *run.eval, run.loss, run.reduction)
        row["eval_loss"] = float(value)
        if "eval_accuracy" in history:
            row["eval_accuracy"] = float(accuracy)
    row["time"] = clock["offset"] + time.perf_counter() - clock["started"]
    measuring = time.perf_counter()  # after the clock: measurements are not training
    for callback in run.callbacks:
        if callable(getattr(callback, "measure", None)):
            row.update(callback.measure(net))
    clock["started"] += time.perf_counter() - measuring  # kept out of the next epochs' training time
    for name in row:
        history.setdefault(name, [None] * len(history["epoch"]))  # new measurements, or a resumed run without them
    for name, value in row.items():
        history[name].append(value)
    run.reporter.epoch(row)
    return row


def _stop_requested(run: _Run, epoch: int) -> bool:
    if run.checkpoint.stop is None:
        return False
    stopping = bool(run.checkpoint.stop())
    mesh = run.gradient.mesh
    if mesh is not None:
        from purebp.train import distributed

        with distributed.peer_failures(f"after epoch {epoch}"):
            stopping = distributed.any_process(stopping, mesh)
    return stopping


def _diverged(run: _Run, state: EpochState, epoch: int, step: int, history: dict, config: dict) -> None:
    message = (
        f"training diverged: the loss became non-finite at step {step} (epoch {epoch}); "
        "the last parameters with a finite loss are in DivergenceError.net"
    )
    path = run.checkpoint.path
    if path is not None and jax.process_index() == 0:
        # a separate file: the regular checkpoint keeps the last finite state a run can resume from
        diverged_path = f"{path}.diverged"
        metadata = {"config": config, "diverged_at_step": step, "diverged_in_epoch": epoch, "history": history}
        _resume.save(diverged_path, state.previous_net, state.previous_opt_state, step, run.key, metadata)
        message += f" and saved to {diverged_path}"
    raise DivergenceError(
        message, net=state.previous_net, opt_state=state.previous_opt_state, step=step, epoch=epoch, history=history
    )
