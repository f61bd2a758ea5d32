"""Equivalence at scale: is the hand-written gradient the gradient, on thousands of random MLPs?

For each random architecture (depth 1-8, widths 1-64, any activation per hidden
layer, every output/cost pair, batch 1-64, float32 and float64, both
reductions) the hand-written gradient h is compared, per parameter leaf, with

- ``jax.grad`` of the same forward pass and cost (``purebp.check_gradients``),
- the NumPy float64 matrix-form oracle (``reference/numpy_matrix.py``),
- float64 finite differences of the oracle's loss along a random unit
  direction v per leaf, phi(t) = L(theta + t v), vs <h, v>: Ridders' method
  (``reference.finite_differences.directional_derivative``), central
  differences at t = 0.1, 0.05, ... combined by Richardson extrapolation,
  with an error estimate; the step adapts to the loss scale and curvature
  (a fixed step 1e-5 failed on a badly scaled deep sigmoid network: rounding
  ~eps L / h; it is still evaluated, for comparison, as fd_fixed_step_error).

Error measure, as everywhere in purebp: ||h - g||_2 / max(||g||_2, f ||g_all||_2)
(f = 1e-6 float64, 1e-3 float32); for finite differences the numerator is
|fd - <h, v>|. Tolerances: 1e-10 (float64) / 1e-5 (float32) against jax.grad
and the oracle; 1e-6 against finite differences (1e-5 for float32 h). A finite
difference whose step moves a relu/leaky_relu pre-activation across 0 is not a
derivative, and across an elu's 0 (where G'' jumps) Richardson extrapolation
does not hold: the first step is halved until no sign of those z changes at
+-t (the oracle's z), down to 1e-7; a leaf where none is found is reported as
``kink``, not compared. All three oracles compare the same h: the one check_gradients
computed (at matmul precision "highest", so pb.grad reuses its compile).

    python -m experiments.equivalence            # 2000 architectures
    python -m experiments.equivalence --quick    # 8 small ones, for the test suite
    python -m experiments.equivalence --families mlp layers conv --trials 10000 [--workers 2]
                                                 # every family vs jax.grad and NumPy, resumable
                                                 # (experiments/equivalence_families.py)
    python -m experiments.equivalence --oracles numpy "finite differences" --previous OLD.csv
                                                 # rerun some oracles, keep the others' rows from OLD.csv

Writes equivalence.csv, equivalence.md and equivalence.png to experiments/results/.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import platform
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # before any array exists

import numpy as np  # noqa: E402

import purebp as pb  # noqa: E402
from purebp.check import FLOOR, TOLERANCE  # noqa: E402
from purebp.testing import make_case, random_spec  # noqa: E402
from reference import finite_differences, numpy_matrix  # noqa: E402

FAMILIES = ("mlp", "layers", "conv")  # --families (experiments.equivalence_families)

RESULTS = Path(__file__).resolve().parent / "results"
FD_TOLERANCE = 1e-6
FD_FIRST_STEP = 0.1  # Ridders starts large and shrinks by 2 (reference.finite_differences)
OLD_FD_STEP = 1e-5  # the fixed step of the previous run, still evaluated for comparison
# activations where phi(t) is not smooth: relu and leaky_relu have a kink at z = 0 (no derivative across it);
# elu's second derivative jumps there (1 to 0), which breaks the h^2, h^4, ... error expansion that
# Richardson extrapolation relies on (with every step crossing some z = 0 of a wide batch, the first run of
# the adaptive oracle missed the tolerance on 148 leaves of elu networks). Steps must not cross z = 0 there.
KINKED = ("relu", "leaky_relu", "elu")
ORACLES = ("jax.grad", "numpy", "finite differences")
# the two finite-difference mismatches of the previous 2000-architecture run (fixed step 1e-5)
FORMER_MISMATCHES = {(1851254610, 0, "w"): 1.3e-6, (1851254610, 0, "b"): 8.4e-6}


def _oracle(weights, biases, case):
    return numpy_matrix.loss_and_gradients(
        weights, biases, case.net.activations, np.asarray(case.x), np.asarray(case.y), case.loss, case.reduction
    )


def _oracle_loss_and_signs(weights, biases, case) -> tuple[float, list[np.ndarray]]:
    """The NumPy oracle's L (same operations as ``numpy_matrix.loss_and_gradients``, no backward pass) and
    the signs of z^l of the KINKED layers, to tell whether a finite-difference step crossed z = 0 there."""
    a = np.asarray(case.x, np.float64).T
    signs = []
    z = a
    for w, b, name in zip(weights, biases, case.net.activations):
        z = w @ a + b[:, None]
        if name in KINKED:
            signs.append(z > 0)
        a = numpy_matrix.activation(name, z)
    y = numpy_matrix.dense_targets(np.asarray(case.y), weights[-1].shape[0]).T
    cost, _ = numpy_matrix.cost_and_output_gradient(case.loss, z, a, y)
    scale = 1.0 / a.shape[1] if case.reduction == "mean" else 1.0
    return scale * float(np.sum(cost)), signs


def _relative(difference: float, scale: float, floor: float) -> float:
    if difference == 0.0:
        return 0.0
    denominator = max(scale, floor)
    return difference / denominator if denominator > 0 else math.inf


def run_trial(spec, rng: np.random.Generator, oracles=ORACLES) -> list[dict]:
    """Return one row per (oracle, leaf) for this architecture (``oracles``: which of ORACLES to run)."""
    case = make_case(spec)
    dtype = np.dtype(spec.dtype)
    floor_factor = FLOOR[dtype]
    with jax.default_matmul_precision("highest"):  # as in check_gradients: the same compiled h, no second compile
        if "jax.grad" in oracles:
            report = pb.check_gradients(case.net, case.x, case.y, loss=spec.loss, reduction=spec.reduction)
        grads = pb.grad(case.net, case.x, case.y, loss=spec.loss, reduction=spec.reduction)
    h_leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(grads)]
    weights = [np.asarray(layer.w, np.float64) for layer in case.net.layers]
    biases = [np.asarray(layer.b, np.float64) for layer in case.net.layers]
    _, oracle_w, oracle_b = _oracle(weights, biases, case)
    oracle_leaves = [leaf for pair in zip(oracle_w, oracle_b) for leaf in pair]
    total = math.sqrt(sum(float(np.sum(g * g)) for g in oracle_leaves))
    kinked = any(name in KINKED for name in spec.activations)
    signs_at_zero = _oracle_loss_and_signs(weights, biases, case)[1]
    rows = []
    base = {
        "sizes": "-".join(map(str, spec.sizes)),
        "loss": spec.loss,
        "reduction": spec.reduction,
        "dtype": spec.dtype,
        "batch": spec.batch,
        "seed": spec.seed,
    }
    no_fd = {
        "fd_step": math.nan,
        "fd_first_step": math.nan,
        "fd_error_estimate": math.nan,
        "fd_fixed_step_error": math.nan,
    }
    for index, (h, g) in enumerate(zip(h_leaves, oracle_leaves)):
        layer, parameter = index // 2, "wb"[index % 2]
        common = {**base, "layer": layer, "param": parameter, "activation": spec.activations[layer]}
        if "jax.grad" in oracles:
            leaf = report.leaves[index]
            assert (leaf.layer, leaf.parameter) == (layer, parameter)
            rows.append({**common, "oracle": "jax.grad", "error": leaf.relative_error, "status": "compared", **no_fd})
        # the same denominator for every oracle: the float32 floor covers float32 h's own rounding on tiny leaves
        # (before this run, finite differences used the float64 floor 1e-6 even for float32 h)
        scale = float(np.linalg.norm(g.ravel()))
        if "numpy" in oracles:
            error = _relative(float(np.linalg.norm((h - g).ravel())), scale, floor_factor * total)
            rows.append({**common, "oracle": "numpy", "error": error, "status": "compared", **no_fd})
        # finite differences along a random unit direction of this leaf (drawn even when not run: same stream)
        direction = rng.standard_normal(g.shape)
        direction /= np.linalg.norm(direction.ravel())
        if "finite differences" not in oracles:
            continue
        source = weights if parameter == "w" else biases

        def moved(t, source=source, layer=layer, direction=direction, parameter=parameter):
            w, b = list(weights), list(biases)
            (w if parameter == "w" else b)[layer] = source[layer] + t * direction
            return _oracle_loss_and_signs(w, b, case)

        def phi(t, moved=moved):
            return moved(t)[0]

        def smooth(t, moved=moved):  # no relu/leaky_relu/elu pre-activation changed sign between 0 and t
            return all(np.array_equal(s, s0) for s, s0 in zip(moved(t)[1], signs_at_zero))

        derivative = finite_differences.directional_derivative(phi, FD_FIRST_STEP, smooth=smooth if kinked else None)
        projected = float(np.sum(h * direction))
        fixed = math.nan  # what the previous run's fixed step 1e-5 gives (NaN where it would cross a kink)
        if not kinked or (smooth(OLD_FD_STEP) and smooth(-OLD_FD_STEP)):
            old = (phi(OLD_FD_STEP) - phi(-OLD_FD_STEP)) / (2 * OLD_FD_STEP)
            fixed = _relative(abs(old - projected), scale, floor_factor * total)
        fd = {
            "fd_step": derivative.step,
            "fd_first_step": derivative.first_step,
            "fd_error_estimate": _relative(derivative.error, scale, floor_factor * total),
            "fd_fixed_step_error": fixed,
        }
        if not derivative.smooth:
            rows.append({**common, "oracle": "finite differences", "error": math.nan, "status": "kink", **fd})
            continue
        error = _relative(abs(derivative.value - projected), scale, floor_factor * total)
        rows.append({**common, "oracle": "finite differences", "error": error, "status": "compared", **fd})
    return rows


def tolerance(row: dict) -> float:
    """1e-10 / 1e-5 (float64 / float32); finite differences 1e-6, or the float32 tolerance for float32 h."""
    dtype_tolerance = TOLERANCE[np.dtype(row["dtype"])]
    return max(FD_TOLERANCE, dtype_tolerance) if row["oracle"] == "finite differences" else dtype_tolerance


def summarise(rows: list[dict]) -> list[dict]:
    """Worst and median error per oracle x dtype x activation, with mismatch counts and the FD steps used."""
    groups = collections.defaultdict(list)
    for row in rows:
        groups[(row["oracle"], row["dtype"], row["activation"])].append(row)
    table = []
    for (oracle, dtype, activation), members in sorted(groups.items()):
        compared = [r for r in members if r["status"] == "compared"]
        errors = np.asarray([r["error"] for r in compared])
        steps = np.asarray([r["fd_step"] for r in compared if not math.isnan(r["fd_step"])])
        estimates = np.asarray([r["fd_error_estimate"] for r in compared if not math.isnan(r["fd_error_estimate"])])
        fixed = [r["fd_fixed_step_error"] for r in members if not math.isnan(r["fd_fixed_step_error"])]
        table.append(
            {
                "oracle": oracle,
                "run": members[0]["run"],
                "dtype": dtype,
                "activation": activation,
                "leaves": len(members),
                "kink_skipped": sum(r["status"] == "kink" for r in members),
                "median": float(np.median(errors)) if errors.size else math.nan,
                "worst": float(np.max(errors)) if errors.size else math.nan,
                "tolerance": tolerance(members[0]),
                "mismatches": int(sum(not r["error"] <= tolerance(r) for r in compared)),
                "fd_step_min": float(steps.min()) if steps.size else math.nan,
                "fd_step_max": float(steps.max()) if steps.size else math.nan,
                "fd_estimate_worst": float(estimates.max()) if estimates.size else math.nan,
                "fixed_step_mismatches": int(sum(not e <= tolerance(members[0]) for e in fixed)) if fixed else None,
            }
        )
    return table


def _former_mismatch_lines(rows: list[dict]) -> list[str]:
    """What the adaptive oracle gives on the two leaves that failed with the fixed step 1e-5."""
    lines = []
    for row in rows:
        key = (row["seed"], row["layer"], row["param"])
        if row["oracle"] == "finite differences" and row["run"] == "this run" and key in FORMER_MISMATCHES:
            lines.append(
                f"- layer {row['layer']} {row['param']}: fixed step 1e-5 {FORMER_MISMATCHES[key]:.1e} in the previous "
                f"run ({row['fd_fixed_step_error']:.1e} recomputed here), adaptive **{row['error']:.1e}** "
                f"(step {row['fd_step']:.1e}, error estimate {row['fd_error_estimate']:.1e}), status {row['status']}"
            )
    return lines


def write_outputs(
    rows, table, specs, seconds, out: Path, quick: bool, previous: str | None = None, load: str = ""
) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if quick else ""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / f"equivalence{suffix}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    mismatches = sum(r["mismatches"] for r in table)
    fd_rows = [r for r in rows if r["oracle"] == "finite differences" and r["status"] == "compared"]
    fixed = [r for r in fd_rows if not math.isnan(r["fd_fixed_step_error"])]
    fixed_fail = sum(not r["fd_fixed_step_error"] <= tolerance(r) for r in fixed)
    steps = np.asarray([r["fd_step"] for r in fd_rows])
    fresh = sorted({r["oracle"] for r in rows if r["run"] == "this run"}, key=ORACLES.index)
    lines = [
        "# Equivalence: hand-written gradient vs jax.grad, the NumPy oracle and finite differences",
        "",
        f"{len(specs)} random architectures ({sum(s.dtype == 'float32' for s in specs)} float32, "
        f"{sum(s.dtype == 'float64' for s in specs)} float64; depths {min(len(s.sizes) - 1 for s in specs)}-"
        f"{max(len(s.sizes) - 1 for s in specs)}; {sum(1 in s.sizes for s in specs)} with a width of 1; "
        f"{sum(s.batch == 1 for s in specs)} with batch 1; every loss/output pair), {len(rows)} leaf comparisons, "
        f"**{mismatches} mismatches**. This run ({', '.join(fresh)}): {seconds:.0f} s on {platform.machine()} "
        f"({platform.processor() or 'cpu'}, {os.cpu_count()} cores{', ' + load if load else ''}), "
        f"jax {jax.__version__}.",
    ]
    if previous:
        lines += [
            "",
            f"**Not every oracle was rerun.** Rows whose `run` column says `{previous}` are copied unchanged from "
            "the previous run on the same 2000 architectures (same seed, same specs), which tested the purebp of "
            "that commit; the hand-written pass has changed since (24de3a8: relu/leaky_relu/elu derivatives from "
            "the stored activation), so those rows are not a check of the current code. Only the oracles named "
            "above were run again, on the current code, to fit the time available on a shared 2-core machine; "
            "`python -m experiments.equivalence` reruns all three.",
        ]
    lines += [
        "",
        "Error per leaf: ||h - g||_2 / max(||g||_2, f ||g_all||_2), f = 1e-6 (float64) / 1e-3 (float32); finite "
        "differences: |fd - <h, v>| over the same denominator, v a random unit direction, float64 oracle loss. "
        "`kink skipped`: no step down to 1e-7 kept every relu/leaky_relu/elu pre-activation on its side of 0 "
        "(nothing smooth to extrapolate; the fixed step of the previous run skipped 2). "
        "`FD step`: the range over the leaves of the smallest step that went into the "
        "adaptive estimate; `FD est.`: the worst error estimate the oracle gave, over the same denominator.",
        "",
        "Command: `python -m experiments.equivalence"
        + (" --quick" if quick else "")
        + (
            " --oracles " + " ".join(o if " " not in o else f'"{o}"' for o in fresh) + " --previous OLD.csv "
            f'--previous-label "{previous}"`, OLD.csv being the equivalence.csv of that run'
            if previous
            else "`"
        ),
        "",
        "| oracle | run | dtype | activation | leaves | kink skipped | median | worst | tolerance | mismatches "
        "| FD step | FD est. |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        step = "" if math.isnan(r["fd_step_min"]) else f"{r['fd_step_min']:.0e}–{r['fd_step_max']:.0e}"
        estimate = "" if math.isnan(r["fd_estimate_worst"]) else f"{r['fd_estimate_worst']:.0e}"
        lines.append(
            f"| {r['oracle']} | {r['run']} | {r['dtype']} | {r['activation']} | {r['leaves']} | {r['kink_skipped']} | "
            f"{r['median']:.1e} | {r['worst']:.1e} | {r['tolerance']:.0e} | {r['mismatches']} | {step} | {estimate} |"
        )
    if fd_rows:
        lines += [
            "",
            "## The finite-difference oracle is adaptive now",
            "",
            "The previous run used one central difference with a fixed step 1e-5 and reported 2 mismatches, both "
            "the oracle's own rounding: layer 0 (w and b) of one depth-8 network (`39-24-36-32-56-8-20-19-40`, "
            "mostly sigmoid, mse, float64, batch 59, seed 1851254610) whose first-layer gradient is 3e-4 to 4e-3 "
            "of the whole gradient while L ~ 20, so the difference quotient carries rounding error ~eps L / h ~ "
            "4e-10, about 2e-5 of that leaf (jax.grad and the NumPy oracle agreed with the hand-written gradient "
            "to ~1e-15 on the same leaves). A fixed step cannot suit every loss scale and curvature, so the oracle "
            "(`reference/finite_differences.directional_derivative`) now uses Ridders' method: central differences "
            "at h = 0.1, 0.05, 0.025, ... combined by Richardson extrapolation (each combination removes the next "
            "h^2k error term), each entry with an error estimate, returning the entry with the smallest estimate "
            "and stopping once rounding makes the estimates grow. Large steps keep rounding ~eps L / h small; "
            "the extrapolation removes the truncation error large steps bring. Richardson extrapolation needs phi "
            "smooth over the steps, so where a relu, leaky_relu or elu pre-activation could cross 0 (a kink, or for "
            "elu a jump of G'' from 1 to 0) the first step is halved until none changes sign at +h or -h (down to "
            "1e-7), and every later step is checked the same way. The directions v are the same as in the previous "
            "run (same generator, same order).",
            "",
            "Two more changes, both found by the first full run of the adaptive oracle (148 mismatches): (1) it "
            "checked signs for relu/leaky_relu only, and all 148 leaves were in elu networks, where nearly every "
            "large step crosses some elu z = 0 of a wide batch and the extrapolated value was off by 1e-6 to 8e-5 "
            "(float64; 1e-5 to 6e-4 for float32 h), where the fixed step 1e-5, crossing few, passed on 147 of "
            "them; elu joined the sign check. Rechecking the 110 networks of those "
            "leaves with that change left one: (2) a float32 leaf (`41-17-2-1-30-54-47-29`, layer 2 b) whose norm "
            "is below 1e-3 of the whole gradient, at 1.1e-5 with the oracle's error estimate 7e-12, i.e. the "
            "float32 gradient's own rounding. Finite differences had used the float64 floor 1e-6 ||g_all|| for "
            "float32 h too; they now use the floor every other comparison uses (1e-3 in float32), as the error "
            "measure above says. And all oracles now compare the same h: `purebp.grad` runs at matmul precision "
            '"highest", as `check_gradients` does, so it reuses that compile (on this CPU that h was bit-identical '
            "to the default-precision one where checked; the float32 h of that network did change since the "
            "previous run, with the library, see above).",
            "",
            f"Over the {len(fd_rows)} compared leaves the steps used range from {steps.min():.0e} to "
            f"{steps.max():.0e} (median {np.median(steps):.0e}). The old fixed step 1e-5, evaluated again on the "
            f"same directions for comparison (`fd_fixed_step_error` in the CSV; {len(fixed)} leaves where it "
            f"crosses no kink), fails the tolerance on {fixed_fail} of them. The two former mismatches:",
            "",
            *(_former_mismatch_lines(rows) or ["- not among these architectures"]),
            "",
            "`python -m experiments.equivalence_fd_recheck` recomputes both, fixed step and adaptive.",
        ]
    (out / f"equivalence{suffix}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=False)
    for axis, oracle in zip(axes, ORACLES):
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
        run = next((r["run"] for r in rows if r["oracle"] == oracle), "this run")
        axis.set_title(f"vs {oracle}" + ("" if run == "this run" else f" ({run})"))
        axis.set_xlabel("log10 relative error per leaf (zeros at -20)")
        axis.legend()
    axes[0].set_ylabel("leaves")
    fig.suptitle(f"Hand-written vs three oracles, {len(specs)} random MLPs (dashed: tolerances)")
    fig.tight_layout()
    fig.savefig(out / f"equivalence{suffix}.png", dpi=110)
    plt.close(fig)


def _previous_rows(path: Path, oracles, label: str, specs) -> list[dict]:
    """The rows of the oracles not rerun, from an earlier run's CSV of the same architectures."""
    import csv

    with open(path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["oracle"] not in oracles]
    seeds = {s.seed for s in specs}
    if {int(r["seed"]) for r in rows} != seeds:
        raise ValueError(f"{path} is not a run of the same architectures (its seeds differ from this run's)")
    for r in rows:
        r.update(batch=int(r["batch"]), seed=int(r["seed"]), layer=int(r["layer"]), error=float(r["error"]))
        r.update(fd_step=math.nan, fd_first_step=math.nan, fd_error_estimate=math.nan, fd_fixed_step_error=math.nan)
        r["run"] = label
    return rows


