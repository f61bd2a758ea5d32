"""``purebp verify``: random architectures through ``check_gradients``, one row per architecture as it is checked."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from purebp.cli.arguments import enable_x64_if

# The defaults of each mode: a quick check (about 20 s at most on 2 idle cores, nearly all of it compiling: one
# program per architecture). Larger stacks take longer to compile, so the stack bounds are smaller; the options
# reach every size.
DEFAULTS = {
    "mlp": {"trials": 40, "max_depth": 8, "max_width": 64, "max_batch": 64},
    "all": {"trials": 5, "max_depth": 4, "max_width": 16, "max_batch": 16},
}


def _describe_defaults(layers: str) -> str:
    bounds = DEFAULTS[layers]
    return (
        f"{bounds['trials']} architectures of depth <= {bounds['max_depth']}, width <= {bounds['max_width']}, "
        f"batch <= {bounds['max_batch']}"
    )


def add_verify_parser(subparsers: argparse._SubParsersAction) -> None:
    from purebp.testing import NOTATION_HELP  # light: no array is created on import

    parser = subparsers.add_parser(
        "verify",
        help="random architectures through check_gradients (hand-written vs JAX autodiff); a few seconds",
        description="Draw random architectures and compare the hand-written gradient with JAX autodiff on each; "
        "one row per architecture as soon as it is checked. --layers mlp (default): MLPs of depth 1-8, widths "
        "1-64, any activation per hidden layer, every valid output/cost pair, batch 1-64, both reductions. "
        "--layers all: stacks over every layer kind (dense layers, residual blocks, layer norm, dropout, with "
        "or without a dropout key; half of them behind a conv1d / pooling / residual-conv front and a flatten) and "
        "every cost, printed compactly: " + NOTATION_HELP + " (e.g. "
        "in4>d5t>r(d5r,ln)>do.25>d3). Each architecture is a new program, compiled once and run once, so by "
        "default its two gradients are compiled together, on CPU at XLA's quick settings (LLVM -O0: the same "
        "ops, less optimised kernels). Compiling is nearly all the cost, so the defaults are a quick check "
        f"(about 20 s at most on 2 idle cores): {_describe_defaults('mlp')} with --layers mlp, "
        f"{_describe_defaults('all')} with --layers all. For more, raise --trials (an MLP takes tenths of a "
        "second, a stack up to a few seconds: a stack with a dropout key is compiled at XLA's default settings) "
        "and the bounds, and vary --seed, e.g. purebp verify --trials 1000 --dtype both; purebp verify --layers all "
        "--trials 200 --max-depth 8 --max-width 64 --max-batch 64. Exit code 1 on any mismatch.",
    )
    parser.add_argument(
        "--trials",
        type=int,
        help=f"number of random architectures (default {DEFAULTS['mlp']['trials']}; "
        f"{DEFAULTS['all']['trials']} with --layers all)",
    )
    parser.add_argument(
        "--layers",
        choices=("mlp", "all"),
        default="mlp",
        help="mlp: dense layers only (default); all: dense, residual, layer norm, dropout, conv1d, pooling and "
        "flatten stacks",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "float64", "both"), default="float64", help="parameter dtype (default float64)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the architecture generator (default 0)")
    parser.add_argument(
        "--max-depth",
        type=int,
        help="most layers (with --layers all: top-level layers) (default "
        f"{DEFAULTS['mlp']['max_depth']}; {DEFAULTS['all']['max_depth']} with --layers all)",
    )
    parser.add_argument(
        "--max-width",
        type=int,
        help=f"widest layer (default {DEFAULTS['mlp']['max_width']}; {DEFAULTS['all']['max_width']} with --layers all)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        help=f"largest batch (default {DEFAULTS['mlp']['max_batch']}; "
        f"{DEFAULTS['all']['max_batch']} with --layers all)",
    )
    parser.add_argument(
        "--full-compile",
        action="store_true",
        help="compile each gradient as its own program with XLA's default optimisations, as "
        "purebp.value_and_grad runs (several times slower)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    parser.set_defaults(handler=run_verify)


# jax.clear_caches() after every so many architectures: each one is a new program, and with
# --full-compile thousands of cached executables exhaust the process's memory mappings (LLVM 'Cannot
# allocate memory', seen after some hundreds of trials); the fast path caches no executable, only traces
_VERIFY_CLEAR_EVERY = 32


def _verify_sizes_width(max_depth: int, max_width: int) -> int:
    # the longest sizes cell this run can draw (depth + 1 widths, the output at least 2 wide),
    # so the column is never cut
    return max(len("sizes"), (max_depth + 1) * (len(str(max(max_width, 2))) + 1) - 1)


def _verify_row(columns: Sequence[str], sizes_width: int) -> str:
    # the activation list comes last, unpadded: it is never cut, however deep the network
    trial, sizes, loss, reduction, dtype, batch, error, autodiff, verdict, activations = columns
    return (
        f"{trial:>5}  {sizes:<{sizes_width}}  {loss:<22} {reduction:<4} {dtype:<7} {batch:>3}  {error:>9} "
        f"{autodiff:>9}  {verdict:<8}  {activations}"
    )


def _verify_stack_row(columns: Sequence[str]) -> str:
    # --layers all: the architecture comes last, unpadded, so it is never cut
    trial, loss, reduction, dtype, batch, key, error, autodiff, verdict, architecture = columns
    return (
        f"{trial:>5}  {loss:<22} {reduction:<4} {dtype:<7} {batch:>3}  {key:<3}  {error:>9} {autodiff:>9}  "
        f"{verdict:<8}  {architecture}"
    )


def _verify_draw(args: argparse.Namespace, rng, dtype: str):
    """Draw one architecture; return (case, the table row without its error and verdict cells, replay line)."""
    from purebp import testing

    bounds = {"max_depth": args.max_depth, "max_width": args.max_width, "max_batch": args.max_batch}
    if args.layers == "all":
        spec = testing.random_stack_spec(rng, dtype=dtype, conv=None, **bounds)
        cells = (spec.loss, spec.reduction, dtype, str(spec.batch), "yes" if spec.with_key else "no")
        return testing.make_stack_case(spec), (cells, spec.notation), f"purebp.testing.make_stack_case({spec!r})"
    spec = testing.random_spec(rng, dtype=dtype, **bounds)
    cells = (",".join(map(str, spec.sizes)), spec.loss, spec.reduction, dtype, str(spec.batch))
    return testing.make_case(spec), (cells, ",".join(spec.activations)), f"purebp.testing.make_case({spec!r})"


def _fill_defaults(args: argparse.Namespace) -> None:
    # the bounds left out take their mode's defaults; the ones given are checked
    for name, value in DEFAULTS[args.layers].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for flag, value in (("--trials", args.trials), ("--max-depth", args.max_depth),
                        ("--max-width", args.max_width), ("--max-batch", args.max_batch)):  # fmt: skip
        if value < 1:
            raise SystemExit(f"purebp verify: {flag} must be at least 1, got {value}")


def _announce(args: argparse.Namespace, dtypes: Sequence[str]) -> None:
    # on stderr, so that stdout stays the table: what runs, and how to run more
    kind = "MLPs" if args.layers == "mlp" else "stacks of every layer kind"
    print(
        f"purebp verify: {args.trials} random {kind} in {' and '.join(dtypes)} (seed {args.seed}, depth <= "
        f"{args.max_depth}, width <= {args.max_width}, batch <= {args.max_batch}), each compiled and checked once; "
        "more with --trials N, --seed S and the --max-* bounds",
        file=sys.stderr,
        flush=True,
    )


def run_verify(args: argparse.Namespace) -> int:
    """Check ``args.trials`` random architectures; print a row for each as it is checked; 1 on any mismatch."""
    _fill_defaults(args)
    dtypes = ("float32", "float64") if args.dtype == "both" else (args.dtype,)
    if not args.quiet:
        _announce(args, dtypes)
    enable_x64_if(dtypes)
    import jax
    import numpy as np

    from purebp.check import KAPPA, check_gradients

    rng = np.random.default_rng(args.seed)
    sizes_width = _verify_sizes_width(args.max_depth, args.max_width)
    if args.layers == "all":
        header = ("#", "loss", "red", "dtype", "N", "key", "hand", "autodiff", "verdict", "architecture")

        def format_row(columns: Sequence[str]) -> str:
            return _verify_stack_row(columns)
    else:
        header = ("#", "sizes", "loss", "red", "dtype", "N", "hand", "autodiff", "verdict", "activations")

        def format_row(columns: Sequence[str]) -> str:
            return _verify_row(columns, sizes_width)

    if not args.quiet:
        print(format_row(header), flush=True)
    worst: dict[str, float] = {}
    failures = []
    for trial in range(args.trials):
        dtype = dtypes[trial % len(dtypes)]
        case, (cells, last), replay = _verify_draw(args, rng, dtype)
        report = check_gradients(
            case.net,
            case.x,
            case.y,
            loss=case.loss,
            reduction=case.reduction,
            key=case.key,
            fast_compile=not args.full_compile,
        )
        if (trial + 1) % _VERIFY_CLEAR_EVERY == 0:
            jax.clear_caches()
        worst[dtype] = max(worst.get(dtype, 0.0), report.max_relative_error)
        autodiff = f"{report.max_autodiff_error:.2e}" if report.reference_dtype else "-"
        row = (
            str(trial), *cells, f"{report.max_relative_error:.2e}", autodiff, "ok" if report.passed else "MISMATCH",
            last,
        )  # fmt: skip
        if not report.passed:
            failures.append((replay, report))
        if not report.passed or not args.quiet:
            # flushed: `purebp verify | cat` shows each row as soon as its architecture is checked
            print(format_row(row), flush=True)
    summary = ", ".join(f"worst relative error {dtype} {error:.2e}" for dtype, error in worst.items())
    print(
        f"purebp verify: {args.trials} architectures, {len(failures)} mismatches; {summary} (hand: the "
        f"hand-written gradient's distance from the truth, jax.grad in float64; autodiff: jax.grad's own, in "
        f"float32; a leaf is a mismatch when hand > max({KAPPA:g} x autodiff, tolerance), tolerance 1e-10 float64, "
        f"1e-5 float32)",
        flush=True,
    )
    for replay, report in failures:
        print(f"\nreplay: {replay}\n{report}", flush=True)
    return 1 if failures else 0
