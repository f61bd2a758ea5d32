"""Atomic checkpoints: a network, its optimizer state, step, key and metadata in one ``.npz`` file.

Writing goes to a temporary file in the same directory, which is flushed and
fsync'ed, then ``os.replace``d over the target (atomic on POSIX), then the
directory is fsync'ed: a crash at any point leaves either the old checkpoint
or the new one, never a mix. Reading checks everything (format version,
structure, shapes, dtypes; the zip's CRC-32 catches corrupted bytes) and turns
any problem into a ``CheckpointError`` that names the file.

One layout is written, ``purebp-checkpoint-2`` (``np.load(path)`` reads it, no
pickle anywhere): ``params/<i>``, the network's parameters in ``jax.tree.leaves``
order; the meta has ``network`` (``describe_network``: the input shape and, per
layer, its kind and static fields, enough to rebuild a stack of known layer
kinds without pickle: each kind's row in ``purebp.layers.kinds`` describes and
rebuilds it), ``param_paths`` (each leaf's ``jax.tree_util.keystr`` path, e.g.
``.layers[1].layers[0].w``), ``param_leaves`` (shape and dtype per leaf) and
``treedef`` (``str`` of the network's tree structure, a last structure check).

The MLP layout of earlier versions, ``purebp-checkpoint-1`` (``net/<l>/w`` and
``net/<l>/b``; the meta has ``sizes``, ``activations`` and ``dtype``), is still
read, into ``Sequential(layers=(Dense(w, b, activation), ...), input_shape=(n_in,))``;
its optimizer state (whose stored tree structure names the old ``Network``
type) is matched to the template leaf by leaf: same count, shapes and dtypes.

Both also hold ``opt/<i>`` (the optimizer state's leaves in ``jax.tree.leaves``
order), ``key_data`` (``jax.random.key_data(key)``, absent without a key) and
``meta`` (UTF-8 JSON: the format, purebp version, step, the key's
implementation, the optimizer state's tree structure and leaf shapes/dtypes,
and the caller's metadata). Arrays are stored bit for bit.

Faults. Every file written since the checksum was added ends in a zip
comment ``purebp-sha256:<hex>``: the SHA-256 of every byte before the
comment (all entries, the zip directory and its end record), and the meta
says ``"checksum": "sha256"``. Loading checks it before anything else, so a
truncated or altered file (any single flipped bit) is refused with "checksum
mismatch". Files written before, or rewritten by another zip writer, end in
an end record without comment and load as before, unverified but for the
zip's CRC-32 of each entry. A file whose
format is newer than this purebp reads is refused, naming both formats.
A save that fails (full disk, file-size limit, read-only directory) raises
``CheckpointWriteError``, an ``OSError`` that says which step failed, for
which path, why, and that the previous checkpoint is intact. A writer holds
an ``flock`` on its temporary file until it is renamed into place; a save
removes the temporary files of this path that no live writer holds (left by
a killed save), and only those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import os
import re
import struct
import tempfile
import zipfile
from typing import IO, Any

import jax
import jax.numpy as jnp
import numpy as np

from purebp import inputs as _inputs
from purebp.layers import Dense as _Dense
from purebp.layers import kinds as _kinds
from purebp.network import Sequential, validate_architecture, validate_sequential
from purebp.version import __version__

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so temporary files of killed saves are not cleaned up
    fcntl = None

FORMAT_MLP = "purebp-checkpoint-1"
FORMAT_SEQUENTIAL = "purebp-checkpoint-2"
FORMATS = (FORMAT_MLP, FORMAT_SEQUENTIAL)
CHECKSUM_PREFIX = b"purebp-sha256:"  # the zip comment's scheme; a different scheme takes a different prefix
_CHECKSUM_LENGTH = len(CHECKSUM_PREFIX) + 64
_END_RECORD = b"PK\x05\x06"  # the zip's end-of-central-directory record: 22 bytes, the comment's length last
_END_RECORD_SIZE = 22


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not match what it is loaded into."""


class CheckpointWriteError(OSError):
    """A save failed (no space, file-size limit, read-only directory...); the previous file at the path is intact."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What ``load_checkpoint`` returns. ``opt_state`` is None unless a template was given."""

    net: Sequential
    opt_state: Any
    step: int
    key: jax.Array | None
    metadata: dict


