"""Vanishing gradients: the notes' G'(z^l) factor at every layer, against depth and activation; skips and norms.

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

The same for three variants of the deep sigmoid and relu networks, built with
``purebp.init_network`` (same key, same SGD), each with the same number of
hidden dense layers of width 64:

- ``residual``: dense(64, G), then (depth - 1) x residual(dense(64, G)), then dense(10);
  the chain rule's Case 2 adds dC/d(block output) to what comes back through
  the body, so the identity path carries delta past every G'(z);
- ``layernorm``: every hidden dense(64, G) followed by layer_norm();
- ``residual+layernorm``: dense(64, G), then (depth - 1) pre-norm blocks
  residual(layer_norm(), dense(64, G)), then dense(10).

||delta^1|| / ||delta^L|| is always trace.deltas[0] against trace.deltas[-1]:
both are dense layers (the first hidden one and the output one), so both are
dC^n/dz. In between, a residual block's or a layer norm's delta is
dC^n/d(its output), the delta flowing into the block from above. A network
"trains" when its test accuracy after SGD is >= 90% (digits, chance 10%).

    python -m experiments.vanishing_gradients            # a few minutes on 2 CPU cores
    python -m experiments.vanishing_gradients --quick    # seconds

Writes vanishing_gradients.csv (one row per network, phase and top-level layer),
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
# the variants of the deep sigmoid and relu networks; "mlp" is init_mlp's plain stack, as before
VARIANTS = ("mlp", "residual", "layernorm", "residual+layernorm")
VARIANT_ACTIVATIONS = ("sigmoid", "relu")
# test accuracy after training at or above which a network "trains", and below which it is stuck at chance
TRAINS_ACCURACY = 0.90
CHANCE_ACCURACY = 0.20


def settings(quick: bool) -> dict:
    """Depths (hidden layers), width, examples measured, SGD steps, batch size and learning rate.

    ``variants`` and ``variant_activations``: the residual and layer-norm variants that run, and for which
    activations (in --quick two variants, relu only: between them every layer kind and every measuring path).
    """
    if quick:
        return {
            "depths": (2,),
            "width": 16,
            "examples": 64,
            "steps": 20,
            "batch_size": 32,
            "learning_rate": 0.1,
            "variants": ("layernorm", "residual+layernorm"),
            "variant_activations": ("relu",),
        }
    return {
        "depths": (2, 5, 10, 15, 20),
        "width": 64,
        "examples": 512,
        "steps": 500,
        "batch_size": 64,
        "learning_rate": 0.1,
        "variants": VARIANTS[1:],
        "variant_activations": VARIANT_ACTIVATIONS,
    }


def measure(net: pb.Sequential, x, y) -> tuple[float, list[dict]]:
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
                "kind": f"dense({layer_grad.w.shape[0]}, {name})",
                "delta_of": "dC/dz",
                "delta_norm": float(jnp.mean(jnp.linalg.norm(delta, axis=1))),
                "grad_w_norm": float(jnp.linalg.norm(layer_grad.w)) / n,  # gradient of the mean loss L
                "grad_b_norm": float(jnp.linalg.norm(layer_grad.b)) / n,
                "g_prime_mean": float(jnp.mean(g_prime)),
                "g_prime_max": float(jnp.max(g_prime)),
                "g_prime_count": int(g_prime.size),
            }
        )
    return float(trace.loss) / n, rows


def build(variant: str, activation: str, depth: int, width: int, n_in: int, n_out: int, key) -> pb.Sequential:
    """The ``variant`` network with ``depth`` hidden dense layers of ``width`` units and activation G."""
    hidden = pb.dense(width, activation)
    if variant == "residual":
        layers = [hidden] + [pb.residual(pb.dense(width, activation)) for _ in range(depth - 1)]
    elif variant == "layernorm":
        layers = [item for _ in range(depth) for item in (pb.dense(width, activation), pb.layer_norm())]
    elif variant == "residual+layernorm":
        layers = [hidden] + [pb.residual(pb.layer_norm(), pb.dense(width, activation)) for _ in range(depth - 1)]
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS[1:]}")
    return pb.init_network(key, (n_in,), [*layers, pb.dense(n_out, "identity")])


def describe(layer) -> str:
    """A layer as its builder call, e.g. residual(layer_norm, dense(64, relu))."""
    if isinstance(layer, pb.Dense):
        return f"dense({layer.w.shape[0]}, {layer.activation})"
    if isinstance(layer, pb.Residual):
        return f"residual({', '.join(describe(inner) for inner in layer.layers)})"
    if isinstance(layer, pb.LayerNorm):
        return "layer_norm"
    return type(layer).__name__


def dense_parts(layer, grads, a) -> list[tuple[pb.Dense, pb.Dense, object]]:
    """The dense layers in ``layer`` (itself, or the body of a residual block) with their gradients and caches.

    A residual block's caches are not in the trace (it records top-level layers only): the body's forward is rerun
    on the block's input ``a``, the same arithmetic the trace ran.
    """
    if isinstance(layer, pb.Dense):
        return [(layer, grads, layer.forward(a)[1])]
    if isinstance(layer, pb.Residual):
        parts, hidden = [], a
        for inner, inner_grads in zip(layer.layers, grads.layers):
            hidden, cache = inner.forward(hidden)
            if isinstance(inner, pb.Dense):
                parts.append((inner, inner_grads, cache))
        return parts
    return []


def measure_stack(net: pb.Sequential, x, y) -> tuple[float, list[dict]]:
    """``measure`` for an ``init_network`` stack: one dict per top-level layer.

    ``delta_norm`` is trace.deltas[l]: dC^n/dz for a dense layer, dC^n/d(output) for a residual block or a layer
    norm. The weight and bias gradient norms and the G' statistics cover the dense layers inside the layer (NaN
    for a layer norm).
    """
    trace = pb.backprop_trace(net, x, y, loss=LOSS, reduction="sum")
    n = x.shape[0]
    rows = []
    for l, (layer, a_in, delta, layer_grad) in enumerate(
        zip(net.layers, trace.inputs, trace.deltas, trace.grads.layers), start=1
    ):
        parts = dense_parts(layer, layer_grad, a_in)
        g_primes = [
            activations.get(dense.activation).derivative(cache.pre_activation, cache.activation)
            for dense, _, cache in parts
        ]
        nan = float("nan")
        sum_w = sum(float(jnp.sum(g.w * g.w)) for _, g, _ in parts)
        sum_b = sum(float(jnp.sum(g.b * g.b)) for _, g, _ in parts)
        rows.append(
            {
                "layer": l,
                "kind": describe(layer),
                "delta_of": "dC/dz" if isinstance(layer, pb.Dense) else "dC/d(output)",
                "delta_norm": float(jnp.mean(jnp.linalg.norm(delta, axis=1))),
                "grad_w_norm": float(np.sqrt(sum_w)) / n if parts else nan,  # of the mean loss L
                "grad_b_norm": float(np.sqrt(sum_b)) / n if parts else nan,
                "g_prime_mean": float(np.mean([float(jnp.mean(g)) for g in g_primes])) if g_primes else nan,
                "g_prime_max": max(float(jnp.max(g)) for g in g_primes) if g_primes else nan,
                "g_prime_count": sum(int(g.size) for g in g_primes),
            }
        )
    return float(trace.loss) / n, rows


def train(net, dataset: data.Dataset, config: dict, seed: int) -> tuple[object, str]:
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


def verdict(status: str, accuracy: float) -> str:
    """Does it train? yes (test accuracy >= 90%), partly, no (< 20%, chance is 10%), or diverged."""
    if status != "trained":
        return "diverged"
    if accuracy >= TRAINS_ACCURACY:
        return "yes"
    return "no" if accuracy < CHANCE_ACCURACY else "partly"


def run(args) -> tuple[list[dict], list[dict]]:
    """Return (per-layer rows, per-network summary rows) for every variant, activation, depth and phase."""
    config = settings(args.quick)
    dataset = data.load_digits()
    x, y = jnp.asarray(dataset.x_train[: config["examples"]]), jnp.asarray(dataset.y_train[: config["examples"]])
    layers, summary = [], []
    jobs = [("mlp", name, depth) for name in ACTIVATIONS for depth in config["depths"]]
    jobs += [
        (variant, name, depth)
        for variant in config["variants"]
        for name in config["variant_activations"]
        for depth in config["depths"]
    ]
    for variant, name, depth in _common.progress(jobs, desc="networks"):
        if variant == "mlp":  # exactly the original study: init_mlp, the same keys
            sizes = (dataset.n_features, *(config["width"],) * depth, dataset.n_outputs)
            net = pb.init_mlp(jax.random.key(args.seed), sizes, (name,) * depth + ("identity",))
            measure_net = measure
        else:
            net = build(
                variant, name, depth, config["width"], dataset.n_features, dataset.n_outputs, jax.random.key(args.seed)
            )
            measure_net = measure_stack
        trained, status = train(net, dataset, config, args.seed)
        for phase, model in (("init", net), ("trained", trained)):
            loss_value, rows = measure_net(model, x, y)
            accuracy = pb.evaluate(model, *dataset.test, loss=LOSS)["accuracy"]
            dense_rows = [r for r in rows[:-1] if r["g_prime_count"]]  # the hidden layers holding a dense layer
            first, last = rows[0], rows[-1]
            factors = [r["g_prime_mean"] for r in dense_rows]
            for r in rows:
                layers.append({"variant": variant, "activation": name, "hidden_layers": depth, "phase": phase, **r})
            summary.append(
                {
                    "variant": variant,
                    "activation": name,
                    "hidden layers": depth,
                    "phase": "init" if phase == "init" else f"{config['steps']} SGD steps ({status})",
                    "loss": loss_value,
                    "test accuracy": accuracy,
                    "trains": "—" if phase == "init" else verdict(status, accuracy),
                    "‖δ¹‖": first["delta_norm"],
                    "‖δᴸ‖": last["delta_norm"],
                    "‖δ¹‖/‖δᴸ‖": first["delta_norm"] / last["delta_norm"],
                    "‖∂L/∂W¹‖": first["grad_w_norm"],
                    "‖∂L/∂Wᴸ‖": last["grad_w_norm"],
                    "mean G′ (hidden)": float(np.mean(factors)),
                    "max G′ (hidden)": max(r["g_prime_max"] for r in dense_rows),
                    "∏ mean G′": float(np.prod(factors)),
                }
            )
    return layers, summary


COLUMNS = (
    "variant",
    "activation",
    "hidden layers",
    "phase",
    "loss",
    "test accuracy",
    "‖δ¹‖",
    "‖δᴸ‖",
    "‖δ¹‖/‖δᴸ‖",
    "‖∂L/∂W¹‖",
    "‖∂L/∂Wᴸ‖",
    "mean G′ (hidden)",
    "max G′ (hidden)",
    "∏ mean G′",
)
VERDICT_COLUMNS = (
    "activation",
    "variant",
    "hidden layers",
    "‖δ¹‖/‖δᴸ‖ at init",
    "‖δ¹‖/‖δᴸ‖ trained",
    "final loss",
    "test accuracy",
    "trains",
)


def verdict_rows(summary: list[dict]) -> list[dict]:
    """One row per network: the ratio at init and after training, the final loss and accuracy, the verdict."""
    init = {(r["variant"], r["activation"], r["hidden layers"]): r for r in summary if r["phase"] == "init"}
    rows = []
    for r in summary:
        if r["phase"] == "init":
            continue
        start = init[(r["variant"], r["activation"], r["hidden layers"])]
        rows.append(
            {
                "activation": r["activation"],
                "variant": r["variant"],
                "hidden layers": r["hidden layers"],
                "‖δ¹‖/‖δᴸ‖ at init": start["‖δ¹‖/‖δᴸ‖"],
                "‖δ¹‖/‖δᴸ‖ trained": r["‖δ¹‖/‖δᴸ‖"],
                "final loss": r["loss"],
                "test accuracy": f"{100 * r['test accuracy']:.1f}%",
                "trains": r["trains"] if "diverged" not in r["phase"] else r["phase"].split("(")[1].split(";")[0],
            }
        )
    order = {name: i for i, name in enumerate(ACTIVATIONS)}
    return sorted(rows, key=lambda r: (order[r["activation"]], VARIANTS.index(r["variant"]), r["hidden layers"]))


def write_markdown(path, args, summary) -> None:
    config = settings(args.quick)
    command = "python -m experiments.vanishing_gradients" + (" --quick" if args.quick else "")
    width = config["width"]
    lines = [
        "# Vanishing gradients: G'(z^l) at every layer, and what skips and layer norm change",
        "",
        f"Command: `{command}` (seed {args.seed}). Machine: {_common.machine()}.",
        "",
        f"Networks on digits (64 inputs, 10 classes), softmax cross-entropy, depth ∈ {{"
        f"{', '.join(map(str, config['depths']))}}} hidden dense layers of width {width}; measured with "
        f"`purebp.backprop_trace` on {config['examples']} training examples at initialisation and after "
        f"{config['steps']} steps of SGD (η = {config['learning_rate']}, batch {config['batch_size']}); every network "
        "starts from the same key and sees the same minibatches.",
        "",
        f"- **mlp**: `init_mlp` 64-({width} × depth)-10 (Glorot for sigmoid/tanh, He for relu), the original study.",
        f"- **residual**: `dense({width}, G)`, then (depth − 1) × `residual(dense({width}, G))`, then `dense(10)`.",
        f"- **layernorm**: every hidden `dense({width}, G)` followed by `layer_norm()`, then `dense(10)`.",
        f"- **residual+layernorm**: `dense({width}, G)`, then (depth − 1) pre-norm blocks "
        f"`residual(layer_norm(), dense({width}, G))`, then `dense(10)`.",
        "",
        "‖δ¹‖/‖δᴸ‖: `trace.deltas[0]` against `trace.deltas[-1]`, the per-example L2 norm averaged over examples, of "
        "the first hidden layer's δ¹ = dCⁿ/dz¹ and the output layer's δᴸ = dCⁿ/dzᴸ (both dense layers in every "
        'variant; `reduction="sum"`, so per example). Between them, `trace.deltas[l]` of a residual block or a '
        "layer norm is dCⁿ/d(its output): for a block, the delta flowing into it from above. "
        f"**trains**: test accuracy (360 held-out digits) after SGD ≥ {TRAINS_ACCURACY:.0%} → yes; "
        f"< {CHANCE_ACCURACY:.0%} (chance is 10%) → no; in between → partly; a non-finite loss → diverged "
        "(then the numbers are of the last finite parameters). final loss: the mean loss on the measured training "
        "examples.",
        "",
        "## Does each depth train, and how much of δ reaches layer 1?",
        "",
        *_common.markdown_table(
            verdict_rows(summary), VERDICT_COLUMNS, {"final loss": ".3g", "‖δ¹‖/‖δᴸ‖ trained": ".3g"}
        ),
        "",
        "## Every network and phase",
        "",
        "loss: the mean loss on the measured training examples. ‖∂L/∂Wˡ‖: Frobenius norm of the gradient of the "
        "mean loss (layer 1 and the output layer, both dense); G′ statistics over every example and unit of the "
        "hidden dense layers (inside residual blocks too); ∏ mean G′: the product over hidden dense layers of the "
        "layer's mean G′(zˡ), the part of ‖δ¹‖/‖δᴸ‖ that G′ alone contributes in a plain MLP (for the sigmoid at "
        "most (1/4)^hidden layers); a skip connection adds a path that bypasses those factors.",
        "",
        *_common.markdown_table(summary, COLUMNS, {"loss": ".3g", "mean G′ (hidden)": ".3f", "test accuracy": ".3f"}),
        "",
        "Per-layer numbers: `vanishing_gradients.csv` (for residual and layer-norm networks one row per top-level "
        "layer; `delta_of` says which derivative `delta_norm` is). Picture: `vanishing_gradients.png`.",
    ]
    _common.write_markdown(path, lines)


def plot(path, layers: list[dict], summary: list[dict], config: dict) -> None:
    plt = _common.pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(4, len(ACTIVATIONS), figsize=(15, 14.5), squeeze=False)
    colormap = plt.get_cmap("viridis")
    depths = config["depths"]
    panels = (
        ("delta_norm", "‖δˡ‖ (per example, mean)"),
        ("grad_w_norm", "‖∂L/∂Wˡ‖ (Frobenius)"),
        ("g_prime_mean", "mean G′(zˡ), hidden layers"),
    )
    mlp_layers = [r for r in layers if r["variant"] == "mlp"]
    for column, name in enumerate(ACTIVATIONS):
        for row, (key, label) in enumerate(panels):
            ax = axes[row, column]
            for i, depth in enumerate(depths):
                color = colormap(i / max(1, len(depths) - 1))
                for phase, style in (("init", "-"), ("trained", "--")):
                    rows = [
                        r
                        for r in mlp_layers
                        if (r["activation"], r["hidden_layers"], r["phase"]) == (name, depth, phase)
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
            ax.set_title(f"{name} MLP: {label}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("layer l (1 = first hidden, last = output)")
    axes[0, 0].legend(fontsize=7, ncol=2)
    # bottom row: the variants against depth
    colors = dict(zip(VARIANTS, ("black", "tab:blue", "tab:orange", "tab:green")))
    for column, name in enumerate(VARIANT_ACTIVATIONS):
        ax = axes[3, column]
        for variant in VARIANTS:
            for phase, style in (("init", "-"), ("trained", "--")):
                rows = [
                    r
                    for r in summary
                    if (r["variant"], r["activation"], r["phase"] == "init") == (variant, name, phase == "init")
                ]
                if rows:
                    ax.plot(
                        [r["hidden layers"] for r in rows],
                        [r["‖δ¹‖/‖δᴸ‖"] for r in rows],
                        style,
                        color=colors[variant],
                        marker="o",
                        label=f"{variant}, {phase}",
                    )
        ax.set_yscale("log")
        ax.set_title(f"{name}: ‖δ¹‖/‖δᴸ‖ against depth")
        ax.set_xlabel("hidden layers")
        ax.legend(fontsize=7)
    ax = axes[3, 2]
    for variant in VARIANTS:
        for name, marker in zip(VARIANT_ACTIVATIONS, ("s", "^")):
            rows = [r for r in summary if r["variant"] == variant and r["activation"] == name and r["phase"] != "init"]
            if rows:
                ax.plot(
                    [r["hidden layers"] for r in rows],
                    [100 * r["test accuracy"] for r in rows],
                    "-",
                    color=colors[variant],
                    marker=marker,
                    label=f"{variant}, {name}",
                )
    ax.axhline(100 * TRAINS_ACCURACY, color="red", linestyle=":", linewidth=1.5)
    ax.set_ylim(0, 100)
    ax.set_title("test accuracy after SGD (red: the 'trains' threshold)")
    ax.set_xlabel("hidden layers")
    ax.set_ylabel("%")
    ax.legend(fontsize=7)
    fig.suptitle(
        "Vanishing gradients: rows 1-3 plain MLPs (solid = at initialisation, dashed = after SGD; colour = depth); "
        "row 4: residual and layer-norm variants"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = _common.parse_args(__doc__.split("\n\n")[0], argv)
    stem = _common.output_stem(args, "vanishing_gradients")
    layers, summary = run(args)
    _common.write_csv(stem.with_suffix(".csv"), layers)
    write_markdown(stem.with_suffix(".md"), args, summary)
    plot(stem.with_suffix(".png"), layers, summary, settings(args.quick))
    for row in summary:
        print(
            f"{row['variant']:>18} {row['activation']:>8} {row['hidden layers']:>2} hidden, {row['phase']:<30} "
            f"‖δ¹‖/‖δᴸ‖ = {row['‖δ¹‖/‖δᴸ‖']:.2e}, test accuracy {row['test accuracy']:.3f} {row['trains']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
