"""Equivalence per family, at scale and resumable: ``python -m experiments.equivalence --families ...``.

Families: ``mlp`` (``purebp.testing.random_spec``), ``layers`` (``random_stack_spec(conv=False)``) and
``conv`` (``random_stack_spec(conv=True)``); architecture i of a family is float32 for odd i, float64 for even
i, drawn from one NumPy stream per family (``np.random.default_rng([seed, family number])``), so that the
first M architectures of a run with --trials M' >= M are the same.

Per architecture and parameter leaf (and the loss), two oracles, one rule (``purebp.check``):

- ``jax.grad``: the ``check_gradients(fast_compile=True)`` verdict itself: h and autodiff's a each against the
  float64 truth t (autodiff of the promoted network; t = a in float64), e_h = ||h - t|| / s, e_a = ||a - t|| / s,
  s = max(||t_leaf||, FLOOR ||t_all||); a mismatch when e_h > max(KAPPA e_a, TOLERANCE[dtype]) and, below
  float64, the same hand-written pass run in float64 is also more than TOLERANCE[float64] off the truth
  (``float64_error``);
- ``numpy``: the float64 NumPy oracle o (``reference/numpy_matrix.py`` for MLPs, ``reference/numpy_layers.py``
  for stacks, with the engine's dropout masks) as the truth: e_h = ||h - o|| / s, e_a = ||a - o|| / s, the same
  rule, and below float64 the same float64 decision (the hand-written pass on the promoted network, against o).

h and a are the very arrays the verdict compared (captured from the check's one program), so each
architecture compiles once (plus a small program drawing dropout masks, and the float64 pass where a decision
needs it). A stack without an active dropout layer is checked without its key (the key changes nothing there,
and with a key check_gradients takes XLA's default compile, ~10x slower). Every architecture is its own program
(of 10,000 drawn per family, 9,999 to 10,000 differ in more than the seed), so batching equal shapes does not
pay. Rows are appended to ``equivalence_families.csv`` one architecture at a time (flushed, fsynced); a
rerun with the same arguments skips the architectures already there and drops a partial one at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # before any array exists (also in each worker process)

import numpy as np  # noqa: E402

import purebp as pb  # noqa: E402
from experiments.equivalence import FAMILIES  # noqa: E402
from purebp import check as _check  # noqa: E402
from purebp.check import FLOOR, KAPPA, TOLERANCE, compare_gradients, leaf_names  # noqa: E402
from purebp.testing import random_spec, random_stack_spec  # noqa: E402

FAMILY_ORACLES = ("jax.grad", "numpy")
STEM = "equivalence_families"
# the limits of the earlier --layers all / conv runs (experiments.equivalence.STACK_LIMITS); MLPs: the generator's
LIMITS = {"mlp": {}, "layers": {"max_depth": 6, "max_width": 24, "max_batch": 24}}
LIMITS["conv"] = LIMITS["layers"]
QUICK_LIMITS = {
    "mlp": {"max_depth": 3, "max_width": 8, "max_batch": 8},
    "layers": {"max_depth": 4, "max_width": 6, "max_batch": 5},
    "conv": {"max_depth": 4, "max_width": 6, "max_batch": 5},
}
FIELDS = (
    "family", "index", "rows", "architecture", "loss", "reduction", "dtype", "batch", "seed", "oracle", "layer",
    "param", "kind", "h_error", "a_error", "allowed", "float64_error", "mismatch", "seconds",
)  # fmt: skip


def draw_specs(family: str, trials: int, seed: int, quick: bool = False) -> list:
    """The first ``trials`` architectures of ``family``: even indices float64, odd float32 (module docstring)."""
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    limits = (QUICK_LIMITS if quick else LIMITS)[family]
    dtypes = ("float64", "float32")
    if family == "mlp":
        return [random_spec(rng, dtype=dtypes[i % 2], **limits) for i in range(trials)]
    conv = family == "conv"
    return [random_stack_spec(rng, dtype=dtypes[i % 2], conv=conv, **limits) for i in range(trials)]


def replay_line(spec) -> str:
    """The line that rebuilds this architecture's network, inputs and targets."""
    if type(spec).__name__ == "CaseSpec":
        return f"purebp.testing.make_case({spec!r})"
    return f"purebp.testing.make_stack_case({spec!r})"


def notation(spec) -> str:
    if type(spec).__name__ == "CaseSpec":
        return "-".join(map(str, spec.sizes)) + ":" + ",".join(spec.activations)
    return spec.notation


