"""Fused multistep-solver step (DPM-Solver++ 2M/3M/2M-SDE, UniPC): one pass per step.

The math and the coefficient columns are the ``MS_*`` of :mod:`fastddpm._layout`; the per-step
coefficients come from the float32 table ``coef[S, NMS]``, row ``step[0]`` (the device step counter),
so a launch can be captured in a CUDA graph and replayed for every step. Every product is rounded
and the sums run left to right, written exactly as in the reference backend and the C++/CUDA
kernels; the launcher compiles with ``enable_fp_fusion=False`` (no FMA contraction), so all
backends give the same bits.

Grid: ``(cdiv(cdiv(N, 4), BLOCK_G), B)``. Program ``(i, b)`` handles the ``[BLOCK_G, 4]`` tile of
elements ``4 * BLOCK_G * i ..`` of sample ``b``; row ``k`` of the tile takes its SDE noise from one
Philox call (stream ``STREAM_SDE``, counter t = ``tval[step]``).

Bytes per element (state float32, model output of size s): read ``x``, ``xp``, ``D1..D3`` (20) and
``m`` (s), ``+ 4`` for a float32 noise tensor; write ``x``, ``xp`` and ``D0`` (12). X0_ONLY: read
``x`` and ``m``, write a float32 ``x0`` (4).
"""

import triton
import triton.language as tl

from fastddpm import _layout as L

from .philox import normal_tile

_NMS = tl.constexpr(L.NMS)
_CX = tl.constexpr(L.MS_CX)
_CM = tl.constexpr(L.MS_CM)
_KX = tl.constexpr(L.MS_KX)
_KXP = tl.constexpr(L.MS_KXP)
_KD0 = tl.constexpr(L.MS_KD0)
_KD1 = tl.constexpr(L.MS_KD1)
_KD2 = tl.constexpr(L.MS_KD2)
_KD3 = tl.constexpr(L.MS_KD3)
_PX = tl.constexpr(L.MS_PX)
_PD0 = tl.constexpr(L.MS_PD0)
_PD1 = tl.constexpr(L.MS_PD1)
_PD2 = tl.constexpr(L.MS_PD2)
_PZ = tl.constexpr(L.MS_PZ)
_HIST = tl.constexpr(L.MS_HIST)

_CLIP_RANGE = tl.constexpr(L.CLIP_RANGE)
_CLIP_THRESHOLD = tl.constexpr(L.CLIP_THRESHOLD)
_NOISE_NONE = tl.constexpr(L.NOISE_NONE)
_NOISE_TENSOR = tl.constexpr(L.NOISE_TENSOR)
_NOISE_PHILOX = tl.constexpr(L.NOISE_PHILOX)
_STREAM_SDE = tl.constexpr(L.STREAM_SDE)


