"""Data parallelism on JAX's own machinery: a mesh, ``shard_map`` and one ``psum``.

The notes' L(theta) = sum_n C^n(theta) gives dL/dw = sum_n dC^n/dw: split the
batch over the devices of a 1-D mesh, let every device run the hand-written
backward pass on its share (reduction "sum"), and add the shares with one
all-reduce. Parameters are replicated. For ``reduction="mean"`` the sum is
divided by the global batch size afterwards, so the result equals the
single-device one up to the order of the floating-point additions.

When the mesh spans several processes, the gradient pytree and the loss are
flattened into one buffer before the ``psum``: CPU collectives (gloo) do one
all-reduce per array, and one buffer is several times faster than one
reduction per leaf.

The same code runs across processes: after ``initialize`` (``jax.distributed``)
the mesh holds every process's devices, ``shard_epoch`` gives each process only
its share of every batch, ``replicate`` puts identical parameters on all
devices, and ``any_process`` is the one-number all-reduce that lets processes
agree on stopping at the same step.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from purebp import engine as _engine
from purebp import inputs as _inputs
from purebp import programs as _programs
from purebp.network import AnyNetwork

Array = jax.Array
DATA_AXIS = "data"


def make_data_mesh(num_devices: int | None = None, axis: str = DATA_AXIS) -> Mesh:
    """Return a 1-D mesh over the first ``num_devices`` devices (all by default), axis type Auto.

    Auto, not the default Explicit axes of ``jax.make_mesh``: under Explicit
    axes the weight-gradient matmul over a sharded batch raises ShardingTypeError.
    """
    available = len(jax.devices())
    num_devices = available if num_devices is None else num_devices
    if not 1 <= num_devices <= available:
        raise ValueError(f"num_devices must be between 1 and {available} (the devices JAX sees), got {num_devices}")
    return jax.make_mesh((num_devices,), (axis,), axis_types=(jax.sharding.AxisType.Auto,))


def validate_mesh(mesh: Mesh, axis: str, batch_size: int) -> int:
    """Return the number of shards; raise ValueError if ``axis`` is missing or does not divide the batch."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.shape:
        raise ValueError(f"the mesh has axes {tuple(mesh.shape)}, not the data axis {axis!r}")
    shards = mesh.shape[axis]
    if batch_size % shards:
        raise ValueError(
            f"a batch of {batch_size} examples does not split evenly over the {shards} devices of mesh axis "
            f"{axis!r}; use a batch size divisible by {shards}"
        )
    return shards


@functools.lru_cache(maxsize=64)
def sharded_value_and_grad(mesh: Mesh, axis: str, loss: str, reduction: str) -> Callable:
    """Return the jitted ``f(net, x, y, key=None) -> (L, grads)`` with the batch split over ``mesh``'s ``axis``.

    Unchecked (``data_parallel_value_and_grad`` checks); one program per (mesh, axis, loss, reduction),
    shapes cached by jit itself.
    """

    # Across processes (gloo: one TCP all-reduce per array) one flattened buffer is several times
    # faster; within one process the all-reduce is a copy and flattening's concatenation costs more
    # than it saves (experiments/results/scaling.md), so there the leaves are reduced as they are.
    flatten = len({device.process_index for device in mesh.devices.flat}) > 1

    def local(net: AnyNetwork, x: Array, y: Array, key: Array | None):
        # this shard's sum_n C^n and its gradient; its examples start at axis_index * shard size, so
        # its dropout masks are the ones the whole batch draws for them on one device
        offset = jax.lax.axis_index(axis) * x.shape[0]
        shard_loss, grads = _engine.loss_and_grads(
            net, x, y, loss=loss, reduction="sum", key=key, example_offset=offset
        )
        if not flatten:
            return jax.lax.psum((shard_loss, grads), axis)
        flat, unravel = ravel_pytree((shard_loss, grads))
        total_loss, grads = unravel(jax.lax.psum(flat, axis))  # one all-reduce for every leaf
        return total_loss, grads

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis), P(axis), P()), out_specs=(P(), P()))

    @jax.jit
    def value_and_grad(net: AnyNetwork, x: Array, y: Array, key: Array | None = None):
        total_loss, grads = sharded(net, x, y, key)
        if reduction == "mean":
            scale = 1.0 / x.shape[0]
            return scale * total_loss, jax.tree.map(lambda g: scale * g, grads)
        return total_loss, grads

    return value_and_grad


