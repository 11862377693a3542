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

__all__ = ["available", "q_sample", "randn", "step"]


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


def step(
    x: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor | None,
    noise: torch.Tensor | None,
    prev_out: torch.Tensor | None,
    x0_out: torch.Tensor | None,
    coef: torch.Tensor,
    tval: torch.Tensor,
    rows: torch.Tensor,
    thresh: torch.Tensor | None,
    rng: torch.Tensor,
    *,
    clip_mode: int,
    clip_range: float,
    var_mode: int,
    noise_mode: int,
    x0_only: bool,
) -> None:
    """One fused reverse step on ``[B, N]`` CUDA views; writes ``prev_out`` and/or ``x0_out`` in place.

    One thread per 4 elements: one Philox call, vector loads/stores where aligned. See
    :mod:`fastddpm.backends` for the arguments and :mod:`fastddpm._layout` for the math.
    """
    _build.load_cuda_extension().step(
        x,
        m,
        v,
        noise,
        prev_out,
        x0_out,
        coef,
        tval,
        rows,
        thresh,
        rng,
        clip_mode=int(clip_mode),
        clip_range=float(clip_range) if clip_range is not None else 0.0,
        var_mode=int(var_mode),
        noise_mode=int(noise_mode),
        x0_only=bool(x0_only),
    )


def q_sample(
    x0: torch.Tensor,
    noise: torch.Tensor | None,
    out: torch.Tensor,
    table: torch.Tensor,
    t: torch.Tensor,
    rng: torch.Tensor,
    *,
    noise_mode: int,
) -> None:
    """``out = table[t, 0] * x0 + table[t, 1] * z`` on ``[B, N]`` CUDA views, in place.

    ``z`` is ``noise`` (NOISE_TENSOR), the counter-based normal of stream ``STREAM_QSAMPLE`` with
    counter timestep ``t[b]`` (NOISE_PHILOX), or 0 (NOISE_NONE). See :mod:`fastddpm.backends`.
    """
    _build.load_cuda_extension().q_sample(x0, noise, out, table, t, rng, noise_mode=int(noise_mode))


def randn(out: torch.Tensor, t: torch.Tensor, rng: torch.Tensor, *, stream: int) -> None:
    """Fill ``out[b, e]`` with the counter-based normal of ``(seed, sample_offset + b, t[b], e, stream)``.

    ``out`` is ``[B, N]`` (float32/16, bfloat16 or float64, unit stride inside a sample), ``t`` int64
    ``[B]`` (stride 0 allowed), ``rng`` int64 ``[seed, sample_offset]``. See :mod:`fastddpm.backends`.
    """
    _build.load_cuda_extension().randn(out, t, rng, stream=int(stream))
