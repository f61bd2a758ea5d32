"""The hardest training examples of a digits classifier, ranked by their per-example gradient norm.

Trains a 64-64-10 relu MLP on scikit-learn's 8x8 digits with ``purebp.fit``,
then ranks the training examples by ||dC^n/dtheta||_2 from
``purebp.per_example_grad_norms`` (computed from the deltas, no per-example
gradient in memory). Large norms are the examples the model is still being
pulled hardest by: mislabelled-looking, ambiguous or badly written digits.

Run: ``python experiments/hardest_examples.py [--top 8] [--plot hardest.png]``
(needs scikit-learn; matplotlib for ``--plot``).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import purebp as pb

LOSS = "softmax_cross_entropy"
SHADES = " .:-=+*#%@"  # 16 grey levels of the digits image, 10 characters


def load_digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test): pixels scaled to [0, 1], a fixed 80/20 split."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError("this example needs scikit-learn: pip install scikit-learn") from error
    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def ascii_digit(pixels: np.ndarray) -> list[str]:
    """Return the 8x8 image as 8 lines of characters, darker is denser."""
    levels = np.clip((pixels.reshape(8, 8) * (len(SHADES) - 1)).round().astype(int), 0, len(SHADES) - 1)
    return ["".join(SHADES[v] * 2 for v in row) for row in levels]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=8, help="how many of the hardest examples to show")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="also save the hardest digits as an image here (matplotlib)")
    args = parser.parse_args(argv)

    x_train, y_train, x_test, y_test = load_digits(args.seed)
    x_train, y_train, x_test, y_test = map(jnp.asarray, (x_train, y_train, x_test, y_test))
    net = pb.init_mlp(jax.random.key(args.seed), (64, 64, 10), ("relu", "identity"))
    net, history = pb.fit(
        net,
        (x_train, y_train),
        loss=LOSS,
        optimizer=optax.adam(1e-2),
        epochs=args.epochs,
        batch_size=64,
        key=jax.random.key(args.seed + 1),
        eval=(x_test, y_test),
    )
    print(f"test accuracy after {args.epochs} epochs: {history['eval_accuracy'][-1]:.3f}")

    # ||dC^n/dtheta|| for every training example, from the deltas: O(N * widths) memory
    norms, layer_norms = pb.per_example_grad_norms(net, x_train, y_train, loss=LOSS, per_layer=True)
    norms = np.asarray(norms)
    probabilities = np.asarray(jax.nn.softmax(pb.forward(net, x_train), axis=1))
    predicted = probabilities.argmax(axis=1)
    labels = np.asarray(y_train)
    hardest = np.argsort(-norms, kind="stable")[: args.top]

    print(
        f"per-example gradient norms over {len(norms)} training examples: median {np.median(norms):.2e}, "
        f"max {norms.max():.2e}; misclassified: {int(np.sum(predicted != labels))}"
    )
    print(f"\n{'rank':>4} {'index':>5} {'label':>5} {'predicted':>9} {'p(label)':>8} {'||g_n||':>9} {'share W1':>8}")
    first_layer = np.asarray(layer_norms.layers[0].w) ** 2 / np.maximum(norms**2, np.finfo(np.float32).tiny)
    for rank, n in enumerate(hardest, 1):
        print(
            f"{rank:>4} {n:>5} {labels[n]:>5} {predicted[n]:>9} {probabilities[n, labels[n]]:>8.3f} "
            f"{norms[n]:>9.3f} {first_layer[n]:>8.0%}"
        )
    print("\nthe three hardest, as images:")
    pictures = [ascii_digit(np.asarray(x_train[n])) for n in hardest[:3]]
    print("   ".join(f"label {labels[n]}, predicted {predicted[n]}".ljust(16) for n in hardest[:3]))
    for row in zip(*pictures):
        print("   ".join(row))

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError("--plot needs matplotlib: pip install matplotlib") from error
        figure, axes = plt.subplots(1, len(hardest), figsize=(1.6 * len(hardest), 2.0))
        for axis, n in zip(np.atleast_1d(axes), hardest):
            axis.imshow(np.asarray(x_train[n]).reshape(8, 8), cmap="gray_r")
            axis.set_title(f"y={labels[n]} pred={predicted[n]}\n|g|={norms[n]:.2f}", fontsize=8)
            axis.axis("off")
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
