"""The ``fastddpm`` command line: one module per command (``sample``, ``train``, ``info``, ``bench``, ``quality``).

``fastddpm sample`` with no arguments samples the bundled digits model and writes ``samples.png``. Each command
module adds its parser and runs from the parsed arguments; library modules never see the ``argparse`` namespace.
"""

from __future__ import annotations

import argparse
import os
import sys

from .bench import add_bench_parser
from .distill import add_parser as add_distill_parser
from .info import add_info_parser
from .quality import add_quality_parser
from .sample import add_sample_parser
from .train import add_train_parser

__all__ = ["main", "build_parser", "add_sample_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastddpm", description="Fast, reproducible DDPM sampling and training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (
        add_sample_parser,
        add_train_parser,
        add_distill_parser,
        add_bench_parser,
        add_quality_parser,
        add_info_parser,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fastddpm`` with ``argv`` (default ``sys.argv[1:]``; none: ``sample``); returns the exit status.

    A command's error is printed as one line ``fastddpm COMMAND: error: ...`` with status 2 (set
    ``FASTDDPM_DEBUG=1`` for the traceback); an interrupt gives status 130.
    """
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["sample"])
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"fastddpm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, OSError, ArithmeticError) as e:
        if os.environ.get("FASTDDPM_DEBUG"):
            raise
        print(f"fastddpm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