# ---------------------------------------------------------------- stacks over every layer kind (--layers all)
#
# Random stacks of dense layers, residual blocks (nested once), layer norm and dropout (with or without a
# key), drawn by purebp.testing.random_stack_spec, each compared with three oracles:
#
# - jax.grad of the same forward pass and cost: the two programs check_gradients(fast_compile=True)
#   compiles together (backprop.compiled_value_and_grad, check.compiled_autodiff_value_and_grad), with
#   its compiler options, matmul precision and per-leaf measure (check.compare_gradients, check.TOLERANCE,
#   check.FLOOR), compiled here so that the same h also goes to the two other oracles;
# - the NumPy float64 layer oracle (reference/numpy_layers.py) on the same parameters, with the dropout
#   masks the engine draws (``plain_layers``), when that file exists;
# - float64 finite differences (Ridders, reference.finite_differences) of purebp's own forward pass and cost
#   along a random unit direction per leaf, vs <h, v>, on every ``fd_every``-th architecture; the steps
#   never move a relu/leaky_relu/elu pre-activation across 0 (``KINKED``) and the masks stay fixed (the key
#   does not depend on the parameters).

STACK_LIMITS = {"max_depth": 6, "max_width": 24, "max_batch": 24}
STACK_QUICK_LIMITS = {"max_depth": 4, "max_width": 6, "max_batch": 5}
STACK_FD_EVERY = 4


