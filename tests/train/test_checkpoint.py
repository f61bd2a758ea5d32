"""Checkpoints: bit-identical round trips, atomic writes, clear errors on bad files."""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
import pytest

import purebp as pb
from purebp.train.checkpoint import CheckpointError


def _trained_state(dtype="float64", sizes=(5, 7, 3), optimizer=None):
    """A network and an Adam state after a few updates, so every leaf (moments, count) is non-trivial."""
    optimizer = optimizer or optax.adam(1e-2)
    net = pb.init_mlp(jax.random.key(0), sizes, ("tanh", "identity"), dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (16, sizes[0]), dtype=dtype)
    y = jax.random.randint(jax.random.key(2), (16,), 0, sizes[-1])
    step = jax.jit(pb.make_train_step(optimizer, loss="softmax_cross_entropy"))
    opt_state = optimizer.init(net)
    for _ in range(3):
        net, opt_state, _ = step(net, opt_state, (x, y))
    return net, opt_state, optimizer


def _assert_identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for i, (x, y) in enumerate(zip(leaves_a, leaves_b, strict=True)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), f"leaf {i} differs"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_is_bit_identical(tmp_path, dtype):
    net, opt_state, optimizer = _trained_state(dtype)
    key = jax.random.fold_in(jax.random.key(42), 7)
    path = tmp_path / "state.ckpt"
    pb.save_checkpoint(path, net, opt_state, step=123, key=key, metadata={"note": "hello", "lr": 0.01})
    restored = pb.load_checkpoint(path, opt_state_template=optimizer.init(net))
    _assert_identical(restored.net, net)
    _assert_identical(restored.opt_state, opt_state)
    assert restored.net.activations == net.activations
    assert restored.step == 123
    assert np.array_equal(jax.random.key_data(restored.key), jax.random.key_data(key))
    assert restored.metadata == {"note": "hello", "lr": 0.01}
    # the restored key draws the same numbers
    assert np.array_equal(jax.random.normal(restored.key, (4,)), jax.random.normal(key, (4,)))
    # without a template the network still loads; the optimizer state is not guessed
    assert pb.load_checkpoint(path).opt_state is None


def test_failed_write_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    old_net, old_state, optimizer = _trained_state()
    path = tmp_path / "run.ckpt"
    pb.save_checkpoint(path, old_net, old_state, step=1)
    before = path.read_bytes()
    new_net = jax.tree.map(lambda leaf: leaf + 1.0, old_net)

    write_array = np.lib.format.write_array
    calls = []

    def crash_on_third_array(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # two arrays are already in the temporary file
            raise OSError("disk full (simulated)")
        return write_array(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", crash_on_third_array)
    with pytest.raises(OSError, match="disk full"):
        pb.save_checkpoint(path, new_net, old_state, step=2)
    monkeypatch.undo()
    assert len(calls) == 3
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.ckpt"], "the temporary file must be removed"
    restored = pb.load_checkpoint(path, opt_state_template=optimizer.init(old_net))
    _assert_identical(restored.net, old_net)
    assert restored.step == 1


def test_crash_before_the_rename_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    net, opt_state, _ = _trained_state()
    path = tmp_path / "run.ckpt"
    pb.save_checkpoint(path, net, opt_state, step=1)
    before = path.read_bytes()

    def fail(*args):
        raise OSError("fsync failed (simulated)")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="fsync failed"):
        pb.save_checkpoint(path, net, opt_state, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.ckpt"]


def _saved(tmp_path):
    net, opt_state, optimizer = _trained_state()
    path = tmp_path / "run.ckpt"
    pb.save_checkpoint(path, net, opt_state, step=5, key=jax.random.key(0))
    return path, net, optimizer


def test_truncated_file_is_reported(tmp_path):
    path, _, _ = _saved(tmp_path)
    data = path.read_bytes()
    for length in (0, 10, len(data) // 2, len(data) - 30):
        path.write_bytes(data[:length])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            pb.load_checkpoint(path)


def test_corrupted_bytes_are_reported(tmp_path):
    path, net, _ = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    # flip one byte inside the stored weights of layer 0 (the zip's CRC-32 must catch it)
    offset = bytes(data).find(np.asarray(net.layers[0].w).tobytes()[:16])
    assert offset > 0
    data[offset + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        pb.load_checkpoint(path)


def test_missing_and_foreign_files_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        pb.load_checkpoint(tmp_path / "nothing.ckpt")
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a purebp checkpoint"):
        pb.load_checkpoint(foreign)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a zip file at all" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        pb.load_checkpoint(garbage)


def test_mismatched_optimizer_or_network_is_reported(tmp_path):
    path, net, _ = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="optimizer state has structure"):
        pb.load_checkpoint(path, opt_state_template=optax.sgd(0.1, momentum=0.9).init(net))
    other = pb.init_mlp(jax.random.key(0), (5, 8, 3), ("tanh", "identity"), dtype="float64")
    with pytest.raises(CheckpointError, match=r"optimizer leaf \d+ is float64\[7, 5\], expected float64\[8, 5\]"):
        pb.load_checkpoint(path, opt_state_template=optax.adam(1e-2).init(other))
    other32 = pb.init_mlp(jax.random.key(0), (5, 7, 3), ("tanh", "identity"), dtype="float32")
    with pytest.raises(CheckpointError, match="expected float32"):
        pb.load_checkpoint(path, opt_state_template=optax.adam(1e-2).init(other32))
