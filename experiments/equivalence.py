"""Equivalence at scale: is the hand-written gradient the gradient, on thousands of random MLPs?

For each random architecture (depth 1-8, widths 1-64, any activation per hidden
layer, every output/cost pair, batch 1-64, float32 and float64, both
reductions) the hand-written gradient h is compared, per parameter leaf, with

- ``jax.grad`` of the same forward pass and cost (``purebp.check_gradients``),
- the NumPy float64 matrix-form oracle (``reference/numpy_matrix.py``),
- float64 central finite differences of the oracle's loss along a random unit
  direction v per leaf: (L(theta + h v) - L(theta - h v)) / 2h vs <h, v>.

Error measure, as everywhere in purebp: ||h - g||_2 / max(||g||_2, f ||g_all||_2)
(f = 1e-6 float64, 1e-3 float32); for finite differences the numerator is
|fd - <h, v>|. Tolerances: 1e-10 (float64) / 1e-5 (float32) against jax.grad
and the oracle; 1e-6 against finite differences (1e-5 for float32 h). A finite difference whose
step moves a relu/leaky_relu pre-activation across 0 is not a derivative: it
is detected (the oracle's z at both ends) and reported as ``kink``, not compared.

    python -m experiments.equivalence            # 2000 architectures
    python -m experiments.equivalence --quick    # 8 small ones, for the test suite

Writes equivalence.csv, equivalence.md and equivalence.png to experiments/results/.
"""

from __future__ import annotations

import argparse
import collections
import math
import platform
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # before any array exists

import numpy as np  # noqa: E402

import purebp as pb  # noqa: E402
from purebp.check import FLOOR, TOLERANCE  # noqa: E402
from purebp.testing import make_case, random_spec  # noqa: E402
from reference import numpy_matrix  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FD_TOLERANCE = 1e-6
FD_STEP = 1e-5
KINKED = ("relu", "leaky_relu")


def _oracle(weights, biases, case):
    return numpy_matrix.loss_and_gradients(
        weights, biases, case.net.activations, np.asarray(case.x), np.asarray(case.y), case.loss, case.reduction
    )


def _pre_activation_signs(weights, biases, case) -> list[np.ndarray]:
    """Signs of z^l of the kinked layers, to detect a finite-difference step that crosses a kink."""
    a = np.asarray(case.x, np.float64).T
    signs = []
    for w, b, name in zip(weights, biases, case.net.activations):
        z = w @ a + b[:, None]
        if name in KINKED:
            signs.append(z > 0)
        a = numpy_matrix.activation(name, z)
    return signs


def _relative(difference: float, scale: float, floor: float) -> float:
    if difference == 0.0:
        return 0.0
    denominator = max(scale, floor)
    return difference / denominator if denominator > 0 else math.inf


def run_trial(spec, rng: np.random.Generator) -> list[dict]:
    """Return one row per (oracle, leaf) for this architecture."""
    case = make_case(spec)
    dtype = np.dtype(spec.dtype)
    floor_factor = FLOOR[dtype]
    report = pb.check_gradients(case.net, case.x, case.y, loss=spec.loss, reduction=spec.reduction)
    grads = pb.grad(case.net, case.x, case.y, loss=spec.loss, reduction=spec.reduction)
    h_leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(grads)]
    weights = [np.asarray(layer.w, np.float64) for layer in case.net.layers]
    biases = [np.asarray(layer.b, np.float64) for layer in case.net.layers]
    _, oracle_w, oracle_b = _oracle(weights, biases, case)
    oracle_leaves = [leaf for pair in zip(oracle_w, oracle_b) for leaf in pair]
    total = math.sqrt(sum(float(np.sum(g * g)) for g in oracle_leaves))
    rows = []
    base = {
        "sizes": "-".join(map(str, spec.sizes)),
        "loss": spec.loss,
        "reduction": spec.reduction,
        "dtype": spec.dtype,
        "batch": spec.batch,
        "seed": spec.seed,
    }
    for index, leaf in enumerate(report.leaves):
        layer_activation = spec.activations[leaf.layer]
        common = {**base, "layer": leaf.layer, "param": leaf.parameter, "activation": layer_activation}
        rows.append({**common, "oracle": "jax.grad", "error": leaf.relative_error, "status": "compared"})
        h, g = h_leaves[index], oracle_leaves[index]
        error = _relative(
            float(np.linalg.norm((h - g).ravel())), float(np.linalg.norm(g.ravel())), floor_factor * total
        )
        rows.append({**common, "oracle": "numpy", "error": error, "status": "compared"})
        # finite differences along a random unit direction of this leaf
        direction = rng.standard_normal(g.shape)
        direction /= np.linalg.norm(direction.ravel())
        plus_w, plus_b = list(weights), list(biases)
        minus_w, minus_b = list(weights), list(biases)
        target = (plus_w, minus_w) if leaf.parameter == "w" else (plus_b, minus_b)
        source = weights if leaf.parameter == "w" else biases
        target[0][leaf.layer] = source[leaf.layer] + FD_STEP * direction
        target[1][leaf.layer] = source[leaf.layer] - FD_STEP * direction
        crossed = any(
            np.any(p != m)
            for p, m in zip(_pre_activation_signs(plus_w, plus_b, case), _pre_activation_signs(minus_w, minus_b, case))
        )
        if crossed:
            rows.append({**common, "oracle": "finite differences", "error": math.nan, "status": "kink"})
            continue
        fd = (_oracle(plus_w, plus_b, case)[0] - _oracle(minus_w, minus_b, case)[0]) / (2 * FD_STEP)
        error = _relative(abs(fd - float(np.sum(h * direction))), float(np.linalg.norm(g.ravel())), 1e-6 * total)
        rows.append({**common, "oracle": "finite differences", "error": error, "status": "compared"})
    return rows