def numpy_layers_oracle():
    """The module reference.numpy_layers, or None while that oracle is not in this checkout."""
    if not (Path(__file__).resolve().parent.parent / "reference" / "numpy_layers.py").exists():
        return None
    from reference import numpy_layers

    return numpy_layers


def _draw_masks(layers, keys, batch: int, shape: tuple, dtype) -> list:
    from purebp.layers import Dropout, Residual, layer_keys
    from purebp.layers.shapes import output_shape

    masks = []
    for index, layer in enumerate(layers):
        keys_here = layer_keys(keys, index)
        if isinstance(layer, Dropout) and layer.rate > 0:
            masks.append(layer.forward(jax.numpy.ones((batch,) + shape, dtype=dtype), keys_here)[1])
        elif isinstance(layer, Residual):
            masks.append(_draw_masks(layer.layers, keys_here, batch, shape, dtype))
        else:
            masks.append(None)
        shape = output_shape(layer, shape)
    return masks


def dropout_masks(net, batch: int, key) -> list:
    """Per layer of ``net``: the 0/1 keep mask (NumPy float64, shape (batch,) + its input shape) that a dropout
    layer draws under ``key``, a nested list for a residual block, None for any other layer or without a key.

    Drawn as the engine documents it, not read back from its forward pass: example n of layer ``index`` gets
    ``fold_in(fold_in(key, n), index)`` (``purebp.layers.example_keys`` / ``layer_keys``, folded once more
    per residual body), and the dropout layer's own ``forward`` turns those keys into its mask.
    """
    from purebp.layers import example_keys

    def to_numpy(masks):
        return [to_numpy(m) if isinstance(m, list) else None if m is None else (np.asarray(m) != 0).astype(float)
                for m in masks]  # fmt: skip

    if key is None:
        return to_numpy(_draw_masks(net.layers, None, batch, net.input_shape, net.dtype))

    def draw(key):
        return _draw_masks(net.layers, example_keys(key, batch), batch, net.input_shape, net.dtype)

    return to_numpy(compile_once(fast_jit(draw), key)(key))


