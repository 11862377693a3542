"""``fastddpm train``: train a U-Net from a preset (or fine-tune a checkpoint) on digits or a folder of images.

Under ``torchrun`` (``WORLD_SIZE > 1``) the command initialises ``torch.distributed`` itself (NCCL on CUDA,
gloo on CPU), splits every global batch over the ranks and writes checkpoints from rank 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from .._argtypes import add_optimization_arguments, add_run_arguments, positive_int
from . import _checks

__all__ = ["add_train_parser", "run_train"]


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "train",
        help="train a DDPM U-Net (torchrun-aware)",
        description=(
            "Train a DDPM U-Net with the simple epsilon/sample/v loss. Checkpoints (EMA weights as config.json + "
            "model.safetensors, scheduler_config.json, training_state.pt) go to --out; --resume continues a run "
            "there up to --steps total steps. Launch with torchrun for multi-process (DDP) training."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default="digits", help="'digits', 'digits-train', 'digits-test' or a folder of PNG/JPEG")
    p.add_argument(
        "--model",
        default="digits",
        help="U-Net preset (digits, ddpm-cifar10, ddpm-256) or a checkpoint directory to fine-tune; presets win "
        "over a same-named directory (write ./NAME for that)",
    )
    p.add_argument("--steps", type=positive_int, default=10000, help="total optimizer steps of the run")
    add_optimization_arguments(p, batch_size=128, lr=2e-4, lr_help="AdamW learning rate", warmup=100,
                               warmup_help="linear learning-rate warm-up steps", ema_help="EMA decay of the saved weights")  # fmt: skip
    p.add_argument("--flip", action="store_true", help="random horizontal flips (never for digits)")
    p.add_argument("--out", default="fastddpm-train", help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    add_run_arguments(p, save_every=1000, save_help="checkpoint every N steps (0: end only)")
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    """Run ``fastddpm train`` from parsed arguments; returns the exit status."""
    from ..training import LOG_NAME, SCHEDULER_NAME, STATE_NAME, train

    _checks.check_device(args.device)
    rank0 = os.environ.get("RANK", "0") in ("", "0")
    out, created = _checks.prepare_output_folder(args.out) if rank0 else (Path(args.out).expanduser(), [])
    state = out / STATE_NAME
    state_before = state.stat().st_mtime_ns if state.is_file() else None
    import torch

    from .. import distributed

    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device, started = distributed.init_from_env(torch.device(want))  # the one torchrun join (sample, distill too)
    rank = 0
    try:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        t0 = time.perf_counter()
        try:
            result = train(
                args.model,
                None,
                args.data,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                weight_decay=args.weight_decay,
                grad_clip=args.grad_clip or None,
                ema_decay=args.ema_decay,
                warmup=args.warmup,
                seed=args.seed,
                device=device,
                out_dir=args.out,
                save_every=args.save_every or None,
                resume=args.resume,
                progress=not args.no_progress,
                log_every=args.log_every,
                backend=args.backend,
                flip=args.flip,
                image_size=args.image_size,
            )
        except FileExistsError as e:
            print(f"fastddpm train: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if rank == 0:
                print(f"interrupted; {_interrupted_state(state, state_before)}", file=sys.stderr)
                _checks.remove_empty(created)
            return 130
        total = time.perf_counter() - t0
        if rank == 0:
            ran = result.step - result.start_step
            rate = ran / result.seconds if result.seconds > 0 else float("nan")
            loss = result.final_loss
            print(
                f"trained steps {result.start_step}..{result.step} ({ran} steps) in {result.seconds:.1f} s "
                f"({rate:.2f} steps/s; {total:.1f} s with setup)"
                + (
                    f", final loss {loss:.4f} (mean of the last {min(100, len(result.losses))} steps)"
                    if loss is not None
                    else ""
                )
            )
            if result.checkpoints:
                out = result.out_dir
                print(
                    f"checkpoints (steps {', '.join(map(str, result.checkpoints))}) in {out}: EMA weights "
                    f"config.json + model.safetensors, {SCHEDULER_NAME}, {STATE_NAME}, {LOG_NAME}"
                )
                print(f"sample with: fastddpm sample --model {out}")
        return 0
    except BaseException:
        if rank == 0:
            _checks.remove_empty(created)
        raise
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _interrupted_state(state: Path, mtime_before: int | None) -> str:
    """What an interrupted run left in ``--out``, truthfully: a new checkpoint, the old one, or none."""
    if not state.is_file():
        return "no checkpoint was written"
    stamp = time.strftime("%H:%M:%S", time.localtime(state.stat().st_mtime))
    resume = f"continue with `fastddpm train --resume --out {state.parent}` (and the same options)"
    if mtime_before is None or state.stat().st_mtime_ns != mtime_before:
        return f"the checkpoint this run wrote last ({state}, {stamp}) is kept; {resume}"
    return f"{state.parent} holds the checkpoint this run resumed from, unchanged; {resume}"
