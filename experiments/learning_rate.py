"""Learning rate: the notes' theta <- theta - eta grad L on one fixed problem, from too small to divergent.

The problem: purebp's synthetic regression data (8 inputs, 2 outputs, 1600
training examples), an 8-32-2 tanh/identity MLP, mean squared error, float32,
full-batch gradient descent (``optax.sgd(eta)``, the notes' update) from the
same initial parameters for every eta. A run whose loss turns non-finite stops
with ``purebp.DivergenceError``; it is caught and recorded with its step.

Each run ends in one of three states: ``diverged`` (the loss became inf/NaN),
``unstable`` (finite, but the final loss is above the initial one) or
``stable``. The largest stable eta of the sweep is compared with 2 / lambda_max,
lambda_max the largest eigenvalue of the Hessian of L at the initial
parameters (power iteration on Hessian-vector products formed by central
differences of the hand-written gradient, float64): gradient descent on a
quadratic with that curvature is stable exactly for eta < 2 / lambda_max.
lambda_max is measured again at the end of the largest stable run: a network
is not a quadratic, and training can move to flatter regions where a step
that was too large at the start becomes stable.

    python -m experiments.learning_rate            # about a minute on 2 CPU cores
    python -m experiments.learning_rate --quick    # seconds

Writes learning_rate.csv (one row per eta and step), learning_rate.md (one
row per eta) and learning_rate.png.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)  # the curvature estimate runs in float64

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import purebp as pb  # noqa: E402
from experiments import _common  # noqa: E402
from purebp import data  # noqa: E402

LOSS = "mse"
SIZES = (8, 32, 2)
ACTIVATIONS = ("tanh", "identity")


def sweep(quick: bool) -> tuple[np.ndarray, int]:
    """Return (the learning rates, the number of gradient-descent steps per run)."""
    if quick:
        return np.array([0.01, 1.0, 100.0]), 20
    # five decades, plus a finer grid around the edge of stability (2/lambda_max at init is about 0.57)
    return np.unique(np.concatenate([np.geomspace(1e-3, 100.0, 21), np.geomspace(0.4, 2.5, 12)])), 300


def top_hessian_eigenvalue(net: pb.Sequential, x, y, *, iterations: int = 100, seed: int = 0) -> float:
    """Return lambda_max of the Hessian of L at ``net``: power iteration, Hv from central differences of the gradient.

    Runs in float64: Hv ~ (grad L(theta + eps v) - grad L(theta - eps v)) / (2 eps), eps = 1e-5, ||v|| = 1.
    """
    net = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), net)
    x, y = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
    leaves, treedef = jax.tree.flatten(net)
    shapes = [leaf.shape for leaf in leaves]
    flat = jnp.concatenate([leaf.ravel() for leaf in leaves])

    def gradient(vector):
        parts, start = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            parts.append(vector[start : start + size].reshape(shape))
            start += size
        grads = pb.grad(jax.tree.unflatten(treedef, parts), x, y, loss=LOSS)
        return jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(grads)])

    eps = 1e-5
    v = jax.random.normal(jax.random.key(seed), flat.shape, dtype=jnp.float64)
    v = v / jnp.linalg.norm(v)
    eigenvalue = 0.0
    for _ in range(iterations):
        hv = (gradient(flat + eps * v) - gradient(flat - eps * v)) / (2 * eps)
        eigenvalue = float(v @ hv)  # Rayleigh quotient, ||v|| = 1
        v = hv / jnp.linalg.norm(hv)
    return eigenvalue


def run(args) -> tuple[list[dict], list[dict], float, float]:
    """Return (per-step rows, per-eta summary rows, lambda_max at the start, lambda_max at the end of the run with
    the largest stable eta)."""
    etas, steps = sweep(args.quick)
    dataset = data.load("synthetic-regression", seed=args.seed)
    x, y = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    net = pb.init_mlp(jax.random.key(args.seed), SIZES, ACTIVATIONS)
    curvature = top_hessian_eigenvalue(net, x, y, iterations=10 if args.quick else 100, seed=args.seed)
    curves, summary, finals = [], [], {}
    for eta in _common.progress(etas, desc="learning rates"):
        eta = float(eta)
        try:
            finals[eta], history = pb.fit(net, (x, y), loss=LOSS, optimizer=optax.sgd(eta), steps=steps)
            diverged_at = None
        except pb.DivergenceError as error:
            history, diverged_at = error.history, error.step
        # full batch: epoch k is step k, and its train_loss is L at the parameters after k updates
        losses = history["train_loss"]
        for step, value in enumerate(losses):
            curves.append({"eta": eta, "step": step, "loss": value})
        if diverged_at is not None:
            status = "diverged"
        elif losses[-1] > losses[0]:
            status = "unstable"
        else:
            status = "stable"
        summary.append(
            {
                "η": eta,
                "η λ_max / 2": eta * curvature / 2,
                "status": status,
                "diverged at step": diverged_at if diverged_at is not None else "",
                "initial loss": losses[0] if losses else float("nan"),
                "final finite loss": losses[-1] if losses else float("nan"),
                "lowest loss": min(losses) if losses else float("nan"),
            }
        )
    stable = largest_stable(summary)
    iterations = 10 if args.quick else 100
    end_curvature = (
        float("nan")
        if np.isnan(stable)
        else top_hessian_eigenvalue(finals[stable], x, y, iterations=iterations, seed=args.seed)
    )
    return curves, summary, curvature, end_curvature


def largest_stable(summary: list[dict]) -> float:
    """The largest eta whose run is stable (NaN when none is)."""
    return max((r["η"] for r in summary if r["status"] == "stable"), default=float("nan"))


def write_markdown(path, args, summary, curvature, end_curvature) -> None:
    etas, steps = sweep(args.quick)
    command = "python -m experiments.learning_rate" + (" --quick" if args.quick else "")
    best = min(summary, key=lambda r: r["final finite loss"] if r["status"] == "stable" else float("inf"))
    lines = [
        "# Learning rate: θ ← θ − η∇L, from too small to divergent",
        "",
        f"Command: `{command}` (seed {args.seed}). Machine: {_common.machine()}.",
        "",
        f"Synthetic regression (8 inputs, 2 outputs, 1600 training examples), {'-'.join(map(str, SIZES))} "
        f"tanh/identity MLP, mean squared error, float32, {steps} full-batch gradient-descent steps from the same "
        f"initial parameters for each of {len(etas)} learning rates. `diverged`: the loss became non-finite "
        "(`purebp.DivergenceError`, caught; the step is the first non-finite one); `unstable`: finite, but the final "
        "loss is above the initial one; `stable`: otherwise.",
        "",
        f"- λ_max of the Hessian at the initial parameters: {curvature:.4g}, so 2/λ_max = {2 / curvature:.4g}",
        f"- largest stable η in the sweep: {largest_stable(summary):.4g}; λ_max at the end of that run: "
        f"{end_curvature:.4g} (2/λ_max = {2 / end_curvature:.4g})",
        f"- lowest final loss: η = {best['η']:.4g} ({best['final finite loss']:.4g})",
        "",
        *_common.markdown_table(
            summary,
            ["η", "η λ_max / 2", "status", "diverged at step", "initial loss", "final finite loss", "lowest loss"],
            {"η": ".3g", "η λ_max / 2": ".3g", "initial loss": ".4g", "final finite loss": ".4g", "lowest loss": ".4g"},
        ),
        "",
        "Per-step losses: `learning_rate.csv`. Picture: `learning_rate.png`.",
    ]
    _common.write_markdown(path, lines)


def plot(path, curves, summary, curvature, end_curvature) -> None:
    plt = _common.pyplot()
    from matplotlib.colors import LogNorm

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    etas = np.array([r["η"] for r in summary])
    norm = LogNorm(etas.min(), etas.max())
    colormap = plt.get_cmap("plasma")
    initial = summary[0]["initial loss"]
    lowest = min(r["lowest loss"] for r in summary)
    top = 10 * initial  # diverging curves leave the plot here; their last finite loss is in the table
    for row in summary:
        color = colormap(norm(row["η"]))
        points = [(c["step"], c["loss"]) for c in curves if c["eta"] == row["η"]]
        if points:  # a run that diverges at step 0 has no finite loss to draw
            left.plot(*zip(*points), color=color, linewidth=1)
        if row["status"] == "diverged":
            left.plot(row["diverged at step"], top, marker="x", color=color, markersize=8, clip_on=False)
    left.set_yscale("log")
    left.set_ylim(lowest / 2, top)
    left.set_xlabel("gradient-descent step")
    left.set_ylabel("training loss (mean squared error)")
    left.set_title("Loss per step, colour = η (× on the top edge: diverged at that step)", fontsize=10)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=colormap), ax=left, label="learning rate η")
    stable = [r for r in summary if r["status"] != "diverged"]  # stable and unstable: both finite
    right.plot(
        [r["η"] for r in stable],
        [r["final finite loss"] for r in stable],
        "o-",
        color="tab:green",
        label=f"final loss after {max(c['step'] for c in curves) + 1} steps",
    )
    diverged = [r["η"] for r in summary if r["status"] == "diverged"]
    right.plot(
        diverged,
        [top] * len(diverged),
        "x",
        color="tab:red",
        markersize=9,
        clip_on=False,
        label="diverged (DivergenceError)",
    )
    right.axvline(
        2 / curvature, color="black", linestyle="--", linewidth=1, label=f"2/λ_max at init = {2 / curvature:.3g}"
    )
    if not np.isnan(end_curvature):
        right.axvline(
            2 / end_curvature,
            color="tab:blue",
            linestyle=":",
            linewidth=1.5,
            label=f"2/λ_max at the end of the largest stable run = {2 / end_curvature:.3g}",
        )
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_ylim(lowest / 2, top)
    right.set_xlabel("learning rate η")
    right.set_ylabel("final training loss")
    right.set_title(f"Final loss against η (largest stable η = {largest_stable(summary):.3g})")
    right.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = _common.parse_args(__doc__.split("\n\n")[0], argv)
    stem = _common.output_stem(args, "learning_rate")
    curves, summary, curvature, end_curvature = run(args)
    _common.write_csv(stem.with_suffix(".csv"), curves)
    write_markdown(stem.with_suffix(".md"), args, summary, curvature, end_curvature)
    plot(stem.with_suffix(".png"), curves, summary, curvature, end_curvature)
    print(
        f"2/lambda_max at init = {2 / curvature:.4g}; largest stable eta = {largest_stable(summary):.4g}, "
        f"2/lambda_max at its end = {2 / end_curvature:.4g}"
    )
    for row in summary:
        print(
            f"  eta {row['η']:<10.4g} {row['status']:<9} {row['diverged at step']!s:>4} "
            f"final loss {row['final finite loss']:.4g}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