def plain_layers(net, batch: int, key) -> list[dict]:
    """The ``Sequential`` ``net`` as the NumPy oracle's list of dicts (float64 copies), with the keep masks
    its dropout layers draw for a batch of ``batch`` under ``key`` (None: inference, no masks)."""
    from purebp.layers import AvgPool1d, Conv1d, Dense, Dropout, Flatten, LayerNorm, MaxPool1d, Residual

    def convert(layers, masks) -> list[dict]:
        plain = []
        for layer, mask in zip(layers, masks):
            if isinstance(layer, Dense):
                w, b = np.asarray(layer.w, np.float64), np.asarray(layer.b, np.float64)
                plain.append({"kind": "dense", "w": w, "b": b, "activation": layer.activation})
            elif isinstance(layer, Residual):
                plain.append({"kind": "residual", "layers": convert(layer.layers, mask)})
            elif isinstance(layer, LayerNorm):
                scale, offset = np.asarray(layer.scale, np.float64), np.asarray(layer.offset, np.float64)
                plain.append({"kind": "layer_norm", "scale": scale, "offset": offset, "eps": layer.eps})
            elif isinstance(layer, Dropout):
                plain.append({"kind": "dropout", "rate": layer.rate, "mask": mask})
            elif isinstance(layer, Conv1d):
                w, b = np.asarray(layer.w, np.float64), np.asarray(layer.b, np.float64)
                plain.append({"kind": "conv1d", "w": w, "b": b, "stride": layer.stride, "padding": layer.padding,
                              "activation": layer.activation})  # fmt: skip
            elif isinstance(layer, (MaxPool1d, AvgPool1d)):
                kind = "max_pool1d" if isinstance(layer, MaxPool1d) else "avg_pool1d"
                plain.append({"kind": kind, "kernel": layer.kernel, "stride": layer.stride})
            elif isinstance(layer, Flatten):
                plain.append({"kind": "flatten"})
            else:
                raise TypeError(f"the NumPy oracle has no layer like {layer!r}")
        return plain

    return convert(net.layers, dropout_masks(net, batch, key))


