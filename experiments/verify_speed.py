"""How long does `purebp verify` take per architecture, compiled the default way, the fast way, or run eagerly?

python -m experiments.verify_speed [--quick] [--seed S] [--out DIR] [--trials N] [--eager N] [--cli-trials N]
    # writes verify_speed.{csv,md}

Part 1, in one process, on the first N architectures that `purebp verify --seed S` draws, each
architecture through every variant in turn (so a busy machine slows all of them alike):

- ``full``: ``check_gradients`` as by default, two programs compiled with XLA's defaults
  (what `purebp verify` ran before ``fast_compile``; ``--full-compile`` now);
- ``fast``: ``check_gradients(..., fast_compile=True)``, what `purebp verify` runs now;
- ``eager``: ``check_gradients`` under ``jax.disable_jit()``, op by op (first ``--eager`` only: slow).

Each is followed by ``jax.clear_caches()`` (as the old `purebp verify` loop was), so no variant reuses
another's executables. Every variant must give the same verdict. Part 2 times the command itself,
``python -m purebp.cli verify`` (200 architectures by default), as it runs now and with
``--full-compile``, in fresh processes: wall time and CPU time (user + sys) of the child.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

from experiments import _common  # noqa: E402
from purebp.check import check_gradients  # noqa: E402
from purebp.testing import make_case, random_spec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the architecture generator (default 0)")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    parser.add_argument("--trials", type=int, default=40, help="architectures timed in-process (default 40)")
    parser.add_argument("--eager", type=int, default=4, help="of those, how many also run eagerly (default 4)")
    parser.add_argument("--cli-trials", type=int, default=200, help="--trials of the timed commands (default 200)")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.eager, args.cli_trials = 3, 1, 3
    return args


def timed_check(case, variant: str):
    start = time.perf_counter()
    if variant == "eager":
        with jax.disable_jit():
            report = check_gradients(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction)
    else:
        report = check_gradients(
            case.net, case.x, case.y, loss=case.loss, reduction=case.reduction, fast_compile=variant == "fast"
        )
    jax.clear_caches()
    return time.perf_counter() - start, report


def time_command(arguments: list[str]) -> dict:
    """Run ``python -m purebp.cli verify ARGUMENTS`` in a fresh process; return its wall and CPU seconds."""
    command = [sys.executable, "-m", "purebp.cli", "verify", "--quiet", *arguments]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": "purebp verify " + " ".join(arguments), "wall s": wall, "cpu s": cpu}


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    specs = [random_spec(rng) for _ in range(args.trials)]  # the draws of `purebp verify --seed S`
    times: dict[str, list[float]] = {"full": [], "fast": [], "eager": []}
    rows = []
    for trial, spec in enumerate(_common.progress(specs, desc="architectures")):
        case = make_case(spec)
        variants = ("full", "fast", "eager") if trial < args.eager else ("full", "fast")
        verdicts = {}
        row = {"trial": trial, "sizes": ",".join(map(str, spec.sizes)), "batch": spec.batch}
        for variant in variants:
            seconds, report = timed_check(case, variant)
            times[variant].append(seconds)
            verdicts[variant] = report.passed
            row[f"{variant} s"] = seconds
            row[f"{variant} max rel"] = report.max_relative_error
        if len(set(verdicts.values())) != 1:
            raise SystemExit(f"variants disagree on {spec!r}: {verdicts}")
        rows.append(row)
    for row in rows:
        row.setdefault("eager s", float("nan"))
        row.setdefault("eager max rel", float("nan"))

    commands = [
        time_command(["--trials", str(args.cli_trials), "--seed", str(args.seed)]),
        time_command(["--trials", str(args.cli_trials), "--seed", str(args.seed), "--full-compile"]),
    ]
    load_after = os.getloadavg()

    def summary(variant: str) -> dict:
        own = times[variant]
        count = len(own)
        full = times["full"][:count]
        return {
            "variant": variant,
            "architectures": count,
            "median s per architecture": statistics.median(own),
            "total s": sum(own),
            "full / this (totals, same architectures)": sum(full) / sum(own),
        }

    summaries = [summary(variant) for variant in ("full", "fast", "eager")]
    stem = _common.output_stem(args, "verify_speed")
    _common.write_csv(stem.with_suffix(".csv"), rows)
    load = f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (1-minute `uptime` figures)"
    lines = [
        "# `purebp verify`: time per architecture",
        "",
        f"{_common.machine()}; {load}. Architectures: the first {args.trials} that "
        f"`purebp verify --seed {args.seed}` draws (float64). Command: "
        f"`python -m experiments.verify_speed{' --quick' if args.quick else ''}`.",
        "",
        "In one process, each architecture through each variant in turn, `jax.clear_caches()` after each:",
        "",
        *_common.markdown_table(summaries, list(summaries[0]), {"median s per architecture": ".3f", "total s": ".1f",
                                                                 "full / this (totals, same architectures)": ".1f"}),
        "",
        "The command, in fresh processes (wall and CPU time of the child, `--quiet`):",
        "",
        *_common.markdown_table(commands, list(commands[0]), {"wall s": ".1f", "cpu s": ".1f"}),
    ]  # fmt: skip
    _common.write_markdown(stem.with_suffix(".md"), lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
