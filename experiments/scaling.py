"""Scaling out: step time and samples/s on 1, 2, 4 simulated devices and 1 vs 2 processes; all-reduce cost.

Every configuration runs in fresh processes (the device count and
``jax.distributed.initialize`` must precede the first JAX operation):

- devices: one process with ``jax_num_cpu_devices`` = 1, 2, 4; one epoch of
  ``STEPS`` data-parallel steps (``purebp.train.fit.run_sharded_epoch``), plus the
  plain single-device ``run_epoch`` as the baseline;
- processes: 1 and 2 processes of one CPU device each, on loopback, gloo collectives;
- all-reduce: the gradient pytree summed over the devices with one ``psum`` per
  leaf versus one ``psum`` of the flattened buffer (what ``purebp.train.distributed`` does).

Times are medians over ``ROUNDS`` compiled runs. On a 2-core machine no
speed-up is expected: simulated devices and processes share the same two
cores. Run: ``python -m experiments.scaling`` (writes experiments/results/scaling.md and .csv;
``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = (64, 256, 256, 256, 10)  # 8 parameter leaves
BATCH = 256
STEPS = 20
ROUNDS = 15
ALLREDUCE_CALLS = 50
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- worker side (runs in a fresh process)


def _median_seconds(function, rounds: int) -> float:
    function()  # compile and warm up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    import jax

    if args.num_processes > 1:
        from purebp.train import distributed

        distributed.initialize(args.num_processes, args.process_id, args.coordinator, heartbeat_timeout=20)
    else:
        jax.config.update("jax_num_cpu_devices", args.devices)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.flatten_util import ravel_pytree
    from jax.sharding import PartitionSpec as P

    import purebp as pb
    from purebp.train import distributed
    from purebp.train import fit as training

    rng = np.random.default_rng(0)
    n = BATCH * args.steps
    x = rng.normal(size=(n, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=n).astype(np.int32)
    net = pb.init_mlp(jax.random.key(0), SIZES, ("relu",) * (len(SIZES) - 2) + ("identity",), dtype="float32")
    optimizer = optax.sgd(0.01)
    loss = "softmax_cross_entropy"
    rows = []

    if args.baseline:  # plain single-device run_epoch, no mesh
        state = training.initial_state(net, optimizer.init(net))
        xd, yd = jnp.asarray(x), jnp.asarray(y)
        options = dict(optimizer=optimizer, loss=loss, reduction="mean", gradient="handwritten")
        options |= dict(batch_size=BATCH, num_batches=args.steps, shuffle=False)
        seconds = _median_seconds(
            lambda: jax.block_until_ready(training.run_epoch(state, jax.random.key(0), xd, yd, **options)), args.rounds
        )
        rows.append({"setting": "1 device, no mesh (run_epoch)", "seconds_per_step": seconds / args.steps})
    else:
        mesh = distributed.make_data_mesh()
        shards = mesh.shape["data"]
        state = training.initial_state(*distributed.replicate((net, optimizer.init(net)), mesh))
        xb, yb = distributed.shard_epoch(x, y, np.arange(n), args.steps, BATCH, mesh)
        options = dict(optimizer=optimizer, loss=loss, reduction="mean", mesh=mesh)
        seconds = _median_seconds(
            lambda: jax.block_until_ready(training.run_sharded_epoch(state, xb, yb, **options)), args.rounds
        )
        where = f"{args.num_processes} processes x 1 device" if args.num_processes > 1 else f"{shards} device(s)"
        rows.append({"setting": f"{where}, mesh (run_sharded_epoch)", "seconds_per_step": seconds / args.steps})

        grads = distributed.replicate(net, mesh)

        def per_leaf(tree):
            return jax.tree.map(lambda leaf: jax.lax.psum(leaf, "data"), tree)

        def flattened(tree):
            flat, unravel = ravel_pytree(tree)
            return unravel(jax.lax.psum(flat, "data"))

        leaves = len(jax.tree.leaves(net))
        variants = {"one psum per leaf": per_leaf, "one psum of the flattened buffer": flattened}
        reduces = {
            name: jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P()))
            for name, body in variants.items()
        }
        times = {name: [] for name in variants}
        for reduce in reduces.values():
            jax.block_until_ready(reduce(grads))  # compile
        for _ in range(args.rounds):  # interleaved, so that load changes hit both variants alike
            for name, reduce in reduces.items():
                started = time.perf_counter()
                # wait for each call: queuing many in-process collectives at once can deadlock the CPU runtime
                for _ in range(ALLREDUCE_CALLS):
                    jax.block_until_ready(reduce(grads))
                times[name].append((time.perf_counter() - started) / ALLREDUCE_CALLS)
        for name, reduce in reduces.items():
            # XLA combines the psums into one variadic all-reduce; count the arrays it reduces (its result shapes)
            hlo = reduce.lower(grads).compile().as_text().splitlines()
            count = sum(
                len(re.findall(r"f32\[", line.split(" all-reduce(")[0])) for line in hlo if " all-reduce(" in line
            )
            rows.append(
                {
                    "setting": f"{where}: all-reduce of {leaves} leaves, {name}",
                    "seconds_per_call": statistics.median(times[name]),
                    "all_reduce_arrays": count,
                }
            )
    if jax.process_index() == 0:
        print("RESULT " + json.dumps(rows), flush=True)


# ---------------------------------------------------------------- driver


def _run(argv: list[str], environment: dict | None = None, count: int = 1) -> list[dict]:
    base = [sys.executable, "-m", "experiments.scaling", "--worker"]
    root = Path(__file__).resolve().parents[1]
    processes = [
        subprocess.Popen(
            base + argv + ([f"--process-id={i}"] if count > 1 else []),
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
            env=environment,
        )
        for i in range(count)
    ]
    rows = []
    for process in processes:
        output, _ = process.communicate(timeout=600)
        if process.returncode:
            raise SystemExit(f"worker {argv} failed with code {process.returncode}")
        rows += [row for line in output.splitlines() if line.startswith("RESULT ") for row in json.loads(line[7:])]
    return rows


def machine() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    system = f"{platform.system()}, Python {platform.python_version()}, jax {jax.__version__}"
    return f"{cpu}, {os.cpu_count()} cores visible, {system}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="3 steps, 2 rounds: a smoke run (not written)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from purebp.cli.launch import free_loopback_port

    timing = ["--steps", "3", "--rounds", "2"] if args.quick else []
    rows = _run(["--baseline"] + timing)
    for devices in (1, 2, 4):
        rows += _run([f"--devices={devices}"] + timing)
    coordinator = f"127.0.0.1:{free_loopback_port()}"
    environment = dict(os.environ, JAX_COORDINATOR_BIND_ADDRESS=coordinator)
    rows += _run(["--num-processes=2", f"--coordinator={coordinator}"] + timing, environment, count=2)

    description = machine()
    lines = [
        "# Scaling out: data-parallel steps on simulated devices and processes",
        "",
        f"Machine: {description}. Measured by `python -m experiments.scaling`.",
        f"MLP {','.join(map(str, SIZES))} (relu, softmax cross-entropy), float32, global batch {BATCH}, "
        f"SGD; medians of {2 if args.quick else args.rounds} compiled epochs of {3 if args.quick else args.steps} "
        f"steps; all-reduce: medians over rounds of {ALLREDUCE_CALLS} calls, each waited for. Machine load while "
        f"measuring (1-min load average): {os.getloadavg()[0]:.1f}.",
        "",
        "| setting | ms per step | samples/s |",
        "|---|---:|---:|",
    ]
    for row in rows:
        if "seconds_per_step" in row:
            per_step = row["seconds_per_step"]
            lines.append(f"| {row['setting']} | {1e3 * per_step:.3f} | {BATCH / per_step:,.0f} |")
    lines += ["", "| all-reduce of the gradient | arrays in the compiled all-reduce | µs per call |", "|---|---:|---:|"]
    for row in rows:
        if "seconds_per_call" in row:
            lines.append(f"| {row['setting']} | {row['all_reduce_arrays']} | {1e6 * row['seconds_per_call']:.1f} |")
    lines += [
        "",
        "This machine has 2 CPU cores: the simulated devices and the processes share them, so no speed-up is "
        "expected and none is claimed; the table shows the overhead of sharding and of the collectives. "
        "On real devices or hosts the per-device work shrinks with the device count while the all-reduce "
        "stays one buffer of the parameter size per step. Flattening pays off where each collective has a "
        "fixed cost (gloo across processes: one TCP all-reduce per array); between simulated devices of one "
        "process the all-reduce is a memory copy, and the concatenation that flattening adds is about what it "
        "saves (slower with 1-2 devices, faster with 4 in the runs so far), so purebp flattens only across processes.",
    ]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.md").write_text(markdown)
    with open(RESULTS / "scaling.csv", "w", newline="") as file:
        writer = csv.DictWriter(
            file, fieldnames=["setting", "seconds_per_step", "seconds_per_call", "all_reduce_arrays", "machine"]
        )
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "machine": description})
    print(f"wrote {RESULTS / 'scaling.md'} and scaling.csv")


if __name__ == "__main__":
    main()
