"""CUDA backend: the kernels of ``csrc/cuda_kernels.cu`` (binding ``csrc/cuda_binding.cpp``).

Compiled on first use with nvcc for the current GPU. Inputs arrive from :mod:`fastddpm.ops`
already viewed as ``[B, N]`` with unit stride inside a sample (see :mod:`fastddpm.backends`);
nothing here reshapes or copies. Launches go to the current CUDA stream, and everything that
changes per step (rows, timestep values, thresholds, seed, sample offset) is read by the kernels
from device memory, so a launch can be captured in a CUDA graph and replayed. Argument checks
look at metadata only (never at device data): a row or timestep index out of range makes that
sample's outputs NaN instead of raising.
"""

from __future__ import annotations

import torch

from .. import _build
from ._extension import ExtensionLaunchers

__all__ = ["available", "multistep", "q_sample", "randn", "step"]


def available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the CUDA kernels can run here, and if not, why (builds the extension on first call).

    Args:
        device: the device of the tensors to be processed (``None``: the current CUDA device).
    Returns:
        ``(ok, reason)``: the GPU used, or what is missing (CUDA torch, GPU, nvcc) / what failed.
    """
    if device is not None and torch.device(device).type != "cuda":
        return False, f"the cuda backend runs CUDA tensors, not {torch.device(device).type}"
    try:
        _build.load_cuda_extension()
    except _build.ExtensionUnavailableError as exc:
        return False, exc.reason
    dev = torch.device(device) if device is not None else torch.device("cuda")
    return True, f"CUDA extension on {torch.cuda.get_device_name(dev)}"


_launchers = ExtensionLaunchers(_build.load_cuda_extension)
step = _launchers.step
q_sample = _launchers.q_sample
randn = _launchers.randn
multistep = _launchers.multistep