def _version() -> str:
    return __version__


# ---------------------------------------------------------------------------------------------------------------
# Describing a network's architecture as JSON, and rebuilding built-in layers from that description


def _layers_tuple(layers: object, where: str) -> tuple:
    if not isinstance(layers, tuple):
        raise TypeError(f"{where}: layers is a {type(layers).__name__}; a checkpoint needs a tuple of layers")
    return layers


def _type_name(layer: object) -> str:
    return f"{type(layer).__module__}.{type(layer).__qualname__}"


def describe_layer(layer: object, where: str = "layer") -> dict:
    """Return a JSON-able description of one layer: ``{"kind": ..., <its static fields>}``.

    Every kind in the table of layer kinds (``purebp.layers.kinds``) describes
    itself: ``dense`` (activation, n_out), ``residual`` (layers: the body,
    described the same way), ``layer_norm`` (eps), ``dropout`` (rate),
    ``conv1d`` (activation, channels, kernel, stride, padding), ``max_pool1d``
    and ``avg_pool1d`` (kernel, stride), ``flatten``, and any kind registered
    since. Any other layer is ``custom``: its type (module.qualname), its tree
    structure as text (which shows its static fields) and its leaves' shapes.
    ``where`` names the layer in error messages.
    """
    kind = _kinds.kind_of(layer)  # exact type: a subclass of a built-in may add fields, so it is custom
    if kind is not None:
        return {"kind": kind.name} | kind.describe(layer, where, describe_layer)
    leaves, structure = jax.tree_util.tree_flatten_with_path(layer)
    return {
        "kind": "custom",
        "type": _type_name(layer),
        "structure": str(structure),
        "shapes": {jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in leaves},
    }


def describe_network(net: Sequential) -> dict:
    """Return a JSON-able description of ``net``'s architecture (no parameter values).

    ``{"kind": "sequential", "input_shape", "dtype", "layers"}`` with one
    ``describe_layer`` entry per layer. Two networks with the same description
    have the same architecture and dtype; for the table's layer kinds the
    description is enough to rebuild the network's structure (the values come
    from the checkpoint). Raises TypeError for anything else, and for a
    built-in layer whose static field is not a plain Python value.
    """
    if isinstance(net, Sequential):
        dtype = net.dtype
        layers = _layers_tuple(net.layers, "the network")
        return {
            "kind": "sequential",
            "input_shape": [int(n) for n in net.input_shape],
            "dtype": None if dtype is None else str(dtype),
            "layers": [describe_layer(layer, f"layers[{i}]") for i, layer in enumerate(layers)],
        }
    raise TypeError(f"expected a purebp.Sequential, got {type(net).__name__}")


def _skeleton(path: str, description: dict) -> Sequential:
    """Rebuild a Sequential of known kinds from its description, with ``kinds.LEAF`` for every parameter."""

    def build(item: dict, where: str) -> object:
        kind = item.get("kind") if isinstance(item, dict) else None
        if kind == "custom":
            raise CheckpointError(
                f"checkpoint {path}: {where} is a {item.get('type')}, not a built-in layer, so the file alone "
                "cannot rebuild it; pass net_template= (e.g. the freshly initialised network) to load it"
            )
        row = _kinds.kind_named(kind)
        if row is None:
            known = ", ".join(sorted(row.name for row in _kinds.all_kinds()))
            raise CheckpointError(
                f"checkpoint {path}: {where} has layer kind {kind!r}, which this purebp ({_version()}) does not know "
                f"(known: {known}); pass net_template= to load it"
            )
        return row.rebuild(item, lambda inner, index: build(inner, f"{where}.layers[{index}]"))

    try:
        layers = tuple(build(item, f"layers[{i}]") for i, item in enumerate(description["layers"]))
        return Sequential(layers=layers, input_shape=tuple(int(n) for n in description["input_shape"]))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(
            f"checkpoint {path} has a malformed network description ({type(error).__name__}: {error})"
        ) from error