_programs.on_clear(sharded_value_and_grad.cache_clear)


def data_parallel_value_and_grad(
    net: AnyNetwork,
    x: Array,
    y: Array,
    *,
    loss: str,
    reduction: str = "mean",
    mesh: Mesh,
    axis: str = DATA_AXIS,
    key: Array | None = None,
) -> tuple[Array, AnyNetwork]:
    """``purebp.value_and_grad`` with the batch split over ``mesh``'s ``axis``; replicated results.

    Raises ValueError before compiling when the batch does not divide by the
    number of devices on ``axis`` (no padding: padding would change a mean).
    ``key`` draws the dropout masks: each device draws those of its own
    examples (``fold_in(key, global example index)``), so any number of
    devices gives the masks of one device, and the result to rounding.
    """
    x, y = _inputs.coerce_inputs(net, x, y)
    _inputs.validate_inputs(net, x, y, loss=loss, reduction=reduction)
    validate_mesh(mesh, axis, x.shape[0])
    return sharded_value_and_grad(mesh, axis, loss, reduction)(net, x, y, key)


def shard_batch(x: Array, mesh: Mesh, axis: str = DATA_AXIS) -> Array:
    """Place ``x`` on ``mesh`` split along its first (batch) axis."""
    spec = P(axis, *([None] * (jnp.ndim(x) - 1)))
    return jax.device_put(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------- global arrays


def batch_spec(ndim: int, axis: str = DATA_AXIS, leading: int = 0) -> P:
    """Return the PartitionSpec that splits dimension ``leading`` (the batch) over ``axis``."""
    return P(*([None] * leading), axis, *([None] * (ndim - leading - 1)))


def shard_epoch(
    x: np.ndarray, y: np.ndarray, order: np.ndarray, num_steps: int, batch_size: int, mesh: Mesh, axis: str = DATA_AXIS
) -> tuple[Array, Array]:
    """Return global arrays (num_steps, batch_size, ...) of an epoch's batches, split over ``axis`` along dim 1.

    Batch s is the examples ``order[s * batch_size:(s + 1) * batch_size]`` of the
    host arrays ``x``, ``y`` (the same on every process). Each process gathers
    only the rows its own devices hold: ``jax.make_array_from_callback`` asks it
    for exactly those index ranges, so no process ever materialises another's share.
    """
    indices = np.asarray(order)[: num_steps * batch_size].reshape(num_steps, batch_size)

    def global_array(host: np.ndarray) -> Array:
        shape = (num_steps, batch_size, *host.shape[1:])
        sharding = NamedSharding(mesh, batch_spec(len(shape), axis, leading=1))
        return jax.make_array_from_callback(shape, sharding, lambda index: host[indices[index[:2]]])

    return global_array(np.asarray(x)), global_array(np.asarray(y))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Return ``tree`` with every leaf a global array replicated on all devices of ``mesh``.

    Every process must pass the same values (the same seed or the same checkpoint).
    """
    sharding = NamedSharding(mesh, P())

    def put(leaf: Any) -> Array:
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def to_local(tree: Any) -> Any:
    """Return a copy of a tree of fully replicated global arrays as ordinary arrays on this process's default device."""
    return jax.tree.map(lambda leaf: jnp.asarray(np.asarray(leaf)), tree)


@functools.lru_cache(maxsize=16)
def _global_max(mesh: Mesh, axis: str):
    return jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))


