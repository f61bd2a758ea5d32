"""Test-suite settings: float64 on, strict promotion, hypothesis profiles, the background runner.

Two tiers (pyproject.toml, [tool.pytest.ini_options]): `python -m pytest` runs the default tier, every test
not marked `slow` or `peer`; `python -m pytest -m slow` runs the long sweeps (a command-line -m replaces the
one in addopts). `-m peer` runs the PyTorch comparisons (needs the bench extra).

JAX settings must precede the first array, so they are set at import time.
"""

import os

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

from hypothesis import HealthCheck, settings  # noqa: E402

# "ci" (the default) is derandomized so every run draws the same cases;
# HYPOTHESIS_PROFILE=dev explores new cases with more examples.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=500,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---------------------------------------------------------------- subprocess runs on the second core

import dataclasses  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@dataclasses.dataclass
class BackgroundRun:
    """One finished background command: its ``subprocess.CompletedProcess`` and its own output directory."""

    process: subprocess.CompletedProcess
    out: Path


class Background:
    """Subprocess runs (experiment scripts, README examples, 8-device runs) started when the session starts.

    The suite's own process keeps one core busy (compiles are single-threaded); a CI machine has two. A test
    marked ``@pytest.mark.background(name, command=[...], **options)`` has its command queued when the
    session starts and run on a thread, one command at a time, while the in-process tests run; such tests
    are moved to the end of the session, and ``background.result(name, command=..., **options)`` (the
    ``background`` fixture) waits for the run, or runs it there and then if it was never queued. What each
    test asserts on the run is unchanged. ``{out}`` in the command and in ``cwd`` is replaced by a fresh
    directory of the run's own; ``options`` are ``cwd``, ``env`` (default: as when the session started) and
    ``timeout`` (seconds, default 600) as for subprocess.run, and ``files`` ({name: text} written to ``{out}``
    before the run).
    """

    def __init__(self) -> None:
        self._specs: dict[str, dict] = {}
        self._done: dict[str, threading.Event] = {}
        self._results: dict[str, BackgroundRun | BaseException] = {}
        self._lock = threading.Lock()
        self._running: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._root = Path(tempfile.mkdtemp(prefix="purebp-background-"))
        self.seconds: dict[str, float] = {}  # wall time of each finished run, for the summary line

    def queue(self, name: str, **spec) -> None:
        if name not in self._specs:
            # the environment and directory of now: a test's monkeypatch.setenv/chdir must not reach the run
            self._specs[name] = {"env": dict(os.environ), "cwd": os.getcwd(), **spec}
            self._done[name] = threading.Event()

    def start(self) -> None:
        if self._specs and self._thread is None:
            self._thread = threading.Thread(target=self._work, args=(list(self._specs),), daemon=True)
            self._thread.start()

    def _work(self, names: list[str]) -> None:
        for name in names:
            if self._stopped:
                return
            try:
                self._results[name] = self._run(name, **self._specs[name])
            except BaseException as error:  # handed to the test that waits for it
                self._results[name] = error
            self._done[name].set()

    def _run(self, name, command, cwd=None, env=None, timeout=600, files=None) -> BackgroundRun:
        out = Path(tempfile.mkdtemp(prefix="run-", dir=self._root))
        for file_name, text in (files or {}).items():
            (out / file_name).write_text(text)
        argv = [str(arg).replace("{out}", str(out)) for arg in command]
        cwd = None if cwd is None else str(cwd).replace("{out}", str(out))
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"background run {name!r} not started: the session is over")
            started = time.monotonic()
            self._running = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        try:
            stdout, stderr = self._running.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._running.kill()
            self._running.communicate()
            raise
        self.seconds[name] = time.monotonic() - started
        return BackgroundRun(subprocess.CompletedProcess(argv, self._running.returncode, stdout, stderr), out)

    def result(self, name: str, **spec) -> BackgroundRun:
        """The run ``name`` (waits for it); ``spec`` runs it now if no test queued it."""
        if name in self._done and self._thread is not None:
            self._done[name].wait()
            result = self._results[name]
            if isinstance(result, BaseException):
                raise result
            return result
        return self._run(name, **spec)

    def wait_all(self) -> None:
        """Wait until every queued run is done (for tests that time processes of their own)."""
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._running is not None and self._running.poll() is None:
                self._running.kill()
        if self._thread is not None:
            self._thread.join(timeout=30)
        shutil.rmtree(self._root, ignore_errors=True)


BACKGROUND = Background()


# trylast: after -k/-m deselection, so only the selected tests' runs are queued; the default tier
# (addopts: -m 'not peer and not slow') never starts a slow test's run (tests/project/test_suite_tiers.py checks it)
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("background") is not None]
    if not marked or config.option.collectonly:
        return
    items[:] = [item for item in items if item not in marked] + marked
    for item in marked:
        for mark in item.iter_markers("background"):
            BACKGROUND.queue(*mark.args, **mark.kwargs)
    BACKGROUND.start()


def pytest_sessionfinish(session, exitstatus):
    BACKGROUND.stop()


def pytest_terminal_summary(terminalreporter):
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    terminalreporter.write_line(
        f"CPU time: this process {own.ru_utime + own.ru_stime:.1f} s, "
        f"its subprocesses {children.ru_utime + children.ru_stime:.1f} s"
    )
    if BACKGROUND.seconds:
        total = sum(BACKGROUND.seconds.values())
        terminalreporter.write_line(
            f"background runs (conftest.Background): {len(BACKGROUND.seconds)} runs, {total:.1f} s of wall time "
            f"beside the in-process tests (not in --durations, which shows only the wait); each, slowest first: "
            + ", ".join(
                f"{name} {seconds:.1f} s" for name, seconds in sorted(BACKGROUND.seconds.items(), key=lambda x: -x[1])
            )
        )


@pytest.fixture(scope="session")
def background() -> Background:
    return BACKGROUND