def _first_difference(
    saved: Any, now: Any, where: str, ours: str = "the checkpoint", theirs: str = "net_template"
) -> str | None:
    """The first place two JSON values differ, as 'where: X in <ours>, Y in <theirs>', or None."""
    differences = _inputs.json_differences(saved, now)
    if not differences:
        return None
    path, first, second = differences[0]
    place = where
    for part in path[:-1] if path and path[-1] == "len" else path:
        place += f"[{part}]" if isinstance(part, int) else (f".{part}" if place else str(part))
    if path and path[-1] == "len":
        return f"{place}: {first} entries in {ours}, {second} in {theirs}"
    if first is _inputs.ABSENT:
        return f"{place}: absent in {ours}, {second!r} in {theirs}"
    if second is _inputs.ABSENT:
        return f"{place}: {first!r} in {ours}, absent in {theirs}"
    return f"{place}: {first!r} in {ours}, {second!r} in {theirs}"


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot open directories
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _shape_dtype(array: np.ndarray) -> list:
    return [list(array.shape), str(array.dtype)]


def save_checkpoint(
    path: str | os.PathLike,
    net: Sequential,
    opt_state: Any = None,
    *,
    step: int = 0,
    key: jax.Array | None = None,
    metadata: dict | None = None,
) -> None:
    """Write ``net``, ``opt_state`` (a pytree), ``step``, ``key`` and JSON ``metadata`` to ``path`` atomically.

    ``net`` is a ``Sequential`` of any layers (written as
    ``purebp-checkpoint-2``; one holding a layer of your own whose kind has no
    row in ``purebp.layers.kinds`` loads back with ``net_template=``). The previous file at
    ``path``, if any, is replaced only once the new one is complete on disk.
    Arrays are stored exactly: a round trip is bit-identical. A failed write
    raises ``CheckpointWriteError`` (an ``OSError``) and leaves the previous
    file and no temporary file behind.
    """
    path = os.fspath(path)
    arrays = _arrays(net, opt_state, step, key, metadata)
    _write_atomically(path, arrays)