def _case(spec):
    from purebp.testing import make_case, make_stack_case

    return make_case(spec) if type(spec).__name__ == "CaseSpec" else make_stack_case(spec)


def _oracle(spec, case) -> tuple[float, list[np.ndarray]]:
    """(L, gradient leaves in purebp's order) by the float64 NumPy oracle of the family."""
    if type(spec).__name__ == "CaseSpec":
        from reference import numpy_matrix

        weights = [np.asarray(layer.w, np.float64) for layer in case.net.layers]
        biases = [np.asarray(layer.b, np.float64) for layer in case.net.layers]
        value, grad_w, grad_b = numpy_matrix.loss_and_gradients(
            weights, biases, spec.activations, np.asarray(case.x), np.asarray(case.y), spec.loss, spec.reduction
        )
        return value, [leaf for pair in zip(grad_w, grad_b) for leaf in pair]
    from experiments.equivalence import _upcast, plain_grad_leaves, plain_layers
    from reference import numpy_layers

    plain = plain_layers(case.net, spec.batch, case.key)
    x, y = np.asarray(case.x, np.float64), np.asarray(_upcast(case.y))
    value, grads = numpy_layers.loss_and_grads(plain, x, y, loss=spec.loss, reduction=spec.reduction)
    return value, plain_grad_leaves(grads)


def _float64_handwritten(case):
    """(L, grads) of the same hand-written pass on the network promoted to float64: the float64 decision."""
    return _check.handwritten_in_float64(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction,
                                         key=case.key)  # fmt: skip


def _relative(value: float, truth: float) -> float:
    if value == truth:
        return 0.0
    if not (math.isfinite(value) and math.isfinite(truth)):
        return math.inf
    return abs(value - truth) / max(abs(truth), np.finfo(np.float64).tiny)


def _leaf_kinds(net) -> list[str]:
    from experiments.equivalence import _leaf_kind

    names, leaves = leaf_names(net), jax.tree.leaves(net)
    ranks = {name: np.ndim(leaf) for name, leaf in zip(names, leaves)}
    kinds = []
    for layer, param in names:
        rank = ranks.get((layer, param[:-1] + "w"), 2) if param.endswith("b") else ranks[(layer, param)]
        kinds.append(_leaf_kind(param, rank))
    return kinds


def _numpy_verdict(case, passes, oracle) -> tuple[list[dict], dict]:
    """Per leaf and for the loss: h and a against the NumPy oracle o, with check_gradients' rule."""
    (value_h, grads_h), (value_a, grads_a), _ = passes
    dtype = np.dtype(case.spec.dtype)
    value_o, leaves_o = oracle
    tree_o = jax.tree.unflatten(jax.tree.structure(grads_h), leaves_o)
    leaves = compare_gradients(grads_h, grads_a, tolerance=TOLERANCE[dtype], floor=FLOOR[dtype], truth=tree_o)
    results = [{"h": c.relative_error, "a": c.autodiff_error, "allowed": c.allowed, "passed": c.passed,
                "f64": None} for c in leaves]  # fmt: skip
    e_h, e_a = _relative(float(value_h), value_o), _relative(float(value_a), value_o)
    loss = {"h": e_h, "a": e_a, "allowed": max(KAPPA * e_a, TOLERANCE[dtype]), "f64": None}
    loss["passed"] = e_h <= loss["allowed"]
    if dtype != np.float64 and not (loss["passed"] and all(r["passed"] for r in results)):
        value_64, grads_64 = _float64_handwritten(case)
        float64 = np.dtype("float64")
        again = compare_gradients(grads_64, tree_o, tolerance=TOLERANCE[float64], floor=FLOOR[float64])
        for result, twin in zip(results, again):
            if not result["passed"]:
                result.update(passed=twin.passed, f64=twin.relative_error)
        if not loss["passed"]:
            loss["f64"] = _relative(float(value_64), value_o)
            loss["passed"] = loss["f64"] <= TOLERANCE[float64]
    return results, loss


