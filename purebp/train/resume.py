"""Checkpointing and resume for ``fit``: one ``Checkpointing`` object, the run's settings, and the refusals.

A run's settings that shape its trajectory (architecture, dtype, loss,
reduction, batch size, total steps, gradient, optimizer, data digest, the
caller's ``settings``) are saved in every checkpoint; a resumed run compares
them with its own and refuses any difference, naming the setting and both values.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from purebp import inputs as _inputs
from purebp.extras import rules as _rules
from purebp.network import AnyNetwork, is_mlp
from purebp.train import optimizers as _optimizers
from purebp.train.schedule import positive_int


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Where and when ``fit`` saves, and whether it resumes.

    - ``path``: the checkpoint file, saved every ``every`` epochs and at the
      end (and with the last finite parameters, as ``path + ".diverged"``, on
      divergence). None: no file (``stop`` still applies).
    - ``resume``: continue from ``path``: any finished or interrupted run
      extends to more steps or epochs, mid-epoch too, ending bit for bit where
      the uninterrupted longer run ends. Without a file there it starts fresh.
    - ``stop()``: called after every epoch; once it returns True (on any
      process: agreed by an all-reduce) fit saves and returns early.
    - ``settings``: the caller's own settings that shape the run (``purebp
      train`` passes its flags), saved in the checkpoint and compared on resume.
    """

    path: str | os.PathLike | None
    every: int = 1
    resume: bool = False
    stop: Callable[[], bool] | None = None
    settings: dict[str, Any] | None = None

    def checked(self) -> Checkpointing:
        """Raise ValueError/TypeError, before anything trains, unless the file can be written; return it normalized."""
        every = positive_int("checkpoint_every", self.every)
        if not isinstance(self.resume, bool):
            raise TypeError(f"resume must be True or False, got {self.resume!r}")
        if self.resume and self.path is None:
            raise ValueError("resume=True needs a checkpoint path")
        if self.stop is not None and not callable(self.stop):
            raise TypeError(f"stop must be a callable returning bool, got {type(self.stop).__name__}")
        if self.settings is not None and not isinstance(self.settings, dict):
            raise TypeError(f"settings must be a dict, got {type(self.settings).__name__}")
        path = None if self.path is None else _checked_path(self.path)
        return dataclasses.replace(self, path=path, every=every)


def _checked_path(path: object) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path or a Checkpointing, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a directory: give a file path, e.g. {os.path.join(path, 'run.ckpt')}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint {path}: the directory {directory} does not exist")
    return path


def as_checkpointing(value: object) -> Checkpointing:
    """A ``Checkpointing`` from None (no file), a path (every epoch, no resume) or a ``Checkpointing``; checked."""
    if value is None or isinstance(value, (str, os.PathLike)):
        value = Checkpointing(value)
    if not isinstance(value, Checkpointing):
        raise TypeError(f"checkpoint must be a path or a Checkpointing, got {type(value).__name__}")
    return value.checked()


def architecture(net: AnyNetwork) -> dict:
    """The network's shape as JSON values: sizes and activations, or the layer description."""
    if is_mlp(net):  # the description earlier versions recorded: their checkpoints still resume
        return {"sizes": list(net.sizes), "activations": list(net.activations)}
    from purebp.train import checkpoint as _checkpoint

    return {"architecture": _checkpoint.describe_network(net)}


def run_config(net: AnyNetwork, run: Any, opt_state: Any) -> dict:
    """The settings that shape the trajectory, as JSON values: saved in checkpoints, compared on resume."""
    gradient = run.gradient
    config = {
        **architecture(net),
        "dtype": str(net.dtype),
        "loss": run.loss,
        "reduction": run.reduction,
        "batch_size": run.schedule.batch_size,
        "total_steps": run.schedule.total_steps,
        "gradient": gradient.source,
        "compute_dtype": gradient.compute_dtype,
        "rule": _rules.describe(gradient.rule),
        "optimizer": _optimizers.describe(run.optimizer.update, "update") | _initial_state_scalars(opt_state),
        "settings": dict(run.checkpoint.settings or {}),
    }
    if run.checkpoint.path is not None:  # a digest of the data costs a pass over it: only when it is compared
        config["data"] = {"examples": int(run.x.shape[0]), "sha256": _inputs.digest(run.x, run.y)}
    return json.loads(json.dumps(config, default=repr))  # as it reads back from a checkpoint


def _initial_state_scalars(opt_state: Any) -> dict[str, str]:
    # hyperparameters that optax.inject_hyperparams keeps in the state
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return {f"state{jax.tree_util.keystr(path)}": str(np.asarray(leaf)[()]) for path, leaf in leaves
            if np.size(leaf) == 1}  # fmt: skip


def restore(run: Any, config: dict, opt_state: Any, net: AnyNetwork) -> tuple[AnyNetwork, Any, int, dict] | None:
    """Load the run's checkpoint if it exists and belongs to this run; return (net, opt_state, step, history)."""
    from purebp.train import checkpoint as _checkpoint

    path = run.checkpoint.path
    if not os.path.exists(path):
        run.say(f"no checkpoint at {path}: starting fresh")
        return None
    # a Sequential may hold layers of the user's own, which only the network given to fit can rebuild
    template = None if is_mlp(net) else net  # an MLP is rebuilt from the file: a changed width is named by the config
    saved = _checkpoint.load_checkpoint(path, net_template=template)  # settings first: they name what differs
    check_resumable(saved, config, run)
    restored = _checkpoint.load_checkpoint(path, opt_state_template=opt_state, net_template=template)
    history = {name: list(values) for name, values in restored.metadata["history"].items()}
    return restored.net, restored.opt_state, restored.step, history


def _differences(saved: Any, now: Any, name: str) -> list[str]:
    found = []
    for path, first, second in _inputs.json_differences(saved, now, into_lists=False):
        label = " ".join([name, *map(str, path)]).strip()
        found.append(f"{label}: checkpoint {first!r}, now {second!r}")
    return found


def check_resumable(saved: Any, config: dict, run: Any) -> None:
    """Refuse a checkpoint from a different run, or one that already holds more steps than asked for.

    Every setting in the checkpoint's config must match except the total step
    count (a setting the checkpoint does not record, from an older purebp, is
    not compared). Settings the caller passed come first in the message.
    """
    path, recorded = run.checkpoint.path, saved.metadata.get("config", {})
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


def save(path: str, net: AnyNetwork, opt_state: Any, step: int, key: Any, metadata: dict) -> None:
    """Write the checkpoint from process 0 only (multi-process: the parameters are identical everywhere)."""
    from purebp.train import checkpoint as _checkpoint

    if jax.process_index() != 0:
        return
    _checkpoint.save_checkpoint(path, net, opt_state, step=step, key=key, metadata=metadata)
