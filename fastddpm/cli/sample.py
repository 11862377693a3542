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

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# The flag that sets each SamplingConfig field, for error messages.
FLAGS = {
    "sampler": "--sampler", "num_inference_steps": "--steps", "timestep_spacing": "--spacing", "eta": "--eta",
    "use_clipped_model_output": "--use-clipped-model-output", "seed": "--seed", "batch_size": "--batch-size",
    "dtype": "--dtype", "cuda_graph": "--no-cuda-graph", "backend": "--backend",
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
                   help="inference steps (default: the model's sampling.json if it has one -- 250 for digits -- else "
                        "all training steps; x0 is always one model evaluation)")  # fmt: skip
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddpm", help="sampler (default ddpm)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0; --sampler ddim only)")
    p.add_argument("--use-clipped-model-output", action="store_true",
                   help="DDIM: re-derive the noise from the clipped x0 (keeps many-step DDIM consistent with clip_sample)")  # fmt: skip
    p.add_argument("--spacing", default="leading", help="timestep spacing: leading, linspace, trailing or e.g. ddim50")
    p.add_argument("--seed", type=int, default=0, help="noise seed, 0 <= seed < 2**64 (default 0)")
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="images per batch (default: all at once, at most 256)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="model precision (step math is always fp32)")
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
            sampler=args.sampler, num_inference_steps=steps, timestep_spacing=args.spacing, eta=args.eta,
            use_clipped_model_output=args.use_clipped_model_output, seed=args.seed,
            batch_size=args.batch_size or min(args.num_samples, 256), dtype=DTYPES[args.dtype],
            cuda_graph="off" if args.no_cuda_graph else "auto", backend=args.backend,
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


def run_sample(args: argparse.Namespace) -> int:
    from ..registry import recommended_steps

    steps = args.steps
    if steps is None and args.sampler != "x0":
        steps = recommended_steps(args.model)
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
    """``"ddpm, 250 steps"``; for x0 the one timestep it predicts from."""
    from ..sampling import plan_for

    if config.sampler == "x0":
        import torch

        t = int(plan_for(schedule, config, torch.device("cpu")).pairs[0, 0])
        return f"x0, one model evaluation at t={t}"
    from ..sampling import plan_steps

    return f"{config.sampler}, {plan_steps(schedule, config)} steps"


def _run_one_process(args: argparse.Namespace, out: Path, device: Any, config: SamplingConfig) -> int:
    from ..images import save_samples
    from ..registry import load_model
    from ..sampling import sample

    model, schedule, desc = load_model(args.model, device)
    model = prepare_unet(model, args.compile)
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
        config = config_from_args(args, args.steps)
    device, created = D.init_from_env(device)
    try:
        rank, ws = D.world()
        model, schedule, desc = load_model(args.model, device)
        model = prepare_unet(model, getattr(args, "compile", None))  # as the one-process path: the same images
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
