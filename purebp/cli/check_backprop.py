"""``purebp check-backprop MODULE:FUNCTION``: check your own backward pass with ``purebp.kit.check_backprop``.

The command loads ``fn(weights, biases, x, y)`` from a module or a file and prints the kit's report; exit 0
when it passed, 1 on a mismatch (or an exception in the function), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence

# the kit's choices, repeated so that the parser (and --help) loads without JAX; tests/kit/test_backprop_kit.py
# checks they are the kit's own
LAYOUTS = ("columns", "rows", "examples")
DTYPES = ("float64", "float32")


def add_check_backprop_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-backprop",
        help="check your own backward pass fn(weights, biases, x, y) against autodiff: MODULE:FUNCTION --activation "
        "sigmoid --loss mse --layout columns (exit 1 on a mismatch)",
        description="Check your own backward pass fn(weights, biases, x, y) against autodiff on random networks "
        "(purebp.kit.check_backprop); on a mismatch the report names the layer and which of BP1-BP4 is wrong.",
    )
    parser.add_argument("target", help="MODULE:FUNCTION or path/to/file.py:FUNCTION")
    parser.add_argument("--activation", required=True, help="hidden-layer activation (purebp's registry)")
    parser.add_argument("--output", default=None, help="output activation (default: the loss's, else --activation)")
    parser.add_argument("--loss", required=True, help="cost (purebp's registry)")
    parser.add_argument("--reduction", default="sum", choices=("sum", "mean"))
    parser.add_argument("--layout", default="columns", choices=LAYOUTS)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-depth", type=int, default=3)
    parser.add_argument("--max-width", type=int, default=6)
    parser.add_argument("--max-batch", type=int, default=5)
    parser.add_argument("--dtype", default="float64", choices=DTYPES)
    parser.set_defaults(handler=run_check_backprop)


def load_function(target: str) -> Callable:
    """``module:function`` or ``path/to/file.py:function``, imported from the current directory."""
    module_name, sep, function_name = target.rpartition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"expected MODULE:FUNCTION (or path/to/file.py:FUNCTION), got {target!r}")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(module_name[:-3].replace("/", "_"), module_name)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot load {module_name!r}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if "" not in sys.path:
            sys.path.insert(0, "")  # a module next to the caller, as `python -m` would find it
        module = importlib.import_module(module_name)
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ValueError(f"{module_name!r} has no function {function_name!r}")
    return fn


def run_check_backprop(args: argparse.Namespace) -> int:
    """Print the kit's report; 0 when it passed, 1 on a mismatch, 2 on bad arguments."""
    from purebp import losses
    from purebp.kit.backprop import check_backprop

    try:
        fn = load_function(args.target)
        output = args.output
        if output is None:
            output = losses.get(args.loss).output_activation or args.activation
        report = check_backprop(
            fn,
            activation=args.activation,
            output=output,
            loss=args.loss,
            reduction=args.reduction,
            layout=args.layout,
            trials=args.trials,
            seed=args.seed,
            max_depth=args.max_depth,
            max_width=args.max_width,
            max_batch=args.max_batch,
            dtype=args.dtype,
        )
    except (ValueError, TypeError, ImportError) as error:
        print(f"purebp check-backprop: error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.passed else 1


def main_check_backprop(argv: Sequence[str] | None = None) -> int:
    """``purebp check-backprop ARGUMENTS``: the same as ``purebp.cli.main(["check-backprop", *argv])``."""
    from purebp.cli.main import main

    return main(["check-backprop", *(sys.argv[1:] if argv is None else argv)])
