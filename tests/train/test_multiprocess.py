"""Multi-process training on jax.distributed: 2 processes equal 1, a killed worker, resume, SIGTERM, the launcher.

Every run is a set of fresh processes (``jax.distributed.initialize`` works
once per process and must precede the first JAX operation), on loopback, with a
4-second heartbeat timeout and short subprocess timeouts. Tolerance: per
parameter leaf relative L2 error ||a - b||_2 / ||b||_2 <= 1e-10 in float64 (the
runs differ only in the order of two-term gradient additions; measured ~1e-16).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import purebp as pb
from purebp.cli import main
from purebp.cli.launch import free_loopback_port, launch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # multi-process runs: `python -m pytest -m slow`
HEARTBEAT = 4
EPOCHS = 16  # 4 steps of 400 examples per epoch on the 1600 synthetic examples
RUN = ["train", "--dataset", "synthetic", "--sizes", "20,8,4", "--batch-size", "400", "--dtype", "float64",
       "--optimizer", "adam", "--lr", "0.01", "--no-verify", "--epochs", str(EPOCHS)]  # fmt: skip
CLI = [sys.executable, "-m", "purebp.cli"]
DIGEST = re.compile(r"process (\d) of 2: parameters sha256 ([0-9a-f]{16})")


@pytest.fixture(scope="module", autouse=True)
def quiet_machine(background):
    """The session's background runs (conftest.Background) finish first: these tests time processes of their own."""
    background.wait_all()


@pytest.fixture(scope="module")
def environment(tmp_path_factory) -> dict[str, str]:
    """The workers' environment: outside pytest's JAX settings, like a user's shell, plus a persistent
    compilation cache shared by this module's runs (same programs, compiled once: about a third less CPU)."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("JAX_")}
    return clean | {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def _assert_close(net, reference, tolerance=1e-10):
    for leaf, expected in zip(jax.tree.leaves(net), jax.tree.leaves(reference), strict=True):
        error = np.linalg.norm(np.asarray(leaf) - np.asarray(expected)) / np.linalg.norm(np.asarray(expected))
        assert error <= tolerance, error


def _wait_for(path: Path, processes, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in processes), "a worker exited before the first checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint {path} after {timeout} s"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run (no mesh) of RUN: its final parameters."""
    path = tmp_path_factory.mktemp("reference") / "single.ckpt"
    assert main(RUN + ["--checkpoint", str(path)]) == 0
    return pb.load_checkpoint(path).net


