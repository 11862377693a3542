"""``fastddpm distill``: progressive distillation of a model into few-step DDIM students (torchrun-aware).

Under ``torchrun`` (``WORLD_SIZE > 1``) the command joins the process group itself (NCCL on CUDA, gloo on CPU),
splits every global batch over the ranks and writes checkpoints from rank 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .._argtypes import add_optimization_arguments, add_run_arguments, positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``distill`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "distill",
        help="progressive distillation into few-step students (torchrun-aware)",
        description=(
            "Progressive distillation (Salimans & Ho 2022): each round trains a student of half the DDIM steps to "
            "match two DDIM (eta 0) steps of its teacher, from --from-steps down to --to-steps. Each round's EMA "
            "student goes to OUT/round_<k>_<steps>steps/ as a fastddpm checkpoint with a sampling.json; "
            "OUT/distill_state.pt and distill_log.jsonl let --resume continue an interrupted run."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--teacher", default="digits", help="bundled model name, fastddpm checkpoint dir or diffusers dir")
    p.add_argument("--data", default="digits", help="'digits', 'digits-train', 'digits-test' or a folder of PNG/JPEG")
    p.add_argument("--from-steps", type=positive_int, required=True, help="DDIM steps of the teacher")
    p.add_argument("--to-steps", type=positive_int, required=True, help="DDIM steps of the last student")
    p.add_argument("--steps-per-round", type=positive_int, required=True, help="optimizer steps per halving")
    p.add_argument(
        "--prediction-type",
        choices=["v_prediction", "sample", "epsilon"],
        default="v_prediction",
        help="what the students predict (v: the paper's choice; epsilon cannot make good 1-step samples)",
    )
    add_optimization_arguments(p, batch_size=64, lr=1e-4, lr_help="AdamW learning rate (warm-up, then linear decay per round)",
                               warmup=10, warmup_help="linear learning-rate warm-up steps of each round",
                               ema_help="EMA decay of the saved students")  # fmt: skip
    p.add_argument("--out", default="fastddpm-distill", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--stop-after", type=positive_int, default=None,
                   help="stop after this many optimizer steps (state saved; continue with --resume)")  # fmt: skip
    add_run_arguments(p, save_every=500, save_help="state every N steps of a round (0: round ends)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``fastddpm distill`` from parsed arguments; returns the exit status."""
    import torch

    from .. import distributed
    from ..distillation import DISTILL_LOG_NAME, DISTILL_STATE_NAME, distill

    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device, started = distributed.init_from_env(torch.device(want))
    try:
        rank = distributed.world()[0]
        t0 = time.perf_counter()
        try:
            result = distill(
                args.teacher,
                None,
                args.data,
                from_steps=args.from_steps,
                to_steps=args.to_steps,
                steps_per_round=args.steps_per_round,
                prediction_type=args.prediction_type,
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
                stop_after=args.stop_after,
                progress=not args.no_progress,
                log_every=args.log_every,
                backend=args.backend,
                image_size=args.image_size,
            )
        except FileExistsError as e:
            print(f"fastddpm distill: error: {e}", file=sys.stderr)
            return 2
        total = time.perf_counter() - t0
        if rank == 0:
            ran = result.step - result.start_step
            rate = result.seconds / ran if ran else float("nan")
            print(f"distilled global steps {result.start_step}..{result.step} ({ran} steps) in {result.seconds:.1f} s "
                  f"({rate:.3f} s/step; {total:.1f} s with setup)")  # fmt: skip
            for rr in result.rounds:
                loss = "" if rr.final_loss is None else f", final loss {rr.final_loss:.5f}"
                print(f"round {rr.index}: {rr.teacher_steps} -> {rr.student_steps} steps{loss}, {rr.seconds:.1f} s"
                      + (f", saved to {rr.out_dir}" if rr.out_dir else ""))  # fmt: skip
            if not result.finished:
                print(f"stopped early: continue with --resume (state in {args.out}/{DISTILL_STATE_NAME}, log "
                      f"{DISTILL_LOG_NAME})")  # fmt: skip
            elif result.rounds and result.rounds[-1].out_dir is not None:
                last = result.rounds[-1]
                print(f"sample with: fastddpm sample --model {last.out_dir} --sampler ddim --eta 0 --spacing trailing "
                      f"--steps {last.student_steps}")  # fmt: skip
        return 0
    finally:
        if started:
            distributed.destroy()
