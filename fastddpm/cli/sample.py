"""``fastddpm sample``: draw samples from a model and write a PNG grid or an ``.npz``.

The flags are parsed into one :class:`~fastddpm.SamplingConfig` (:func:`config_from_args`), which goes whole to
:func:`fastddpm.sample` in one process or to :func:`fastddpm.shards.sample_sharded` under torchrun or with
``--shard-size``: both paths see the same options. Every argument is checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from .._argtypes import positive_int
from ..config import ConfigError, SamplingConfig
from . import _checks

DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# The flag that sets each SamplingConfig field, for error messages.
FLAGS = {
    "sampler": "--sampler", "num_inference_steps": "--steps", "timestep_spacing": "--spacing", "eta": "--eta",
    "use_clipped_model_output": "--use-clipped-model-output", "seed": "--seed", "batch_size": "--batch-size",
    "dtype": "--dtype", "cuda_graph": "--no-cuda-graph", "backend": "--backend", "solver_order": "--solver-order",
    "use_karras_sigmas": "--karras",
}  # fmt: skip


def add_sample_parser(sub: argparse._SubParsersAction) -> None:
    from ..sampling import SAMPLERS

    p = sub.add_parser("sample", help="draw samples from a model and write a .png grid or .npz",
                       description="Sample images from a DDPM model (bundled name, fastddpm checkpoint dir or "
                                   "diffusers model dir) and write them as a PNG grid or an .npz of uint8 NHWC images.")  # fmt: skip
    p.add_argument(
        "--model",
        default="digits",
        help="bundled model name, fastddpm checkpoint dir or diffusers dir (default: digits)",
    )
    p.add_argument("--num-samples", type=positive_int, default=64, help="number of images (default 64)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="inference steps (default: the model's sampling.json when --sampler is its sampler -- 15 "
                        "dpmpp_2m_sde steps for digits -- else all training steps; x0 is one model evaluation)")  # fmt: skip
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help="sampler (default: the model's sampling.json, else ddpm); dpmpp_2m, dpmpp_3m, dpmpp_2m_sde "
                        "and unipc are the few-step multistep solvers")  # fmt: skip
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0; --sampler ddim only)")
    p.add_argument("--solver-order", type=int, default=None, choices=(1, 2, 3),
                   help="UniPC's order (default 2; multistep samplers only)")  # fmt: skip
    p.add_argument("--karras", action="store_true",
                   help="Karras sigma spacing (diffusers' use_karras_sigmas; multistep samplers only)")  # fmt: skip
    p.add_argument("--use-clipped-model-output", action="store_true",
                   help="DDIM: re-derive the noise from the clipped x0 (keeps many-step DDIM consistent with clip_sample)")  # fmt: skip
    p.add_argument(
        "--spacing",
        default=None,
        help="timestep spacing: leading, linspace, trailing or e.g. ddim50 (default: the model's sampling.json, else its "
        "scheduler config's timestep_spacing)",
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed, 0 <= seed < 2**64 (default 0)")
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="images per batch (default: all at once, at most 256)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto",
                   help="U-Net precision; auto (default): fp32, or bf16 autocast on a CPU with native bf16 where a "
                        "timed forward is faster (the summary line says which). The step math is always fp32")  # fmt: skip
    p.add_argument("--out", default="samples.png", help="output .png (grid) or .npz (default samples.png)")
    p.add_argument("--shard-size", type=positive_int, default=None,
                   help="write resumable shards of this many images next to --out (default under torchrun: 4 batches)")  # fmt: skip
    p.add_argument("--backend", default="auto", help="fused step backend: auto, cpu, triton, cuda, reference")
    p.add_argument("--no-cuda-graph", action="store_true", help="sample eagerly on GPU")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the U-Net (backend: inductor unless named). Off by default: the first "
                        "batch pays the compile (seconds to minutes on a small CPU); whether it is faster "
                        "afterwards depends on the device: compare with `fastddpm bench` (rows B1, +compile)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_sample)


def config_from_args(args: argparse.Namespace, steps: int | None) -> SamplingConfig:
    """The one :class:`SamplingConfig` of a ``fastddpm sample`` command line (errors name the flag)."""
    try:
        return SamplingConfig(
            sampler=args.sampler or "ddpm", num_inference_steps=steps, timestep_spacing=args.spacing,
            eta=0.0 if args.eta is None else args.eta, use_clipped_model_output=args.use_clipped_model_output,
            seed=args.seed, batch_size=args.batch_size or min(args.num_samples, 256), dtype=DTYPES[args.dtype],
            cuda_graph="off" if args.no_cuda_graph else "auto", backend=args.backend,
            solver_order=getattr(args, "solver_order", None), use_karras_sigmas=getattr(args, "karras", False),
        )  # fmt: skip
    except ConfigError as e:
        raise ValueError(f"{FLAGS.get(e.field, e.field)}: {e}") from None


def prepare_unet(model, compile_backend: str | None = None):
    """The U-Net as the CLI samples it: channels_last weights (cuDNN's fast layout on GPU, oneDNN's on
    CPU: digits, b = 64, 61 -> 46 ms per step on the 2-core machine; ``sample()`` then feeds it
    channels_last input), optionally wrapped in ``torch.compile(backend=compile_backend)``."""
    import torch

    model = model.to(memory_format=torch.channels_last)
    if compile_backend:
        model = torch.compile(model, backend=compile_backend, dynamic=False)
    return model


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def apply_model_defaults(args: argparse.Namespace) -> int | None:
    """Fill ``--sampler``, ``--eta`` and ``--spacing`` left unset from the model's ``sampling.json``
    (a distilled student names its sampler there) and return the step count to use: ``--steps``, else the
    file's (x0: None, one evaluation). ``eta`` and the spacing are taken only with the file's own sampler."""
    from ..registry import sampling_defaults

    defaults = sampling_defaults(args.model)
    if args.sampler is None:
        args.sampler = defaults.get("sampler", "ddpm")
    if args.sampler == defaults.get("sampler", "ddpm"):
        if args.eta is None and "eta" in defaults and args.sampler == "ddim":
            args.eta = defaults["eta"]
        if args.spacing is None:
            args.spacing = defaults.get("timestep_spacing")
    if args.sampler == "x0":
        return args.steps
    if args.steps is not None:
        return args.steps
    # The file's step count goes with its sampler: `--sampler ddpm` alone is the full chain, not 15 DDPM steps.
    if args.sampler == defaults.get("sampler", args.sampler):
        return defaults.get("num_inference_steps")
    return None


def run_sample(args: argparse.Namespace) -> int:
    steps = apply_model_defaults(args)
    config = config_from_args(args, steps)
    device = _checks.check_device(args.device)
    sharded = os.environ.get("WORLD_SIZE", "1") not in ("", "1") or args.shard_size
    out, created = _checks.prepare_output_file(args.out)
    if created and _is_rank0():
        print(f"created folder {created[0]}")
    try:
        for warning in _checks.check_model_files(args.model, args.sampler):
            if _is_rank0():
                print(f"fastddpm sample: warning: {warning}", file=sys.stderr)
        if sharded:
            return run_sharded_sample(args, out, device, config)
        return _run_one_process(args, out, device, config)
    except KeyboardInterrupt:
        if _is_rank0():
            kept = (
                f"; the finished shards in {out}.shards are kept: rerun the same command to resume" if sharded else ""
            )
            print(f"interrupted; {out} was not written{kept}", file=sys.stderr)
        if _is_rank0():
            _checks.remove_empty(created)
        return 130
    except BaseException:
        if _is_rank0():
            _checks.remove_empty(created)
        raise


def _summary(schedule: Any, config: SamplingConfig) -> str:
    """``"ddpm, 250 steps, float32"``; for x0 the one timestep it predicts from."""
    from ..sampling import plan_for

    if config.sampler == "x0":
        import torch

        t = int(plan_for(schedule, config, torch.device("cpu")).pairs[0, 0])
        return f"x0, one model evaluation at t={t}, {config.dtype}"
    from ..sampling import plan_steps

    return f"{config.sampler}, {plan_steps(schedule, config)} steps, {config.dtype}"


def _resolve_dtype(model: Any, config: SamplingConfig, device: Any, quiet: bool = False) -> SamplingConfig:
    """``--dtype auto`` made concrete for this model and device, with one line saying what was chosen and why."""
    from ..sampling import resolve_auto_dtype

    config, choice = resolve_auto_dtype(model, config, device)
    if choice is not None and not quiet:
        print(f"dtype: {config.dtype} ({choice.reason})", file=sys.stderr)
    return config


def _run_one_process(args: argparse.Namespace, out: Path, device: Any, config: SamplingConfig) -> int:
    from ..images import save_samples
    from ..registry import load_model
    from ..sampling import sample

    model, schedule, desc = load_model(args.model, device)
    model = prepare_unet(model, args.compile)
    config = _resolve_dtype(model, config, device)
    t0 = time.perf_counter()
    images = sample(model, schedule, args.num_samples, device=device, progress=not args.quiet, config=config)
    path = save_samples(images, out)
    dt = time.perf_counter() - t0
    print(f"wrote {images.shape[0]} images ({'x'.join(map(str, images.shape[1:]))}) to {path.resolve()} in {dt:.1f} s "
          f"[{desc}; {_summary(schedule, config)}, seed {config.seed}, {device}]")  # fmt: skip
    return 0


def run_sharded_sample(args: argparse.Namespace, out: Path, device: Any, config: SamplingConfig | None = None) -> int:
    """``fastddpm sample`` under torchrun (or with ``--shard-size``): join the process group, sample through
    shards, merge on rank 0.

    Creates the process group from the torchrun environment when none exists (NCCL on ``cuda:LOCAL_RANK``,
    gloo on CPU) and destroys it at the end. Reads ``args.shard_size``, else env ``FASTDDPM_SHARD_SIZE``.
    ``config`` defaults to :func:`config_from_args` of ``args``.
    """
    from .. import distributed as D
    from ..registry import load_model
    from ..sampling import infer_shape
    from ..shards import sample_sharded, shard_folder

    if config is None:
        config = config_from_args(args, apply_model_defaults(args))
    device, created = D.init_from_env(device)
    try:
        rank, ws = D.world()
        model, schedule, desc = load_model(args.model, device)
        model = prepare_unet(model, getattr(args, "compile", None))  # as the one-process path: the same images
        config = _resolve_dtype(model, config, device, quiet=rank != 0)  # rank 0's choice, broadcast
        t0 = time.perf_counter()
        res = sample_sharded(
            model, schedule, out, args.num_samples, shard_size=getattr(args, "shard_size", None), device=device,
            progress=not args.quiet, info={"model": args.model}, log=print, config=config,
        )  # fmt: skip
        if rank == 0:
            dt = time.perf_counter() - t0
            c, h, w = infer_shape(model, None)
            print(f"wrote {res.num_samples} images ({c}x{h}x{w}) to {out.resolve()} in {dt:.1f} s "
                  f"[{desc}; {_summary(schedule, config)}, seed {config.seed}, {ws} x {device.type}; "
                  f"{res.num_shards} shards of {res.shard_size} in {shard_folder(out)}, {res.reused} reused]")  # fmt: skip
        return 0
    finally:
        if created:
            D.destroy()
