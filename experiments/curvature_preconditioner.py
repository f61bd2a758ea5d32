"""Curvature preconditioning on MNIST-1D: SGD and Adam against diagonal-GGN (MC) and K-FAC preconditioned steps.

python -m experiments.curvature_preconditioner [--quick] [--seed S] [--out DIR]   # writes curvature_preconditioner.*

The network: 40-256-256-10, relu hidden units, identity outputs, softmax
cross-entropy (mean over the batch), float32, batches of 128 drawn by epoch
permutations, a fixed budget of STEPS steps for every method. The methods:

- ``sgd``: optax.sgd(lr, momentum=0.9)
- ``adam``: optax.adam(lr)
- ``diag_ggn_mc``: chain(diag_ggn_preconditioner(damping, decay=0.95), trace(0.9), scale_by_learning_rate(lr)),
  curvature ``pb.diag_ggn(..., mc_samples=1, key)`` on the step's batch
- ``kfac``: chain(kfac_preconditioner(damping, decay=0.95), trace(0.9), scale_by_learning_rate(lr)),
  curvature ``pb.kfac(..., mc_samples=1, key)`` on the step's batch (pi-damping, Martens & Grosse 2015)

so the two preconditioned methods differ from SGD with momentum only in the
curvature they divide by. The learning rate (and the damping) of every method
is chosen on a small grid by the accuracy after STEPS steps on a validation
split (1000 of the 4000 training examples, fixed permutation; trained on the
other 3000; seed ``--seed``), never on the test set. Then each method trains
with its pick on all 4000 training examples with 3 seeds (initial weights,
batch order and Monte-Carlo draws from the seed), and the training loss (all
4000) and the test set (the package's 1000) are evaluated every EVAL_EVERY
steps. If a method's pick diverges on any of the seeds, its runner-up on the
validation split runs too and both are reported (a rule fixed in advance: one
unstable pick does not stand for the method, and is not hidden either).

One step of each method is one jitted program: value_and_grad, the
curvature and the optimizer update, ``lax.scan``-ned over EVAL_EVERY steps.
The hyperparameters sit in the optimizer state (``optax.inject_hyperparams``),
so each method compiles once for the whole grid and all seeds. Time per step:
each method's compiled EVAL_EVERY-step program timed again at the end, methods
alternating, medians of 7 repeats; the curves against wall time use each
run's own measured training time (no evaluation), so they also carry the
machine's load at that moment.

OPENBLAS_NUM_THREADS=1 is set before NumPy loads: jax's CPU Cholesky and
triangular solves call the LAPACK of NumPy/SciPy's OpenBLAS, whose threads spin
and wait for each other on a shared 2-core machine; with its default threads a
256x256 triangular solve took 8-16 ms instead of under 1 ms here, which would
bill K-FAC for the machine's load rather than for its arithmetic.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads OpenBLAS: see the module docstring

import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import purebp as pb
from experiments import _common
from purebp import data
from purebp.extras import preconditioning as pc

LOSS = "softmax_cross_entropy"
METHODS = ("sgd", "adam", "diag_ggn_mc", "kfac")
LABELS = {
    "sgd": "SGD + momentum",
    "adam": "Adam",
    "diag_ggn_mc": "diag GGN (MC) + momentum",
    "kfac": "K-FAC + momentum",
}
MOMENTUM, DECAY, BATCH = 0.9, 0.95, 128
LOSS_TARGET = 0.01  # "steps to reach": a training loss (all training examples) every method reaches
FULL = dict(hidden=(256, 256), steps=1500, eval_every=50, seeds=3, timing_repeats=7)
QUICK = dict(hidden=(32, 32), steps=40, eval_every=20, seeds=1, timing_repeats=2)
GRID = {
    "sgd": [{"learning_rate": lr} for lr in (0.01, 0.03, 0.1, 0.3)],
    "adam": [{"learning_rate": lr} for lr in (3e-4, 1e-3, 3e-3, 1e-2)],
    "diag_ggn_mc": [{"learning_rate": lr, "damping": d} for lr in (1e-3, 3e-3, 1e-2) for d in (1e-3, 1e-2, 1e-1)],
    "kfac": [{"learning_rate": lr, "damping": d} for lr in (3e-4, 1e-3, 3e-3) for d in (1e-3, 1e-2, 1e-1)],
}
QUICK_GRID = {name: points[1:3] for name, points in GRID.items()}


def _preconditioned(factory):
    def make(learning_rate, damping):
        return optax.chain(
            factory(damping, decay=DECAY), optax.trace(MOMENTUM), optax.scale_by_learning_rate(learning_rate)
        )

    return make


def optimizer(method: str, hyperparameters: dict) -> optax.GradientTransformationExtraArgs:
    """The method's optax transformation with its hyperparameters in the state (traced: one compile per method)."""
    if method == "sgd":
        return optax.inject_hyperparams(optax.sgd)(momentum=MOMENTUM, **hyperparameters)
    if method == "adam":
        return optax.inject_hyperparams(optax.adam)(**hyperparameters)
    factory = pc.diag_ggn_preconditioner if method == "diag_ggn_mc" else pc.kfac_preconditioner
    return optax.inject_hyperparams(_preconditioned(factory))(**hyperparameters)


