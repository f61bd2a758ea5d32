"""Training curves: does the hand-written gradient train like jax.grad, and how do the optimizers compare?

On scikit-learn's digits and on MNIST-1D (Greydanus 2020):

1. Hand-written vs autodiff: the same network, key and minibatches trained with
   ``fit(..., gradient="handwritten")`` and ``fit(..., gradient="autodiff")``
   (plain SGD, the notes' theta <- theta - eta grad L), in float32 and float64.
   The loss curves are overlaid; the table gives the largest parameter
   difference at the end, max |theta_hand - theta_auto| over all entries.
2. Optimizers, same network and number of epochs (the same number of
   examples seen): full-batch gradient descent (gd), minibatch SGD, SGD with
   momentum 0.9, Adam (all optax). Final test accuracy per optimizer, on
   MNIST-1D beside the baselines published with the dataset.

    python -m experiments.training_curves            # about 2-3 minutes on 2 CPU cores
    python -m experiments.training_curves --quick    # a few seconds, tiny networks

Writes training_curves.csv (one row per run and epoch), training_curves.md and
training_curves.png.
"""

from __future__ import annotations

import dataclasses

import jax

jax.config.update("jax_enable_x64", True)  # float64 runs of the hand-written vs autodiff comparison

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import purebp as pb  # noqa: E402
from experiments import _common  # noqa: E402
from purebp import data  # noqa: E402

LOSS = "softmax_cross_entropy"
OPTIMIZERS = ("gd", "sgd", "momentum", "adam")
# MNIST-1D test accuracy published in the dataset's README (github.com/greydanus/mnist1d, "Comparing MNIST and
# MNIST-1D"); the MLP is 40-100-100-10 relu trained with Adam 1e-2, batch 100, 6000 steps.
PUBLISHED_MNIST1D = {"logistic regression": 0.32, "MLP": 0.68, "CNN": 0.94, "GRU": 0.91, "human expert": 0.96}
# The authors' PyTorch MLP code rerun here (5 seeds, 2-core CPU machine of this project; see the training issue)
RERUN_MNIST1D_MLP = "65.5 ± 0.5%"


@dataclasses.dataclass(frozen=True)
class Study:
    """One dataset's setup: the network, the epochs, the minibatch size and each optimizer's learning rate."""

    dataset: str
    hidden: tuple[int, ...]
    epochs: int
    batch_size: int
    learning_rates: dict[str, float]


def studies(quick: bool) -> list[Study]:
    """digits: `purebp train`'s defaults; MNIST-1D: the authors' MLP (6000 steps of batch 100 = 150 epochs)."""
    rates_digits = {"gd": 0.5, "sgd": 0.1, "momentum": 0.01, "adam": 1e-3}
    rates_mnist1d = {"gd": 0.5, "sgd": 0.1, "momentum": 0.01, "adam": 1e-2}
    if quick:
        return [Study("digits", (16,), 2, 64, rates_digits)]  # MNIST-1D alone takes 5 s to generate
    return [Study("digits", (256,), 30, 32, rates_digits), Study("mnist1d", (100, 100), 150, 100, rates_mnist1d)]


def train(study: Study, dataset: data.Dataset, optimizer: str, gradient: str, dtype: str, seed: int):
    """Train one network; return (trained net, history). Same seed: same initial net and minibatch order."""
    x_train, y_train = jnp.asarray(dataset.x_train, dtype), jnp.asarray(dataset.y_train)
    x_test, y_test = jnp.asarray(dataset.x_test, dtype), jnp.asarray(dataset.y_test)
    sizes = (dataset.n_features, *study.hidden, dataset.n_outputs)
    net = pb.init_mlp(jax.random.key(seed), sizes, ("relu",) * len(study.hidden) + ("identity",), dtype=dtype)
    batch_size = len(x_train) if optimizer == "gd" else study.batch_size
    return pb.fit(
        net,
        (x_train, y_train),
        loss=LOSS,
        optimizer=pb.make_optimizer(optimizer, study.learning_rates[optimizer]),
        epochs=study.epochs,
        batch_size=batch_size,
        key=jax.random.key(seed + 1),
        eval=(x_test, y_test),
        gradient=gradient,
    )


def max_difference(a: pb.Sequential, b: pb.Sequential) -> tuple[float, float]:
    """Return (max |a - b| over all parameters, ||a - b||_2 / ||b||_2 over the whole parameter vector)."""
    diffs = [
        np.asarray(x, np.float64) - np.asarray(y, np.float64) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    ]
    norm_b = np.sqrt(sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(b)))
    largest = max(float(np.max(np.abs(d))) for d in diffs)
    return largest, float(np.sqrt(sum(float(np.sum(d * d)) for d in diffs)) / norm_b)


def network_name(study: Study) -> str:
    """The layer widths of the study's network, e.g. 40-100-100-10."""
    n_in = {"digits": 64, "mnist1d": 40}[study.dataset]
    return "-".join(map(str, (n_in, *study.hidden, 10)))