def _arrays(net: Sequential, opt_state: Any, step: int, key: jax.Array | None, metadata: dict | None) -> dict:
    """The file's entries: parameters, optimizer leaves, key data and the JSON meta, as NumPy arrays."""
    arrays: dict[str, np.ndarray] = {}
    if not isinstance(net, Sequential):
        raise TypeError(f"save_checkpoint: expected a purebp.Sequential, got {type(net).__name__}")
    validate_sequential(net)
    description = describe_network(net)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(net)
    for i, (_, leaf) in enumerate(leaves):
        arrays[f"params/{i}"] = np.asarray(leaf)
    meta = {
        "format": FORMAT_SEQUENTIAL,
        "purebp_version": _version(),
        "checksum": "sha256",
        "network": description,
        "treedef": str(treedef),
        "param_paths": [jax.tree_util.keystr(leaf_path) for leaf_path, _ in leaves],
        "param_leaves": [_shape_dtype(arrays[f"params/{i}"]) for i in range(len(leaves))],
    }
    opt_leaves, opt_treedef = jax.tree.flatten(opt_state)
    for i, leaf in enumerate(opt_leaves):
        arrays[f"opt/{i}"] = np.asarray(leaf)
    key_impl = None
    if key is not None:
        arrays["key_data"] = np.asarray(jax.random.key_data(key))
        key_impl = str(jax.random.key_impl(key))
    meta |= {
        "step": int(step),
        "key_impl": key_impl,
        "opt_treedef": str(opt_treedef),
        "opt_leaves": [_shape_dtype(arrays[f"opt/{i}"]) for i in range(len(opt_leaves))],
        "metadata": metadata or {},
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    return arrays


def _write_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write to a locked temporary file beside ``path``, fsync, rename over ``path``, fsync the directory."""
    directory, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    _remove_leftovers(directory, name)
    previous = (
        f"the previous checkpoint at {path} is intact" if os.path.exists(path) else f"nothing was written at {path}"
    )
    try:
        descriptor, temporary = _locked_temporary(directory, name)
    except OSError as error:
        raise _write_error(path, f"creating a temporary file in the directory {directory}", error, previous) from None
    stage = f"writing the temporary file {temporary}"
    try:
        with os.fdopen(descriptor, "w+b") as file:
            np.savez(file, **arrays)
            _append_checksum(file)
            file.flush()
            os.fsync(file.fileno())
            stage = f"renaming {temporary} over {path}"
            os.replace(temporary, path)  # before the lock is released: no other save takes it for a leftover
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError) and not isinstance(error, CheckpointWriteError):
            raise _write_error(path, stage, error, previous + " and the temporary file was removed") from error
        raise
    _fsync_directory(directory)


_WHY = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "file too large (a file-size limit such as ulimit -f, or the file system's maximum)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied: is the directory read-only, or not yours?",
    errno.EPERM: "operation not permitted: is the directory read-only, or not yours?",
    errno.EROFS: "the file system is read-only",
}


def _write_error(path: str, stage: str, error: OSError, previous: str) -> CheckpointWriteError:
    why = _WHY.get(error.errno)
    message = f"cannot save checkpoint {path}: {stage} failed ({type(error).__name__}: {error})"
    message += f": {why}" if why else ""
    message += f"; {previous}"
    return CheckpointWriteError(message) if error.errno is None else CheckpointWriteError(error.errno, message)


def _locked_temporary(directory: str, name: str) -> tuple[int, str]:
    """Create ``.<name>.<random>.tmp`` in ``directory`` and hold an exclusive ``flock`` on it until it is closed."""
    while True:
        descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        if fcntl is None:
            return descriptor, temporary
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # waits only for a cleaner that found it unlocked, briefly
        except OSError:  # no locks on this file system: cleaners cannot lock it either, so they leave it alone
            return descriptor, temporary
        if os.fstat(descriptor).st_nlink > 0:
            return descriptor, temporary
        os.close(descriptor)  # a cleaner removed it between its creation and our lock: take another name


def _remove_leftovers(directory: str, name: str) -> None:
    """Remove this path's temporary files that no live writer holds: those of saves killed before the rename.

    Only names ``.<name>.<mkstemp's random letters>.tmp`` are considered (the
    random part has no dot, so another checkpoint's ``.<name>.x.<random>.tmp``
    is not), and only those whose ``flock`` can be taken: a live writer holds its own.
    """
    if fcntl is None:
        return
    pattern = re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]+\.tmp")
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        if not pattern.fullmatch(entry):
            continue
        leftover = os.path.join(directory, entry)
        try:
            descriptor = os.open(leftover, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # renamed into place or removed meanwhile, or not ours to open
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            opened, named = os.fstat(descriptor), os.stat(leftover, follow_symlinks=False)
            if (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino):  # still the file we locked
                os.unlink(leftover)
        except OSError:  # held by a live writer, or gone: leave it
            pass
        finally:
            os.close(descriptor)


def _append_checksum(file: IO[bytes]) -> None:
    """Append the zip comment ``purebp-sha256:<hex>``: the SHA-256 of every byte before it.

    np.savez ends the file with a 22-byte end record whose last two bytes are
    the comment's length (0); that length is set first, so it is covered too.
    """
    file.seek(-_END_RECORD_SIZE, os.SEEK_END)
    end = file.read(_END_RECORD_SIZE)
    if end[:4] != _END_RECORD or end[-2:] != b"\0\0":
        raise RuntimeError("np.savez did not end the file with an end record without comment; cannot add a checksum")
    file.seek(-2, os.SEEK_END)
    file.write(struct.pack("<H", _CHECKSUM_LENGTH))
    length = file.seek(0, os.SEEK_END)
    digest = _sha256(file, length)
    file.seek(0, os.SEEK_END)
    file.write(CHECKSUM_PREFIX + digest.encode("ascii"))


def _sha256(file: IO[bytes], length: int) -> str:
    file.seek(0)
    hasher, left = hashlib.sha256(), length
    while left > 0:
        chunk = file.read(min(left, 1 << 20))
        if not chunk:
            break
        hasher.update(chunk)
        left -= len(chunk)
    return hasher.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Reading


# what zipfile and np.load raise on damaged bytes (a flipped flag bit can ask for a compression or a password)
_READ_ERRORS = (
    zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, RuntimeError, NotImplementedError,
    struct.error, OverflowError, MemoryError,
)  # fmt: skip


def _read(path: str) -> dict[str, np.ndarray]:
    """The file's entries, once its checksum (if it has one) matches."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as file:  # one open file: a concurrent save's rename cannot swap it between the steps
            _verify_checksum(path, file)
            file.seek(0)
            with np.load(file, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
    except _READ_ERRORS as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read ({type(error).__name__}: {error})"
        ) from error


