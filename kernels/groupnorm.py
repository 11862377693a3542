"""Fused GroupNorm (+ per-channel add) (+ SiLU) for the U-Net, an inference kernel.

``group_norm_silu(x, weight, bias, num_groups, eps, add, silu)`` computes, in one kernel::

    h = x + add[:, :, None, None]                       # optional: the res block's time-embedding add
    y = (h - mean_g(h)) / sqrt(var_g(h) + eps) * weight[c] + bias[c]
    y = y * sigmoid(y)                                  # optional SiLU

with biased per-(sample, group) statistics in float32, exactly as ``F.group_norm`` defines them.
``x`` may be contiguous (NCHW) or channels_last; the output keeps x's memory format and dtype.

Kernel layout: one program per (sample, group). The group is a ``[CPG, S]`` tile (channels of the
group x flattened spatial positions) addressed through a channel stride and a spatial stride, so
NCHW (``stride_s == 1``) and NHWC (``stride_c == 1``) share one kernel. A group that fits one
``[BLOCK_C, BLOCK_S]`` tile is read once and kept in registers; larger groups take two sweeps
(statistics merged tile by tile with Chan's parallel-variance update, then normalise).

Bytes per element, for ``s`` the size of x's dtype: read ``s`` (``2s`` when the group takes two
sweeps), write ``s``; per channel: weight, bias and ``add`` once per program.

This is an inference kernel: it has no backward. When autograd would need gradients through it
(grad mode on and any input requiring grad), :func:`group_norm_silu` falls back to the
differentiable composition of ``torch.nn.functional`` ops; it does the same on CPU tensors when
Triton is not running in interpreter mode.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["group_norm_silu"]

_MAX_TILE = 8192  # elements of the largest [BLOCK_C, BLOCK_S] tile a program keeps in registers


@triton.jit
def _group_norm_silu_kernel(
    x_ptr,  # [B, C, S] input (S = flattened spatial), fp32/fp16/bf16; (b, c, s) at b*x_stride_b + c*x_stride_c + s*x_stride_s
    y_ptr,  # [B, C, S] output, dtype of x; (b, c, s) at b*y_stride_b + c*y_stride_c + s*y_stride_s
    w_ptr,  # [C] weight (fp32 or x's dtype), contiguous; read when HAS_WEIGHT
    bias_ptr,  # [C] bias (fp32 or x's dtype), contiguous; read when HAS_BIAS
    add_ptr,  # [B, C] per-channel add; (b, c) at b*add_stride_b + c*add_stride_c; read when HAS_ADD
    S,  # spatial positions per channel (H * W)
    G,  # number of groups
    x_stride_b,  # strides of x, in elements
    x_stride_c,
    x_stride_s,
    y_stride_b,  # strides of y, in elements
    y_stride_c,
    y_stride_s,
    add_stride_b,  # strides of add, in elements
    add_stride_c,
    eps,  # float32 added to the variance
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ADD: tl.constexpr,
    SILU: tl.constexpr,  # apply y * sigmoid(y)
    CPG: tl.constexpr,  # channels per group (C // num_groups); constexpr so NHWC loads can vectorise
    BLOCK_C: tl.constexpr,  # power of two >= CPG
    BLOCK_S: tl.constexpr,  # spatial positions per tile (power of two)
    SINGLE_TILE: tl.constexpr,  # S <= BLOCK_S: the whole group is one tile, read once
):
    pid = tl.program_id(0)
    b = (pid // G).to(tl.int64)
    g = pid % G

    c_loc = tl.arange(0, BLOCK_C)
    c_mask = c_loc < CPG
    chan = g * CPG + c_loc  # channel index inside the sample
    s_loc = tl.arange(0, BLOCK_S)
    x_base = x_ptr + b * x_stride_b + (chan * x_stride_c)[:, None]
    y_base = y_ptr + b * y_stride_b + (chan * y_stride_c)[:, None]

    if HAS_ADD:
        a = tl.load(add_ptr + b * add_stride_b + chan * add_stride_c, mask=c_mask, other=0.0).to(tl.float32)
    else:
        a = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + chan, mask=c_mask, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
    if HAS_BIAS:
        beta = tl.load(bias_ptr + chan, mask=c_mask, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = (CPG * 1.0) * S  # float32; CPG and S may arrive as constexpr 1

    if SINGLE_TILE:
        mask = c_mask[:, None] & (s_loc < S)[None, :]
        h = tl.load(x_base + s_loc[None, :] * x_stride_s, mask=mask, other=0.0).to(tl.float32) + a[:, None]
        mean = tl.sum(tl.sum(tl.where(mask, h, 0.0), axis=1), axis=0) / count
        d = tl.where(mask, h - mean, 0.0)
        var = tl.sum(tl.sum(d * d, axis=1), axis=0) / count
        y = d * (w * tl.rsqrt(var + eps))[:, None] + beta[:, None]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_base + s_loc[None, :] * y_stride_s, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Sweep 1: per-tile mean and M2, merged with Chan et al.'s update (no E[h^2] - E[h]^2 cancellation).
        n_acc = 0.0
        mean = 0.0
        m2 = 0.0
        for s0 in range(0, S, BLOCK_S):
            s_idx = s0 + s_loc
            mask = c_mask[:, None] & (s_idx < S)[None, :]
            h = tl.load(x_base + s_idx[None, :] * x_stride_s, mask=mask, other=0.0).to(tl.float32) + a[:, None]
            n_tile = (CPG * 1.0) * tl.minimum(S - s0, BLOCK_S)
            mean_tile = tl.sum(tl.sum(tl.where(mask, h, 0.0), axis=1), axis=0) / n_tile
            d = tl.where(mask, h - mean_tile, 0.0)
            m2_tile = tl.sum(tl.sum(d * d, axis=1), axis=0)
            n_new = n_acc + n_tile
            delta = mean_tile - mean
            mean = mean + delta * (n_tile / n_new)
            m2 = m2 + m2_tile + delta * delta * (n_acc * n_tile / n_new)
            n_acc = n_new
        scale = w * tl.rsqrt(m2 / count + eps)
        # Sweep 2: normalise, affine, SiLU.
        for s0 in range(0, S, BLOCK_S):
            s_idx = s0 + s_loc
            mask = c_mask[:, None] & (s_idx < S)[None, :]
            h = tl.load(x_base + s_idx[None, :] * x_stride_s, mask=mask, other=0.0).to(tl.float32) + a[:, None]
            y = (h - mean) * scale[:, None] + beta[:, None]
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(y_base + s_idx[None, :] * y_stride_s, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch_config(cpg: int, spatial: int) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_S, num_warps)``: the group's channels times as many positions as fit ``_MAX_TILE``."""
    block_c = triton.next_power_of_2(cpg)
    block_s = max(1, min(triton.next_power_of_2(spatial), _MAX_TILE // block_c))
    tile = block_c * block_s
    num_warps = 8 if tile >= 4096 else 4 if tile >= 1024 else 2 if tile >= 256 else 1
    return block_c, block_s, num_warps


def _torch_group_norm_silu(x, weight, bias, num_groups, eps, add, silu):
    """The differentiable definition (also the fallback): silu(group_norm(x + add))."""
    h = x if add is None else x + add.reshape(*add.shape, *([1] * (x.dim() - 2))).to(x.dtype)
    y = F.group_norm(h, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def _kernel_can_run(x: torch.Tensor) -> bool:
    """CUDA tensors with a kernel compiled for the GPU, or CPU tensors with an interpreted one. A kernel
    built under ``TRITON_INTERPRET=1`` is never launched on CUDA tensors: it would run in numpy on the host
    (the same rule as the step backend's ``triton_compiles_for_cuda``)."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(_group_norm_silu_kernel, InterpretedFunction)
    if x.is_cuda:
        return not interpreted
    return x.device.type == "cpu" and interpreted


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    add: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """``silu(group_norm(x + add[:, :, None, None]))`` fused into one kernel (inference only).

    Args:
        x: ``[B, C, H, W]`` (any number of spatial dims), float32/float16/bfloat16, contiguous or
            channels_last (other layouts are copied to contiguous first).
        weight: ``[C]`` affine scale (float32 or x's dtype), or None for 1.
        bias: ``[C]`` affine shift (float32 or x's dtype), or None for 0.
        num_groups: number of groups; must divide C.
        eps: added to the per-group variance.
        add: optional ``[B, C]`` (any dtype, any strides) added to every position of channel c of
            sample b before the statistics; the sum is kept in float32, not rounded to x's dtype.
        silu: apply SiLU after the affine transform.
    Returns:
        ``[B, C, H, W]`` tensor of x's dtype and memory format.

    Statistics are computed in float32. With autograd needing gradients, or on CPU without the
    Triton interpreter, the result comes from the ``torch.nn.functional`` composition instead.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be [B, C, *spatial], got shape {list(x.shape)}")
    batch, channels = x.shape[:2]
    if num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(f"num_groups ({num_groups}) must be positive and divide the {channels} channels")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (channels,):
            raise ValueError(f"{name} must have shape [{channels}], got {list(p.shape)}")
    if add is not None and tuple(add.shape) != (batch, channels):
        raise ValueError(f"add must have shape [{batch}, {channels}], got {list(add.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("add", add)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected {x.device} (the device of x)")

    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, add))
    if needs_grad or not _kernel_can_run(x):
        return _torch_group_norm_silu(x, weight, bias, num_groups, eps, add, silu)

    y = torch.empty_like(x)  # keeps channels_last (or any dense layout) of x
    spatial = x[0, 0].numel() if batch and channels else 0
    if y.numel() == 0:
        return y
    try:
        x3, y3 = x.view(batch, channels, spatial), y.view(batch, channels, spatial)
    except RuntimeError:  # spatial dims not mergeable without a copy
        x = x.contiguous()
        y = torch.empty_like(x)
        x3, y3 = x.view(batch, channels, spatial), y.view(batch, channels, spatial)
    cpg = channels // num_groups
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    block_c, block_s, num_warps = _launch_config(cpg, spatial)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _group_norm_silu_kernel[(batch * num_groups,)](
            x3,
            y3,
            weight if weight is not None else x3,
            bias if bias is not None else x3,
            add if add is not None else x3,
            spatial,
            num_groups,
            x3.stride(0),
            x3.stride(1),
            x3.stride(2),
            y3.stride(0),
            y3.stride(1),
            y3.stride(2),
            add.stride(0) if add is not None else 0,
            add.stride(1) if add is not None else 0,
            float(eps),
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            HAS_ADD=add is not None,
            SILU=bool(silu),
            CPG=cpg,
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            SINGLE_TILE=spatial <= block_s,
            num_warps=num_warps,
        )
    return y
