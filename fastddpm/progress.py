"""tqdm progress bars, silenced by ``progress=False`` and off ranks other than 0."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


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