def plain_grad_leaves(grads: list[dict]) -> list[np.ndarray]:
    """The oracle's gradients in purebp's leaf order: dense w, b; layer norm scale, offset; residual bodies."""
    leaves = []
    for grad in grads:
        if "layers" in grad:
            leaves += plain_grad_leaves(grad["layers"])
        else:
            leaves += [grad[name] for name in ("w", "b", "scale", "offset") if name in grad]
    return leaves


def _upcast(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64) if np.issubdtype(a.dtype, np.floating) else a, tree)


def _kinked_signs(layers, caches) -> list[np.ndarray]:
    """z > 0 for every relu/leaky_relu/elu dense or conv layer, and every max pool's arg-max (where the pooled
    value stops being smooth), residual bodies included, from a forward pass's caches."""
    from purebp.layers import Conv1d, Dense, MaxPool1d, Residual

    signs = []
    for layer, cache in zip(layers, caches):
        if isinstance(layer, (Dense, Conv1d)) and layer.activation in KINKED:
            signs.append(cache.pre_activation > 0)
        elif isinstance(layer, MaxPool1d):
            signs.append(cache[0])
        elif isinstance(layer, Residual):
            signs += _kinked_signs(layer.layers, cache)
    return signs


def fast_jit(function, **options):
    """``jax.jit`` with the compiler options of check_gradients(fast_compile=True): these run once each."""
    return jax.jit(function, compiler_options=pb.check.FAST_COMPILE_OPTIONS.get(jax.default_backend()), **options)


def compile_once(jitted, *args):
    # as check_gradients(fast_compile=True): traced with jit disabled (one flat program), compiled ahead of
    # time, so the executable is freed with its last reference instead of filling the compilation cache
    with jax.disable_jit():
        lowered = jitted.trace(*args).lower()
    return lowered.compile()


def fast_handwritten_value_and_grad(case) -> tuple:
    """(L, dL/dtheta) of a ``StackCase`` by the hand-written pass, compiled as check_gradients(fast_compile=True)
    compiles (LLVM -O0 on CPU, matmul precision "highest"): for an architecture that runs once."""
    jitted = fast_jit(pb.engine.compiled_value_and_grad, static_argnames=("loss", "reduction"))
    with jax.default_matmul_precision("highest"):
        compiled = compile_once(jitted, case.net, case.x, case.y, case.loss, case.reduction, case.key)
        return compiled(case.net, case.x, case.y, case.key)


def _handwritten_and_autodiff(net, x, y, key, loss, reduction):
    hand = pb.engine.compiled_value_and_grad(net, x, y, loss, reduction, key)
    return hand, pb.check.compiled_autodiff_value_and_grad(net, x, y, loss, reduction, key)


def _moved_loss_and_signs(net, direction, t, x, y, key, loss, reduction):
    moved = jax.tree.map(lambda p, d: p + t * d, net, direction)  # theta + t v
    outputs, caches = pb.engine.forward_layers(moved, x, key)
    cost = pb.engine.output_cost(moved, outputs[-1], caches, y, loss=loss)
    value = jax.numpy.mean(cost) if reduction == "mean" else jax.numpy.sum(cost)
    return value, _kinked_signs(moved.layers, caches)


def stack_directional_derivatives(case, h_leaves, rng: np.random.Generator) -> list[dict]:
    """Per leaf of ``case.net``: Ridders' phi'(0), phi(t) = L(theta + t v) of the float64 network, v a random
    unit direction of that leaf; returns dicts with the estimate, <h, v>, its error estimate and steps.

    One compile per architecture (t and v are arguments). The float32 networks are upcast exactly.
    """
    net, x, y = _upcast(case.net), _upcast(case.x), _upcast(case.y)
    leaves = jax.tree.leaves(net)
    treedef = jax.tree.structure(net)
    jitted = fast_jit(_moved_loss_and_signs, static_argnames=("loss", "reduction"))
    zero = [np.zeros_like(leaf) for leaf in leaves]
    compiled = compile_once(jitted, net, jax.tree.unflatten(treedef, zero), 0.0, x, y, case.key, case.loss,
                             case.reduction)  # fmt: skip
    kinked = _contains_kink(case.net.layers)
    results = []
    for index, h in enumerate(h_leaves):
        direction = rng.standard_normal(h.shape)
        direction /= np.linalg.norm(direction.ravel())
        tree = jax.tree.unflatten(treedef, zero[:index] + [direction] + zero[index + 1 :])
        memo = {}

        def evaluate(t, tree=tree, memo=memo):
            if t not in memo:
                value, signs = compiled(net, tree, t, x, y, case.key)
                memo[t] = (float(value), [np.asarray(s) for s in signs])
            return memo[t]

        signs_at_zero = evaluate(0.0)[1]

        def smooth(t, evaluate=evaluate, signs_at_zero=signs_at_zero):
            return all(np.array_equal(s, s0) for s, s0 in zip(evaluate(t)[1], signs_at_zero))

        derivative = finite_differences.directional_derivative(
            lambda t, evaluate=evaluate: evaluate(t)[0], FD_FIRST_STEP, smooth=smooth if kinked else None
        )
        results.append({"derivative": derivative, "projected": float(np.sum(h * direction))})
    return results


def _contains_kink(layers) -> bool:
    from purebp.layers import Conv1d, Dense, MaxPool1d, Residual

    return any(
        (isinstance(layer, (Dense, Conv1d)) and layer.activation in KINKED)
        or isinstance(layer, MaxPool1d)
        or (isinstance(layer, Residual) and _contains_kink(layer.layers))
        for layer in layers
    )


def _leaf_kind(parameter: str, ndim: int = 2) -> str:
    """'dense', 'conv1d' or 'layer_norm' by the parameter's name and rank, '... in a residual body' below a
    residual block."""
    kind = "conv1d" if ndim == 3 else "dense"
    if parameter.split(".")[-1] in ("scale", "offset"):
        kind = "layer_norm"
    return kind + (" in a residual body" if parameter.startswith("layers[") else "")


