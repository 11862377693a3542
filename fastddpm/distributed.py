"""Scale-out helpers on ``torch.distributed`` (torchrun; NCCL on GPU, gloo on CPU).

Noise is keyed by global sample index, so any split of the index range over ranks gives the same
images as one process. Rank ``r`` of ``W`` takes the contiguous range ``rank_range(N)``.

:func:`init_from_env` joins the process group torchrun describes in the environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); :func:`barrier`, :func:`broadcast_object` and
:func:`all_gather_object` are the collectives the sharded writer needs, and are no-ops in one process.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

# How long a rank may wait in a collective for the others. A rank that is done with its shards waits at
# the barrier while the others finish theirs, so this must exceed the longest imbalance (about one
# shard's sampling time). torchrun tears the whole job down when one rank fails, so a long timeout
# does not turn crashes into hangs.
DEFAULT_TIMEOUT_S = 3 * 3600.0
TIMEOUT_ENV = "FASTDDPM_DIST_TIMEOUT_S"


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def split_range(n: int, rank: int, world_size: int, align: int = 1) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``range(n)`` for ``rank`` of ``world_size``.

    The range is cut into blocks of ``align`` items (the last may be short); the first
    ``blocks % world_size`` ranks get one block more. ``align=batch_size`` keeps every rank's batches on
    the same global boundaries as a single-process run. Ranks beyond the work get an empty range.
    """
    if n < 0 or world_size < 1 or not 0 <= rank < world_size or align < 1:
        raise ValueError(f"bad split: n={n}, rank={rank}, world_size={world_size}, align={align}")
    blocks = -(-n // align)
    base, extra = divmod(blocks, world_size)
    first = rank * base + min(rank, extra)
    last = first + base + (1 if rank < extra else 0)
    return min(n, first * align), min(n, last * align)


def rank_range(n: int, align: int = 1) -> tuple[int, int]:
    """This process's range of global sample indices (see :func:`split_range`)."""
    return split_range(n, *world(), align=align)


def gather_samples(local: torch.Tensor, n: int, align: int = 1) -> torch.Tensor:
    """All-gather every rank's :func:`rank_range` slice into the full ``[n, ...]`` tensor, in sample order.

    ``local`` is this rank's ``[stop - start, ...]`` slice (possibly empty); ``align`` must be the value
    the slices were split with. Every rank returns the same tensor, on ``local``'s device.
    """
    rank, ws = world()
    if ws == 1:
        return local
    sizes = [split_range(n, r, ws, align) for r in range(ws)]
    start, stop = sizes[rank]
    if local.shape[0] != stop - start:
        raise ValueError(f"rank {rank} holds {local.shape[0]} samples but its range is [{start}, {stop})")
    most = max(stop - start for start, stop in sizes)
    backend = dist.get_backend()
    dev = local.device if backend != "gloo" else torch.device("cpu")
    padded = torch.zeros((most, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local.to(dev)
    out = [torch.empty_like(padded) for _ in range(ws)]
    dist.all_gather(out, padded)
    full = torch.cat([o[: stop - start] for o, (start, stop) in zip(out, sizes)])
    return full.to(local.device)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): how many processes torchrun started."""
    raw = os.environ.get("WORLD_SIZE", "") or "1"
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={raw!r} is not an integer") from None


def init_from_env(device: torch.device, timeout_s: float | None = None) -> tuple[torch.device, bool]:
    """Join the process group torchrun set up in the environment; returns ``(device, created)``.

    With ``WORLD_SIZE`` > 1 and no group yet, initialises one (``env://``): NCCL when ``device`` is a
    CUDA device, gloo otherwise. A CUDA device without an index becomes ``cuda:LOCAL_RANK`` and is made
    current. ``created`` tells the caller to :func:`destroy` the group when done; it is ``False`` when a
    group already existed (the caller's) or there is only one process. ``timeout_s`` (default env
    ``FASTDDPM_DIST_TIMEOUT_S``, else 3 hours) bounds how long a rank waits for the others.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        torch.cuda.set_device(device)
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return device, False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, "") or DEFAULT_TIMEOUT_S)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device, True


def destroy() -> None:
    """Destroy the default process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if world()[1] == 1:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself in one process)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, indexed by rank (``[obj]`` in one process)."""
    ws = world()[1]
    if ws == 1:
        return [obj]
    out: list[Any] = [None] * ws
    dist.all_gather_object(out, obj)
    return out
