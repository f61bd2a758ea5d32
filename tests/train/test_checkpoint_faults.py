"""Checkpoints under faults: kill -9 mid-save, a full disk, two writers, a read-only directory, damaged files.

The writer processes are forked from one server process (tests/train/checkpoint_writer.py), so a trial
costs a fork, not an import of JAX. Every loop states its trial count and, on failure, prints a replay line
with its seed (``CHECKPOINT_FAULTS_SEED``): the seed fixes the kill delays, bit positions and lengths; where a
kill lands within a save still depends on timing, which is the point.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pickle
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import purebp as pb
from purebp.train import checkpoint as checkpoint_module
from purebp.train.checkpoint import CheckpointError, CheckpointWriteError

ROOT = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("checkpoint_writer.py")
SEED = int(os.environ.get("CHECKPOINT_FAULTS_SEED", "20240526"))
STATES = 32  # distinct saved states; the trajectory holds one more, the step a resume from the last one takes
OPTIMIZER = optax.adam(1e-2)


def replay(test: str) -> str:
    where = f"tests/train/test_checkpoint_faults.py::{test}"
    return f"replay: CHECKPOINT_FAULTS_SEED={SEED} python -m pytest -m 'slow or not slow' '{where}'"


# ---------------------------------------------------------------------------------------------------------------
# A training trajectory (float32 MLP, Adam), its train step, and bit-for-bit comparison


def _train_step():
    return jax.jit(pb.make_train_step(OPTIMIZER, loss="softmax_cross_entropy"))


def _batch():
    x = jax.random.normal(jax.random.key(1), (16, 32), dtype="float32")
    y = jax.random.randint(jax.random.key(2), (16,), 0, 10)
    return x, y


@pytest.fixture(scope="module")
def trajectory():
    """``STATES + 1`` consecutive (net, opt_state) of a training run, with NumPy leaves."""
    net = pb.init_mlp(jax.random.key(0), (32, 64, 10), ("tanh", "identity"), dtype="float32")
    opt_state, step, batch = OPTIMIZER.init(net), _train_step(), _batch()
    states = []
    for _ in range(STATES + 1):
        states.append(jax.tree.map(np.asarray, (net, opt_state)))
        net, opt_state, _ = step(net, opt_state, batch)
    return states


def _identical(a, b) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


def _load(path, states):
    return pb.load_checkpoint(path, opt_state_template=OPTIMIZER.init(jax.tree.map(np.asarray, states[0][0])))


def _temporaries(folder: Path, name: str) -> list[str]:
    return sorted(entry for entry in os.listdir(folder) if entry.startswith(f".{name}.") and entry.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------------------------
# The writer server


class Server:
    """tests/train/checkpoint_writer.py running in a child process; ``ask`` sends a command, returns the reply."""

    def __init__(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(
            [sys.executable, str(WRITER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith("@@ "):
                self.replies.put(json.loads(line[3:]))
        self.replies.put(None)

    def send(self, **command) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def reply(self, timeout: float = 60) -> dict:
        answer = self.replies.get(timeout=timeout)
        assert answer is not None, f"the writer server exited ({self.process.poll()})"
        return answer

    def ask(self, **command) -> dict:
        self.send(**command)
        return self.reply()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(trajectory, tmp_path_factory):
    pickled = tmp_path_factory.mktemp("states") / "states.pkl"
    pickled.write_bytes(pickle.dumps(trajectory[:STATES]))
    server = Server()
    assert server.ask(op="states", pickle=str(pickled)) == {"states": STATES}
    yield server
    server.close()


# ---------------------------------------------------------------------------------------------------------------
# kill -9 during save_checkpoint


KILL_TRIALS = 240


@pytest.mark.slow
def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint_which_resumes_bit_for_bit(
    server, trajectory, tmp_path
):
    """KILL_TRIALS writers, each SIGKILLed after a seeded random delay while saving in a loop."""
    rng = np.random.default_rng(SEED)
    path, train_step, batch = tmp_path / "run.ckpt", _train_step(), _batch()
    pb.save_checkpoint(path, *trajectory[0], step=0, metadata={"trial": -1, "save": 0})
    step, left_behind, mid_save, before_write, previous_leftovers = 0, 0, 0, 0, []
    again = replay("test_a_writer_killed_mid_save_leaves_the_previous_checkpoint_which_resumes_bit_for_bit")
    for trial in range(KILL_TRIALS):
        where = f"trial {trial} of {KILL_TRIALS}; {again}"
        delay = float(rng.choice([0.0, rng.uniform(0, 0.002), rng.uniform(0, 0.1)]))  # in a save, or after many
        report = server.ask(op="kill", path=str(path), trial=trial, first_step=step + 1, delay=delay)
        assert report["signal"] == "signal 9", f"the writer was not killed ({report}); {where}"
        completed = report["completed"]
        assert completed == list(range(step + 1, step + 1 + len(completed))), f"{report}; {where}"
        try:
            restored = _load(path, trajectory)
        except CheckpointError as error:
            pytest.fail(f"after the kill the checkpoint does not load: {error}; {where}")
        last = completed[-1] if completed else step
        # the kill may land after the rename and before the writer reported it: one more save is then in place
        assert restored.step in (last, last + 1), f"step {restored.step}, last reported {last}; {where}"
        mid_save += restored.step == last + 1
        expected = trajectory[restored.step % STATES]
        assert _identical((restored.net, restored.opt_state), expected), f"not the saved bits; {where}"
        if restored.step > step:  # steps are unique: a newer step was saved by this trial's writer
            assert restored.metadata["trial"] == trial, f"{restored.metadata}; {where}"
        resumed = train_step(restored.net, restored.opt_state, batch)[:2]
        assert _identical(resumed, trajectory[restored.step % STATES + 1]), f"resume differs; {where}"
        leftovers = _temporaries(tmp_path, "run.ckpt")
        assert len(leftovers) <= 1, f"temporary files pile up: {leftovers}; {where}"
        if completed:  # a save ran since the last kill: it removed that kill's leftover
            assert not set(previous_leftovers) & set(leftovers), f"{previous_leftovers} not removed; {where}"
        left_behind += bool(leftovers)
        before_write += not completed and not leftovers and restored.step == step
        previous_leftovers, step = leftovers, restored.step
    print(
        f"{KILL_TRIALS} kills: {step} saves completed in all, {left_behind} kills left a temporary file "
        f"(killed mid-write), {mid_save} landed between the rename and the writer's report, {before_write} before "
        "the first save's temporary file"
    )
    assert left_behind > 0, f"no kill landed mid-write in {KILL_TRIALS} trials: the test proved nothing"
    pb.save_checkpoint(path, *trajectory[1], step=1)
    assert _temporaries(tmp_path, "run.ckpt") == [], "a save did not remove the last kill's temporary file"
    assert os.listdir(tmp_path) == ["run.ckpt"]


def test_a_save_removes_only_its_own_paths_leftovers_that_no_live_writer_holds(trajectory, tmp_path):
    path = tmp_path / "run.ckpt"
    stale = [".run.ckpt.abcd1234.tmp", ".run.ckpt.x_9zz0qq.tmp"]  # mkstemp's names, from killed saves
    others = [
        "other.tmp",
        ".run.ckpt.notes",
        "run.ckpt.tmp",
        ".run.ckpt.x.abcd1234.tmp",  # a temporary file of the checkpoint run.ckpt.x
        ".run.ckpt.abcd1234.tmp.keep",
        ".other.ckpt.abcd1234.tmp",
    ]
    for name in [*stale, *others, ".run.ckpt.live1234.tmp"]:
        (tmp_path / name).write_bytes(b"partial")
    with open(tmp_path / ".run.ckpt.live1234.tmp", "rb") as live:
        fcntl.flock(live, fcntl.LOCK_EX)  # as a writer saving right now holds it
        pb.save_checkpoint(path, *trajectory[0])
        assert sorted(os.listdir(tmp_path)) == sorted([*others, ".run.ckpt.live1234.tmp", "run.ckpt"])
    pb.save_checkpoint(path, *trajectory[1], step=1)  # the writer is gone now: its file is a leftover
    assert sorted(os.listdir(tmp_path)) == sorted([*others, "run.ckpt"])
    assert _identical(_load(path, trajectory).net, trajectory[1][0])


# ---------------------------------------------------------------------------------------------------------------
# A full disk: a file-size limit (RLIMIT_FSIZE) in the writer


def _assert_full_disk_refused(report, path: Path, before: bytes, folder: Path, where: str) -> None:
    error = report["error"]
    assert error is not None, f"the save passed the file-size limit; {where}"
    assert error["type"] == "CheckpointWriteError" and error["is_oserror"], f"{error}; {where}"
    assert error["errno"] == errno.EFBIG, f"{error}; {where}"
    message = error["message"]
    for part in (str(path), "failed", "file too large", f"the previous checkpoint at {path} is intact"):
        assert part in message, f"{part!r} not in {message!r}; {where}"
    assert path.read_bytes() == before, f"the previous checkpoint changed; {where}"
    assert _temporaries(folder, path.name) == [], f"a temporary file was left behind; {where}"


def test_a_full_disk_is_a_clear_error_and_the_old_checkpoint_is_intact(server, trajectory, tmp_path):
    path = tmp_path / "run.ckpt"
    pb.save_checkpoint(path, *trajectory[0], step=0)
    before = path.read_bytes()
    report = server.ask(op="limit", path=str(path), index=3, limit=len(before) // 2)
    _assert_full_disk_refused(report, path, before, tmp_path, "a limit of half the file")
    assert report["status"] == "exit 1"
    restored = _load(path, trajectory)
    assert restored.step == 0 and _identical((restored.net, restored.opt_state), trajectory[0])


FULL_DISK_TRIALS = 60


@pytest.mark.slow
def test_a_full_disk_at_any_point_of_the_write_is_refused_cleanly(server, trajectory, tmp_path):
    """FULL_DISK_TRIALS limits from 0 bytes to the file's size, seeded: each a clear error, the old file intact."""
    path = tmp_path / "run.ckpt"
    pb.save_checkpoint(path, *trajectory[0], step=0)
    before = path.read_bytes()
    again = replay("test_a_full_disk_at_any_point_of_the_write_is_refused_cleanly")
    limits = [0, 1, len(before) - 1, *np.random.default_rng(SEED).integers(2, len(before) - 1, FULL_DISK_TRIALS - 3)]
    for trial, limit in enumerate(limits):
        where = f"trial {trial} of {FULL_DISK_TRIALS}, limit {limit} bytes; {again}"
        report = server.ask(op="limit", path=str(path), index=3, limit=int(limit))
        _assert_full_disk_refused(report, path, before, tmp_path, where)
    assert _identical((_load(path, trajectory).net, _load(path, trajectory).opt_state), trajectory[0])
    report = server.ask(op="limit", path=str(path), index=3, limit=len(before) + 1)  # the same size fits
    assert report["error"] is None, report
    assert _load(path, trajectory).step == 3


