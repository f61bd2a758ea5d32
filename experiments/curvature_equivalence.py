"""Curvature at scale: are purebp's hand-written curvature quantities the autodiff ones, on random architectures?

For T random stacks per dtype (``purebp.testing.random_stack_spec``, two in three redrawn
until they have no layer norm: dense layers
with any hidden activation, residual blocks, layer norm, dropout with or without
a key, conv1d/pooling/flatten fronts half the time, every built-in loss, both
reductions, batch 1-6) every quantity of purebp/extras/curvature.py is compared, leaf
by leaf, with its autodiff oracle (tests/curvature_oracles.py: ravel_pytree,
jax.jacrev / jax.hessian / jax.vmap(jax.grad), in float64 on the same weights,
upcast exactly for the float32 runs):

- sum_grad_squared, grad_variance, diag_ggn, diag_hessian, ggn_vector_product
  (a random Gaussian v): trees like the network;
- kflr: every layer's g and a against their defining sums (conv: g from the backpropagated
  columns summed over positions, BackPACK's convention), and where kron(g, a)
  is exact (N = 1, dense layers and single-position convs) kron(g, a) against the
  GGN block of vec(W) ("kflr exact block");
- kfac a (deterministic, = kflr's a);
- Monte Carlo (diag_ggn with mc_samples=16, kfac g with mc_samples=16, K = 16 keys):
  unbiasedness, as the statistic z = ||mean_k D_k - D|| / (RMS_k ||D_k - D|| / sqrt(K)),
  the error of the mean of K estimates in units of its predicted RMS; z > 4 counts
  as a mismatch (tests/extras/test_curvature.py states and calibrates this bound).

Error measure: ||a - b||_2 / max(||b||_2, f ||b_all||_2) per leaf, b the oracle,
f = 1e-6 (float64) / 1e-3 (float32), as purebp.check; for grad_variance the floor
is also 1e-5 (float64) / 0.1 (float32) of that leaf's second moment (1/N) sum_n (s g_n)^2
(the one-pass E[ghat^2] - E[ghat]^2 is a difference of two terms of that size: ~5 ulps
of it). Tolerances: 1e-10 (float64), 1e-5 (float32). A ValueError the contract asks for
(layer norm in diag_hessian / kflr / kfac, mse on a softmax output in diag_hessian)
is counted as "refused", any other exception as an error.

    python -m experiments.curvature_equivalence              # 8 architectures per dtype
    python -m experiments.curvature_equivalence --quick      # 2 small ones per dtype

Writes curvature_equivalence.csv and curvature_equivalence.md to experiments/results/.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # before any array exists

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import purebp as pb  # noqa: E402
from experiments import _common  # noqa: E402
from purebp.testing import make_stack_case, random_stack_spec  # noqa: E402
from tests import curvature_oracles as co  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = ("float64", "float32")
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
FLOOR = {"float64": 1e-6, "float32": 1e-3}
# grad_variance is (1/N) sum ghat^2 - (mean ghat)^2 (BackPACK's one-pass form): a leaf whose variance is far below
# its second moment m2 (N = 1: exactly 0) comes out as rounding of m2. These floors put the absolute error allowed
# there at ~5 ulps of m2 in either dtype (1e-10 * 1e-5 = 4.5 eps64; 1e-5 * 0.1 = 8 eps32).
VARIANCE_FLOOR = {"float64": 1e-5, "float32": 1e-1}
MC_SAMPLES, MC_KEYS, MC_Z = 16, 16, 4.0
QUANTITIES = (
    "sum_grad_squared",
    "grad_variance",
    "diag_ggn",
    "diag_hessian",
    "kflr",
    "kflr exact block",
    "kfac a",
    "ggn_vector_product",
    "diag_ggn MC",
    "kfac g MC",
)


def _has(layers, kind: str) -> bool:
    return any(d[0] == kind or (d[0] == "residual" and _has(d[1], kind)) for d in layers)


def _refusal(spec, quantity: str) -> bool:
    """Whether the contract has the library refuse this quantity on this architecture (ValueError)."""
    softmax_mse = spec.loss == "mse" and spec.layers[-1][0] == "dense" and spec.layers[-1][2] == "softmax"
    norm = _has(spec.layers, "layer_norm")
    if quantity == "diag_hessian":
        return norm or softmax_mse
    return norm and quantity.startswith(("kflr", "kfac"))


def _variance_errors(actual, expected, second_moment, floor: float, m2_floor: float) -> list[tuple[str, float]]:
    b_all = math.sqrt(sum(float(np.sum(np.square(b))) for b in jax.tree.leaves(expected)))
    errors = []
    for path, a, b, m2 in zip(
        co.leaf_paths(expected), jax.tree.leaves(actual), jax.tree.leaves(expected), jax.tree.leaves(second_moment)
    ):
        a, b = np.asarray(a, np.float64), np.asarray(b)
        scale = max(float(np.linalg.norm(b)), floor * b_all, m2_floor * float(np.linalg.norm(m2)), 1e-300)
        errors.append((path, float(np.linalg.norm(a - b)) / scale))
    return errors


def _exact_blocks(case, oracle, result) -> list[tuple[str, float]]:
    if case.x.shape[0] != 1:
        return []
    factors = jax.tree.leaves(result, is_leaf=lambda t: isinstance(t, pb.KroneckerFactors))
    errors = []
    for index, ((w_slice, _), (g, a), jz) in enumerate(zip(oracle.parameter_slices(), factors, oracle.raw["Jz"])):
        if jz.ndim == 3 or jz.shape[-1] == 1:  # dense, or a conv with one output position
            kron = np.kron(np.asarray(g, np.float64), np.asarray(a, np.float64))
            errors += [(f"layer {index} kron", e) for _, e in co.relative_errors(kron, oracle.ggn_block(w_slice))]
    return errors


def _mc_z(draws, exact) -> list[tuple[str, float]]:
    exact = co.ravel_numpy(exact)
    flat = np.stack([co.ravel_numpy(d) for d in draws])
    rms = np.sqrt(np.mean(np.sum((flat - exact) ** 2, axis=1)))
    pooled = np.linalg.norm(flat.mean(axis=0) - exact)
    return [("all leaves (z)", float(pooled / (rms / math.sqrt(len(draws)))) if rms > 0 else math.inf)]


def _quantity_errors(quantity, case, oracle, options, dtype, floor):
    """[(leaf, error)] for one quantity; raises what the library raises."""
    args = (case.net, case.x, case.y)
    if quantity == "sum_grad_squared":
        return co.relative_errors(pb.sum_grad_squared(*args, **options), oracle.sum_grad_squared(), floor=floor)
    if quantity == "grad_variance":
        m2 = jax.tree.map(lambda v: v / case.x.shape[0], oracle.sum_grad_squared())
        variance = pb.grad_variance(*args, **options)
        return _variance_errors(variance, oracle.grad_variance(), m2, floor, VARIANCE_FLOOR[dtype])
    if quantity == "diag_ggn":
        return co.relative_errors(pb.diag_ggn(*args, **options), oracle.diag_ggn(), floor=floor)
    if quantity == "diag_hessian":
        return co.relative_errors(pb.diag_hessian(*args, **options), oracle.diag_hessian(), floor=floor)
    if quantity == "kflr":
        return co.relative_errors(pb.kflr(*args, **options), oracle.kflr(), floor=floor)
    if quantity == "kflr exact block":
        return _exact_blocks(case, oracle, pb.kflr(*args, **options))
    if quantity == "kfac a":
        result = pb.kfac(*args, **options, key=jax.random.key(0))
        a_of = lambda tree: [f.a for f in jax.tree.leaves(tree, is_leaf=lambda t: hasattr(t, "_fields"))]  # noqa: E731
        return co.relative_errors(a_of(result), a_of(oracle.kflr()), floor=floor)
    if quantity == "ggn_vector_product":
        rng = np.random.default_rng(0)
        v = jax.tree.map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape).astype(dtype)), case.net)
        expected = oracle.ggn_vector_product(v)
        return co.relative_errors(pb.ggn_vector_product(*args, v, **options), expected, floor=floor)
    keys = [jax.random.key(1000 + k) for k in range(MC_KEYS)]
    if quantity == "diag_ggn MC":
        draws = [pb.diag_ggn(*args, **options, mc_samples=MC_SAMPLES, key=key) for key in keys]
        return _mc_z(draws, oracle.diag_ggn())
    if quantity == "kfac g MC":
        g_of = lambda tree: [f.g for f in jax.tree.leaves(tree, is_leaf=lambda t: hasattr(t, "_fields"))]  # noqa: E731
        draws = [g_of(pb.kfac(*args, **options, mc_samples=MC_SAMPLES, key=key)) for key in keys]
        return _mc_z(draws, g_of(oracle.kflr()))
    raise ValueError(quantity)


def _draw(rng: np.random.Generator, dtype: str, index: int, limits: dict):
    """random_stack_spec, redrawn while it holds a layer norm except for every third trial: the stacks draw layer
    norms so often that diag_hessian and the Kronecker factors (which refuse them) would see few architectures."""
    while True:
        spec = random_stack_spec(rng, dtype=dtype, conv=None, **limits)
        if index % 3 == 0 or not _has(spec.layers, "layer_norm"):
            return spec


def run_trial(spec) -> list[dict]:
    case = make_stack_case(spec)
    dtype = spec.dtype
    floor, tolerance = FLOOR[dtype], TOLERANCE[dtype]
    needs_hessian = not _refusal(spec, "diag_hessian")
    oracle = co.Oracle(
        case.net, case.x, case.y, loss=spec.loss, reduction=spec.reduction, key=case.key, hessian=needs_hessian
    )
    options = dict(loss=spec.loss, reduction=spec.reduction, dropout_key=case.key)
    base = {
        "architecture": spec.notation,
        "loss": spec.loss,
        "reduction": spec.reduction,
        "batch": spec.batch,
        "dropout": spec.has_dropout,
        "dtype": dtype,
        "seed": spec.seed,
    }
    rows = []

    def unmeasured(quantity: str, limit: float, status: str, message: str) -> dict:
        # a row without an error value: refused as the contract says, not applicable, or a failure
        return {
            **base,
            "quantity": quantity,
            "leaf": "",
            "error": math.nan,
            "limit": limit,
            "status": status,
            "message": message,
        }

    for quantity in QUANTITIES:
        refused = _refusal(spec, quantity)
        limit = MC_Z if quantity.endswith("MC") else tolerance
        try:
            errors = _quantity_errors(quantity, case, oracle, options, dtype, floor)
        except ValueError as error:
            status = "refused" if refused else "error"
            rows.append(unmeasured(quantity, limit, status, str(error)[:200]))
            continue
        except Exception as error:  # any other failure is a finding: recorded and counted
            rows.append(unmeasured(quantity, limit, "error", f"{type(error).__name__}: {str(error)[:200]}"))
            continue
        if not errors and not refused:  # kflr exact block on N > 1: not applicable
            rows.append(unmeasured(quantity, limit, "n/a", "kron(g, a) is exact only for N = 1"))
            continue
        if refused:
            rows.append(unmeasured(quantity, limit, "error", "expected a ValueError, got a result"))
            continue
        for leaf, error in errors:
            rows.append(
                {
                    **base,
                    "quantity": quantity,
                    "leaf": leaf,
                    "error": error,
                    "limit": limit,
                    "status": "compared" if error <= limit else "mismatch",
                    "message": "",
                }
            )
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for quantity in QUANTITIES:
        for dtype in DTYPES:
            mine = [r for r in rows if r["quantity"] == quantity and r["dtype"] == dtype]
            if not mine:
                continue
            compared = [r for r in mine if r["status"] in ("compared", "mismatch")]
            architectures = {(r["architecture"], r["seed"]) for r in compared}
            worst = max(compared, key=lambda r: r["error"]) if compared else None
            per_architecture = {}
            for r in compared:
                key = (r["architecture"], r["seed"])
                per_architecture[key] = max(per_architecture.get(key, 0.0), r["error"])
            out.append(
                {
                    "quantity": quantity,
                    "dtype": dtype,
                    "limit": mine[0]["limit"],
                    "architectures compared": len(architectures),
                    "not applicable": len({(r["architecture"], r["seed"]) for r in mine if r["status"] == "n/a"}),
                    "refused (as the contract says)": len(
                        {(r["architecture"], r["seed"]) for r in mine if r["status"] == "refused"}
                    ),
                    "leaves": len(compared),
                    "median worst per architecture": float(np.median(list(per_architecture.values())))
                    if per_architecture
                    else math.nan,
                    "worst": worst["error"] if worst else math.nan,
                    "mismatches": sum(r["status"] == "mismatch" for r in mine),
                    "errors": sum(r["status"] == "error" for r in mine),
                    "worst architecture": f"{worst['architecture']} {worst['loss']} N={worst['batch']}"
                    if worst
                    else "",
                }
            )
    return out


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="random architectures per dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 small architectures per dtype")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    trials = 2 if args.quick else args.trials
    limits = dict(max_depth=3, max_width=4, max_batch=3) if args.quick else dict(max_depth=4, max_width=6, max_batch=6)
    uptime_start, started = _uptime(), time.monotonic()
    rng = np.random.default_rng(args.seed)
    rows = []
    specs = [_draw(rng, dtype, index, limits) for dtype in DTYPES for index in range(trials)]
    for spec in _common.progress(specs, desc="architectures"):
        rows += run_trial(spec)
    seconds = time.monotonic() - started
    uptime_end = _uptime()
    stem = _common.output_stem(args, "curvature_equivalence")
    _common.write_csv(stem.with_suffix(".csv"), rows)
    table = summary(rows)
    command = "python -m experiments.curvature_equivalence" + (" --quick" if args.quick else f" --trials {trials}")
    if args.seed:
        command += f" --seed {args.seed}"
    columns = [
        "quantity",
        "dtype",
        "limit",
        "architectures compared",
        "not applicable",
        "refused (as the contract says)",
        "leaves",
        "median worst per architecture",
        "worst",
        "mismatches",
        "errors",
        "worst architecture",
    ]
    failures = [r for r in rows if r["status"] in ("mismatch", "error")]
    lines = [
        "# Curvature quantities vs autodiff oracles",
        "",
        f"`{command}`: {trials} random architectures per dtype ({len(specs)} in all; two in three drawn without a "
        "layer norm, which diag_hessian and the Kronecker factors refuse), every quantity of "
        "purebp/extras/curvature.py on each, against tests/curvature_oracles.py "
        "(float64 autodiff on the same weights). "
        "Relative L2 error per leaf, ||a - b|| / max(||b||, f ||b_all||) (f = 1e-6 float64, 1e-3 float32; "
        "grad_variance also floors at 1e-5 (float64) / 0.1 (float32) of the leaf's second moment "
        "(1/N) sum_n ghat_n^2, ~5 ulps of it: the one-pass E[ghat^2] - E[ghat]^2 cannot do better where the "
        "variance is far below it); limit 1e-10 (float64) / 1e-5 (float32). "
        f"Monte Carlo rows: z = error of the mean of {MC_KEYS} estimates at mc_samples={MC_SAMPLES} in units of its "
        f"predicted RMS (unbiased: z ~ 1), limit {MC_Z:g}. `uptime` here is the shared machine's load.",
        "",
        *_common.markdown_table(table, columns, {"limit": "g", "median worst per architecture": ".2e", "worst": ".2e"}),
        "",
        f"{len(failures)} mismatching or failing rows.",
    ]
    for row in failures[:20]:
        lines.append(
            f"- {row['quantity']} {row['dtype']} {row['architecture']} {row['loss']} {row['reduction']} "
            f"N={row['batch']} seed={row['seed']}: {row['leaf']} {fmt_error(row)} {row['message']}"
        )
    lines += [
        "",
        f"Run time {seconds:.0f} s on {_common.machine()} (a VM shared with other jobs).",
        f"`uptime` at the start: `{uptime_start}`; at the end: `{uptime_end}`.",
    ]
    _common.write_markdown(stem.with_suffix(".md"), lines)
    print("\n".join(lines))
    return 0


def fmt_error(row: dict) -> str:
    return "" if math.isnan(row["error"]) else f"error {row['error']:.3e} (limit {row['limit']:g})"


if __name__ == "__main__":
    raise SystemExit(main())
