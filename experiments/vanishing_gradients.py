"""Vanishing gradients: the notes' G'(z^l) factor at every layer, against depth and activation.

The backward pass multiplies by G'(z^l) once per layer:
delta^l = ((W^{l+1})^T delta^{l+1}) (.) G'(z^l). For the sigmoid
sigma'(z) = sigma(z) (1 - sigma(z)) <= 1/4, so each hidden layer can shrink
delta by up to 4x on top of what W^T does; tanh' <= 1 (equal to 1 only at 0);
relu' is exactly 0 or 1.

For sigmoid, tanh and relu MLPs with 2 to 20 hidden layers of width 64 on
scikit-learn's digits (init_mlp's defaults: Glorot for sigmoid/tanh, He for
relu) this measures, with ``purebp.backprop_trace`` on 512 training examples,
at initialisation and after some SGD:

- ||delta^l||: the per-example L2 norm of dC^n/dz^l, averaged over examples,
- ||dL/dW^l||: the Frobenius norm of the gradient of the mean loss,
- the mean and max of G'(z^l) over examples and units.

    python -m experiments.vanishing_gradients            # about 2 minutes on 2 CPU cores
    python -m experiments.vanishing_gradients --quick    # seconds

Writes vanishing_gradients.csv (one row per network, phase and layer),
vanishing_gradients.md (one row per network and phase) and vanishing_gradients.png.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import purebp as pb
from experiments import _common
from purebp import activations, data

LOSS = "softmax_cross_entropy"
ACTIVATIONS = ("sigmoid", "tanh", "relu")


def settings(quick: bool) -> dict:
    """Depths (hidden layers), width, examples measured, SGD steps, batch size and learning rate."""
    if quick:
        return {"depths": (2,), "width": 16, "examples": 64, "steps": 20, "batch_size": 32, "learning_rate": 0.1}
    return {
        "depths": (2, 5, 10, 15, 20),
        "width": 64,
        "examples": 512,
        "steps": 500,
        "batch_size": 64,
        "learning_rate": 0.1,
    }


def measure(net: pb.Network, x, y) -> tuple[float, list[dict]]:
    """Return (mean loss on (x, y), one dict per layer l = 1..L).

    Each dict holds ||delta^l||, ||dL/dW^l||, ||dL/db^l|| and the mean and max of G'(z^l).
    """
    trace = pb.backprop_trace(net, x, y, loss=LOSS, reduction="sum")  # deltas per example: dC^n/dz^l
    n = x.shape[0]
    rows = []
    for l, (z, a, delta, layer_grad, name) in enumerate(
        zip(trace.pre_activations, trace.activations, trace.deltas, trace.grads.layers, net.activations), start=1
    ):
        g_prime = activations.get(name).derivative(z, a)
        rows.append(
            {
                "layer": l,
                "delta_norm": float(jnp.mean(jnp.linalg.norm(delta, axis=1))),
                "grad_w_norm": float(jnp.linalg.norm(layer_grad.w)) / n,  # gradient of the mean loss L
                "grad_b_norm": float(jnp.linalg.norm(layer_grad.b)) / n,
                "g_prime_mean": float(jnp.mean(g_prime)),
                "g_prime_max": float(jnp.max(g_prime)),
            }
        )
    return float(trace.loss) / n, rows


def train(net: pb.Network, dataset: data.Dataset, config: dict, seed: int) -> tuple[pb.Network, str]:
    """SGD for config["steps"] steps; return (net, status). On divergence: the last net with a finite loss."""
    try:
        net, _ = pb.fit(
            net,
            dataset.train,
            loss=LOSS,
            optimizer=optax.sgd(config["learning_rate"]),
            steps=config["steps"],
            batch_size=config["batch_size"],
            key=jax.random.key(seed + 1),
        )
        return net, "trained"
    except pb.DivergenceError as error:
        return error.net, f"diverged at step {error.step}; the last finite parameters"


def run(args) -> tuple[list[dict], list[dict]]:
    """Return (per-layer rows, per-network summary rows) for every activation, depth and phase."""
    config = settings(args.quick)
    dataset = data.load_digits()
    x, y = jnp.asarray(dataset.x_train[: config["examples"]]), jnp.asarray(dataset.y_train[: config["examples"]])
    layers, summary = [], []
    jobs = [(name, depth) for name in ACTIVATIONS for depth in config["depths"]]
    for name, depth in _common.progress(jobs, desc="networks"):
        sizes = (dataset.n_features, *(config["width"],) * depth, dataset.n_outputs)
        net = pb.init_mlp(jax.random.key(args.seed), sizes, (name,) * depth + ("identity",))
        trained, status = train(net, dataset, config, args.seed)
        for phase, model in (("init", net), ("trained", trained)):
            loss_value, rows = measure(model, x, y)
            hidden = rows[:-1]
            first, last = rows[0], rows[-1]
            factors = [r["g_prime_mean"] for r in hidden]
            for r in rows:
                layers.append({"activation": name, "hidden_layers": depth, "phase": phase, **r})
            summary.append(
                {
                    "activation": name,
                    "hidden layers": depth,
                    "phase": "init" if phase == "init" else f"{config['steps']} SGD steps ({status})",
                    "loss": loss_value,
                    "‖δ¹‖": first["delta_norm"],
                    "‖δᴸ‖": last["delta_norm"],
                    "‖δ¹‖/‖δᴸ‖": first["delta_norm"] / last["delta_norm"],
                    "‖∂L/∂W¹‖": first["grad_w_norm"],
                    "‖∂L/∂Wᴸ‖": last["grad_w_norm"],
                    "mean G′ (hidden)": float(np.mean(factors)),
                    "max G′ (hidden)": max(r["g_prime_max"] for r in hidden),
                    "∏ mean G′": float(np.prod(factors)),
                }
            )
    return layers, summary


COLUMNS = (
    "activation",
    "hidden layers",
    "phase",
    "loss",
    "‖δ¹‖",
    "‖δᴸ‖",
    "‖δ¹‖/‖δᴸ‖",
    "‖∂L/∂W¹‖",
    "‖∂L/∂Wᴸ‖",
    "mean G′ (hidden)",
    "max G′ (hidden)",
    "∏ mean G′",
)


def write_markdown(path, args, summary) -> None:
    config = settings(args.quick)
    command = "python -m experiments.vanishing_gradients" + (" --quick" if args.quick else "")
    lines = [
        "# Vanishing gradients: G'(z^l) at every layer",
        "",
        f"Command: `{command}` (seed {args.seed}). Machine: {_common.machine()}.",
        "",
        f"MLPs {dataset_sizes(config)} on digits, softmax cross-entropy; measured with `purebp.backprop_trace` on "
        f"{config['examples']} training examples at initialisation and after {config['steps']} steps of SGD "
        f"(η = {config['learning_rate']}, batch {config['batch_size']}). Layer 1 is the first hidden layer, layer L "
        "the output layer. loss: the mean loss on those examples. ‖δˡ‖: per-example L2 norm of dCⁿ/dzˡ, "
        "averaged over examples; ‖∂L/∂Wˡ‖: Frobenius "
        "norm of the gradient of the mean loss; G′ statistics over every example and unit of the hidden layers; "
        "∏ mean G′: the product over hidden layers of the layer's mean G′(zˡ), the part of ‖δ¹‖/‖δᴸ‖ that "
        "G′ alone contributes (for the sigmoid it is at most (1/4)^hidden layers).",
        "",
        *_common.markdown_table(summary, COLUMNS, {"loss": ".3g", "mean G′ (hidden)": ".3f"}),
        "",
        "Per-layer numbers: `vanishing_gradients.csv`. Picture: `vanishing_gradients.png`.",
    ]
    _common.write_markdown(path, lines)


def dataset_sizes(config: dict) -> str:
    return f"64-({config['width']} × {{{', '.join(map(str, config['depths']))}}})-10"


def plot(path, layers: list[dict], config: dict) -> None:
    plt = _common.pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(3, len(ACTIVATIONS), figsize=(15, 11), squeeze=False)
    colormap = plt.get_cmap("viridis")
    depths = config["depths"]
    panels = (
        ("delta_norm", "‖δˡ‖ (per example, mean)"),
        ("grad_w_norm", "‖∂L/∂Wˡ‖ (Frobenius)"),
        ("g_prime_mean", "mean G′(zˡ), hidden layers"),
    )
    for column, name in enumerate(ACTIVATIONS):
        for row, (key, label) in enumerate(panels):
            ax = axes[row, column]
            for i, depth in enumerate(depths):
                color = colormap(i / max(1, len(depths) - 1))
                for phase, style in (("init", "-"), ("trained", "--")):
                    rows = [
                        r for r in layers if (r["activation"], r["hidden_layers"], r["phase"]) == (name, depth, phase)
                    ]
                    if key == "g_prime_mean":
                        rows = rows[:-1]  # the output layer is the identity
                    ax.plot(
                        [r["layer"] for r in rows],
                        [r[key] for r in rows],
                        style,
                        color=color,
                        marker=".",
                        label=f"{depth} hidden, {phase}",
                    )
            if key == "g_prime_mean":
                if name == "sigmoid":
                    ax.axhline(0.25, color="red", linestyle=":", linewidth=1.5)
                    ax.text(1, 0.252, "σ′ ≤ 1/4", color="red", fontsize=9, va="bottom")
                ax.set_ylim(0, 1.05)
            else:
                ax.set_yscale("log")
            ax.set_title(f"{name}: {label}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("layer l (1 = first hidden, last = output)")
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.suptitle("Vanishing gradients: solid = at initialisation, dashed = after SGD; colour = depth")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = _common.parse_args(__doc__.split("\n\n")[0], argv)
    stem = _common.output_stem(args, "vanishing_gradients")
    layers, summary = run(args)
    _common.write_csv(stem.with_suffix(".csv"), layers)
    write_markdown(stem.with_suffix(".md"), args, summary)
    plot(stem.with_suffix(".png"), layers, settings(args.quick))
    for row in summary:
        print(
            f"{row['activation']:>8} {row['hidden layers']:>2} hidden, {row['phase']:<30} "
            f"‖δ¹‖/‖δᴸ‖ = {row['‖δ¹‖/‖δᴸ‖']:.2e}, mean G′ = {row['mean G′ (hidden)']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