def tolerance(row: dict) -> float:
    """1e-10 / 1e-5 (float64 / float32); finite differences 1e-6, or the float32 tolerance for float32 h."""
    dtype_tolerance = TOLERANCE[np.dtype(row["dtype"])]
    return max(FD_TOLERANCE, dtype_tolerance) if row["oracle"] == "finite differences" else dtype_tolerance


def summarise(rows: list[dict]) -> list[dict]:
    """Worst and median error per oracle x dtype x activation, with mismatch counts."""
    groups = collections.defaultdict(list)
    for row in rows:
        groups[(row["oracle"], row["dtype"], row["activation"])].append(row)
    table = []
    for (oracle, dtype, activation), members in sorted(groups.items()):
        errors = np.asarray([r["error"] for r in members if r["status"] == "compared"])
        table.append(
            {
                "oracle": oracle,
                "dtype": dtype,
                "activation": activation,
                "leaves": len(members),
                "kink_skipped": sum(r["status"] == "kink" for r in members),
                "median": float(np.median(errors)) if errors.size else math.nan,
                "worst": float(np.max(errors)) if errors.size else math.nan,
                "tolerance": tolerance(members[0]),
                "mismatches": int(sum(r["status"] == "compared" and not r["error"] <= tolerance(r) for r in members)),
            }
        )
    return table


def write_outputs(rows, table, specs, seconds, out: Path, quick: bool) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if quick else ""
    with open(out / f"equivalence{suffix}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    mismatches = sum(r["mismatches"] for r in table)
    lines = [
        "# Equivalence: hand-written gradient vs jax.grad, the NumPy oracle and finite differences",
        "",
        f"{len(specs)} random architectures ({sum(s.dtype == 'float32' for s in specs)} float32, "
        f"{sum(s.dtype == 'float64' for s in specs)} float64; depths {min(len(s.sizes) - 1 for s in specs)}-"
        f"{max(len(s.sizes) - 1 for s in specs)}; {sum(1 in s.sizes for s in specs)} with a width of 1; "
        f"{sum(s.batch == 1 for s in specs)} with batch 1; every loss/output pair), {len(rows)} leaf comparisons, "
        f"**{mismatches} mismatches**. {seconds:.0f} s on {platform.machine()} "
        f"({platform.processor() or 'cpu'}), jax {jax.__version__}.",
        "",
        "Error per leaf: ||h - g||_2 / max(||g||_2, f ||g_all||_2), f = 1e-6 (float64) / 1e-3 (float32); finite "
        "differences: |fd - <h, v>| over the same denominator, v a random unit direction, step 1e-5, float64 "
        "oracle loss. `kink_skipped`: the step moved a relu pre-activation across 0 (no derivative to compare).",
        "",
        "Command: `python -m experiments.equivalence" + (" --quick" if quick else "") + "`",
        "",
        "| oracle | dtype | activation | leaves | kink skipped | median | worst | tolerance | mismatches |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['oracle']} | {r['dtype']} | {r['activation']} | {r['leaves']} | {r['kink_skipped']} | "
            f"{r['median']:.1e} | {r['worst']:.1e} | {r['tolerance']:.0e} | {r['mismatches']} |"
        )
    (out / f"equivalence{suffix}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=False)
    for axis, oracle in zip(axes, ("jax.grad", "numpy", "finite differences")):
        for dtype, color in (("float32", "tab:orange"), ("float64", "tab:blue")):
            errors = np.asarray(
                [
                    r["error"]
                    for r in rows
                    if r["oracle"] == oracle and r["dtype"] == dtype and r["status"] == "compared"
                ]
            )
            logs = np.log10(np.maximum(errors, 1e-20))
            if logs.size:
                axis.hist(logs, bins=60, range=(-20, 0), alpha=0.6, color=color, label=dtype)
        for dtype, color in (("float32", "tab:orange"), ("float64", "tab:blue")):
            limit = tolerance({"oracle": oracle, "dtype": dtype})
            axis.axvline(np.log10(limit), color=color, linestyle="--", linewidth=1)
        axis.set_title(f"vs {oracle}")
        axis.set_xlabel("log10 relative error per leaf (zeros at -20)")
        axis.legend()
    axes[0].set_ylabel("leaves")
    fig.suptitle(f"Hand-written vs three oracles, {len(specs)} random MLPs (dashed: tolerances)")
    fig.tight_layout()
    fig.savefig(out / f"equivalence{suffix}.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8 small architectures (for the test suite)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    trials = 8 if args.quick else args.trials
    limits = {"max_depth": 3, "max_width": 8, "max_batch": 8} if args.quick else {}
    rng = np.random.default_rng(args.seed)
    specs = [random_spec(rng, dtype=("float32", "float64")[i % 2], **limits) for i in range(trials)]
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional

        def tqdm(iterable, **_):
            return iterable

    start = time.perf_counter()
    rows = []
    for spec in tqdm(specs, desc="architectures", disable=None):
        rows.extend(run_trial(spec, rng))
        jax.clear_caches()  # each architecture is a new program; thousands would exhaust memory mappings
    seconds = time.perf_counter() - start
    table = summarise(rows)
    write_outputs(rows, table, specs, seconds, args.out, args.quick)
    mismatches = sum(r["mismatches"] for r in table)
    print(f"{trials} architectures, {len(rows)} leaf comparisons, {mismatches} mismatches, {seconds:.0f} s")
    for oracle in ("jax.grad", "numpy", "finite differences"):
        for dtype in ("float32", "float64"):
            worst = max((r["worst"] for r in table if r["oracle"] == oracle and r["dtype"] == dtype), default=math.nan)
            print(f"  worst vs {oracle:<18} {dtype}: {worst:.2e}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