def _verify_checksum(path: str, file: IO[bytes]) -> bool:
    """True if the file ends in a checksum comment that matches; False if it ends without a comment.

    Files written before the checksum, or rewritten by another zip writer (the
    comment gone), end in a zip end record with no comment and are read as
    before. Anything else (a cut-short end, a damaged record, a mismatch)
    raises CheckpointError: no single flipped bit or truncation leads here to False.
    """
    size = file.seek(0, os.SEEK_END)
    if size >= _END_RECORD_SIZE:
        file.seek(size - _END_RECORD_SIZE)
        end = file.read(_END_RECORD_SIZE)
        if end[:4] == _END_RECORD and end[-2:] == b"\0\0":
            return False
    corrupt = (
        f"checkpoint {path} is truncated or corrupt: checksum mismatch: the file is corrupt (truncated or altered)"
    )
    record = _END_RECORD_SIZE + _CHECKSUM_LENGTH
    tail = b""
    if size >= record:
        file.seek(size - record)
        tail = file.read(record)
    if (
        tail[:4] != _END_RECORD
        or tail[_END_RECORD_SIZE - 2 : _END_RECORD_SIZE] != struct.pack("<H", _CHECKSUM_LENGTH)
        or not tail[_END_RECORD_SIZE:].startswith(CHECKSUM_PREFIX)
    ):
        raise CheckpointError(
            f"{corrupt}: it does not end in a zip end record, with or without a purebp checksum (cut short, "
            "altered, or not a purebp checkpoint)"
        )
    recorded = tail[_END_RECORD_SIZE + len(CHECKSUM_PREFIX) :].decode("ascii", errors="replace")
    actual = _sha256(file, size - _CHECKSUM_LENGTH)
    if recorded != actual:
        raise CheckpointError(
            f"{corrupt} since it was written: its bytes hash to sha256 {actual[:16]}..., it records {recorded[:16]}..."
        )
    return True


def _check_format(path: str, meta: object) -> str:
    """The file's format, if this purebp reads it; else a CheckpointError naming both versions."""
    found = meta.get("format") if isinstance(meta, dict) else None
    if found in FORMATS:
        return found
    number = re.fullmatch(r"purebp-checkpoint-(\d+)", found) if isinstance(found, str) else None
    newest = max(FORMATS, key=lambda name: int(name.rsplit("-", 1)[1]))
    if number is not None and int(number.group(1)) > int(newest.rsplit("-", 1)[1]):
        writer = meta.get("purebp_version")
        raise CheckpointError(
            f"checkpoint {path} has format {found}" + (f" (written by purebp {writer})" if writer else "")
            + f", newer than this purebp ({_version()}) reads: it reads {' and '.join(FORMATS)}; "
            "upgrade purebp to load it"
        )  # fmt: skip
    raise CheckpointError(f"{path} is not a purebp checkpoint of format {' or '.join(FORMATS)} (format {found!r})")


