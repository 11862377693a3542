"""Measuring: the device clock (CUDA events or ``perf_counter``), repeat counts, percentiles, peak
memory, and the per-row environment (fused-norm switch, SDPA backend, autocast)."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .rows import DTYPES, BenchConfig, Variant


class Clock:
    """Times a callable: CUDA events on a CUDA device, ``time.perf_counter`` on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any]) -> float:
        """Seconds ``fn()`` took on the device timeline (GPU work included)."""
        if self.cuda:
            self.sync()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def wall(self, fn: Callable[[], Any]) -> float:
        """Host seconds for ``fn()`` plus the GPU work it queued (synchronised before and after)."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def repeat_count(first_s: float, cfg: BenchConfig, left_s: float | None = None) -> int:
    """Timed runs for a row whose first timed run took ``first_s``: enough for ``cfg.target_s``,
    within ``[min_repeats, max_repeats]``, cut (to no fewer than one) so the row stays within
    ``cfg.max_row_s`` and the ``left_s`` seconds left of the run's budget."""
    first_s = max(first_s, 1e-9)
    want = math.ceil(cfg.target_s / first_s) if cfg.target_s > 0 else 1
    n = min(max(want, cfg.min_repeats), cfg.max_repeats)
    cap = cfg.max_row_s if left_s is None else min(cfg.max_row_s, left_s)
    return max(1, min(n, int(cap // first_s)))


def repeat_times(clock: Clock, fn: Callable[[], Any], cfg: BenchConfig, left_s: float | None = None) -> list[float]:
    """Run ``fn`` :func:`repeat_count` times; seconds of each run."""
    times = [clock.time(fn)]
    for _ in range(repeat_count(times[0], cfg, left_s) - 1):
        times.append(clock.time(fn))
    return times


def percentiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) with linear interpolation (numpy's default)."""
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no values")
    p20, p50, p80 = np.percentile(arr, [20, 50, 80])
    return float(p50), float(p20), float(p80)


class MemoryProbe:
    """Peak memory of a row: ``torch.cuda.max_memory_allocated`` on CUDA, ``ru_maxrss`` growth on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> MemoryProbe:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def read(self) -> tuple[float, str]:
        """(megabytes, what the number means)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda max_memory_allocated (incl. weights)"
        grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.rss0
        scale = 1.0 / 2**20 if sys.platform == "darwin" else 1.0 / 1024  # bytes on macOS, KiB on Linux
        return grow * scale, "cpu ru_maxrss growth (process high-water mark: 0 if below an earlier peak)"


@contextlib.contextmanager
def variant_context(variant: Variant, device: torch.device) -> Iterator[None]:
    """Environment of a row: ``FASTDDPM_FUSED_NORM`` and the SDPA backend choice."""
    old = os.environ.get("FASTDDPM_FUSED_NORM")
    with contextlib.ExitStack() as stack:
        if not variant.fused_norm:
            os.environ["FASTDDPM_FUSED_NORM"] = "0"
        if variant.sdpa == "math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("FASTDDPM_FUSED_NORM", None)
            else:
                os.environ["FASTDDPM_FUSED_NORM"] = old


def autocast_context(variant: Variant, device: torch.device) -> contextlib.AbstractContextManager:
    if variant.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[variant.dtype])