def seeds(args) -> tuple[int, ...]:
    """The optimizer comparison runs three seeds (one in --quick); the hand-vs-autodiff pairs use the first."""
    return (args.seed,) if args.quick else (args.seed, args.seed + 1, args.seed + 2)


def dtypes(args) -> tuple[str, ...]:
    """The hand-vs-autodiff pairs run in float32 and float64 (float32 only in --quick, to save compiles)."""
    return ("float32",) if args.quick else ("float32", "float64")


def run(args) -> tuple[list[dict], list[dict], list[dict]]:
    """Return (per-epoch rows, hand-vs-autodiff rows, final-accuracy rows) for every study."""
    pairs = [("sgd", g, d, args.seed) for d in dtypes(args) for g in ("handwritten", "autodiff")]
    others = [(o, "handwritten", "float32", s) for s in seeds(args) for o in OPTIMIZERS if (o, s) != ("sgd", args.seed)]
    jobs = [(study, *job) for study in studies(args.quick) for job in pairs + others]
    datasets = {s.dataset: data.load(s.dataset) for s in studies(args.quick)}
    curves, nets = [], {}
    for study, optimizer, gradient, dtype, seed in _common.progress(jobs, desc="training runs"):
        run_key = (study.dataset, optimizer, gradient, dtype, seed)
        nets[run_key], history = train(study, datasets[study.dataset], optimizer, gradient, dtype, seed)
        for i in range(len(history["epoch"])):
            curves.append(
                {
                    **dict(zip(("dataset", "optimizer", "gradient", "dtype", "seed"), run_key)),
                    "epoch": history["epoch"][i] + 1,
                    "step": history["step"][i],
                    "train_loss": history["train_loss"][i],
                    "test_loss": history["eval_loss"][i],
                    "test_accuracy": history["eval_accuracy"][i],
                }
            )

    def last(dataset, optimizer, gradient, dtype, seed, column):
        rows = [
            r
            for r in curves
            if (r["dataset"], r["optimizer"], r["gradient"], r["dtype"], r["seed"])
            == (dataset, optimizer, gradient, dtype, seed)
        ]
        return [r[column] for r in rows]

    agreement, finals = [], []
    for study in studies(args.quick):
        for dtype in dtypes(args):
            hand, auto = (nets[study.dataset, "sgd", g, dtype, args.seed] for g in ("handwritten", "autodiff"))
            largest, relative = max_difference(hand, auto)
            losses = [
                last(study.dataset, "sgd", g, dtype, args.seed, "train_loss") for g in ("handwritten", "autodiff")
            ]
            agreement.append(
                {
                    "dataset": study.dataset,
                    "dtype": dtype,
                    "steps": last(study.dataset, "sgd", "handwritten", dtype, args.seed, "step")[-1],
                    "max abs Δθ": largest,
                    "rel L2 Δθ": relative,
                    "max abs ΔL per epoch": float(np.max(np.abs(np.subtract(*losses)))),
                    "final train loss": losses[0][-1],
                }
            )
        for optimizer in OPTIMIZERS:
            accuracy = 100 * np.array(
                [last(study.dataset, optimizer, "handwritten", "float32", s, "test_accuracy")[-1] for s in seeds(args)]
            )
            train_loss = [
                last(study.dataset, optimizer, "handwritten", "float32", s, "train_loss")[-1] for s in seeds(args)
            ]
            finals.append(
                {
                    "dataset": study.dataset,
                    "optimizer": optimizer,
                    "learning rate": study.learning_rates[optimizer],
                    "batch": "full" if optimizer == "gd" else study.batch_size,
                    "steps": last(study.dataset, optimizer, "handwritten", "float32", args.seed, "step")[-1],
                    "final train loss (mean)": float(np.mean(train_loss)),
                    "test accuracy per seed (%)": ", ".join(f"{a:.1f}" for a in accuracy),
                    "test accuracy (%)": float(np.mean(accuracy)),
                    "std (%)": float(np.std(accuracy, ddof=1)) if len(accuracy) > 1 else float("nan"),
                }
            )
    return curves, agreement, finals


