"""Template: how does test accuracy on digits depend on the hidden width? Copy this file to start a new study.

python -m experiments.template [--quick] [--seed S] [--out DIR]   # writes template.{csv,md,png}
"""

import jax
import optax

import purebp as pb
from experiments import _common
from purebp import data


def main(argv=None) -> int:
    args = _common.parse_args(__doc__.split("\n\n")[0], argv)
    digits, loss, rows = data.load_digits(seed=args.seed), "softmax_cross_entropy", []
    for width in _common.progress((4, 16) if args.quick else (2, 4, 8, 16, 32, 64, 128), desc="widths"):
        net = pb.init_mlp(jax.random.key(args.seed), (64, width, 10), ("relu", "identity"))
        epochs, key = 2 if args.quick else 20, jax.random.key(args.seed + 1)
        net, history = pb.fit(
            net, digits.train, loss=loss, optimizer=optax.adam(1e-2), epochs=epochs, batch_size=64, key=key
        )
        accuracy = pb.evaluate(net, *digits.test, loss=loss)["accuracy"]
        rows.append({"width": width, "train loss": history["train_loss"][-1], "test accuracy": accuracy})
    stem = _common.output_stem(args, "template")
    _common.write_csv(stem.with_suffix(".csv"), rows)
    table = _common.markdown_table(rows, list(rows[0]))
    _common.write_markdown(stem.with_suffix(".md"), ["# Test accuracy against hidden width", "", *table])
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogx([r["width"] for r in rows], [r["test accuracy"] for r in rows], "o-", base=2)
    ax.set(xlabel="hidden width", ylabel="test accuracy", title="digits: 64-width-10 relu MLP, Adam 1e-2")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
