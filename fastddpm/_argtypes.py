"""argparse value types shared by the ``fastddpm`` subcommands."""

from __future__ import annotations

import argparse


def int_at_least(low: int, what: str):
    """An argparse ``type`` accepting integers ``>= low``; errors read "expected <what>, got ..."."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    parse.__name__ = what.replace(" ", "_")
    return parse


positive_int = int_at_least(1, "a positive integer")
nonneg_int = int_at_least(0, "an integer >= 0")


def real_number(text: str) -> float:
    """An argparse ``type`` for a float; errors read "expected a number, got ..."."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_optimization_arguments(
    p: argparse.ArgumentParser,
    *,
    batch_size: int,
    lr: float,
    lr_help: str,
    warmup: int,
    warmup_help: str,
    ema_help: str,
) -> None:
    """The AdamW / EMA / data-size flags ``fastddpm train`` and ``fastddpm distill`` share (their defaults differ)."""
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help="global batch size (over all ranks)")
    p.add_argument("--lr", type=real_number, default=lr, help=lr_help)
    p.add_argument("--weight-decay", type=real_number, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup", type=nonneg_int, default=warmup, help=warmup_help)
    p.add_argument("--grad-clip", type=real_number, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--ema-decay", type=real_number, default=0.999, help=ema_help)
    p.add_argument("--image-size", type=positive_int, default=None, help="resize the data (default: model size)")


def add_run_arguments(p: argparse.ArgumentParser, *, save_every: int, save_help: str) -> None:
    """The seed / device / checkpointing / logging flags ``fastddpm train`` and ``fastddpm distill`` share."""
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, timesteps and noise")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--save-every", type=nonneg_int, default=save_every, help=save_help)
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between loss read-backs / log lines")
    p.add_argument("--backend", default="auto", help="fused-op backend: auto, reference, cpu, cuda, triton")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