# ---------------------------------------------------------------------------------------------------------------
# Two writers on one path


RACE_ROUNDS, RACE_SAVES = 40, 12


@pytest.mark.slow
def test_two_writers_on_one_path_leave_one_whole_checkpoint(server, trajectory, tmp_path):
    """RACE_ROUNDS rounds of two writers saving RACE_SAVES times each to one path, read meanwhile."""
    path, reads = tmp_path / "shared.ckpt", 0
    again = replay("test_two_writers_on_one_path_leave_one_whole_checkpoint")
    for round_ in range(RACE_ROUNDS):
        where = f"round {round_} of {RACE_ROUNDS}; {again}"
        stale = tmp_path / ".shared.ckpt.stale0rd.tmp"  # as a killed save leaves: must not disturb either writer
        stale.write_bytes(b"partial")
        server.send(op="race", path=str(path), saves=RACE_SAVES, writers=[["A", 1000], ["B", 2003]])
        assert server.reply() == {"started": True}
        done = None
        while done is None:
            with contextlib.suppress(queue.Empty):
                done = server.replies.get(timeout=0.001)
            if path.exists():  # a reader meanwhile sees one writer's whole checkpoint, never a mix
                restored = _load(path, trajectory)
                reads += 1
                name = {1: "A", 2: "B"}[restored.step // 1000]
                assert restored.metadata["writer"] == name, where
                assert _identical((restored.net, restored.opt_state), trajectory[restored.step % STATES]), where
        for name, outcome in done["done"].items():
            assert outcome == {"status": "exit 0", "error": None}, f"writer {name}: {outcome}; {where}"
        final = _load(path, trajectory)
        assert final.step in (1000 + RACE_SAVES - 1, 2003 + RACE_SAVES - 1), f"step {final.step}; {where}"
        assert _identical((final.net, final.opt_state), trajectory[final.step % STATES]), where
        assert os.listdir(tmp_path) == ["shared.ckpt"], f"left behind: {os.listdir(tmp_path)}; {where}"
        path.unlink()
    print(f"{RACE_ROUNDS} rounds of 2 writers x {RACE_SAVES} saves, {reads} concurrent reads: all whole")
    pb.save_checkpoint(path, *trajectory[5], step=5)
    assert _load(path, trajectory).step == 5 and os.listdir(tmp_path) == ["shared.ckpt"]


# ---------------------------------------------------------------------------------------------------------------
# A read-only directory


@contextlib.contextmanager
def _read_only_directory(trajectory):
    """A directory that anyone may enter but only root could write, holding a checkpoint."""
    outer = Path(tempfile.mkdtemp(prefix="purebp-read-only-"))
    try:
        outer.chmod(0o755)
        folder = outer / "ro"
        folder.mkdir()
        path = folder / "run.ckpt"
        pb.save_checkpoint(path, *trajectory[0], step=0)
        path.chmod(0o644)
        folder.chmod(0o555)
        yield folder, path
    finally:
        with contextlib.suppress(OSError):
            (outer / "ro").chmod(0o755)
        shutil.rmtree(outer, ignore_errors=True)


def test_a_read_only_directory_is_a_clear_error_naming_it(server, trajectory):
    with _read_only_directory(trajectory) as (folder, path):
        before = path.read_bytes()
        if os.geteuid() == 0:  # root writes anywhere: the writer drops to user nobody, for whom the mode holds
            report = server.ask(op="demoted", path=str(path), index=3, uid=65534)
            error = report["error"]
        else:
            try:
                pb.save_checkpoint(path, *trajectory[3], step=3)
                error = None
            except CheckpointWriteError as raised:
                error = {"type": type(raised).__name__, "errno": raised.errno, "message": str(raised)}
        assert error is not None, "a save into a read-only directory passed"
        assert error["type"] == "CheckpointWriteError" and error["errno"] == errno.EACCES, error
        for part in (f"the directory {folder}", "permission denied", "read-only", f"checkpoint at {path} is intact"):
            assert part in error["message"], f"{part!r} not in {error['message']!r}"
        assert os.listdir(folder) == ["run.ckpt"] and path.read_bytes() == before, "something was written"


def test_a_rename_refused_by_the_directory_leaves_nothing_behind(trajectory, tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    pb.save_checkpoint(path, *trajectory[0])
    before = path.read_bytes()

    def refuse(source, target):
        raise PermissionError(errno.EACCES, "Permission denied", source)

    monkeypatch.setattr(os, "replace", refuse)  # as a directory made read-only during the write refuses it
    renaming = r"renaming .*\.run\.ckpt\..*\.tmp over .*run\.ckpt failed"
    with pytest.raises(CheckpointWriteError, match=renaming) as raised:
        pb.save_checkpoint(path, *trajectory[1], step=1)
    monkeypatch.undo()
    assert raised.value.errno == errno.EACCES and "previous checkpoint at" in str(raised.value)
    assert os.listdir(tmp_path) == ["run.ckpt"] and path.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# Damaged files: every flipped bit and every truncation is refused with the reason


def _small_checkpoint(folder: Path) -> tuple[Path, bytes]:
    net = pb.init_mlp(jax.random.key(0), (3, 4, 2), ("tanh", "identity"), dtype="float32")
    path = folder / "small.ckpt"
    pb.save_checkpoint(path, net, OPTIMIZER.init(net), step=7, key=jax.random.key(3), metadata={"note": "x"})
    return path, path.read_bytes()


def _assert_refused(path: Path, data: bytes | None, where: str) -> None:
    """Load ``path`` (first rewritten as ``data`` unless None): a CheckpointError that says why, or fail."""
    if data is not None:
        path.write_bytes(data)
    try:
        loaded = pb.load_checkpoint(path)
    except CheckpointError as error:
        message = str(error)
        assert "checksum mismatch: the file is corrupt (truncated or altered)" in message, f"{message}; {where}"
        assert "truncated or corrupt" in message and str(path) in message, f"{message}; {where}"
        return
    except Exception as error:
        pytest.fail(f"a raw {type(error).__name__} instead of a CheckpointError: {error}; {where}")
    pytest.fail(f"a damaged file loaded (step {loaded.step}); {where}")


def _flip_positions(size: int, count: int | None) -> list[int]:
    bits = np.arange(size * 8) if count is None else np.random.default_rng(SEED).choice(size * 8, count, False)
    return [int(bit) for bit in bits]


@pytest.mark.parametrize(
    "count", [pytest.param(48, id="48-bits"), pytest.param(None, id="every-bit", marks=pytest.mark.slow)]
)
def test_a_flipped_bit_anywhere_is_refused(tmp_path, count):
    path, data = _small_checkpoint(tmp_path)
    bits = _flip_positions(len(data), count)
    again = replay("test_a_flipped_bit_anywhere_is_refused")
    with open(path, "r+b") as file:  # flipped in place and back: rewriting the file each time costs a flush
        for trial, bit in enumerate(bits):
            original = data[bit // 8]
            os.pwrite(file.fileno(), bytes([original ^ (1 << (bit % 8))]), bit // 8)
            where = f"bit {bit} of {len(data) * 8} flipped (trial {trial} of {len(bits)}); {again}"
            _assert_refused(path, None, where)
            os.pwrite(file.fileno(), bytes([original]), bit // 8)
    assert path.read_bytes() == data
    path.write_bytes(data)
    assert pb.load_checkpoint(path).step == 7


@pytest.mark.parametrize(
    "count", [pytest.param(32, id="32-lengths"), pytest.param(None, id="every-length", marks=pytest.mark.slow)]
)
def test_a_truncated_file_is_refused_at_every_length(tmp_path, count):
    path, data = _small_checkpoint(tmp_path)
    lengths = range(len(data)) if count is None else np.random.default_rng(SEED).choice(len(data), count, False)
    again = replay("test_a_truncated_file_is_refused_at_every_length")
    for trial, length in enumerate(lengths):
        where = f"cut to {length} of {len(data)} bytes (trial {trial} of {len(lengths)}); {again}"
        os.truncate(path, int(length))
        _assert_refused(path, None, where)
        with open(path, "r+b") as file:
            os.pwrite(file.fileno(), data[int(length) :], int(length))


def _rewritten_without_checksum(path: Path, change=None) -> None:
    """Rewrite ``path`` as save_checkpoint wrote it before checksums: np.savez of the same entries, no comment."""
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(arrays["meta"].tobytes())
    del meta["checksum"]
    if change is not None:
        change(meta)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def test_a_checkpoint_written_before_checksums_still_loads(trajectory, tmp_path):
    path = tmp_path / "old.ckpt"
    pb.save_checkpoint(path, *trajectory[2], step=2, metadata={"note": "old"})
    assert path.read_bytes()[-(len(checkpoint_module.CHECKSUM_PREFIX) + 64) :].startswith(b"purebp-sha256:")
    _rewritten_without_checksum(path)
    assert b"purebp-sha256:" not in path.read_bytes()
    restored = _load(path, trajectory)
    assert restored.step == 2 and restored.metadata == {"note": "old"}
    assert _identical((restored.net, restored.opt_state), trajectory[2])


def test_a_checkpoint_of_a_newer_format_is_refused_naming_both_versions(trajectory, tmp_path, monkeypatch):
    path = tmp_path / "new.ckpt"
    monkeypatch.setattr(checkpoint_module, "FORMAT_SEQUENTIAL", "purebp-checkpoint-3")  # as a later purebp writes
    monkeypatch.setattr(checkpoint_module, "_version", lambda: "9.1.0")
    pb.save_checkpoint(path, *trajectory[0])
    monkeypatch.undo()
    older = tmp_path / "unchecked.ckpt"
    shutil.copy(path, older)
    _rewritten_without_checksum(older, lambda meta: meta.update(purebp_version="9.2.0"))
    for written, version in ((path, "9.1.0"), (older, "9.2.0")):
        with pytest.raises(CheckpointError) as raised:
            pb.load_checkpoint(written)
        message = str(raised.value)
        for part in (
            f"has format purebp-checkpoint-3 (written by purebp {version})",
            f"newer than this purebp ({pb.__version__}) reads",
            "purebp-checkpoint-2",
            "upgrade purebp",
        ):
            assert part in message, f"{part!r} not in {message!r}"