def run_stack_trial(spec, rng: np.random.Generator, *, finite_differences_too: bool, oracle) -> list[dict]:
    """One row per (oracle, leaf) and per (oracle, loss value) for this stack."""
    from purebp.check import compare_gradients, leaf_names
    from purebp.testing import make_stack_case

    case = make_stack_case(spec)
    dtype = np.dtype(spec.dtype)
    tolerance_, floor = TOLERANCE[dtype], FLOOR[dtype]
    jitted = fast_jit(_handwritten_and_autodiff, static_argnames=("loss", "reduction"))
    with jax.default_matmul_precision("highest"):  # as check_gradients
        compiled = compile_once(jitted, case.net, case.x, case.y, case.key, case.loss, case.reduction)
        (value_h, grads_h), (value_g, grads_g) = compiled(case.net, case.x, case.y, case.key)
        witness = "fast"
        if not _finite(grads_g) and _finite(grads_h):
            # XLA CPU at -O0 can make jax.grad through jnp.max's tie mask (the row max that softmax and
            # log-softmax subtract) 0/0 = NaN; that is the witness failing, so it runs again at XLA's defaults
            value_g, grads_g = pb.check.compiled_autodiff_value_and_grad(
                case.net, case.x, case.y, case.loss, case.reduction, case.key
            )
            witness = "default (the -O0 one was not finite)"
    h_leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(grads_h)]
    names = leaf_names(case.net)
    # a bias's kind is its weight's: conv1d when the leaf before it (its layer's w) has rank 3
    ranks = {(layer, name): leaf.ndim for (layer, name), leaf in zip(names, h_leaves)}
    ranks = {(layer, name): ranks.get((layer, name[:-1] + "w"), 2) if name.endswith("b") else rank
             for (layer, name), rank in ranks.items()}  # fmt: skip
    base = {
        "architecture": spec.notation,
        "loss": spec.loss,
        "reduction": spec.reduction,
        "dtype": spec.dtype,
        "batch": spec.batch,
        "dropout_active": spec.has_dropout,
        "seed": spec.seed,
        "witness_compile": witness,
    }

    def row(oracle: str, layer: int, parameter: str, error: float, status: str = "compared", **fd) -> dict:
        kind = "loss" if parameter == "loss" else _leaf_kind(parameter, ranks.get((layer, parameter), 2))
        fd = {"fd_step": math.nan, "fd_error_estimate": math.nan, "autodiff_vs_numpy": math.nan, **fd}
        return {**base, "oracle": oracle, "layer": layer, "param": parameter, "kind": kind, "error": error,
                "status": status, **fd}  # fmt: skip

    def loss_error(reference: float) -> float:
        value = float(value_h)
        return 0.0 if value == reference else abs(value - reference) / max(abs(reference), np.finfo(dtype).tiny)

    rows = [row("jax.grad", -1, "loss", loss_error(float(value_g)))]
    compared = compare_gradients(grads_h, grads_g, tolerance=tolerance_, floor=floor)
    rows += [row("jax.grad", layer, name, leaf.relative_error) for (layer, name), leaf in zip(names, compared)]
    if oracle is not None:
        plain = plain_layers(case.net, spec.batch, case.key)
        x, y = np.asarray(case.x, np.float64), np.asarray(_upcast(case.y))
        value_o, grads_o = oracle.loss_and_grads(plain, x, y, loss=spec.loss, reduction=spec.reduction)
        oracle_tree = jax.tree.unflatten(jax.tree.structure(grads_h), plain_grad_leaves(grads_o))
        rows.append(row("numpy", -1, "loss", loss_error(float(value_o))))
        compared = compare_gradients(grads_h, oracle_tree, tolerance=tolerance_, floor=floor)
        rows += [row("numpy", layer, name, leaf.relative_error) for (layer, name), leaf in zip(names, compared)]
        # how far jax.grad's own gradient is from the float64 oracle: tells a wrong h from an ill-conditioned case
        autodiff = compare_gradients(grads_g, oracle_tree, tolerance=tolerance_, floor=floor)
        for witness_row, leaf in zip((r for r in rows if r["oracle"] == "jax.grad" and r["param"] != "loss"), autodiff):
            witness_row["autodiff_vs_numpy"] = leaf.relative_error
    if finite_differences_too:
        total = math.sqrt(sum(float(np.sum(h * h)) for h in h_leaves))
        estimates = stack_directional_derivatives(case, h_leaves, rng)
        for (layer, name), h, estimate in zip(names, h_leaves, estimates):
            derivative = estimate["derivative"]
            if not derivative.smooth:
                rows.append(row("finite differences", layer, name, math.nan, "kink", fd_step=derivative.step))
                continue
            scale = max(float(np.linalg.norm(h.ravel())), floor * total)
            error = _relative(abs(derivative.value - estimate["projected"]), scale, 0.0)
            fd = {"fd_step": derivative.step, "fd_error_estimate": _relative(derivative.error, scale, 0.0)}
            rows.append(row("finite differences", layer, name, error, **fd))
    return rows


def _finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree.leaves(tree))


def stack_tolerance(row: dict) -> float:
    """check_gradients' tolerance of h's dtype; finite differences at least FD_TOLERANCE (their own accuracy)."""
    dtype_tolerance = TOLERANCE[np.dtype(row["dtype"])]
    return max(FD_TOLERANCE, dtype_tolerance) if row["oracle"] == "finite differences" else dtype_tolerance


def summarise_stacks(rows: list[dict], by_kind: bool) -> list[dict]:
    """Per oracle x dtype (x leaf kind): architectures, comparisons, median and worst error, mismatches."""
    groups = collections.defaultdict(list)
    for row in rows:
        groups[(row["oracle"], row["dtype"], row["kind"] if by_kind else "")].append(row)
    table = []
    for (oracle, dtype, kind), members in sorted(
        groups.items(), key=lambda item: (ORACLES.index(item[0][0]),) + item[0][1:]
    ):
        compared = [r for r in members if r["status"] == "compared"]
        errors = np.asarray([r["error"] for r in compared])
        table.append(
            {
                "oracle": oracle,
                "dtype": dtype,
                "kind": kind,
                "architectures": len({r["seed"] for r in members}),
                "comparisons": len(members),
                "kink_skipped": sum(r["status"] == "kink" for r in members),
                "median": float(np.median(errors)) if errors.size else math.nan,
                "worst": float(np.max(errors)) if errors.size else math.nan,
                "tolerance": stack_tolerance(members[0]),
                "mismatches": int(sum(not r["error"] <= stack_tolerance(r) for r in compared)),
            }
        )
    return table


