"""The ``fastddpm`` command line: ``sample``, ``train``, ``info``, ``bench``, ``quality``.

``fastddpm sample`` with no arguments samples the bundled digits model and writes ``samples.png``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from ._argtypes import positive_int

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_sample_parser(sub: argparse._SubParsersAction) -> None:
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
                   help="inference steps (default: the model's sampling.json if it has one -- 250 for digits -- else all training steps)")  # fmt: skip
    p.add_argument("--sampler", choices=["ddpm", "ddim", "x0"], default="ddpm", help="sampler (default ddpm)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--use-clipped-model-output", action="store_true",
                   help="DDIM: re-derive the noise from the clipped x0 (keeps many-step DDIM consistent with clip_sample)")  # fmt: skip
    p.add_argument("--spacing", default="leading", help="timestep spacing: leading, linspace, trailing or e.g. ddim50")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
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


def prepare_unet(model, compile_backend: str | None = None):
    """The U-Net as the CLI samples it: channels_last weights (cuDNN's fast layout on GPU, oneDNN's on
    CPU: digits, b = 64, 61 -> 46 ms per step on the 2-core machine; ``sample()`` then feeds it
    channels_last input), optionally wrapped in ``torch.compile(backend=compile_backend)``."""
    import torch

    model = model.to(memory_format=torch.channels_last)
    if compile_backend:
        model = torch.compile(model, backend=compile_backend, dynamic=False)
    return model


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from .images import check_output_path, save_samples
    from .registry import load_model

    out, created = check_output_path(args.out)
    if created:
        print(f"created folder {out.parent}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.steps is None and args.sampler != "x0":
        from .registry import recommended_steps

        args.steps = recommended_steps(args.model)
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1") or args.shard_size:
        from .shards import run_sharded_sample

        return run_sharded_sample(args, out, device)
    model, schedule, desc = load_model(args.model, device)
    model = prepare_unet(model, args.compile)
    from .sampling import sample

    batch = args.batch_size or min(args.num_samples, 256)
    t0 = time.perf_counter()
    images = sample(
        model, schedule, args.num_samples, num_inference_steps=args.steps, sampler=args.sampler, eta=args.eta,
        use_clipped_model_output=args.use_clipped_model_output,
        timestep_spacing=args.spacing, batch_size=batch, seed=args.seed, device=device,
        dtype=getattr(torch, DTYPES[args.dtype]), cuda_graph=not args.no_cuda_graph and "auto",
        progress=not args.quiet, backend=args.backend,
    )  # fmt: skip
    path = save_samples(images, out)
    dt = time.perf_counter() - t0
    steps = 1 if args.sampler == "x0" else (args.steps or schedule.num_train_timesteps)
    print(f"wrote {images.shape[0]} images ({'x'.join(map(str, images.shape[1:]))}) to {path.resolve()} in {dt:.1f} s "
          f"[{desc}; {args.sampler}, {steps} steps, seed {args.seed}, {device}]")  # fmt: skip
    return 0


def add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="backends available here and why not, compilers, device, versions")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from . import __version__
    from .dispatch import availability
    from .registry import bundled_models

    print(f"fastddpm {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}  (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})")
    except ImportError:
        print("triton: not installed (pip install triton)")
    try:
        import diffusers

        print(f"diffusers {diffusers.__version__}")
    except ImportError:
        print("diffusers: not installed (optional; needed for the DDPMPipeline comparison)")
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("cuda: no GPU visible")
    try:
        from ._build import compiler_info

        for k, v in compiler_info().items():
            print(f"{k}: {v}")
    except ImportError:
        pass
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"backends for {dev} tensors:")
    for name in ("reference", "cpu", "triton", "cuda"):
        ok, why = availability(name, dev)
        print(f"  {name:9s} {'available' if ok else 'unavailable'}: {why}")
    print(f"bundled models: {', '.join(bundled_models()) or '(none)'}")
    return 0


# Subcommands that live in their own modules: (module, function adding the parser).
_EXTRA = [("fastddpm.cli_train", "add_train_parser"), ("fastddpm.cli_bench", "add_bench_parser"),
          ("fastddpm.cli_quality", "add_quality_parser")]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastddpm", description="Fast, reproducible DDPM sampling and training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_sample_parser(sub)
    for mod, fn in _EXTRA:
        try:
            getattr(importlib.import_module(mod), fn)(sub)
        except (ImportError, AttributeError):
            continue
    add_info_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["sample"])
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; no partial output was written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as e:
        if os.environ.get("FASTDDPM_DEBUG"):
            raise
        print(f"fastddpm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
