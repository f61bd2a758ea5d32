"""One training step, and one epoch of them as a compiled ``lax.scan``.

The notes end with gradient descent, theta^{k+1} = theta^k - eta grad L(theta^k).
Here that update is one pure function of (parameters, optimizer state, batch)
(``make_train_step``), any optax ``GradientTransformation`` supplies the rule
(plain gradient descent is ``optax.sgd(eta)``), and one epoch is one jit-compiled
``lax.scan`` over shuffled minibatches (``run_epoch``): no Python loop and no
host round trip per step.

What a compiled epoch depends on is its static ``EpochProgram``: the
optimizer's update function (by identity, through
``optimizers.program_update``), the loss and reduction names, the gradient's
program, the batch size, the step count and the shuffle flag. Everything else
(parameters, optimizer state with its injected hyperparameters, data, keys,
a learning rule's matrices) is a traced argument.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from purebp.extras import rules as _rules
from purebp.network import AnyNetwork
from purebp.train import deprecated as _deprecated
from purebp.train import gradients as _gradients
from purebp.train import optimizers as _optimizers

Array = jax.Array
Batch = tuple[Array, Array]


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    loss: str,
    reduction: str = "mean",
    gradient: object = "handwritten",
    **deprecated: Any,
) -> Callable[..., tuple[AnyNetwork, Any, dict[str, Array]]]:
    """Return the pure step ``(net, opt_state, (x, y), key=None, rule=...) -> (new_net, new_opt_state, {"loss": L})``.

    ``key`` draws the step's dropout masks (None: dropout off). ``gradient``
    says how the gradient is made (``purebp.train.gradients``: "handwritten",
    "autodiff", a learning rule, ``mixed(dtype)``, ``sharded(mesh)``).

    L is the loss at ``net`` (before the update); the update is
    ``optax.apply_updates(net, optimizer.update(grads, opt_state, net))``, so
    ``optax.sgd(eta)`` gives the notes' theta <- theta - eta grad L. The step
    does no input checks (they would run on tracers): check once with
    ``purebp.inputs.validate_inputs``. It is jittable and scannable.

    A learning rule replaces the gradient by the rule's update, which optax
    then descends along. Inside your own ``jit`` pass the rule to the step as
    an argument (``step(net, s, batch, key, rule=r)`` with ``r`` an argument of
    the jitted function): it is then traced, and a new rule of the same shapes
    reuses the program; the one in ``gradient`` is only the default.
    ``mesh=``, ``compute_dtype=`` and ``rule=`` are deprecated spellings of ``gradient``.
    """
    old = _deprecated.take(deprecated, _deprecated.GRADIENT_ALIASES, "make_train_step")
    gradient = _deprecated.gradient_with(gradient, old)
    return _train_step(optimizer.update, loss, reduction, gradient.program, gradient.rule)


def _train_step(update: Callable, loss: str, reduction: str, program: tuple, default_rule: Any) -> Callable:
    value_and_grad = _gradients.value_and_grad_function(*program)

    def train_step(net: AnyNetwork, opt_state: Any, batch: Batch, key: Array | None = None, rule=default_rule):
        x, y = batch
        rule = _rules.check_rule(rule, net)  # shapes only: works on tracers
        if rule is not None:
            _gradients.Gradient(*program, rule=rule).check()
        value, grads = value_and_grad(net, x, y, loss, reduction, key, rule)
        # optax mixes Python scalars with int32 counters (Adam's bias correction):
        # give it the standard promotion rules even when the caller runs strict ones
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = update(grads, opt_state, net)
            net = optax.apply_updates(net, updates)
        return net, opt_state, {"loss": value}

    return train_step


class EpochState(NamedTuple):
    """What one epoch's ``lax.scan`` carries from step to step.

    ``previous_*`` are the parameters before the last update, returned when
    the loss goes non-finite; ``bad_step`` is -1 until then, then the index
    (within the epoch) of the first step whose loss was non-finite, after
    which every step is skipped.
    """

    net: AnyNetwork
    opt_state: Any
    previous_net: AnyNetwork
    previous_opt_state: Any
    bad_step: Array


def initial_state(net: AnyNetwork, opt_state: Any) -> EpochState:
    """Return the ``EpochState`` that starts training at (net, opt_state)."""
    return EpochState(net, opt_state, net, opt_state, jnp.asarray(-1, dtype=jnp.int32))


class EpochProgram(NamedTuple):
    """The static key of a compiled epoch (hashable; the update function compares by identity)."""

    update: Callable
    loss: str
    reduction: str
    gradient: tuple
    batch_size: int
    num_batches: int
    shuffle: bool


def run_epoch(
    state: EpochState,
    key: Array,
    x: Array,
    y: Array,
    *,
    optimizer: optax.GradientTransformation,
    loss: str,
    reduction: str = "mean",
    gradient: object = "handwritten",
    batch_size: int,
    num_batches: int,
    shuffle: bool,
    start: int | Array = 0,
    dropout_key: Array | None = None,
    **deprecated: Any,
) -> tuple[EpochState, Array]:
    """Run ``num_batches`` steps from ``state`` as one ``lax.scan``; return (final ``EpochState``, per-step losses).

    Batch i is examples ``order[(start + i) * batch_size:(start + i + 1) * batch_size]``
    with ``order = jax.random.permutation(key, N)`` (or 0..N-1 when not
    ``shuffle``): ``start`` > 0 runs the rest of an epoch that was cut short,
    with the same batches the whole epoch would have used. Losses of skipped
    steps (after a non-finite loss) are NaN. With ``dropout_key``, step i draws
    its dropout masks from ``fold_in(dropout_key, start + i)``, so a cut
    epoch's rest draws what the whole epoch would have drawn.

    ``gradient`` as in ``make_train_step``; a learning rule in it is a traced
    argument of the compiled epoch (a new rule of the same shapes reuses it).
    With a mesh each step is data-parallel (``batch_size`` must divide by its
    size; ``fit`` checks and itself uses ``run_sharded_epoch``, which also
    works across processes). ``mesh=``, ``compute_dtype=`` and ``rule=`` are
    deprecated spellings of ``gradient``. An optimizer built with
    ``optax.inject_hyperparams`` reuses the program of any other built the same
    way (``optimizers.program_update``).
    """
    old = _deprecated.take(deprecated, _deprecated.GRADIENT_ALIASES, "run_epoch")
    gradient = _deprecated.gradient_with(gradient, old)
    program = EpochProgram(
        _optimizers.program_update(optimizer.update), loss, reduction, gradient.program, batch_size, num_batches,
        shuffle,
    )  # fmt: skip
    start = jnp.asarray(start, dtype=jnp.int32)
    return _run_epoch_jit(state, key, x, y, start, dropout_key, gradient.rule, program=program)


@functools.partial(jax.jit, static_argnames=("program",))
def _run_epoch_jit(state, key, x, y, start, dropout_key, rule, *, program: EpochProgram):
    step = _train_step(program.update, program.loss, program.reduction, program.gradient, rule)
    n = x.shape[0]
    order = jax.random.permutation(key, n) if program.shuffle else jnp.arange(n)
    used = jax.lax.dynamic_slice_in_dim(order, start * program.batch_size, program.num_batches * program.batch_size)
    batches = used.reshape(program.num_batches, program.batch_size)
    step_keys = step_dropout_keys(dropout_key, start, program.num_batches)
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
    ``run_epoch``, with the losses replicated.
    """
    update = _optimizers.program_update(optimizer.update)
    return _run_sharded_epoch_jit(state, x_batches, y_batches, step_keys, program=(update, loss, reduction, mesh))


@functools.partial(jax.jit, static_argnames=("program",))
def _run_sharded_epoch_jit(state, x_batches, y_batches, step_keys, *, program: tuple):
    update, loss, reduction, mesh = program
    step = _train_step(update, loss, reduction, ("handwritten", None, mesh), None)
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