def write_stack_outputs(rows, specs, seconds, out: Path, quick: bool, oracles_run, fd_every: int, load: str,
                        seed: int = 0, conv: bool = False) -> None:  # fmt: skip
    import csv

    from purebp.testing import NOTATION_HELP

    out.mkdir(parents=True, exist_ok=True)
    name = "equivalence_conv" if conv else "equivalence_layers"
    stem = out / (f"{name}_quick" if quick else name)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    overall, detail = summarise_stacks(rows, by_kind=False), summarise_stacks(rows, by_kind=True)
    mismatches = sum(r["mismatches"] for r in overall)
    n_fd = len({r["seed"] for r in rows if r["oracle"] == "finite differences"})

    def count(predicate) -> int:
        return sum(bool(predicate(s)) for s in specs)

    from purebp.testing import _contains

    depths = [len(s.layers) for s in specs]
    lines = [
        "# Equivalence over every layer kind: hand-written gradient vs jax.grad, the NumPy layer oracle and "
        "finite differences",
        "",
        f"{len(specs)} random stacks (`purebp.testing.random_stack_spec`, generator seed {seed}; "
        f"{count(lambda s: s.dtype == 'float32')} float32, {count(lambda s: s.dtype == 'float64')} float64; "
        f"{min(depths)}-{max(depths)} top-level layers; {count(lambda s: _contains(s.layers, 'residual'))} with a "
        f"residual block, {count(lambda s: any(d[0] == 'residual' and _contains(d[1], 'residual') for d in s.layers))} "
        f"with one nested in another, {count(lambda s: _contains(s.layers, 'layer_norm'))} with layer norm, "
        f"{count(lambda s: _contains(s.layers, 'dropout'))} with dropout ({count(lambda s: s.has_dropout)} of them "
        f"with a key: masks drawn), {count(lambda s: s.layers[-1][0] != 'dense')} ending in a layer other than "
        f"dense, {count(lambda s: _contains(s.layers, 'conv1d'))} with conv1d, "
        f"{count(lambda s: _contains(s.layers, 'max_pool1d'))} with max pooling, "
        f"{count(lambda s: _contains(s.layers, 'avg_pool1d'))} with average pooling, "
        f"{count(lambda s: any(d[0] == 'residual' and _contains(d[1], 'conv1d') for d in s.layers))} with a "
        f"residual block of convs; losses: "
        + ", ".join(f"{loss} {count(lambda s, loss=loss: s.loss == loss)}" for loss in sorted({s.loss for s in specs}))
        + f"), {len(rows)} comparisons, **{mismatches} mismatches**. Oracles run: {', '.join(oracles_run)}; finite "
        f"differences on {n_fd} of the architectures (one in {fd_every}). {seconds:.0f} s on "
        f"{platform.machine()} ({platform.processor() or 'cpu'}, {os.cpu_count()} cores, {load}), "
        f"jax {jax.__version__}.",
        "",
        "Architectures in the CSV's `architecture` column: " + NOTATION_HELP + ".",
        "",
        "Error per parameter leaf: ||h - g||_2 / max(||g||_2, f ||g_all||_2), f = 1e-6 (float64) / 1e-3 (float32), "
        "`purebp.check.compare_gradients` (g: jax.grad's gradient, or the NumPy oracle's); finite differences: "
        "|fd - <h, v>| / max(||h_leaf||_2, f ||h_all||_2), v a random unit direction of the leaf, phi(t) = L(theta "
        "+ t v) of purebp's forward pass and cost in float64 (the float32 networks upcast exactly), Ridders' "
        "extrapolation from step 0.1 without moving any relu/leaky_relu/elu pre-activation across 0 (`kink "
        "skipped`: no such step down to 1e-7). `loss` rows: |L_h - L_g| / |L_g|. The NumPy oracle and finite "
        "differences get the engine's dropout masks (drawn from the key as `purebp.layers.example_keys` / "
        "`layer_keys` say); tolerances 1e-10 (float64 h) and 1e-5 (float32 h), 1e-6 at least against finite "
        "differences.",
        "",
        f"Command: `python -m experiments.equivalence --layers {'conv' if conv else 'all'}{' --quick' if quick else ''}"
        + (f" --trials {len(specs)}" if not quick and len(specs) != 2000 else "")
        + (f" --fd-every {fd_every}" if not quick and fd_every != STACK_FD_EVERY else "")
        + (f" --seed {seed}" if seed else "")
        + "`",
        "",
        "## Per oracle",
        "",
        "| oracle | dtype | architectures | comparisons | kink skipped | median | worst | tolerance | mismatches |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in overall:
        lines.append(
            f"| {r['oracle']} | {r['dtype']} | {r['architectures']} | {r['comparisons']} | {r['kink_skipped']} | "
            f"{r['median']:.1e} | {r['worst']:.1e} | {r['tolerance']:.0e} | {r['mismatches']} |"
        )
    lines += [
        "",
        "## Per oracle and leaf kind",
        "",
        "| oracle | dtype | leaf | architectures | comparisons | kink skipped | median | worst | tolerance "
        "| mismatches |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in detail:
        lines.append(
            f"| {r['oracle']} | {r['dtype']} | {r['kind']} | {r['architectures']} | {r['comparisons']} | "
            f"{r['kink_skipped']} | {r['median']:.1e} | {r['worst']:.1e} | {r['tolerance']:.0e} | {r['mismatches']} |"
        )
    recompiled = sorted({(r["seed"], r["architecture"]) for r in rows if r["witness_compile"] != "fast"})
    lines += [
        "",
        "## The jax.grad witness at -O0",
        "",
        f"On {len(recompiled)} of the {len(specs)} architectures the jax.grad program compiled at XLA's -O0 (the "
        "options of `check_gradients(fast_compile=True)`) returned a non-finite gradient where the hand-written one "
        "is finite, and its witness was compiled again at XLA's default options (`witness_compile` in the CSV). "
        "Cause: jax.grad of the row max that softmax / log-softmax subtract goes through jnp.max's tie mask "
        "(x == max(x), divided by the number of ties); compiled at -O0 the mask can come out empty (x recomputed "
        "differently in two places), 0/0 = NaN. `jax.lax.stop_gradient` on that max (the shift does not change "
        "the function) removes it. Architectures: "
        + (", ".join(f"`{arch}` (seed {seed})" for seed, arch in recompiled[:12]) or "none")
        + (f" and {len(recompiled) - 12} more" if len(recompiled) > 12 else "")
        + ".",
    ]
    failing = [r for r in rows if r["status"] == "compared" and not r["error"] <= stack_tolerance(r)]
    if failing:
        lines += [
            "",
            "## Mismatches",
            "",
            "`autodiff vs numpy`: jax.grad's own gradient against the float64 oracle (same measure): when it is as "
            "far off as h, the float computation itself is inaccurate there (ill-conditioned), not the hand-written "
            "rule.",
            "",
            "| oracle | architecture | loss | red | dtype | N | seed | leaf | error | autodiff vs numpy |",
            "|---|---|---|---|---|---:|---:|---|---:|---:|",
        ]
        for r in failing:
            lines.append(
                f"| {r['oracle']} | `{r['architecture']}` | {r['loss']} | {r['reduction']} | {r['dtype']} | "
                f"{r['batch']} | {r['seed']} | {r['layer']} {r['param']} | {r['error']:.1e} | "
                f"{r['autodiff_vs_numpy']:.1e} |"
            )
    if "numpy" not in oracles_run:
        lines += ["", "The NumPy layer oracle (`reference/numpy_layers.py`) is not in this checkout: not run."]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(oracles_run), figsize=(4.4 * len(oracles_run), 3.6), squeeze=False)
    for axis, oracle in zip(axes[0], oracles_run):
        for dtype, color in (("float32", "tab:orange"), ("float64", "tab:blue")):
            errors = np.asarray(
                [
                    r["error"]
                    for r in rows
                    if r["oracle"] == oracle and r["dtype"] == dtype and r["status"] == "compared"
                ]
            )
            if errors.size:
                axis.hist(np.log10(np.maximum(errors, 1e-20)), bins=60, range=(-20, 0), alpha=0.6, color=color,
                          label=dtype)  # fmt: skip
            axis.axvline(np.log10(stack_tolerance({"oracle": oracle, "dtype": dtype})), color=color, linestyle="--")
        axis.set_title(f"vs {oracle}")
        axis.set_xlabel("log10 relative error (zeros at -20)")
        axis.legend()
    axes[0, 0].set_ylabel("comparisons")
    fig.suptitle(f"Hand-written vs the oracles, {len(specs)} random stacks (dashed: tolerances)")
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=110)
    plt.close(fig)