def run_architecture(task: tuple) -> list[dict]:
    """All rows of one architecture: ``task`` = (family, index, spec). Runs in a worker process too."""
    family, index, spec = task
    start = time.perf_counter()
    case = _case(spec)
    # a key changes nothing without an active dropout layer, but it sends check_gradients to XLA's default compile
    # (10x slower; see check_gradients): passed only where a dropout layer draws a mask with it
    if type(spec).__name__ == "StackSpec" and not spec.has_dropout:
        case = dataclasses.replace(case, key=None)
    report = pb.check_gradients(case.net, case.x, case.y, loss=case.loss, reduction=case.reduction,
                                key=case.key, fast_compile=True)  # fmt: skip
    # the same h and a the verdict judged (report.passes), against the NumPy oracle as the truth
    numpy_leaves, numpy_loss = _numpy_verdict(case, report.passes, _oracle(spec, case))
    jax.clear_caches()  # each architecture is a new program; thousands would exhaust memory mappings
    base = {"family": family, "index": index, "architecture": notation(spec), "loss": spec.loss,
            "reduction": spec.reduction, "dtype": spec.dtype, "batch": spec.batch, "seed": spec.seed}  # fmt: skip
    rows = []

    def add(oracle, layer, param, kind, h, a, allowed, f64, passed):
        rows.append({**base, "oracle": oracle, "layer": layer, "param": param, "kind": kind, "h_error": h,
                     "a_error": a, "allowed": allowed, "float64_error": "" if f64 is None else f64,
                     "mismatch": int(not passed)})  # fmt: skip

    loss_allowed = max(KAPPA * report.loss_autodiff_error, report.tolerance)
    add("jax.grad", -1, "loss", "loss", report.loss_relative_error, report.loss_autodiff_error, loss_allowed,
        report.loss_float64_error, report.loss_passed)  # fmt: skip
    kinds = _leaf_kinds(case.net)
    for leaf, kind in zip(report.leaves, kinds):
        add("jax.grad", leaf.layer, leaf.parameter, kind, leaf.relative_error, leaf.autodiff_error, leaf.allowed,
            leaf.float64_error, leaf.passed)  # fmt: skip
    add("numpy", -1, "loss", "loss", numpy_loss["h"], numpy_loss["a"], numpy_loss["allowed"], numpy_loss["f64"],
        numpy_loss["passed"])  # fmt: skip
    for leaf, kind, result in zip(report.leaves, kinds, numpy_leaves):
        add("numpy", leaf.layer, leaf.parameter, kind, result["h"], result["a"], result["allowed"], result["f64"],
            result["passed"])  # fmt: skip
    seconds = time.perf_counter() - start
    for row in rows:
        row.update(rows=len(rows), seconds=f"{seconds:.3f}")
    return rows


# ---------------------------------------------------------------- the CSV: append, resume


def complete_architectures(path: Path, specs: dict) -> dict[str, set[int]]:
    """Per family, the indices whose rows are all in ``path``; truncates a partial architecture at the end.

    Raises ValueError when a stored architecture is not the one these arguments draw (another --seed, another
    generator): resuming would mix two runs.
    """
    done = {family: set() for family in specs}
    if not path.exists():
        return done
    data = path.read_bytes()
    lines = data[: data.rfind(b"\n") + 1].decode().splitlines(keepends=True)  # a line cut by a kill is dropped
    if not lines:
        path.write_bytes(b"")
        return done
    header = next(csv.reader([lines[0]]))
    if tuple(header) != FIELDS:
        raise ValueError(f"{path}: its header is {header}, expected {list(FIELDS)}: not a --families run's CSV")
    counts: dict = {}
    position = complete_bytes = len(lines[0].encode())
    for line in lines[1:]:  # no cell holds a newline: one line, one row
        row = dict(zip(FIELDS, next(csv.reader([line]))))
        position += len(line.encode())
        key = (row["family"], int(row["index"]))
        counts[key] = counts.get(key, 0) + 1
        if counts[key] != int(row["rows"]):
            continue
        family, index = key
        if family in specs and index < len(specs[family]):
            expected = notation(specs[family][index])
            if row["architecture"] != expected:
                raise ValueError(
                    f"{path}: architecture {index} of {family} is {row['architecture']!r} there, these "
                    f"arguments draw {expected!r}: use the --seed (and --quick) of that run, or another --out"
                )
            done[family].add(index)
        complete_bytes = position
    if complete_bytes != len(data):
        with open(path, "r+b") as handle:  # drop the architecture in flight when the run was killed
            handle.truncate(complete_bytes)
    return done


