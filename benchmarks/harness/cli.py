"""Command line of the harness: ``python benchmarks/harness [options]`` and ``fastddpm bench [options]``
(the options are defined by :func:`fastddpm.cli.bench.add_bench_arguments`; ``fastddpm bench`` parses
them and calls :func:`run_from_args`)."""

from __future__ import annotations

import argparse
import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .report import format_table
from .rows import CSV_NAME, JSON_NAME, PNG_NAME, BenchConfig, Case, Task, default_config, default_tasks, filter_tasks
from .run import run_benchmark

DESCRIPTION = "Sampling speed of fastddpm against the ways people sample today, measured side by side in one run."


def parse_cases(specs: Sequence[str]) -> list[Case]:
    """``["ddpm-cifar10:1,16", "digits:64"]`` -> cases."""
    cases = []
    for spec in specs:
        model, sep, batches = spec.rpartition(":")
        if not sep or not model:
            raise ValueError(f"--case must look like MODEL:B[,B...], got {spec!r}")
        try:
            cases += [Case(model, int(b)) for b in batches.split(",") if b]
        except ValueError:
            raise ValueError(f"--case {spec!r}: batch sizes must be positive integers") from None
    return cases


def config_from_args(args: argparse.Namespace) -> tuple[BenchConfig, list[Task]]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides: dict[str, Any] = {"compile_backend": args.compile_backend, "time_budget_s": args.time_budget}
    for name in ("steps", "target_s", "min_repeats", "max_repeats", "solver_steps"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.kernel_backends:
        overrides["kernel_backends"] = tuple(b.strip() for b in args.kernel_backends.split(",") if b.strip())
    cfg = default_config(device, quick=args.quick, **overrides)
    cases = parse_cases(args.case) if args.case else None
    tasks = default_tasks(torch.device(device).type, cases, quick=args.quick)
    rows = [r.strip() for r in args.rows.split(",")] if args.rows else None
    return cfg, filter_tasks(tasks, rows, no_compile=args.no_compile)


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/harness [options]``: the same as ``fastddpm bench [options]``."""
    from fastddpm.cli.bench import add_bench_arguments

    p = argparse.ArgumentParser(description=DESCRIPTION)
    add_bench_arguments(p)
    return run_from_args(p.parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    cfg, tasks = config_from_args(args)
    out = args.out or f"bench-results/{torch.device(cfg.device).type}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    result = run_benchmark(cfg, tasks, out, log=None if args.quiet else print, plot=not args.no_plot)
    print(format_table(result))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(str(Path(out) / n) for n in (JSON_NAME, CSV_NAME, PNG_NAME) if (Path(out) / n).exists())}")
    return 0