def run_stacks(args) -> int:
    """``--layers all``: the stack experiment; returns 1 on any mismatch."""
    from purebp.testing import random_stack_spec

    oracle = numpy_layers_oracle()
    oracles_run = tuple(o for o in ORACLES if o != "numpy" or oracle is not None)
    trials = 4 if args.quick else args.trials
    fd_every = 1 if args.quick else args.fd_every
    limits = STACK_QUICK_LIMITS if args.quick else STACK_LIMITS
    rng = np.random.default_rng(args.seed)
    conv = args.layers == "conv"
    specs = [random_stack_spec(rng, dtype=("float32", "float64")[i % 2], conv=conv, **limits) for i in range(trials)]
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    rows = []
    for number, spec in enumerate(specs, start=1):
        rows += run_stack_trial(spec, rng, finite_differences_too=(number - 1) % fd_every == 0, oracle=oracle)
        jax.clear_caches()  # each architecture is a new program
        if number % 100 == 0:
            print(f"{number}/{trials} stacks, {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    load = f"1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    write_stack_outputs(rows, specs, seconds, args.out, args.quick, oracles_run, fd_every, load, args.seed, conv)
    table = summarise_stacks(rows, by_kind=False)
    mismatches = sum(r["mismatches"] for r in table)
    print(f"{trials} stacks, {len(rows)} comparisons, {mismatches} mismatches, {seconds:.0f} s")
    for r in table:
        print(f"  worst vs {r['oracle']:<18} {r['dtype']}: {r['worst']:.2e} ({r['mismatches']} mismatches)")
    return 1 if mismatches else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=None, help="architectures (default 2000; 10000 per family)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8 small architectures (for the test suite)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--oracles", nargs="+", choices=ORACLES, default=list(ORACLES), help="which oracles to run")
    parser.add_argument(
        "--previous", type=Path, help="CSV of an earlier run of the same architectures: rows of the oracles not run"
    )
    parser.add_argument("--previous-label", default="previous run", help="how the table labels those rows")
    parser.add_argument(
        "--layers",
        choices=("mlp", "all", "conv"),
        default="mlp",
        help="mlp: random MLPs (default); all: random stacks of dense, residual, layer norm and dropout layers, "
        "written to equivalence_layers.*; conv: the same behind a random conv1d / pooling / residual-conv / layer "
        "norm front and a flatten, written to equivalence_conv.*",
    )
    parser.add_argument(
        "--fd-every",
        type=int,
        default=STACK_FD_EVERY,
        help=f"--layers all: finite differences on every k-th architecture (default {STACK_FD_EVERY})",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        choices=FAMILIES,
        help="run these families against jax.grad and the NumPy oracles, half float64, half float32, appending to "
        "equivalence_families.csv and resuming it (experiments/equivalence_families.py); default 10000 each",
    )
    parser.add_argument("--workers", type=int, default=1, help="--families: worker processes (default 1)")
    args = parser.parse_args(argv)
    if args.trials is not None and args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    if args.families:
        if args.workers < 1:
            parser.error(f"--workers must be at least 1, got {args.workers}")
        if args.layers != "mlp" or args.previous is not None or set(args.oracles) != set(ORACLES):
            parser.error("--families runs jax.grad and the NumPy oracles on every family: no --layers, --oracles "
                         "or --previous with it")  # fmt: skip
        from experiments.equivalence_families import main_families

        return main_families(args)
    if args.trials is None:
        args.trials = 2000
    if args.layers in ("all", "conv"):
        if args.previous is not None or set(args.oracles) != set(ORACLES):
            parser.error("--layers all runs every oracle there is; --oracles and --previous are for --layers mlp")
        if args.fd_every < 1:
            parser.error(f"--fd-every must be at least 1, got {args.fd_every}")
        return run_stacks(args)
    oracles = tuple(o for o in ORACLES if o in args.oracles)
    trials = 8 if args.quick else args.trials
    limits = {"max_depth": 3, "max_width": 8, "max_batch": 8} if args.quick else {}
    rng = np.random.default_rng(args.seed)
    specs = [random_spec(rng, dtype=("float32", "float64")[i % 2], **limits) for i in range(trials)]
    previous = []
    if args.previous is not None:  # read before the long run, so a wrong file fails at once
        previous = _previous_rows(args.previous, oracles, args.previous_label, specs)
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional

        def tqdm(iterable, **_):
            return iterable

    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    rows = []
    for number, spec in enumerate(tqdm(specs, desc="architectures", disable=None), start=1):
        rows.extend({**row, "run": "this run"} for row in run_trial(spec, rng, oracles))
        jax.clear_caches()  # each architecture is a new program; thousands would exhaust memory mappings
        if number % 100 == 0:  # a line in a log file, where tqdm draws nothing
            print(f"{number}/{trials} architectures, {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    rows = previous + rows
    table = summarise(rows)
    load = f"1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    write_outputs(rows, table, specs, seconds, args.out, args.quick, args.previous_label if previous else None, load)
    mismatches = sum(r["mismatches"] for r in table)
    print(f"{trials} architectures, {len(rows)} leaf comparisons, {mismatches} mismatches, {seconds:.0f} s")
    for oracle in ORACLES:
        for dtype in ("float32", "float64"):
            worst = max((r["worst"] for r in table if r["oracle"] == oracle and r["dtype"] == dtype), default=math.nan)
            print(f"  worst vs {oracle:<18} {dtype}: {worst:.2e}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
