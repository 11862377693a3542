"""``fastddpm bench``: sampling speed of fastddpm against diffusers, eager PyTorch and torch.compile.

The measuring code is the package ``benchmarks/harness/`` of a source checkout (rows, metrics and
file formats are described in ``benchmarks/README.md``); this module only defines the command line,
finds the harness and calls its ``run_from_args(args)``. It looks in ``$FASTDDPM_BENCH_HARNESS`` (the
harness folder, or its ``__init__.py``), then next to the package (``<checkout>/benchmarks/harness/``,
present for editable installs and checkouts).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from .._argtypes import positive_int

HARNESS_ENV = "FASTDDPM_BENCH_HARNESS"
_MODULE_NAME = "fastddpm_bench_harness"


def harness_path() -> Path:
    """The harness package's ``__init__.py``: from ``$FASTDDPM_BENCH_HARNESS`` (the folder or that file),
    else ``<checkout>/benchmarks/harness/__init__.py``."""
    env = os.environ.get(HARNESS_ENV, "").strip()
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "benchmarks" / "harness"
    return path / "__init__.py" if path.suffix != ".py" else path


def load_harness() -> ModuleType:
    """Import the ``benchmarks/harness`` package (once) and return it.

    Raises:
        FileNotFoundError: the harness is not there (an installed wheel ships without benchmarks).
    """
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    path = harness_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"the benchmark harness {path} does not exist: `fastddpm bench` runs from a source checkout "
            f"(pip install -e .), or set {HARNESS_ENV}=/path/to/benchmarks/harness"
        )
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path, submodule_search_locations=[str(path.parent)])
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot import the benchmark harness from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module  # dataclasses look their module up in sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_MODULE_NAME]
        raise
    return module


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``fastddpm bench`` (also used by ``python benchmarks/harness``)."""
    rows = "B0a,B0b,B1,B2,F1,F2,F3,COPY,MM,K0,K1,K2,KD,KS,KSD,FS,BS,E2E"
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: a tiny U-Net, batch 2, 2 steps, every row that can run on this device",
    )
    p.add_argument(
        "--case",
        action="append",
        default=None,
        metavar="MODEL:B[,B...]",
        help="model and batch sizes, repeatable. Models: ddpm-cifar10, digits, tiny, ddpm-256, a bundled "
        "name or a checkpoint dir (default: both models at 1,16,256 on GPU; ddpm-cifar10:1,8 and "
        "digits:64 on CPU)",
    )
    p.add_argument("--rows", default=None, help=f"comma list of row kinds to run (default: all of {rows})")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="sampling steps per timed run (default 20 on GPU, 3 on CPU); 1000-step times are projected",
    )
    p.add_argument(
        "--solver-steps",
        type=positive_int,
        default=None,
        help="steps S of the multistep-solver rows KS, KSD, FS, BS (default 10); E2E rows name their own",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (B1, B2, +compile)")
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of those rows (default inductor)"
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="S",
        help="stop starting rows after S seconds; the rest are recorded as skipped",
    )
    p.add_argument("--target-s", type=float, default=None, help="measured seconds to aim for per row")
    p.add_argument("--min-repeats", type=positive_int, default=None, help="fewest timed runs per row")
    p.add_argument("--max-repeats", type=positive_int, default=None, help="most timed runs per row")
    p.add_argument(
        "--kernel-backends",
        default=None,
        help="fused backends of the K1 and KS rows, comma separated (default: triton,cuda on GPU; cpu on CPU)",
    )
    p.add_argument("--out", default=None, help="output folder for bench.json, bench.csv, bench.png "
                                               "(default bench-results/<device>-<date>)")  # fmt: skip
    p.add_argument("--no-plot", action="store_true", help="do not write bench.png")
    p.add_argument("--quiet", action="store_true", help="no per-row progress lines")


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``fastddpm bench`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="time sampling: fastddpm vs diffusers, eager PyTorch and torch.compile (JSON, CSV, PNG)",
        description="Time DDPM sampling rows side by side on one model, batch and step count: diffusers "
        "DDPMPipeline (B0a), an eager loop (B0b), torch.compile (B1, B2) and fastddpm eager / CUDA-graph "
        "sampling (F1-F3), plus the step kernel alone against the copy bandwidth; the multistep solvers' step "
        "against diffusers' (KS, KSD), loop (FS, BS) and end to end against DDPM-1000 (E2E). Writes bench.json, "
        "bench.csv and bench.png. See benchmarks/README.md.",
    )
    add_bench_arguments(p)
    p.set_defaults(func=run_bench)
    return p


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by the parsed ``args``; returns the exit status."""
    return int(load_harness().run_from_args(args) or 0)