def write_markdown(path, args, agreement, finals) -> None:
    command = "python -m experiments.training_curves" + (" --quick" if args.quick else "")
    lines = [
        "# Training curves: hand-written vs autodiff gradients, and four optimizers",
        "",
        f"Command: `{command}` (seed {args.seed}). Machine: {_common.machine()}.",
        "",
        "## Hand-written vs jax.grad, trained side by side",
        "",
        "Same network, initial parameters and minibatches; plain SGD (η = 0.1). max abs Δθ is the largest difference "
        "of any parameter after the last step; rel L2 Δθ is ‖θ_hand − θ_auto‖₂ / ‖θ_auto‖₂ over the whole parameter "
        "vector; max abs ΔL per epoch the largest difference of the per-epoch mean training loss.",
        "",
        *_common.markdown_table(
            agreement,
            ["dataset", "dtype", "steps", "max abs Δθ", "rel L2 Δθ", "max abs ΔL per epoch", "final train loss"],
            {"max abs Δθ": ".1e", "rel L2 Δθ": ".1e", "max abs ΔL per epoch": ".1e", "final train loss": ".4f"},
        ),
        "",
        f"## Optimizers (float32, hand-written gradient, seeds {', '.join(map(str, seeds(args)))})",
        "",
        "Same number of epochs for each (gd: one full-batch step per epoch), relu MLPs "
        + ", ".join(f"{st.dataset} {network_name(st)}" for st in studies(args.quick))
        + " (standardised inputs).",
        "",
        *_common.markdown_table(
            finals,
            [
                "dataset",
                "optimizer",
                "learning rate",
                "batch",
                "steps",
                "final train loss (mean)",
                "test accuracy per seed (%)",
                "test accuracy (%)",
                "std (%)",
            ],
            {"final train loss (mean)": ".3g", "test accuracy (%)": ".1f", "std (%)": ".1f"},
        ),
        "",
        "## MNIST-1D: published baselines",
        "",
        'From the dataset\'s README (github.com/greydanus/mnist1d, table "Comparing MNIST and MNIST-1D", test '
        "accuracy on the 1000 test examples):",
        "",
        "| model | test accuracy |",
        "|---|---|",
        *[f"| {model} (published) | {100 * value:.0f}% |" for model, value in PUBLISHED_MNIST1D.items()],
        f"| MLP, the authors' PyTorch code rerun on this project's machine kind (5 seeds) | {RERUN_MNIST1D_MLP} |",
        *[
            f"| purebp MLP, {r['optimizer']} (this run) | {r['test accuracy (%)']:.1f}% |"
            for r in finals
            if r["dataset"] == "mnist1d"
        ],
        "",
        "Picture: `training_curves.png`.",
    ]
    _common.write_markdown(path, lines)


def plot(path, curves, agreement, studies_: list[Study], seed: int) -> None:
    plt = _common.pyplot()
    fig, axes = plt.subplots(len(studies_), 3, figsize=(15, 4 * len(studies_)), squeeze=False)
    colors = {"gd": "tab:gray", "sgd": "tab:blue", "momentum": "tab:green", "adam": "tab:red"}

    def series(dataset, optimizer, gradient, dtype, column):
        rows = [
            r
            for r in curves
            if (r["dataset"], r["optimizer"], r["gradient"], r["dtype"], r["seed"])
            == (dataset, optimizer, gradient, dtype, seed)
        ]
        return [r["epoch"] for r in rows], [r[column] for r in rows]

    for row, study in enumerate(studies_):
        ax = axes[row, 0]
        worst = {r["dtype"]: r["max abs Δθ"] for r in agreement if r["dataset"] == study.dataset}
        for dtype, color in (("float32", "tab:blue"), ("float64", "tab:purple"))[: len(worst)]:
            ax.plot(
                *series(study.dataset, "sgd", "handwritten", dtype, "train_loss"),
                color=color,
                linewidth=3,
                alpha=0.5,
                label=f"hand-written, {dtype}",
            )
            ax.plot(
                *series(study.dataset, "sgd", "autodiff", dtype, "train_loss"),
                color="black",
                linestyle=":",
                linewidth=1.2,
                label=f"jax.grad, {dtype}" if dtype == "float64" else "jax.grad",
            )
        ax.set_title(
            f"{study.dataset}: SGD, hand-written vs jax.grad\nmax |Δθ| at the end: "
            + ", ".join(f"{value:.0e} ({dtype})" for dtype, value in worst.items()),
            fontsize=10,
        )
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
        for column, (name, label) in enumerate((("train_loss", "training loss"), ("test_accuracy", "test accuracy"))):
            ax = axes[row, column + 1]
            for optimizer in OPTIMIZERS:
                ax.plot(
                    *series(study.dataset, optimizer, "handwritten", "float32", name),
                    color=colors[optimizer],
                    label=f"{optimizer} (η={study.learning_rates[optimizer]:g})",
                )
            if name == "train_loss":
                ax.set_yscale("log")
            elif study.dataset == "mnist1d":
                ax.axhline(PUBLISHED_MNIST1D["MLP"], color="black", linestyle="--", linewidth=1)
                ax.text(1, PUBLISHED_MNIST1D["MLP"] - 0.03, "published MLP: 68%", fontsize=8)
            ax.set_title(f"{study.dataset}: {label}, four optimizers (seed {seed})", fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = _common.parse_args(__doc__.split("\n\n")[0], argv)
    stem = _common.output_stem(args, "training_curves")
    curves, agreement, finals = run(args)
    _common.write_csv(stem.with_suffix(".csv"), curves)
    write_markdown(stem.with_suffix(".md"), args, agreement, finals)
    plot(stem.with_suffix(".png"), curves, agreement, studies(args.quick), args.seed)
    for row in agreement:
        print(f"{row['dataset']} {row['dtype']}: max |Δθ| hand-written vs jax.grad = {row['max abs Δθ']:.2e}")
    for row in finals:
        print(f"{row['dataset']} {row['optimizer']}: test accuracy {row['test accuracy per seed (%)']}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