def any_process(flag: bool, mesh: Mesh, axis: str = DATA_AXIS) -> bool:
    """Return True on every process when ``flag`` is True on at least one: a one-number all-reduce (max).

    Every process must call it at the same point of the program (it is a collective).
    """
    sharding = NamedSharding(mesh, P(axis))
    flags = jax.make_array_from_callback(
        (mesh.shape[axis],), sharding, lambda index: np.full(len(range(mesh.shape[axis])[index[0]]), flag, np.int32)
    )
    return bool(_global_max(mesh, axis)(flags))


# ---------------------------------------------------------------- processes


class ProcessFailureError(RuntimeError):
    """A collective failed in a multi-process run: another process has most likely died."""


def process_failure(error: BaseException, where: str) -> ProcessFailureError:
    """Wrap a runtime error from a collective in a message that says what probably happened and what to do."""
    return ProcessFailureError(
        f"process {jax.process_index()} of {jax.process_count()} lost contact with the others {where} "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); another process has "
        "probably died (see its log). Rerun the same command with --resume (fit(..., resume=True)) to continue "
        "from the last checkpoint."
    )


@contextlib.contextmanager
def peer_failures(where: str) -> Iterator[None]:
    """In a multi-process run, turn a failed collective (jaxlib raises ValueError or RuntimeError) into
    ``ProcessFailureError``; a no-op with one process."""
    if jax.process_count() == 1:
        yield
        return
    try:
        yield
    except (ValueError, RuntimeError) as error:
        raise process_failure(error, where) from error


def validate_process_arguments(num_processes: object, process_id: object, coordinator: object) -> None:
    """Raise ValueError/TypeError unless (num_processes, process_id, coordinator HOST:PORT) describe a valid run."""
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive int, got {num_processes!r}")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be an int in [0, {num_processes}), got {process_id!r}")
    host, _, port = str(coordinator).rpartition(":")
    if not isinstance(coordinator, str) or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator must be HOST:PORT (e.g. 127.0.0.1:1234), got {coordinator!r}")


AUTO = "auto"


def initialize(
    num_processes: int | None,
    process_id: int | None,
    coordinator: str,
    *,
    heartbeat_timeout: int = 100,
    initialization_timeout: int = 300,
) -> None:
    """Join a multi-process run: ``jax.distributed.initialize`` with the given coordinator and timeouts.

    ``coordinator="auto"`` leaves the coordinator (and ``num_processes`` /
    ``process_id`` when None) to JAX's cluster auto-detection: SLURM, Open MPI,
    Cloud TPU, Kubernetes. Otherwise all three are required.
    Must run before the first JAX operation of the process, and once. A process
    that stops sending heartbeats for ``heartbeat_timeout`` seconds is declared
    dead and the others are stopped. On CPU the collectives go through gloo (the
    default ``jax_cpu_collectives_implementation`` of this JAX version; set here
    in case it is not). ``JAX_COORDINATOR_BIND_ADDRESS`` (set by ``purebp
    launch`` to the loopback address) restricts where the coordinator listens.
    """
    if coordinator != AUTO:
        validate_process_arguments(num_processes, process_id, coordinator)
    for name, value in (("heartbeat_timeout", heartbeat_timeout), ("initialization_timeout", initialization_timeout)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=None if coordinator == AUTO else coordinator,
            num_processes=num_processes,
            process_id=process_id,
            heartbeat_timeout_seconds=heartbeat_timeout,
            initialization_timeout=initialization_timeout,
            coordinator_bind_address=os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"),
        )
    except RuntimeError as error:  # called twice, or after JAX has started
        raise RuntimeError(
            f"purebp.train.distributed.initialize must run once per process, before its first JAX operation ({error})"
        ) from None
    except ValueError as error:
        if coordinator != AUTO:
            raise
        raise ValueError(
            f"coordinator 'auto' found no cluster (SLURM, Open MPI, Cloud TPU, Kubernetes) to read it from ({error}); "
            "pass the number of processes, this process's id and the coordinator's HOST:PORT"
        ) from None
