"""The ``purebp`` command: the parser and the dispatch.

Each subcommand lives in its own module (``verify``, ``train``, ``check_backprop``, ``launch``) as an
``add_<name>_parser(subparsers)`` function that registers its arguments and sets ``handler``; ``main``
parses and calls the handler. Parsing imports no JAX, so ``purebp --version``, ``--help`` and argument
errors (exit 2) answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from purebp.cli.arguments import version
from purebp.cli.check_backprop import add_check_backprop_parser
from purebp.cli.launch import add_launch_parser
from purebp.cli.train import add_train_parser
from purebp.cli.verify import add_verify_parser

PARSERS = [add_verify_parser, add_train_parser, add_launch_parser, add_check_backprop_parser]


def build_parser() -> argparse.ArgumentParser:
    """The ``purebp`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="purebp",
        description="Backpropagation by hand, proven equal to jax.grad. 'purebp verify' checks the hand-written "
        "gradient against JAX autodiff on random architectures; 'purebp train' trains a network with it.",
    )
    parser.add_argument("--version", action="version", version=version())
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in PARSERS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``purebp ARGV`` (``sys.argv[1:]`` by default); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
