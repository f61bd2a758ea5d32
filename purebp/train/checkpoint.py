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

from purebp import inputs as _inputs
from purebp.layers import Dense as _Dense
from purebp.layers import kinds as _kinds
from purebp.network import Sequential, validate_architecture, validate_sequential
from purebp.version import __version__

FORMAT_MLP = "purebp-checkpoint-1"
FORMAT_SEQUENTIAL = "purebp-checkpoint-2"
FORMATS = (FORMAT_MLP, FORMAT_SEQUENTIAL)


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not match what it is loaded into."""


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
    Arrays are stored exactly: a round trip is bit-identical.
    """
    path = os.fspath(path)
    arrays: dict[str, np.ndarray] = {}
    if isinstance(net, Sequential):
        validate_sequential(net)
        description = describe_network(net)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(net)
        for i, (_, leaf) in enumerate(leaves):
            arrays[f"params/{i}"] = np.asarray(leaf)
        meta = {
            "format": FORMAT_SEQUENTIAL,
            "purebp_version": _version(),
            "network": description,
            "treedef": str(treedef),
            "param_paths": [jax.tree_util.keystr(leaf_path) for leaf_path, _ in leaves],
            "param_leaves": [_shape_dtype(arrays[f"params/{i}"]) for i in range(len(leaves))],
        }
    else:
        raise TypeError(f"save_checkpoint: expected a purebp.Sequential, got {type(net).__name__}")
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


# ---------------------------------------------------------------------------------------------------------------
# Reading


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
    found = meta.get("format") if isinstance(meta, dict) else None
    if found not in FORMATS:
        raise CheckpointError(f"{path} is not a purebp checkpoint of format {' or '.join(FORMATS)} (format {found!r})")
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