def _as_dtype(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # np.save writes dtypes NumPy does not know natively (bfloat16, from ml_dtypes) as raw bytes, |V2;
    # the bytes are the values, so a view gives them back bit for bit
    raw = np.dtype(f"V{dtype.itemsize}")
    if array.dtype == raw and dtype != raw:
        return array.view(dtype)
    return array


def _dtype(path: str, name: object) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError as error:
        raise CheckpointError(f"checkpoint {path} names an unknown dtype {name!r}") from error


def _needs_x64(path: str, dtype: np.dtype | None) -> None:
    if dtype == np.float64 and not jax.config.jax_enable_x64:
        raise CheckpointError(f"checkpoint {path} holds float64 parameters: enable jax_enable_x64 before loading it")


def load_checkpoint(
    path: str | os.PathLike,
    *,
    opt_state_template: Any = None,
    net_template: Sequential | None = None,
) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; return a ``Checkpoint``.

    The network is rebuilt from the file alone when every layer's kind has a
    row in ``purebp.layers.kinds`` (all built-in layers do), and from an old
    MLP file (``purebp-checkpoint-1``) as a ``Sequential`` of ``Dense``.
    A network holding another layer of your own needs ``net_template`` (e.g. the
    freshly initialised network) for its structure; with a template, for any
    network, the stored description, parameter paths, shapes, dtypes and tree
    structure must match the template's, and the first difference is named.
    The optimizer state needs ``opt_state_template`` (e.g.
    ``optimizer.init(net)``) the same way. Raises ``CheckpointError`` on a
    missing, truncated, corrupt or mismatched file.
    """
    path = os.fspath(path)
    if net_template is not None:
        describe_network(net_template)  # a TypeError for anything but a network, before the file is read
        validate_sequential(net_template)
    arrays = _read(path)
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    except KeyError:
        raise CheckpointError(f"{path} is not a purebp checkpoint (no 'meta' entry)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} has corrupt metadata: {error}") from error
    found = _check_format(path, meta)
    try:
        if found == FORMAT_MLP:
            net = _restore_network(path, arrays, meta)  # the MLP format of earlier versions, read into a Sequential
            if net_template is not None:
                _match_template(path, describe_network(net), net_template)
        else:
            net = _restore_sequential(path, arrays, meta, net_template)
        opt_state = None
        if opt_state_template is not None:
            opt_state = _restore_opt_state(path, arrays, meta, opt_state_template, old_mlp=found == FORMAT_MLP)
        key = None
        if "key_data" in arrays:
            try:
                key = jax.random.wrap_key_data(jnp.asarray(arrays["key_data"]), impl=meta["key_impl"])
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"checkpoint {path}: its key cannot be restored ({error})") from error
        step, metadata = int(meta["step"]), meta["metadata"]
    except KeyError as error:  # a meta field missing (a file edited by hand, or written by something else)
        raise CheckpointError(f"checkpoint {path} has incomplete metadata: no {error}") from None
    return Checkpoint(net=net, opt_state=opt_state, step=step, key=key, metadata=metadata)


def _match_template(path: str, saved_description: dict, template: Sequential) -> None:
    difference = _first_difference(saved_description, describe_network(template), "")
    if difference is not None:
        raise CheckpointError(f"checkpoint {path} does not match net_template: {difference}")


def _restore_network(path: str, arrays: dict[str, np.ndarray], meta: dict) -> Sequential:
    sizes, activations, dtype = meta["sizes"], tuple(meta["activations"]), _dtype(path, meta["dtype"])
    _needs_x64(path, dtype)
    layers = []
    for l, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        leaves = {}
        for name, shape in (("w", (n_out, n_in)), ("b", (n_out,))):
            entry = f"net/{l}/{name}"
            if entry not in arrays:
                raise CheckpointError(f"checkpoint {path} is missing {entry} (sizes {sizes})")
            array = _as_dtype(arrays.pop(entry), dtype)
            if array.shape != shape or array.dtype != dtype:
                raise CheckpointError(
                    f"checkpoint {path}: {entry} is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
                )
            leaves[name] = jnp.asarray(array)
        layers.append(_Dense(leaves["w"], leaves["b"], activations[l] if l < len(activations) else "identity"))
    net = Sequential(layers=tuple(layers), input_shape=(int(sizes[0]),))
    try:
        validate_architecture(sizes, activations)
        validate_sequential(net)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} holds an invalid network: {error}") from error
    return net


def _restore_sequential(
    path: str, arrays: dict[str, np.ndarray], meta: dict, template: Sequential | None
) -> Sequential:
    description, paths, leaf_specs = meta["network"], meta["param_paths"], meta["param_leaves"]
    if template is not None:
        _match_template(path, description, template)
        structure = jax.tree.structure(template)
        expected_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
        expected_specs = [[list(leaf.shape), str(np.dtype(leaf.dtype))] for leaf in jax.tree.leaves(template)]
        against = "net_template"
    else:
        skeleton = _skeleton(path, description)
        structure = jax.tree.structure(skeleton)
        expected_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(skeleton)[0]]
        expected_specs = None  # the file's own specs, checked against the arrays below
        against = "the network its description rebuilds"
    if len(leaf_specs) != len(paths):
        raise CheckpointError(f"checkpoint {path} lists {len(paths)} parameter paths but {len(leaf_specs)} leaf shapes")
    if paths != expected_paths:
        index = next((i for i, (a, b) in enumerate(zip(paths, expected_paths)) if a != b), None)
        detail = (
            f"parameter {index} is {paths[index]} in the checkpoint, {expected_paths[index]} in {against}"
            if index is not None
            else f"{len(paths)} parameters in the checkpoint, {len(expected_paths)} in {against}"
        )
        raise CheckpointError(f"checkpoint {path} does not match {against}: {detail}")
    leaves = []
    for i, (leaf_path, (shape, dtype_name)) in enumerate(zip(paths, leaf_specs, strict=True)):
        dtype = _dtype(path, dtype_name)
        if expected_specs is not None and [shape, dtype_name] != expected_specs[i]:
            want_shape, want_dtype = expected_specs[i]
            raise CheckpointError(
                f"checkpoint {path} does not match net_template: parameter {leaf_path} is {dtype_name}{shape} "
                f"in the checkpoint, {want_dtype}{want_shape} in net_template"
            )
        entry = f"params/{i}"
        if entry not in arrays:
            raise CheckpointError(f"checkpoint {path} is missing {entry} (parameter {leaf_path})")
        array = _as_dtype(arrays.pop(entry), dtype)
        if list(array.shape) != shape or array.dtype != dtype:
            raise CheckpointError(
                f"checkpoint {path}: {entry} ({leaf_path}) is {array.dtype}{list(array.shape)}, expected {dtype}{shape}"
            )
        _needs_x64(path, dtype)
        leaves.append(jnp.asarray(array))
    if str(structure) != meta["treedef"]:
        raise CheckpointError(
            f"checkpoint {path}: its network has structure\n  {meta['treedef']}\nbut {against} has\n  {structure}"
        )
    net = jax.tree.unflatten(structure, leaves)
    try:
        validate_sequential(net)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} holds an invalid network: {error}") from error
    if template is None:
        difference = _first_difference(description, describe_network(net), "", "its description", "its arrays")
        if difference is not None:  # e.g. a stored n_out that the stored weights contradict
            raise CheckpointError(f"checkpoint {path} is inconsistent: {difference}")
    return net


def _restore_opt_state(path: str, arrays: dict[str, np.ndarray], meta: dict, template: Any, old_mlp: bool) -> Any:
    leaves, treedef = jax.tree.flatten(template)
    if old_mlp:  # its structure names the old Network type, which no template has now: match leaf by leaf
        if len(leaves) != len(meta["opt_leaves"]):
            raise CheckpointError(
                f"checkpoint {path}: its optimizer state has {len(meta['opt_leaves'])} leaves but the optimizer "
                f"given has {len(leaves)} (a different optimizer or network?)"
            )
    elif str(treedef) != meta["opt_treedef"]:
        raise CheckpointError(
            f"checkpoint {path}: its optimizer state has structure\n  {meta['opt_treedef']}\n"
            f"but the optimizer given has\n  {treedef}\n(a different optimizer or network?)"
        )
    restored = []
    for i, leaf in enumerate(leaves):
        entry = f"opt/{i}"
        if entry not in arrays:
            raise CheckpointError(f"checkpoint {path} is missing optimizer leaf {entry}")
        expected = np.asarray(leaf)
        array = _as_dtype(arrays[entry], expected.dtype)
        if array.shape != expected.shape or array.dtype != expected.dtype:
            raise CheckpointError(
                f"checkpoint {path}: optimizer leaf {i} is {array.dtype}{list(array.shape)}, "
                f"expected {expected.dtype}{list(expected.shape)}"
            )
        restored.append(jnp.asarray(array))
    return jax.tree.unflatten(treedef, restored)
