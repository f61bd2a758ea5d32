"""``purebp launch``: start N processes of one command on this machine, wired to each other over loopback.

For trying multi-process training on one machine: each child runs
``python -m purebp.cli <command> ... --num-processes N --process-id i
--coordinator 127.0.0.1:PORT`` with a free loopback port, and
``JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:PORT`` so that JAX's coordinator
listens on loopback only (gloo's peer-to-peer sockets bind to the address the
host name resolves to, which JAX 0.10.2 does not let us set; 127.0.0.1 on a
machine whose name resolves to loopback). The children share one new process group, so the
launcher signals exactly its own children and nothing else:

- SIGTERM/SIGINT to the launcher are forwarded to the group (preemption: the
  train command checkpoints and stops at the same step everywhere);
- past ``deadline`` seconds the group gets SIGTERM, then SIGKILL after ``grace``;
- when a child fails, the others get ``grace`` seconds to stop by themselves
  (they notice within their heartbeat timeout), then SIGKILL.

The exit code is 0 when every child exits 0, 124 on the deadline, otherwise
the first failing child's code (128 + signal number for a child killed by a signal).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

DEADLINE_EXIT_CODE = 124


def free_loopback_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


PROGRAM = (sys.executable, "-m", "purebp.cli")


def worker_command(
    command: Sequence[str], num_processes: int, process_id: int, coordinator: str, program: Sequence[str] = PROGRAM
) -> list[str]:
    """Return the argv of child ``process_id``: ``program`` (purebp's CLI in this Python) then ``command`` then
    the process flags."""
    return [
        *program,
        *command,
        "--num-processes",
        str(num_processes),
        "--process-id",
        str(process_id),
        "--coordinator",
        coordinator,
    ]


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def launch(
    command: Sequence[str],
    num_processes: int,
    *,
    deadline: float = 3600.0,
    grace: float = 30.0,
    poll: float = 0.05,
    log=print,
    program: Sequence[str] = PROGRAM,
) -> int:
    """Run ``num_processes`` copies of the purebp ``command`` (e.g. ``["train", "--dataset", "digits"]``); return
    the exit code described in the module docstring. ``program`` replaces ``python -m purebp.cli`` (for tests)."""
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"the number of processes must be a positive int, got {num_processes!r}")
    for name, value in (("deadline", deadline), ("grace", grace)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    if not command:
        raise ValueError("no command to launch: give it after --, e.g. purebp launch -n 2 -- train --dataset digits")
    taken = {"--num-processes", "--process-id", "--coordinator"} & {part.split("=")[0] for part in command}
    if taken:
        raise ValueError(f"purebp launch sets {', '.join(sorted(taken))} itself: remove it from the command")

    port = free_loopback_port()
    coordinator = f"127.0.0.1:{port}"
    environment = dict(os.environ, JAX_COORDINATOR_BIND_ADDRESS=coordinator)
    children: list[subprocess.Popen] = []
    group = 0  # the first child starts a new process group; the others join it

    def signal_group(signum: int) -> None:
        # only while a child is unreaped (alive or a zombie): the group id is then still ours, never reused
        if group and any(child.returncode is None for child in children):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signum)

    def forward(signum: int, frame) -> None:
        log(f"purebp launch: got signal {signum}, forwarding it to the {num_processes} processes")
        signal_group(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for process_id in range(num_processes):
            argv = worker_command(command, num_processes, process_id, coordinator, program)
            children.append(subprocess.Popen(argv, env=environment, process_group=group))
            group = group or children[0].pid
        log(f"purebp launch: {num_processes} processes (group {group}), coordinator {coordinator}")
        return _supervise(children, signal_group, deadline=deadline, grace=grace, poll=poll, log=log)
    finally:
        signal_group(signal.SIGKILL)  # nothing of ours outlives the launcher
        for child in children:
            if child.poll() is None:
                child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(children, signal_group, *, deadline: float, grace: float, poll: float, log) -> int:
    started = time.monotonic()
    first_failure: int | None = None
    failed_at = None
    terminated_at = None
    while None in [child.poll() for child in children]:  # a list: poll every child, each time
        now = time.monotonic()
        if first_failure is None:
            for process_id, child in enumerate(children):
                if child.returncode not in (None, 0):
                    first_failure, failed_at = _exit_code(child.returncode), now
                    log(
                        f"purebp launch: process {process_id} exited with code {first_failure}; "
                        f"giving the others {grace:g} s to stop"
                    )
                    break
        if terminated_at is None and now - started > deadline:
            log(f"purebp launch: deadline of {deadline:g} s reached: SIGTERM to every process")
            signal_group(signal.SIGTERM)
            terminated_at = now
        overdue = (failed_at is not None and now - failed_at > grace) or (
            terminated_at is not None and now - terminated_at > grace
        )
        if overdue:
            log("purebp launch: processes still running after the grace period: SIGKILL")
            signal_group(signal.SIGKILL)
            break
        time.sleep(poll)
    codes = [_exit_code(child.wait()) for child in children]
    if terminated_at is not None:
        return DEADLINE_EXIT_CODE
    if first_failure is not None:
        return first_failure
    return next((code for code in codes if code), 0)


def add_launch_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="run N processes of a purebp command on this machine (loopback only), e.g. multi-process training",
        description="Start N copies of 'purebp COMMAND ...' on 127.0.0.1 with --num-processes, --process-id and "
        "--coordinator (a free loopback port) added; the coordinator binds to loopback only. Forwards "
        "SIGTERM/SIGINT to its children, enforces a deadline, kills only its own process group, and exits with "
        "the first failing child's code (124 on the deadline). Example: purebp launch -n 2 -- train --dataset "
        "digits --checkpoint run.ckpt --resume",
    )
    parser.add_argument("-n", "--num-processes", type=int, required=True, help="number of processes")
    parser.add_argument("--deadline", type=float, default=3600.0, help="seconds before SIGTERM (default 3600)")
    parser.add_argument(
        "--grace", type=float, default=30.0, help="seconds between a failure or SIGTERM and SIGKILL (default 30)"
    )
    parser.add_argument("worker", nargs=argparse.REMAINDER, help="-- then the purebp command, e.g. -- train ...")
    parser.set_defaults(handler=run_launch)


def run_launch(args: argparse.Namespace) -> int:
    command = args.worker[1:] if args.worker[:1] == ["--"] else args.worker
    try:
        return launch(
            command,
            args.num_processes,
            deadline=args.deadline,
            grace=args.grace,
            log=lambda message: print(message, file=sys.stderr, flush=True),
        )
    except ValueError as error:
        print(f"purebp launch: error: {error}", file=sys.stderr)
        return 2
