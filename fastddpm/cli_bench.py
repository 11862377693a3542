"""Old import path of :mod:`fastddpm.cli.bench` (``benchmarks/harness.py`` imports it from here)."""

from .cli.bench import add_bench_arguments, add_bench_parser, harness_path, load_harness, run_bench

__all__ = ["add_bench_arguments", "add_bench_parser", "harness_path", "load_harness", "run_bench"]