def make_chunk(method: str, x: jax.Array, y: jax.Array):
    """A jitted ``(carry, batch_indices (K, B)) -> (carry, minibatch losses (K,))`` running K steps of ``method``."""
    opt = optimizer(method, GRID[method][0])  # update reads the hyperparameters from the state, not from here

    def step(carry, indices):
        net, state, key = carry
        xb, yb = x[indices], y[indices]
        key, sample_key = jax.random.split(key)
        loss, grads = pb.engine.compiled_value_and_grad(net, xb, yb, LOSS, "mean")
        extra = {}
        if method == "diag_ggn_mc":
            extra["curvature"] = pb.diag_ggn(net, xb, yb, loss=LOSS, mc_samples=1, key=sample_key)
        elif method == "kfac":
            extra["curvature"] = pb.kfac(net, xb, yb, loss=LOSS, mc_samples=1, key=sample_key)
        updates, state = opt.update(grads, state, net, **extra)
        return (optax.apply_updates(net, updates), state, key), loss

    return jax.jit(lambda carry, indices: jax.lax.scan(step, carry, indices))


def batch_schedule(pool: np.ndarray, steps: int, seed: int) -> np.ndarray:
    """(steps, BATCH) indices into ``pool``: one permutation per epoch, the last partial batch of each dropped."""
    rng, per_epoch = np.random.default_rng(seed), len(pool) // BATCH
    epochs = -(-steps // per_epoch)
    order = np.concatenate([rng.permutation(pool)[: per_epoch * BATCH] for _ in range(epochs)])
    return order.reshape(-1, BATCH)[:steps].astype(np.int32)


def train(chunk, method, hyperparameters, net0, pool, seed, plan, evaluate_on) -> tuple[list[dict], pb.Sequential]:
    """Train one run; return (a row every ``eval_every`` steps, step 0 included; the last network)."""
    net, opt = net0, optimizer(method, hyperparameters)
    carry = (net, opt.init(net), jax.random.key(seed + 1000))
    schedule = batch_schedule(pool, plan["steps"], seed)
    rows, seconds = [], 0.0

    def record(step, net, batch_loss):
        row = {"step": step, "train_seconds": seconds, "batch_loss": batch_loss}
        for name, (xs, ys) in evaluate_on.items():
            metrics = pb.evaluate(net, xs, ys, loss=LOSS)
            row[f"{name}_loss"], row[f"{name}_accuracy"] = metrics["loss"], metrics["accuracy"]
        rows.append(row)

    record(0, net, float("nan"))
    for start in range(0, plan["steps"], plan["eval_every"]):
        indices = jnp.asarray(schedule[start : start + plan["eval_every"]])
        started = time.perf_counter()
        carry, losses = jax.block_until_ready(chunk(carry, indices))
        seconds += time.perf_counter() - started
        record(start + len(indices), carry[0], float(jnp.mean(losses)))
        if not np.isfinite(rows[-1]["batch_loss"]):  # diverged: the rest would be NaN too
            break
    return rows, carry[0]


def time_per_step(chunks, carries, indices, repeats) -> dict[str, float]:
    """Median seconds per step of each method's compiled chunk, methods alternating in order each repeat."""
    times = {method: [] for method in chunks}
    order = list(chunks)
    for repeat in range(repeats):
        for method in order if repeat % 2 == 0 else reversed(order):
            started = time.perf_counter()
            jax.block_until_ready(chunks[method](carries[method], indices))
            times[method].append((time.perf_counter() - started) / indices.shape[0])
    return {method: statistics.median(values) for method, values in times.items()}


def main(argv=None) -> int:
    args = _common.parse_args(__doc__.split("\n\n")[0], argv)
    started = time.perf_counter()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    plan, grid = (QUICK, QUICK_GRID) if args.quick else (FULL, GRID)
    dataset = data.load_mnist1d()
    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    permutation = np.random.default_rng(args.seed).permutation(len(dataset.x_train))
    fit_pool, validation = permutation[:3000], permutation[3000:]
    all_pool = np.arange(len(dataset.x_train))
    validation_set = (dataset.x_train[validation], dataset.y_train[validation])
    sizes = (dataset.n_features, *plan["hidden"], dataset.num_classes)
    activations = ("relu",) * len(plan["hidden"]) + ("identity",)

    def initial(seed):
        return pb.init_mlp(jax.random.key(seed), sizes, activations)

    chunks = {method: make_chunk(method, x_train, y_train) for method in METHODS}
    compile_seconds = {}
    for method in METHODS:  # compile outside every clock, once per method
        opt = optimizer(method, grid[method][0])
        carry = (initial(args.seed), opt.init(initial(args.seed)), jax.random.key(0))
        tic = time.perf_counter()
        chunks[method] = chunks[method].lower(carry, jnp.zeros((plan["eval_every"], BATCH), jnp.int32)).compile()
        compile_seconds[method] = time.perf_counter() - tic

    tuning_rows, ranked = [], {}
    for method in METHODS:
        for point in _common.progress(grid[method], desc=f"tuning {method}"):
            rows, _ = train(chunks[method], method, point, initial(args.seed), fit_pool, args.seed, plan,
                            {"validation": validation_set})  # fmt: skip
            last = rows[-1]
            finished = last["step"] == plan["steps"] and np.isfinite(last["validation_loss"])
            tuning_rows.append({
                "method": method, "hyperparameters": point,
                "validation_accuracy": last["validation_accuracy"] if finished else float("nan"),
                "validation_loss": last["validation_loss"] if finished else float("nan"),
                "diverged": not finished,
            })  # fmt: skip
        candidates = [r for r in tuning_rows if r["method"] == method and not r["diverged"]]
        candidates.sort(key=lambda r: (-r["validation_accuracy"], r["validation_loss"]))
        ranked[method] = [r["hyperparameters"] for r in candidates]

    # the settings run on the test protocol: each method's best on validation, and its runner-up if the best
    # diverges on any seed (a rule fixed before the runs, so that one unstable pick does not stand for the method)
    seeds = [args.seed + s for s in range(plan["seeds"])]
    curves, settings, last_nets = [], [], {}
    evaluate_on = {"train": (dataset.x_train, dataset.y_train), "test": (dataset.x_test, dataset.y_test)}
    for method in METHODS:
        for rank, hyperparameters in enumerate(ranked[method][:2]):
            setting = {"method": method, "rank": rank, "hyperparameters": hyperparameters}
            settings.append(setting)
            diverged = False
            for seed in _common.progress(seeds, desc=f"final {method} #{rank + 1}"):
                rows, last_nets[method, rank, seed] = train(
                    chunks[method], method, hyperparameters, initial(seed), all_pool, seed, plan, evaluate_on
                )
                diverged |= rows[-1]["step"] < plan["steps"]
                curves += [{"method": method, "rank": rank, "seed": seed, **hyperparameters, **row} for row in rows]
            if not diverged:
                break

    # how much of the diagonal step the curvature sets, against the damping: median of c / (c + damping)
    damping = ranked["diag_ggn_mc"][0]["damping"]
    probe = (x_train[:512], y_train[:512])
    share = {
        "at step 0": curvature_share(initial(args.seed), damping, *probe),
        f"at step {plan['steps']}": curvature_share(last_nets["diag_ggn_mc", 0, args.seed], damping, *probe),
    }

    timing_net = initial(args.seed)
    carries = {}
    for method in METHODS:
        opt = optimizer(method, ranked[method][0])
        carries[method] = (timing_net, opt.init(timing_net), jax.random.key(0))
    timing_indices = jnp.asarray(batch_schedule(all_pool, plan["eval_every"], args.seed))
    per_step = time_per_step(chunks, carries, timing_indices, plan["timing_repeats"])
    elapsed = time.perf_counter() - started
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    stem = _common.output_stem(args, "curvature_preconditioner")
    columns = ("method", "rank", "seed", "learning_rate", "damping", "step", "train_seconds", "batch_loss",
               "train_loss", "train_accuracy", "test_loss", "test_accuracy")  # fmt: skip
    _common.write_csv(stem.with_suffix(".csv"), [{c: r.get(c, float("nan")) for c in columns} for r in curves])
    summary = summarize(curves, settings, per_step, plan, seeds)
    lines = report(args, plan, grid, load, load_after, elapsed, summary, tuning_rows, ranked, compile_seconds, seeds)
    lines[-1:-1] = curvature_lines(share, damping, args.seed)
    _common.write_markdown(stem.with_suffix(".md"), lines)
    plot(stem.with_suffix(".png"), curves, settings, seeds, plan)
    print("\n".join(lines))
    return 0


def curvature_share(net: pb.Sequential, damping: float, x: jax.Array, y: jax.Array) -> dict[str, float]:
    """Quantiles over all parameters of c / (c + damping), c the exact diagonal GGN on (x, y)."""
    curvature = pb.diag_ggn(net, x, y, loss=LOSS)
    values = np.concatenate([np.ravel(c) for c in jax.tree.leaves(curvature)])
    fractions = values / (values + damping)
    return {f"q{q}": float(np.quantile(fractions, q / 100)) for q in (10, 50, 90)}


def curvature_lines(share: dict, damping: float, seed: int) -> list[str]:
    rows = [{"diag GGN (MC) pick, seed " + str(seed): when, **{k: f"{v:.3f}" for k, v in q.items()}}
            for when, q in share.items()]  # fmt: skip
    return [
        "",
        f"## What the diagonal divides by: c / (c + damping), damping {damping:g}",
        "",
        "Over all parameters, c the exact diagonal GGN on the first 512 training examples; 0: the damping alone "
        "sets the step (SGD with learning rate lr / damping), 1: the curvature does. Quantiles 10 / 50 / 90 %.",
        "",
        *_common.markdown_table(rows, list(rows[0])),
    ]


def describe(hyperparameters: dict) -> tuple[str, str]:
    damping = hyperparameters.get("damping")
    return f"{hyperparameters['learning_rate']:g}", "—" if damping is None else f"{damping:g}"


def first_below(rows: list[dict], threshold: float) -> dict | None:
    """The first evaluation row whose training loss (all training examples) is below ``threshold``."""
    return next((r for r in rows if r["train_loss"] < threshold), None)


def summarize(curves, settings, per_step, plan, seeds) -> list[dict]:
    rows = []
    for setting in settings:
        method, rank = setting["method"], setting["rank"]
        runs = [[r for r in curves if (r["method"], r["rank"], r["seed"]) == (method, rank, seed)] for seed in seeds]
        complete = [run for run in runs if run[-1]["step"] == plan["steps"]]
        accuracy = [100 * run[-1]["test_accuracy"] for run in complete]
        per_seed = [
            f"{100 * run[-1]['test_accuracy']:.1f}" if run in complete else f"diverged (step {run[-1]['step']})"
            for run in runs
        ]
        reached = [first_below(run, LOSS_TARGET) for run in runs]
        hit = [r for r in reached if r is not None]
        lr, damping = describe(setting["hyperparameters"])
        rows.append({
            "method": LABELS[method] + ("" if rank == 0 else " (runner-up)"),
            "lr": lr, "damping": damping,
            f"test accuracy % at step {plan['steps']} (mean ± sd)":
                f"{np.mean(accuracy):.1f} ± {np.std(accuracy):.1f}"
                + ("" if len(complete) == len(runs) else f" ({len(complete)} of {len(runs)} seeds)")
                if accuracy else "diverged",
            "per seed": " / ".join(per_seed),
            "best test % on the way (mean)":
                f"{100 * np.mean([max(r['test_accuracy'] for r in run) for run in runs]):.1f}",
            "final train loss (mean of finished)":
                f"{np.mean([run[-1]['train_loss'] for run in complete]):.2g}" if complete else "—",
            f"steps to train loss < {LOSS_TARGET:g} (median)":
                f"{statistics.median(r['step'] for r in hit):.0f}" + ("" if len(hit) == len(runs) else
                                                                       f" ({len(hit)} of {len(runs)})")
                if hit else "not reached",
            f"training s to < {LOSS_TARGET:g} (median)":
                f"{statistics.median(r['train_seconds'] for r in hit):.1f}" if hit else "—",
            "ms per step (median)": f"{1000 * per_step[method]:.2f}",
            "× SGD's step": f"{per_step[method] / per_step['sgd']:.1f}",
        })  # fmt: skip
    return rows


def report(args, plan, grid, load, load_after, elapsed, summary, tuning_rows, ranked, compile_seconds, seeds):
    tuning = []
    for r in tuning_rows:
        lr, damping = describe(r["hyperparameters"])
        tuning.append({
            "method": LABELS[r["method"]], "lr": lr, "damping": damping,
            "validation accuracy %": "diverged" if r["diverged"] else f"{100 * r['validation_accuracy']:.1f}",
            "validation loss": "—" if r["diverged"] else f"{r['validation_loss']:.3f}",
            "validation rank": {0: "1st", 1: "2nd"}.get(
                next((i for i, h in enumerate(ranked[r["method"]]) if h == r["hyperparameters"]), None), ""),
        })  # fmt: skip
    edges = []
    for method in METHODS:
        for name, value in ranked[method][0].items():
            values = sorted({point[name] for point in grid[method]})
            if value in (values[0], values[-1]):
                edges.append(f"{LABELS[method]}'s {name.replace('_', ' ')} ({value:g})")
    compiles = ", ".join(f"{LABELS[m]} {s:.1f} s" for m, s in compile_seconds.items())
    network = "-".join(map(str, (40, *plan["hidden"], 10)))
    return [
        "# Curvature preconditioning on MNIST-1D",
        "",
        f"Command: `python -m experiments.curvature_preconditioner{' --quick' if args.quick else ''}`. Machine: "
        f"{_common.machine()}; load at the start: `{load}`; at the end: `{load_after}`. Whole run: {elapsed:.0f} s "
        f"wall. OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')} (see the script's docstring).",
        "",
        f"Network {network}, relu, softmax cross-entropy, float32, batch {BATCH}, {plan['steps']} steps for every "
        f"method, seeds {', '.join(map(str, seeds))}. Momentum {MOMENTUM} for SGD and both preconditioned methods; "
        f"moving average of the curvature with decay {DECAY} (bias-corrected) for both preconditioners; one "
        "Monte-Carlo sample per example for the diagonal GGN and for K-FAC's g. Learning rate and damping chosen by "
        "validation accuracy (3000 / 1000 split of the training set, one seed), then trained on all 4000 and tested "
        "on the package's 1000 test examples; a method whose pick diverges on any seed also runs its runner-up.",
        "",
        *_common.markdown_table(summary, list(summary[0])),
        "",
        f"Train loss: on all 4000 training examples, evaluated every {plan['eval_every']} steps (so the steps to "
        f"reach {LOSS_TARGET:g} are multiples of {plan['eval_every']}). ms per step: each method's compiled "
        f"{plan['eval_every']}-step program (value_and_grad + curvature + update, lax.scan) at its pick, "
        f"{plan['timing_repeats']} repeats, methods alternating in one process, medians. Training s: the runs' own "
        "measured time (evaluation excluded), under whatever load the machine had then. Compile time, once per "
        f"method for the whole grid and all seeds: {compiles}.",
        "",
        "Picks on the edge of their grid (the optimum may lie outside it): "
        + (", ".join(edges) if edges else "none")
        + ".",
        "",
        "## Tuning (validation split)",
        "",
        *_common.markdown_table(tuning, list(tuning[0])),
        "",
    ]


def plot(path, curves, settings, seeds, plan) -> None:
    plt = _common.pyplot()
    colors = {"sgd": "k", "adam": "C0", "diag_ggn_mc": "C1", "kfac": "C2"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for setting in settings:
        method, rank = setting["method"], setting["rank"]
        for index, seed in enumerate(seeds):
            rows = [r for r in curves if (r["method"], r["rank"], r["seed"]) == (method, rank, seed)]
            label = (LABELS[method] + ("" if rank == 0 else " (runner-up)")) if index == 0 else None
            style = dict(color=colors[method], alpha=0.7, linestyle="-" if rank == 0 else ":", label=label)
            for column, key in enumerate(("step", "train_seconds")):
                x = [r[key] for r in rows]
                axes[0, column].semilogy(x, [r["train_loss"] for r in rows], **style)
                axes[1, column].plot(x, [100 * r["test_accuracy"] for r in rows], **style)
    for column, name in enumerate(("steps", "training wall time (s), as measured")):
        axes[0, column].set_ylabel("training loss (all 4000 examples)")
        axes[1, column].set_ylabel("test accuracy %")
        axes[1, column].set_xlabel(name)
        axes[0, column].set_ylim(1e-6, 10)
        axes[1, column].set_ylim(0, 80)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"MNIST-1D, 40-{'-'.join(map(str, plan['hidden']))}-10 relu, batch {BATCH}; one line per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
