"""Mixed precision: in bfloat16 and float16, how close is the hand-written gradient to jax.grad, and each to float64?

Per parameter leaf the error is purebp.check's measure, ||h - r||_2 / max(||r||_2, f ||r_all||_2)
with f = purebp.check.FLOOR[dtype] (1e-2 for the 16-bit dtypes, 1e-3 float32), computed in float64.

1. Standard architectures, parameters from ``init_mlp`` (float32, the master copy), 256 real examples:
   digits 64-256-10 relu, mnist5k 784-256-256-10 relu, digits 64-64-64-64-64-64-10 sigmoid (deep),
   softmax cross-entropy on logits. For d in bfloat16, float16: the master parameters and x rounded to
   d; hand-written (d) vs jax.grad (d) (``check_gradients``), and each vs jax.grad in float64 of the
   same rounded parameters. Mixed mode (``mixed_value_and_grad(d)``, float32 master): its float32
   gradient vs the float32 hand-written gradient and vs float64, both at the master parameters;
   float16 also with a static loss scale of 1024.
2. Random architectures (``purebp.testing.random_spec``, the same draws for both dtypes): the
   distribution of the per-leaf hand-vs-jax.grad error the 16-bit tolerances are chosen from.

    python -m experiments.mixed_precision             # 100 random architectures per dtype: the committed results
    python -m experiments.mixed_precision --cases 0   # part 1 only, about a minute
    python -m experiments.mixed_precision --quick     # one small architecture, 3 small cases
    python -m experiments.mixed_precision --cases 30 --max-depth 8 --max-width 64 --max-batch 64 --seed 1
                                                      # deeper and wider random architectures

Writes mixed_precision.csv (one row per leaf and comparison), .md and .png to experiments/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # the float64 reference; before any array exists

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import purebp as pb  # noqa: E402
from experiments import _common  # noqa: E402
from purebp import data  # noqa: E402
from purebp.check import FLOOR, TOLERANCE, compare_gradients  # noqa: E402
from purebp.testing import make_case, random_spec  # noqa: E402

LOW = ("bfloat16", "float16")
LOSS = "softmax_cross_entropy"
BATCH = 256
FLOAT16_LOSS_SCALE = 1024.0
QUANTILES = (0.5, 0.9, 0.99)


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds), for the test suite")
    parser.add_argument("--seed", type=int, default=0, help="every random draw derives from this seed")
    parser.add_argument("--out", type=Path, default=_common.RESULTS, help="output directory")
    parser.add_argument("--cases", type=int, default=100, help="random architectures per dtype (default 100)")
    parser.add_argument("--max-depth", type=int, default=4, help="random architectures: layers 1..D (default 4)")
    parser.add_argument("--max-width", type=int, default=32, help="random architectures: widths 1..W (default 32)")
    parser.add_argument("--max-batch", type=int, default=32, help="random architectures: batch 1..B (default 32)")
    return parser.parse_args(argv)


def _architectures(quick: bool, seed: int):
    digits = data.load_digits(seed=seed)
    if quick:
        return [("digits 64-32-10 relu", digits, (64, 32, 10), ("relu", "identity"))]
    mnist = data.load_mnist5k(seed=seed)
    return [
        ("digits 64-256-10 relu", digits, (64, 256, 10), ("relu", "identity")),
        ("mnist5k 784-256-256-10 relu", mnist, (784, 256, 256, 10), ("relu", "relu", "identity")),
        ("digits 64-64x5-10 sigmoid", digits, (64, 64, 64, 64, 64, 64, 10), ("sigmoid",) * 5 + ("identity",)),
    ]


def _upcast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _rows(architecture: str, mode: str, comparison: str, comparisons) -> list[dict]:
    return [
        {
            "part": "standard",
            "architecture": architecture,
            "mode": mode,
            "layer": leaf.layer,
            "parameter": leaf.parameter,
            "shape": "x".join(str(n) for n in leaf.shape),
            "comparison": comparison,
            "relative error": leaf.relative_error,
        }
        for leaf in comparisons
    ]


def standard(quick: bool, seed: int) -> list[dict]:
    """Part 1: one row per (architecture, mode, comparison, leaf)."""
    rows = []
    for name, dataset, sizes, activations in _architectures(quick, seed):
        master = pb.init_mlp(jax.random.key(seed), sizes, activations)  # float32
        x, y = jnp.asarray(dataset.x_train[:BATCH]), jnp.asarray(dataset.y_train[:BATCH])
        for dtype in LOW:
            report = pb.check_gradients(pb.cast_network(master, dtype), x.astype(dtype), y, loss=LOSS)
            rows += _rows(name, dtype, "hand vs jax.grad", report.leaves)
            for attribute, label in (("handwritten", "hand"), ("autodiff", "jax.grad")):
                leaves = [_with_error(leaf, getattr(leaf, f"{attribute}_vs_reference")) for leaf in report.leaves]
                rows += _rows(name, dtype, f"{label} vs float64", leaves)
        _, grads32 = pb.value_and_grad(master, x, y, loss=LOSS)
        _, grads64 = pb.autodiff_value_and_grad(_upcast(master, jnp.float64), _upcast(x, jnp.float64), y, loss=LOSS)
        floor32 = FLOOR[np.dtype("float32")]
        rows += _rows(
            name, "float32", "hand vs float64", compare_gradients(grads32, grads64, tolerance=1, floor=floor32)
        )
        modes = [("bfloat16", 1.0), ("float16", 1.0), ("float16", FLOAT16_LOSS_SCALE)]
        for dtype, loss_scale in modes:
            _, mixed = pb.mixed_value_and_grad(dtype, loss_scale=loss_scale)(master, x, y, LOSS, "mean")
            mode = f"mixed {dtype}" + (f", loss scale {loss_scale:g}" if loss_scale != 1.0 else "")
            floor = FLOOR[np.dtype(dtype)]
            rows += _rows(name, mode, "mixed vs float32", compare_gradients(mixed, grads32, tolerance=1, floor=floor))
            rows += _rows(name, mode, "mixed vs float64", compare_gradients(mixed, grads64, tolerance=1, floor=floor))
    return rows


def _with_error(leaf, error):
    return dataclasses.replace(leaf, relative_error=error)


def sweep(args) -> list[dict]:
    """Part 2: the same random architectures in both dtypes; one row per (dtype, case, leaf, comparison)."""
    rows = []
    for dtype in LOW:
        rng = np.random.default_rng(args.seed)  # the same draws for both dtypes
        for index in _common.progress(range(args.cases), desc=dtype):
            spec = random_spec(
                rng, dtype=dtype, max_depth=args.max_depth, max_width=args.max_width, max_batch=args.max_batch
            )
            case = make_case(spec)
            report = pb.check_gradients(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction)
            for leaf in report.leaves:
                for comparison, error in (
                    ("hand vs jax.grad", leaf.relative_error),
                    ("hand vs float64", leaf.handwritten_vs_reference),
                    ("jax.grad vs float64", leaf.autodiff_vs_reference),
                ):
                    rows.append(
                        {
                            "part": "random",
                            "architecture": f"case {index}: {spec!r}",
                            "mode": dtype,
                            "layer": leaf.layer,
                            "parameter": leaf.parameter,
                            "shape": "x".join(str(n) for n in leaf.shape),
                            "comparison": comparison,
                            "relative error": error,
                        }
                    )
            rows.append(
                {
                    "part": "random",
                    "architecture": f"case {index}: {spec!r}",
                    "mode": dtype,
                    "layer": "",
                    "parameter": "loss",
                    "shape": "",
                    "comparison": "hand vs jax.grad",
                    "relative error": report.loss_relative_error,
                }
            )
    return rows


def _max(values) -> float:
    values = list(values)
    return max(values) if values else math.nan


def summaries(rows: list[dict], args) -> list[str]:
    lines = []
    standard_rows = [r for r in rows if r["part"] == "standard"]
    architectures = list(dict.fromkeys(r["architecture"] for r in standard_rows))
    low = [
        {
            "architecture": a,
            "dtype": d,
            **{
                f"{c} (max over leaves)": _max(
                    r["relative error"]
                    for r in standard_rows
                    if r["architecture"] == a and r["mode"] == d and r["comparison"] == c
                )
                for c in ("hand vs jax.grad", "hand vs float64", "jax.grad vs float64")
            },
        }
        for a in architectures
        for d in (*LOW, "float32")
    ]
    lines += ["## 16-bit gradients (worst leaf per architecture)", "", *_common.markdown_table(low, list(low[0])), ""]
    modes = list(dict.fromkeys(r["mode"] for r in standard_rows if r["mode"].startswith("mixed")))
    mixed = [
        {
            "architecture": a,
            "mode": m,
            **{
                f"{c} (max over leaves)": _max(
                    r["relative error"]
                    for r in standard_rows
                    if r["architecture"] == a and r["mode"] == m and r["comparison"] == c
                )
                for c in ("mixed vs float32", "mixed vs float64")
            },
        }
        for a in architectures
        for m in modes
    ]
    lines += ["## Mixed mode, float32 master (worst leaf)", "", *_common.markdown_table(mixed, list(mixed[0])), ""]

    random_rows = [r for r in rows if r["part"] == "random"]
    distribution = []
    for dtype in LOW:
        mine = [r for r in random_rows if r["mode"] == dtype]
        if not mine:
            continue
        hg = np.array([r["relative error"] for r in mine if r["comparison"] == "hand vs jax.grad" and r["layer"] != ""])
        loss = [r["relative error"] for r in mine if r["parameter"] == "loss"]
        tolerance = TOLERANCE[np.dtype(dtype)]
        row = {"dtype": dtype, "cases": len(loss), "leaves": hg.size}
        for q in QUANTILES:
            row[f"hand vs jax.grad p{round(100 * q)}"] = float(np.quantile(hg, q))
        row["hand vs jax.grad max"] = float(hg.max())
        row["loss max"] = _max(loss)
        for c in ("hand vs float64", "jax.grad vs float64"):
            errors = np.array([r["relative error"] for r in mine if r["comparison"] == c])
            row[f"{c} p99"] = float(np.quantile(errors, 0.99))
            row[f"{c} max"] = float(errors.max())
        row["tolerance"] = tolerance
        row["leaves over tolerance"] = int(np.sum(hg > tolerance)) + sum(e > tolerance for e in loss)
        distribution.append(row)
    if distribution:
        worst = max(
            (r for r in random_rows if r["comparison"] == "hand vs jax.grad"), key=lambda r: r["relative error"]
        )
        lines += [
            f"## Random architectures (depth 1-{args.max_depth}, widths 1-{args.max_width}, "
            f"batch 1-{args.max_batch}, every loss/output pair, both reductions)",
            "",
            *_common.markdown_table(distribution, list(distribution[0])),
            "",
            f"Worst leaf: {worst['relative error']:.3g} ({worst['mode']}, layer {worst['layer']} "
            f"{worst['parameter']}) in {worst['architecture']}.",
            "",
        ]
    lines += [
        "## Every leaf (standard architectures)",
        "",
        *_common.markdown_table(
            standard_rows, ["architecture", "mode", "layer", "parameter", "shape", "comparison", "relative error"]
        ),
    ]
    return lines


def plot(rows: list[dict], path: Path) -> None:
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    random_rows = [r for r in rows if r["part"] == "random" and r["layer"] != ""]
    if not random_rows:  # --cases 0: plot the standard architectures instead
        random_rows = [r for r in rows if r["mode"] in LOW]
    for ax, comparison in zip(axes, ("hand vs jax.grad", "hand vs float64")):
        for dtype, color in zip(LOW, ("C0", "C1")):
            errors = [r["relative error"] for r in random_rows if r["mode"] == dtype and r["comparison"] == comparison]
            positive = np.log10([e for e in errors if e > 0]) if any(e > 0 for e in errors) else np.zeros(0)
            ax.hist(positive, bins=40, alpha=0.6, color=color, label=f"{dtype} ({len(errors)} leaves)")
            ax.axvline(math.log10(TOLERANCE[np.dtype(dtype)]), color=color, linestyle="--")
        ax.set(xlabel="log10 relative error per leaf", title=comparison)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("leaves")
    fig.suptitle("per-leaf gradient error in 16 bits (dashed: check_gradients tolerance)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.quick:
        args.cases, args.max_depth, args.max_width, args.max_batch = 3, 3, 8, 8
    start, load = time.perf_counter(), os.getloadavg()[0]
    rows = standard(args.quick, args.seed)
    rows += sweep(args)
    seconds = time.perf_counter() - start
    stem = _common.output_stem(args, "mixed_precision")
    _common.write_csv(stem.with_suffix(".csv"), rows)
    command = "python -m experiments.mixed_precision" + (" --quick" if args.quick else f" --cases {args.cases}")
    header = [
        "# Mixed precision: per-leaf gradient error in bfloat16 and float16",
        "",
        f"`{command}` (seed {args.seed}): {_common.machine()}; 1-min load average {load:.1f} at the start; "
        f"{seconds:.0f} s. Error per leaf: ||h - r||_2 / max(||r||_2, f ||r_all||_2), f = FLOOR[dtype] "
        f"(bfloat16 {FLOOR[np.dtype(jnp.bfloat16)]:g}, float16 {FLOOR[np.dtype(jnp.float16)]:g}, "
        f"float32 {FLOOR[np.dtype('float32')]:g}); 'float64' is jax.grad in float64 of the same parameters "
        f"(the 16-bit ones upcast exactly). Tolerances of check_gradients: bfloat16 "
        f"{TOLERANCE[np.dtype(jnp.bfloat16)]:g}, float16 {TOLERANCE[np.dtype(jnp.float16)]:g}.",
        "",
    ]
    _common.write_markdown(stem.with_suffix(".md"), header + summaries(rows, args))
    plot(rows, stem.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
