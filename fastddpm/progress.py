"""tqdm progress bars, silenced by ``progress=False`` and off ranks other than 0, and the counting of
completed (not merely queued) CUDA steps that feeds them."""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


@contextlib.contextmanager
def progress_bar(enabled: bool, num_samples: int, steps: int, batch_size: int | None) -> Iterator[Any]:
    """A bar over all model evaluations (steps x batches) with steps/s; ``None`` when disabled."""
    if not enabled or not _is_main_process():
        yield None
        return
    from tqdm.auto import tqdm

    batches = 1 if not batch_size else -(-num_samples // batch_size)
    bar = tqdm(total=steps * batches, unit="step", desc=f"sampling {num_samples} images", dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


class StepProgress:
    """Advances a progress bar as sampling steps *complete*.

    On CPU a step is done when its Python call returns, so ``queued(n)`` updates the bar at once. On
    CUDA the host only queues work: ``queued(n)`` records a CUDA event after the queued steps and the
    bar advances by ``n`` when :meth:`torch.cuda.Event.query` says the GPU got there. At most
    :attr:`MAX_IN_FLIGHT` events are pending; when full, the host waits for the oldest one (that
    still leaves that many replays queued ahead of the GPU, so the GPU never starves). ``finish()``
    waits for the rest. With no bar, nothing is recorded and nothing waits.

    Args:
        bar: an object with ``update(n)`` (a tqdm bar), or ``None``.
        device: the device the steps run on.
    """

    MAX_IN_FLIGHT = 32

    def __init__(self, bar: Any, device: Any):
        self.bar = bar
        self.device = torch.device(device)
        self.cuda = bar is not None and self.device.type == "cuda"
        self.pending: collections.deque[tuple[Any, int]] = collections.deque()

    def queued(self, steps: int) -> None:
        """``steps`` more steps were queued on the device's current stream."""
        if self.bar is None:
            return
        if not self.cuda:
            self.bar.update(steps)
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.pending.append((event, steps))
        if len(self.pending) > self.MAX_IN_FLIGHT:
            oldest, n = self.pending.popleft()
            oldest.synchronize()
            self.bar.update(n)
        self.poll()

    def poll(self) -> None:
        """Advance the bar over every pending event the GPU has reached (in queue order)."""
        while self.pending and self.pending[0][0].query():
            self.bar.update(self.pending.popleft()[1])

    def finish(self) -> None:
        """Wait for the pending steps, advancing the bar as each completes."""
        while self.pending:
            event, n = self.pending.popleft()
            event.synchronize()
            self.bar.update(n)