@triton.jit
def multistep_kernel(
    x_ptr,  # [B, N] float32 state x_i, read and overwritten with x_{i+1}; (b, e) at b * x_stride_b + e
    m_ptr,  # [B, N] model output at x_i, fp32/fp16/bf16; at b * m_stride_b + e
    xp_ptr,  # [B, N] float32 previous corrected sample, read and overwritten with this step's xc
    hist_ptr,  # [3, B, N] float32 ring of data predictions; slot k, (b, e) at k * hist_stride_s + b * hist_stride_b + e
    noise_ptr,  # [B, N] caller noise z, any float dtype; read only when NOISE_MODE == NOISE_TENSOR
    x0_ptr,  # [B, N] float32 output D0 (clipped, not thresholded); written only when X0_ONLY
    coef_ptr,  # [S, NMS] float32, contiguous: per-step coefficient table
    tval_ptr,  # [S] int64: timestep value of step i is tval[i * tval_stride], the Philox counter's t
    step_ptr,  # [1] int64: the device step counter i (row of coef and tval)
    thresh_ptr,  # [.] float32: dynamic threshold of sample b is thresh[b * thresh_stride] (CLIP_THRESHOLD)
    rng_ptr,  # [2] int64: (seed, sample_offset), read on the device
    N,  # elements per sample
    b_base,  # index of this launch's first sample in the batch (launches are split past grid limits)
    x_stride_b,  # per-sample stride of x, in elements (likewise for the strides below)
    m_stride_b,
    xp_stride_b,
    hist_stride_s,  # stride between ring slots of hist, in elements
    hist_stride_b,
    noise_stride_b,
    x0_stride_b,
    tval_stride,
    thresh_stride,
    clip_range,  # float32 bound of CLIP_RANGE
    CLIP_MODE: tl.constexpr,  # _layout.CLIP_*
    NOISE_MODE: tl.constexpr,  # _layout.NOISE_*
    X0_ONLY: tl.constexpr,  # write only D0 (clipped, not thresholded) to x0_ptr, nothing else
    BLOCK_G: tl.constexpr,  # 4-element groups per program (power of two)
):
    pid = tl.program_id(0)
    b = b_base + tl.program_id(1).to(tl.int64)
    i = tl.load(step_ptr)
    c = coef_ptr + i * _NMS

    q = pid * BLOCK_G + tl.arange(0, BLOCK_G)  # 4-element group index inside the sample
    offs = q[:, None] * 4 + tl.arange(0, 4)[None, :]  # [BLOCK_G, 4] element index e
    mask = offs < N

    x = tl.load(x_ptr + b * x_stride_b + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + b * m_stride_b + offs, mask=mask, other=0.0).to(tl.float32)

    # Data prediction D0 (x0 for epsilon / sample / v prediction), clipped.
    d0 = tl.load(c + _CX) * x + tl.load(c + _CM) * m
    if CLIP_MODE == _CLIP_RANGE:
        d0 = tl.clamp(d0, -clip_range, clip_range, propagate_nan=tl.PropagateNan.ALL)
    if X0_ONLY:
        tl.store(x0_ptr + b * x0_stride_b + offs, d0, mask=mask)
    else:
        if CLIP_MODE == _CLIP_THRESHOLD:
            s = tl.load(thresh_ptr + b * thresh_stride)
            # div_rn: IEEE division (a plain `/` lowers to the approximate div.full.f32 on NVIDIA GPUs)
            d0 = tl.math.div_rn(tl.clamp(d0, -s, s, propagate_nan=tl.PropagateNan.ALL), s)
        h = hist_ptr + b * hist_stride_b + offs
        s0 = i % _HIST  # slot of D3, overwritten with D0 below
        d1 = tl.load(h + ((i + 2) % _HIST) * hist_stride_s, mask=mask, other=0.0)
        d2 = tl.load(h + ((i + 1) % _HIST) * hist_stride_s, mask=mask, other=0.0)
        d3 = tl.load(h + s0 * hist_stride_s, mask=mask, other=0.0)
        xp = tl.load(xp_ptr + b * xp_stride_b + offs, mask=mask, other=0.0)

        # UniPC's corrector (identity for DPM-Solver++: KX = 1, the rest 0), then the solver update.
        xc = tl.load(c + _KX) * x + tl.load(c + _KXP) * xp + tl.load(c + _KD0) * d0
        xc = xc + tl.load(c + _KD1) * d1 + tl.load(c + _KD2) * d2 + tl.load(c + _KD3) * d3
        xn = tl.load(c + _PX) * xc + tl.load(c + _PD0) * d0 + tl.load(c + _PD1) * d1 + tl.load(c + _PD2) * d2
        if NOISE_MODE == _NOISE_TENSOR:
            z = tl.load(noise_ptr + b * noise_stride_b + offs, mask=mask, other=0.0).to(tl.float32)
            xn = xn + tl.load(c + _PZ) * z
        elif NOISE_MODE == _NOISE_PHILOX:
            seed = tl.load(rng_ptr)
            g = tl.load(rng_ptr + 1) + b
            z = normal_tile(seed, q, g, tl.load(tval_ptr + i * tval_stride), _STREAM_SDE)
            xn = xn + tl.load(c + _PZ) * z
        else:
            tl.static_assert(NOISE_MODE == _NOISE_NONE, "unknown NOISE_MODE")

        tl.store(h + s0 * hist_stride_s, d0, mask=mask)
        tl.store(xp_ptr + b * xp_stride_b + offs, xc, mask=mask)
        tl.store(x_ptr + b * x_stride_b + offs, xn, mask=mask)