def _append(handle, rows: list[dict]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([[row[name] for name in FIELDS] for row in rows])
    handle.write(buffer.getvalue())  # one write per architecture, then to the disk
    handle.flush()
    os.fsync(handle.fileno())


@dataclasses.dataclass
class Progress:
    start: float
    done: int = 0


def run_families(families, trials: int, seed: int, out: Path, workers: int, quick: bool) -> tuple[bool, int]:
    """Run (or resume) the families, appending to ``out``/equivalence_families.csv; returns (stopped by a signal,
    architectures written by this invocation).
    Architectures interleave by family: 0 of each, 1 of each, ..."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{STEM}.csv"
    specs = {family: draw_specs(family, trials, seed, quick) for family in families}
    done = complete_architectures(path, specs)
    for family in families:
        first = next((i for i in range(trials) if i not in done[family]), trials)
        if done[family]:
            print(f"{family}: resuming at architecture {first} of {trials} ({len(done[family])} done)", file=sys.stderr)
    tasks = [(family, index, specs[family][index]) for index in range(trials) for family in families
             if index not in done[family]]  # fmt: skip
    new = not path.exists() or path.stat().st_size == 0
    progress = Progress(time.perf_counter())
    stop = _stop_on_signals()
    with open(path, "a", newline="") as handle:
        if new:
            handle.write(",".join(FIELDS) + "\n")
        for rows in _results(tasks, workers):
            _append(handle, rows)
            progress.done += 1
            if progress.done % 50 == 0:
                rate = progress.done / (time.perf_counter() - progress.start)
                print(f"{progress.done}/{len(tasks)} architectures, {rate:.2f} per s", flush=True)
            if stop:
                print(f"stopped by signal {stop[0]} after {progress.done} architectures", file=sys.stderr)
                break
    return bool(stop), progress.done


def _stop_on_signals() -> list:
    """SIGINT / SIGTERM: finish the architecture being written, then stop (the list gets the signal's number).
    A KeyboardInterrupt can wait for minutes while XLA compiles; this answers within one architecture."""
    import signal

    received: list = []
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda signum, frame: received.append(signum))
    return received


def _results(tasks, workers: int):
    if workers <= 1:
        yield from map(run_architecture, tasks)
        return
    import multiprocessing

    # spawn: JAX is not fork-safe; a worker is replaced now and then to bound what it accumulates
    with multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=400) as pool:
        yield from pool.imap(run_architecture, tasks, chunksize=1)


# ---------------------------------------------------------------- the table


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def summarise(rows: list[dict]) -> list[dict]:
    """Per family x oracle x dtype: architectures, leaves, worst e_h and e_a, mismatches, and how many leaves the
    dtype could not tell (KAPPA e_a set the bound) or the float64 pass decided."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["family"], row["oracle"], row["dtype"]), []).append(row)
    order = {family: n for n, family in enumerate(FAMILIES)}
    table = []
    for (family, oracle, dtype), members in sorted(groups.items(), key=lambda g: (order.get(g[0][0], 9),) + g[0][1:]):
        leaves = [r for r in members if r["param"] != "loss"]
        tolerance = TOLERANCE[np.dtype(dtype)]
        table.append({
            "family": family, "oracle": oracle, "dtype": dtype,
            "architectures": len({r["index"] for r in members}),
            "leaves": len(leaves),
            "worst_h": max(float(r["h_error"]) for r in leaves),
            "worst_a": max(float(r["a_error"]) for r in leaves),
            "cannot_tell": sum(KAPPA * float(r["a_error"]) > tolerance for r in leaves),
            "float64_decided": sum(r["float64_error"] != "" for r in members),
            "mismatches": sum(int(r["mismatch"]) for r in members),
        })  # fmt: skip
    return table


def _margin(row: dict) -> float:
    h, allowed = float(row["h_error"]), float(row["allowed"])
    return h / allowed if allowed > 0 else math.inf


def write_table(path: Path, families, trials: int, seed: int, quick: bool, run: tuple, workers: int) -> Path:
    """equivalence_families.md beside the CSV: the table, the rate, each family's worst case and every mismatch
    with its replay line (the spec redrawn from the generator: the CSV stores the index and checks the notation)."""
    rows = read_rows(path)
    specs = {family: draw_specs(family, trials, seed, quick) for family in families}
    table = summarise(rows)
    seconds: dict = {}
    for row in rows:
        seconds.setdefault(row["family"], {})[row["index"]] = float(row["seconds"])
    arguments = f"--families {' '.join(families)} --trials {trials}" + (f" --seed {seed}" if seed else "")
    lines = [
        "# Equivalence per family: the hand-written gradient vs jax.grad and the NumPy oracles",
        "",
        f"Command: `python -m experiments.equivalence {arguments}{' --quick' if quick else ''}` (resumable; "
        f"architecture i is float64 for even i, float32 for odd i). The rule, per leaf and for the loss, against a "
        f"truth t: e_h = ||h - t|| / s, e_a = ||a - t|| / s, s = max(||t_leaf||, FLOOR ||t_all||); a mismatch when "
        f"e_h > max({KAPPA:g} e_a, tolerance) (tolerance 1e-10 float64, 1e-5 float32) and, in float32, the same "
        "hand-written pass run in float64 is also more than 1e-10 off t. `jax.grad`: the check_gradients"
        "(fast_compile=True) verdict, t = autodiff of the network promoted to float64 (in float64, t = a, so e_a "
        "= 0). `numpy`: t = the float64 NumPy oracle (reference/numpy_matrix.py for MLPs, "
        "reference/numpy_layers.py for stacks). `cannot tell`: leaves where 4 e_a, not the tolerance, set the "
        "bound; `float64 decided`: leaves (and losses) the float64 pass decided.",
        "",
        "| family | oracle | dtype | architectures | leaves | worst e_h | worst e_a | cannot tell | float64 decided "
        "| mismatches |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['family']} | {r['oracle']} | {r['dtype']} | {r['architectures']} | {r['leaves']} | "
            f"{r['worst_h']:.1e} | {r['worst_a']:.1e} | {r['cannot_tell']} | {r['float64_decided']} | "
            f"{r['mismatches']} |"
        )
    lines += ["", "## Time", "", "| family | architectures | seconds per architecture (median) | per architecture "
              "(mean) | projected for 10,000, one process |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for family in families:
        values = np.asarray(list(seconds.get(family, {}).values()))
        if values.size:
            lines.append(f"| {family} | {values.size} | {np.median(values):.2f} | {values.mean():.2f} | "
                         f"{10000 * values.mean() / 3600:.1f} h |")  # fmt: skip
    count, wall = run
    lines += ["", f"This invocation: {count} architectures in {wall:.0f} s wall ({count / max(wall, 1e-9):.2f} per "
              f"second) with {workers} worker process(es) at niceness {os.nice(0)}, on {os.cpu_count()} cores shared "
              f"with other work (load average {os.getloadavg()[0]:.1f} at the end). Seconds per architecture: measured "
              "in the process that ran it, compile included."]  # fmt: skip
    lines += ["", "## Worst case per family", "",
              "The leaf closest to its bound (largest e_h / allowed) of each family and dtype, and its replay line.",
              ""]  # fmt: skip
    for family in families:
        for dtype in ("float64", "float32"):
            members = [r for r in rows if r["family"] == family and r["dtype"] == dtype]
            if members:
                lines += _case_lines(max(members, key=_margin), specs)
    failing = [r for r in rows if r["mismatch"] == "1"]
    lines += ["", "## Mismatches", ""] + ([line for r in failing for line in _case_lines(r, specs)] or ["None."])
    target = path.with_suffix(".md")
    target.write_text("\n".join(lines) + "\n")
    return target


def _case_lines(row: dict, specs: dict) -> list[str]:
    spec = specs.get(row["family"], [])[int(row["index"])] if int(row["index"]) < len(specs.get(row["family"], [])) \
        else None  # fmt: skip
    replay = replay_line(spec) if spec is not None else "(not drawn by these arguments)"
    f64 = f", float64 pass {float(row['float64_error']):.1e}" if row["float64_error"] else ""
    return [
        f"- {row['family']} {row['dtype']}, architecture {row['index']} `{row['architecture']}`, vs {row['oracle']}, "
        f"layer {row['layer']} {row['param']} ({row['kind']}): e_h {float(row['h_error']):.2e}, e_a "
        f"{float(row['a_error']):.2e}, allowed {float(row['allowed']):.2e}{f64}, "
        f"{'MISMATCH' if row['mismatch'] == '1' else 'passed'}",
        f"  `{replay}`",
    ]


def main_families(args) -> int:
    """``--families``: run or resume, write the table, print it; 1 on any mismatch."""
    families = tuple(dict.fromkeys(args.families))
    trials = 6 if args.quick and args.trials is None else (args.trials if args.trials is not None else 10000)
    start = time.perf_counter()
    path = args.out / f"{STEM}.csv"
    stopped, count = run_families(families, trials, args.seed, args.out, args.workers, args.quick)
    wall = time.perf_counter() - start
    table_path = write_table(path, families, trials, args.seed, args.quick, (count, wall), args.workers)
    table = summarise(read_rows(path))
    for r in table:
        print(
            f"{r['family']:<6} {r['oracle']:<8} {r['dtype']}: {r['architectures']} architectures, {r['leaves']} "
            f"leaves, worst e_h {r['worst_h']:.1e}, worst e_a {r['worst_a']:.1e}, {r['mismatches']} mismatches"
        )
    print(f"{count} architectures in {wall:.0f} s; {table_path}")
    if stopped:
        return 130
    return 1 if any(r["mismatches"] for r in table) else 0
