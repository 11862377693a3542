"""fastddpm: fused, graph-captured, reproducible DDPM sampling and training for PyTorch.

Public API::

    Schedule                      noise schedule (diffusers names), Schedule.from_diffusers(...)
    SamplingConfig                one frozen description of a sampling run (sample(..., config=...))
    q_sample, ddpm_step, ddim_step, randn   fused ops (reference / cpu / cuda / triton backends)
    UNet                          DDPM U-Net that loads diffusers checkpoints
    load                          (UNet, Schedule) by name: "digits", a checkpoint dir, a cached Hub id
    sample                        the sampling loop (CUDA graphs on GPU)
    train                         the training loop
    distill                       progressive distillation to few-step students
"""

from __future__ import annotations

from ._layout import STREAM_INIT, STREAM_QSAMPLE, STREAM_STEP
from ._version import __version__ as __version__
from .config import SamplingConfig
from .ops import ddim_step, ddpm_step, q_sample, randn
from .schedule import Schedule

__all__ = [
    "Schedule",
    "SamplingConfig",
    "q_sample",
    "ddpm_step",
    "ddim_step",
    "randn",
    "STREAM_INIT",
    "STREAM_QSAMPLE",
    "STREAM_STEP",
    "UNet",
    "UNetConfig",
    "load",
    "sample",
    "train",
    "distill",
]


def __getattr__(name: str):
    # Heavier modules load on first use so `import fastddpm` stays light and side-effect free.
    if name in ("UNet", "UNetConfig"):
        from . import unet

        return getattr(unet, name)
    if name == "load":
        from .registry import load

        return load
    if name == "sample":
        from .sampling import sample

        return sample
    if name == "train":
        from .training import train

        return train
    if name == "distill":  # the module is fastddpm.distillation: a submodule named distill would shadow this
        from .distillation import distill

        return distill
    raise AttributeError(f"module 'fastddpm' has no attribute {name!r}")
