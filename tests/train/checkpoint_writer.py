"""A fork server for tests/train/test_checkpoint_faults.py: writer processes to kill, race, limit and demote.

Started once as ``python tests/train/checkpoint_writer.py`` (PYTHONPATH = the repository root), it imports
purebp (about a second) but never starts JAX's runtime: its checkpoints have NumPy leaves, so forking it is
safe and cheap, and each trial's writer is a fresh process forked from it (no import per trial).

Protocol: one JSON command per line on stdin, one reply per line on stdout, prefixed ``@@ `` (anything else
on stdout is ignored). Commands (``op``):

- ``states``: load ``pickle`` (a list of ``(net, opt_state)`` with NumPy leaves; the test writes it).
- ``kill``: fork a writer that saves ``states[step % len]`` with ``step = first_step, first_step + 1, ...``
  to ``path`` in a loop, reporting each completed save on a pipe; SIGKILL it after ``delay`` seconds.
  Reply: ``completed`` (the steps whose save returned) and ``signal`` (what ended it).
- ``race``: fork one writer per entry of ``writers`` (``[name, first_step]``), each saving ``saves`` times
  to ``path`` as fast as it can; reply ``started`` at once and ``done`` with each writer's exit status and
  error (if any) once all have exited.
- ``limit``: fork a writer that ignores SIGXFSZ, sets RLIMIT_FSIZE to ``limit`` bytes and saves
  ``states[index]`` to ``path``; reply the error it raised (type, errno, message) or none.
- ``demoted``: fork a writer that becomes user and group ``uid`` (root can; a read-only directory then
  refuses it as it would any user) and saves ``states[index]`` to ``path``; reply as for ``limit``.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import resource
import signal
import sys
import time

from purebp.train.checkpoint import save_checkpoint


def _reply(message: dict) -> None:
    sys.stdout.write("@@ " + json.dumps(message) + "\n")
    sys.stdout.flush()


def _save(states: list, path: str, step: int, metadata: dict) -> None:
    net, opt_state = states[step % len(states)]
    save_checkpoint(path, net, opt_state, step=step, metadata=metadata)


def _error(error: BaseException | None) -> dict | None:
    if error is None:
        return None
    return {"type": type(error).__name__, "errno": getattr(error, "errno", None), "message": str(error),
            "is_oserror": isinstance(error, OSError)}  # fmt: skip


def _in_child(work, report_fd: int) -> None:
    """Run ``work()`` in this forked child, write its error (JSON) to ``report_fd``, and exit without cleanup."""
    code = 0
    try:
        work()
        outcome = None
    except BaseException as error:  # reported to the test, which judges it
        outcome, code = error, 1
    try:
        os.write(report_fd, json.dumps(_error(outcome)).encode())
    finally:
        os._exit(code)


def _fork(work) -> tuple[int, int]:
    """Fork a child running ``work(report_fd)``; return its pid and the read end of its report pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        _in_child(lambda: work(write), write)
    os.close(write)
    return pid, read


def _drain(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def _kill(states: list, command: dict) -> dict:
    def loop(report_fd: int) -> None:
        for j in range(10**9):
            step = command["first_step"] + j
            _save(states, command["path"], step, {"trial": command["trial"], "save": j})
            os.write(report_fd, f"{step}\n".encode())

    pid, read = _fork(loop)
    time.sleep(command["delay"])
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    lines = _drain(read).decode(errors="replace").split("\n")
    completed = [int(line) for line in lines if line.strip().isdigit()]
    return {"completed": completed, "signal": _status(status)}


def _race(states: list, command: dict) -> dict:
    def writer(name: str, first_step: int):
        def loop(report_fd: int) -> None:
            for j in range(command["saves"]):
                _save(states, command["path"], first_step + j, {"writer": name, "save": j})

        return loop

    children = [(name, *_fork(writer(name, first))) for name, first in command["writers"]]
    _reply({"started": True})
    outcome = {}
    for name, pid, read in children:
        _, status = os.waitpid(pid, 0)
        outcome[name] = {"status": _status(status), "error": json.loads(_drain(read) or b"null")}
    return {"done": outcome}


def _one_save(states: list, command: dict, prepare) -> dict:
    def work(report_fd: int) -> None:
        prepare()
        net, opt_state = states[command["index"]]
        save_checkpoint(command["path"], net, opt_state, step=command["index"])

    pid, read = _fork(work)
    _, status = os.waitpid(pid, 0)
    return {"status": _status(status), "error": json.loads(_drain(read) or b"null")}


def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG, not a signal
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))


def _demote(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def main() -> None:
    states: list = []
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "states":
            with open(command["pickle"], "rb") as file:
                states = pickle.load(file)
            _reply({"states": len(states)})
        elif op == "kill":
            _reply(_kill(states, command))
        elif op == "race":
            _reply(_race(states, command))
        elif op == "limit":
            _reply(_one_save(states, command, functools.partial(_limit_file_size, command["limit"])))
        elif op == "demoted":
            _reply(_one_save(states, command, functools.partial(_demote, command["uid"])))
        else:
            _reply({"error": f"unknown op {op!r}"})


if __name__ == "__main__":
    main()
