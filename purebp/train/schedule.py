"""How long training runs: the validated ``Schedule`` of steps, batches and epochs.

Each epoch draws a permutation from ``jax.random.fold_in(key, epoch)`` and cuts
it into ``N // batch_size`` batches; the ``N % batch_size`` examples left over
that epoch are not used (different ones each epoch). A full batch
(``batch_size == N``) uses the data in order: plain gradient descent, as in the notes.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

Array = jax.Array


def positive_int(name: str, value: object) -> int:
    """Return ``value`` as an int; raise TypeError/ValueError naming ``name`` unless it is an int > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


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
    batch_size = positive_int("batch_size", batch_size)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} examples)")
    if (epochs is None) == (steps is None):
        raise ValueError(f"give exactly one of epochs or steps (got epochs={epochs!r}, steps={steps!r})")
    steps_per_epoch = n // batch_size
    total = positive_int("epochs", epochs) * steps_per_epoch if epochs is not None else positive_int("steps", steps)
    shuffle = batch_size < n
    if shuffle and key is None:
        raise ValueError("minibatches are shuffled from a key: pass key=jax.random.key(seed) (or use a full batch)")
    return Schedule(batch_size, steps_per_epoch, total, shuffle)