def test_two_processes_train_to_the_single_process_result(tmp_path, reference, environment):
    checkpoint = tmp_path / "two.ckpt"
    result = subprocess.run(
        CLI + ["launch", "-n", "2", "--deadline", "150", "--"] + RUN
        + ["--checkpoint", str(checkpoint), "--heartbeat-timeout", str(HEARTBEAT)],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=environment,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    digests = dict(DIGEST.findall(result.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], result.stdout  # bit-identical replicas
    saved = pb.load_checkpoint(checkpoint)
    assert saved.step == 4 * EPOCHS
    _assert_close(saved.net, reference)
    assert not list(tmp_path.glob(".two.ckpt.*")), "a temporary checkpoint file was left behind"


def test_killed_worker_stops_the_other_within_the_heartbeat_timeout_and_the_run_resumes(
    tmp_path, reference, environment
):
    checkpoint = tmp_path / "run.ckpt"
    command = RUN + ["--checkpoint", str(checkpoint), "--resume", "--heartbeat-timeout", str(HEARTBEAT)]
    coordinator = f"127.0.0.1:{free_loopback_port()}"
    bound = environment | {"JAX_COORDINATOR_BIND_ADDRESS": coordinator}
    workers = [
        subprocess.Popen(
            CLI + command + ["--num-processes", "2", "--process-id", str(i), "--coordinator", coordinator],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=bound,
        )
        for i in range(2)
    ]
    try:
        _wait_for(checkpoint, workers)
        assert workers[1].poll() is None, "worker 1 finished before it could be killed: make the run longer"
        workers[1].kill()
        killed = time.monotonic()
        _, errors = workers[0].communicate(timeout=HEARTBEAT + 20)
        elapsed = time.monotonic() - killed
    finally:
        for worker in workers:
            worker.kill()
            worker.communicate()
    assert workers[0].returncode == 3, errors
    assert "process 0 of 2 lost contact with the others" in errors and "--resume" in errors, errors
    assert elapsed <= HEARTBEAT + 5, elapsed
    interrupted_at = pb.load_checkpoint(checkpoint).step
    assert 0 < interrupted_at < 4 * EPOCHS

    # rerunning the same command (through the launcher) continues from the checkpoint
    result = subprocess.run(
        CLI + ["launch", "-n", "2", "--deadline", "150", "--"] + command,
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=environment,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    saved = pb.load_checkpoint(checkpoint)
    assert saved.step == 4 * EPOCHS
    assert saved.metadata["history"]["step"][0] == 4  # the history runs on from the interrupted run
    _assert_close(saved.net, reference)


def test_sigterm_stops_every_process_at_the_same_step_after_a_checkpoint(tmp_path, environment):
    checkpoint = tmp_path / "run.ckpt"
    launcher = subprocess.Popen(
        CLI + ["launch", "-n", "2", "--deadline", "150", "--"] + RUN
        + ["--epochs", "400", "--checkpoint", str(checkpoint), "--resume", "--heartbeat-timeout", str(HEARTBEAT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=environment,
    )  # fmt: skip
    try:
        _wait_for(checkpoint, [launcher])
        launcher.send_signal(signal.SIGTERM)
        output, errors = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, output + errors
    stopped = re.findall(r"stopped by SIGTERM after step (\d+) of 1600", output)
    assert len(stopped) == 2 and stopped[0] == stopped[1], output
    assert pb.load_checkpoint(checkpoint).step == int(stopped[0])
    digests = dict(DIGEST.findall(output))
    assert digests["0"] == digests["1"], output


# ---------------------------------------------------------------- the launcher, without JAX

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
EXIT_WITH_7_IN_PROCESS_1 = [
    sys.executable,
    "-c",
    "import sys, time; i = int(sys.argv[sys.argv.index('--process-id') + 1]); time.sleep(0.2 + 60 * (i == 0)); "
    "sys.exit(7 * i)",
]


def test_launcher_enforces_its_deadline_and_kills_its_children():
    started = time.monotonic()
    code = launch(["x"], 2, deadline=0.5, grace=0.5, program=SLEEPER, log=lambda message: None)
    assert code == 124
    assert time.monotonic() - started < 10


def test_launcher_propagates_the_first_failure_and_kills_the_rest_after_the_grace_period():
    messages = []
    code = launch(["x"], 2, deadline=60, grace=0.5, program=EXIT_WITH_7_IN_PROCESS_1, log=messages.append)
    assert code == 7
    assert any("process 1 exited with code 7" in message for message in messages), messages


def test_launcher_passes_the_process_flags_and_rejects_bad_arguments(capsys):
    argv = []
    program = [sys.executable, "-c", "import sys; sys.exit(0)"]
    assert launch(["train"], 3, program=program, log=argv.append) == 0
    assert "coordinator 127.0.0.1:" in argv[0]
    assert main(["launch", "-n", "0", "--", "train"]) == 2
    assert "positive int, got 0" in capsys.readouterr().err
    assert main(["launch", "-n", "2", "--", "train", "--process-id", "1"]) == 2
    assert "sets --process-id itself" in capsys.readouterr().err
    assert main(["train", "--dataset", "synthetic", "--num-processes", "2"]) == 2
    assert "needs --coordinator HOST:PORT" in capsys.readouterr().err
    assert main(["train", "--dataset", "synthetic", "--num-processes", "2", "--coordinator", "127.0.0.1:1"]) == 2
    assert "needs --process-id I" in capsys.readouterr().err


def test_coordinator_auto_without_a_cluster_is_a_clear_error(environment):
    result = subprocess.run(
        CLI + ["train", "--dataset", "synthetic", "--coordinator", "auto"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=environment,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "coordinator 'auto' found no cluster (SLURM, Open MPI, Cloud TPU, Kubernetes)" in result.stderr
