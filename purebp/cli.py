"""The ``purebp`` command.

Each subcommand is an ``add_<name>_parser(subparsers)`` function that
registers its arguments and sets ``handler``; ``main`` dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _enable_x64_if(dtypes: Sequence[str]) -> None:
    # must run before any array exists
    if "float64" in dtypes:
        import jax

        jax.config.update("jax_enable_x64", True)


# ---------------------------------------------------------------- purebp verify


def add_verify_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="random architectures through check_gradients (hand-written vs jax.grad)",
        description="Draw random architectures (depth 1-8, widths 1-64, any activation per hidden "
        "layer, every valid output/cost pair, batch 1-64, both reductions) and compare the "
        "hand-written gradient with jax.grad on each. Exit code 1 on any mismatch.",
    )
    parser.add_argument("--trials", type=int, default=200, help="number of random architectures (default 200)")
    parser.add_argument(
        "--dtype", choices=("float32", "float64", "both"), default="float64", help="parameter dtype (default float64)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the architecture generator (default 0)")
    parser.add_argument("--max-depth", type=int, default=8)
    parser.add_argument("--max-width", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    parser.set_defaults(handler=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    if args.trials < 1:
        raise SystemExit(f"purebp verify: --trials must be at least 1, got {args.trials}")
    dtypes = ("float32", "float64") if args.dtype == "both" else (args.dtype,)
    _enable_x64_if(dtypes)
    import numpy as np

    from purebp.check import check_gradients
    from purebp.testing import make_case, random_spec

    rng = np.random.default_rng(args.seed)
    header = (
        f"{'#':>5}  {'sizes':<28} {'activations':<44} {'loss':<22} {'red':<4} {'dtype':<7} {'N':>3}  {'max rel':>9}"
    )
    if not args.quiet:
        print(header)
    worst: dict[str, float] = {}
    failures = []
    for trial in range(args.trials):
        dtype = dtypes[trial % len(dtypes)]
        spec = random_spec(
            rng, dtype=dtype, max_depth=args.max_depth, max_width=args.max_width, max_batch=args.max_batch
        )
        case = make_case(spec)
        report = check_gradients(case.net, case.x, case.y, loss=spec.loss, reduction=spec.reduction)
        worst[dtype] = max(worst.get(dtype, 0.0), report.max_relative_error)
        line = (
            f"{trial:>5}  {','.join(map(str, spec.sizes)):<28.28} {','.join(spec.activations):<44.44} "
            f"{spec.loss:<22} {spec.reduction:<4} {dtype:<7} {spec.batch:>3}  {report.max_relative_error:>9.2e}"
        )
        if not report.passed:
            failures.append((spec, report))
            print(line + "  MISMATCH")
        elif not args.quiet:
            print(line)
    summary = ", ".join(f"worst relative error {dtype} {error:.2e}" for dtype, error in worst.items())
    print(
        f"purebp verify: {args.trials} architectures, {len(failures)} mismatches; {summary} "
        f"(tolerance 1e-10 float64, 1e-5 float32)"
    )
    for spec, report in failures:
        print(f"\nreplay: purebp.testing.make_case({spec!r})\n{report}")
    return 1 if failures else 0


# ---------------------------------------------------------------- entry point

PARSERS = [add_verify_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="purebp", description="Backpropagation by hand, proven equal to jax.grad.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in PARSERS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
