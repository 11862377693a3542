"""Scale-out helpers on ``torch.distributed`` (torchrun; NCCL on GPU, gloo on CPU).

Noise is keyed by global sample index, so any split of the index range over ranks gives the same
images as one process. Rank ``r`` of ``W`` takes the contiguous range ``rank_range(N)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def split_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``range(n)`` for ``rank``: the first ``n % world_size`` ranks get one more."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def rank_range(n: int) -> tuple[int, int]:
    """This process's range of global sample indices."""
    return split_range(n, *world())


def gather_samples(local: torch.Tensor, n: int) -> torch.Tensor:
    """All-gather every rank's contiguous slice into the full ``[n, ...]`` tensor, in sample order."""
    rank, ws = world()
    if ws == 1:
        return local
    sizes = [split_range(n, r, ws) for r in range(ws)]
    most = max(stop - start for start, stop in sizes)
    backend = dist.get_backend()
    dev = local.device if backend != "gloo" else torch.device("cpu")
    padded = torch.zeros((most, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local.to(dev)
    out = [torch.empty_like(padded) for _ in range(ws)]
    dist.all_gather(out, padded)
    full = torch.cat([o[: stop - start] for o, (start, stop) in zip(out, sizes)])
    return full.to(local.device)
