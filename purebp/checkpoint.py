"""Atomic checkpoints: a Network, its optimizer state, step, key and metadata in one ``.npz`` file.

Writing goes to a temporary file in the same directory, which is flushed and
fsync'ed, then ``os.replace``d over the target (atomic on POSIX), then the
directory is fsync'ed: a crash at any point leaves either the old checkpoint
or the new one, never a mix. Reading checks everything (format version,
structure, shapes, dtypes; the zip's CRC-32 catches corrupted bytes) and turns
any problem into a ``CheckpointError`` that names the file.

Layout of the archive (``np.load(path)`` reads it, no pickle):

- ``net/<l>/w``, ``net/<l>/b``: the parameters, bit for bit
- ``opt/<i>``: the optimizer state's leaves in ``jax.tree.leaves`` order
- ``key_data``: ``jax.random.key_data(key)`` (absent without a key)
- ``meta``: UTF-8 JSON: format, purebp version, sizes, activations, dtype,
  step, the key's implementation, the optimizer state's tree structure and
  leaf shapes/dtypes, and the caller's metadata
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import tempfile
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from purebp.network import Layer, Network, validate_network

FORMAT = "purebp-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not match what it is loaded into."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What ``load_checkpoint`` returns. ``opt_state`` is None unless a template was given."""

    net: Network
    opt_state: Any
    step: int
    key: jax.Array | None
    metadata: dict


def _version() -> str:
    from purebp import __version__

    return __version__


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot open directories
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def save_checkpoint(
    path: str | os.PathLike,
    net: Network,
    opt_state: Any = None,
    *,
    step: int = 0,
    key: jax.Array | None = None,
    metadata: dict | None = None,
) -> None:
    """Write ``net``, ``opt_state`` (a pytree), ``step``, ``key`` and JSON ``metadata`` to ``path`` atomically.

    The previous file at ``path``, if any, is replaced only once the new one
    is complete on disk. Arrays are stored exactly: a round trip is bit-identical.
    """
    validate_network(net)
    path = os.fspath(path)
    arrays: dict[str, np.ndarray] = {}
    for l, layer in enumerate(net.layers):
        arrays[f"net/{l}/w"] = np.asarray(layer.w)
        arrays[f"net/{l}/b"] = np.asarray(layer.b)
    opt_leaves, opt_treedef = jax.tree.flatten(opt_state)
    for i, leaf in enumerate(opt_leaves):
        arrays[f"opt/{i}"] = np.asarray(leaf)
    key_impl = None
    if key is not None:
        arrays["key_data"] = np.asarray(jax.random.key_data(key))
        key_impl = str(jax.random.key_impl(key))
    meta = {
        "format": FORMAT,
        "purebp_version": _version(),
        "sizes": list(net.sizes),
        "activations": list(net.activations),
        "dtype": str(net.dtype),
        "step": int(step),
        "key_impl": key_impl,
        "opt_treedef": str(opt_treedef),
        "opt_leaves": [[list(a.shape), str(a.dtype)] for a in (arrays[f"opt/{i}"] for i in range(len(opt_leaves)))],
        "metadata": metadata or {},
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)

    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _read(path: str) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read ({type(error).__name__}: {error})"
        ) from error


def load_checkpoint(path: str | os.PathLike, *, opt_state_template: Any = None) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; return a ``Checkpoint``.

    The network is rebuilt from the stored sizes, activations and dtype. The
    optimizer state needs ``opt_state_template`` (e.g. ``optimizer.init(net)``)
    for its tree structure; the stored structure, leaf shapes and dtypes must
    match it. Raises ``CheckpointError`` on a missing, truncated, corrupt or
    mismatched file.
    """
    path = os.fspath(path)
    arrays = _read(path)
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    except KeyError:
        raise CheckpointError(f"{path} is not a purebp checkpoint (no 'meta' entry)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} has corrupt metadata: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a {FORMAT} file (format {meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    net = _restore_network(path, arrays, meta)
    opt_state = None
    if opt_state_template is not None:
        opt_state = _restore_opt_state(path, arrays, meta, opt_state_template)
    key = None
    if "key_data" in arrays:
        try:
            key = jax.random.wrap_key_data(jnp.asarray(arrays["key_data"]), impl=meta["key_impl"])
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path}: its key cannot be restored ({error})") from error
    return Checkpoint(net=net, opt_state=opt_state, step=int(meta["step"]), key=key, metadata=meta["metadata"])


def load_checkpoint_if_exists(path: str | os.PathLike, *, opt_state_template: Any = None) -> Checkpoint | None:
    """``load_checkpoint`` if ``path`` exists, else None (for resuming a run that may not have started)."""
    if not os.path.exists(path):
        return None
    return load_checkpoint(path, opt_state_template=opt_state_template)


def _restore_network(path: str, arrays: dict[str, np.ndarray], meta: dict) -> Network:
    sizes, activations, dtype = meta["sizes"], tuple(meta["activations"]), np.dtype(meta["dtype"])
    if dtype == np.float64 and not jax.config.jax_enable_x64:
        raise CheckpointError(f"checkpoint {path} holds float64 parameters: enable jax_enable_x64 before loading it")
    layers = []
    for l, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        leaves = {}
        for name, shape in (("w", (n_out, n_in)), ("b", (n_out,))):
            entry = f"net/{l}/{name}"
            if entry not in arrays:
                raise CheckpointError(f"checkpoint {path} is missing {entry} (sizes {sizes})")
            array = arrays.pop(entry)
            if array.shape != shape or array.dtype != dtype:
                raise CheckpointError(
                    f"checkpoint {path}: {entry} is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
                )
            leaves[name] = jnp.asarray(array)
        layers.append(Layer(**leaves))
    net = Network(layers=tuple(layers), activations=activations)
    try:
        validate_network(net)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} holds an invalid network: {error}") from error
    return net


def _restore_opt_state(path: str, arrays: dict[str, np.ndarray], meta: dict, template: Any) -> Any:
    leaves, treedef = jax.tree.flatten(template)
    if str(treedef) != meta["opt_treedef"]:
        raise CheckpointError(
            f"checkpoint {path}: its optimizer state has structure\n  {meta['opt_treedef']}\n"
            f"but the optimizer given has\n  {treedef}\n(a different optimizer or network?)"
        )
    restored = []
    for i, leaf in enumerate(leaves):
        entry = f"opt/{i}"
        if entry not in arrays:
            raise CheckpointError(f"checkpoint {path} is missing optimizer leaf {entry}")
        array, expected = arrays[entry], np.asarray(leaf)
        if array.shape != expected.shape or array.dtype != expected.dtype:
            raise CheckpointError(
                f"checkpoint {path}: optimizer leaf {i} is {array.dtype}{list(array.shape)}, "
                f"expected {expected.dtype}{list(expected.shape)}"
            )
        restored.append(jnp.asarray(array))
    return jax.tree.unflatten(treedef, restored)
