"""``fastddpm quality``: sample quality and cost of each sampler against the number of steps.

Writes ``results.csv``, ``results.json``, ``figures/*.png`` and ``grids/*.png`` into ``--out``; see
:mod:`fastddpm.quality.run`.
"""

from __future__ import annotations

import argparse
from typing import Any

from .._argtypes import positive_int


def _int_list(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,10,100; got {s!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be >= 1, got {s!r}")
    return vals


def _samplers(s: str) -> tuple[str, ...]:
    from ..quality.run import SAMPLER_ORDER

    vals = tuple(v.strip() for v in s.split(",") if v.strip())
    bad = [v for v in vals if v not in SAMPLER_ORDER]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown sampler(s) {bad or s!r}; allowed: {', '.join(SAMPLER_ORDER)}")
    return vals


def _names(s: str) -> tuple[str, ...]:
    vals = tuple(v.strip() for v in s.split(",") if v.strip())
    if not vals:
        raise argparse.ArgumentTypeError(f"expected a model name or checkpoint dir (comma list allowed), got {s!r}")
    return vals


def add_quality_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``quality`` subcommand on ``sub``."""
    p = sub.add_parser(
        "quality",
        help="measure sample quality and time per image for x0 / DDPM / DDIM at 1..1000 steps and the multistep "
        "solvers at 1..50",
        description="Sample the digits model and a 2-D toy at each step count with each sampler; score them "
        "(FD-digits, classifier confidence and class coverage; sliced Wasserstein distance and log-density "
        "for the toy), time them, and write results.csv, results.json and figures into --out.",
    )
    p.add_argument("--out", default="quality", help="output folder (default ./quality)")
    p.add_argument(
        "--quick", action="store_true", help="CI preset: steps 1,10,50 (solvers 5,10), 64 digits, 500 toy points"
    )
    p.add_argument("--model", default=None, help="digits model: bundled name or checkpoint dir (default digits)")
    p.add_argument("--steps", type=_int_list, default=None, help="step counts (default 1,2,5,10,20,50,100,250,1000)")
    p.add_argument("--solver-steps", type=_int_list, default=None,
                   help="step counts of the multistep solvers (default 1,2,3,5,8,10,15,20,50)")  # fmt: skip
    p.add_argument("--samplers", type=_samplers, default=None,
                   help="comma list of x0, ddpm, ddim, ddim-noclip, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc "
                   "(default all)")  # fmt: skip
    p.add_argument("--extra-model", type=_names, action="append", default=None, metavar="NAME_OR_DIR",
                   help="another digits model (e.g. a distilled student), sampled with the settings of its "
                   "sampling.json; repeat the flag or give a comma list")  # fmt: skip
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0)")
    p.add_argument("--spacing", default=None, help="timestep spacing (default trailing: every schedule starts at T-1)")
    p.add_argument("--num-samples", type=positive_int, default=None, help="digits per setting (default 256)")
    p.add_argument("--toy-samples", type=positive_int, default=None, help="toy points per setting (default 2000)")
    p.add_argument("--toy-train-steps", type=int, default=None,
                   help="train the toy MLP here for this many steps instead of loading the shipped one")  # fmt: skip
    p.add_argument("--no-toy-exact", action="store_true", help="skip the exact-denoiser toy sweep")
    p.add_argument("--no-digits", action="store_true", help="skip the digits part")
    p.add_argument("--no-toy", action="store_true", help="skip the 2-D toy part")
    p.add_argument("--no-figures", action="store_true", help="write only the CSV/JSON tables")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (default 256)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--backend", default=None, help="fused step backend: auto, cpu, triton, cuda, reference")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run_quality)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~fastddpm.quality.run.QualityConfig` the arguments ask for (``--quick`` then overrides)."""
    from ..quality.run import QualityConfig

    given = {
        "model": args.model, "steps": args.steps, "solver_steps": args.solver_steps, "samplers": args.samplers, "eta": args.eta, "spacing": args.spacing,
        "num_samples": args.num_samples, "toy_samples": args.toy_samples, "toy_train_steps": args.toy_train_steps,
        "seed": args.seed, "batch_size": args.batch_size, "device": args.device, "backend": args.backend,
    }  # fmt: skip
    over: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if args.extra_model:
        over["extra_models"] = tuple(name for group in args.extra_model for name in group)
    if args.no_toy_exact:
        over["toy_exact"] = False
    over.update(digits=not args.no_digits, toy=not args.no_toy, figures=not args.no_figures, progress=not args.quiet)
    return QualityConfig.quick(**over) if args.quick else QualityConfig(**over)


def run_quality(args: argparse.Namespace) -> int:
    """Entry point of ``fastddpm quality``."""
    import time

    import torch

    from ..quality.run import format_table
    from ..quality.run import run_quality as run

    config = config_from_args(args)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        result = run(config, args.out)
    finally:
        torch.set_num_threads(threads)
    print(format_table(result))
    print(f"wrote {len(result.files)} files to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0
