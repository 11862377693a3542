"""Fused DDPM/DDIM reverse step: predict x0, clip, posterior mean, variance and noise in one pass.

The math and the coefficient columns are those of :mod:`fastddpm._layout` (per-step
coefficients come from the float32 table ``coef``; the kernel never re-derives one), evaluated in
the float32 operation order of its "Bitwise rules" (launch with ``philox.LAUNCH_OPTIONS``), so the
result is bitwise that of the cpu and cuda backends and the reference. A row index outside
``[0, num_rows)`` is clamped for the loads and the sample's outputs are NaN (as the CUDA kernel).

Grid: ``(cdiv(cdiv(N, 4), BLOCK_G), B)``. Program ``(i, b)`` handles the ``[BLOCK_G, 4]`` tile of
elements ``4 * BLOCK_G * i .. 4 * BLOCK_G * (i + 1) - 1`` of sample ``b``: it reads the sample's
row, coefficients, timestep value and threshold once, and row ``k`` of the tile (4 consecutive
elements) takes its noise from one Philox call.

Bytes per element, for ``s`` the size of the input dtype (4 fp32, 2 fp16/bf16):

* read:  ``x`` and ``m`` (2s), ``+ s`` for ``v`` (VAR_LEARNED), ``+ s`` for ``noise`` (NOISE_TENSOR)
* write: ``prev`` (s), ``+ s`` for ``x0`` when it is requested
* X0_ONLY: read 2s, write 4 (float32 x0).

Per-sample reads (coefficient row, ``rows``, ``tval``, ``thresh``, ``rng``) are negligible.
"""

import triton
import triton.language as tl

from fastddpm import _layout as L

from .philox import cast_rne, exp_f32, normal_tile

_NCOEF = tl.constexpr(L.NCOEF)
_CX = tl.constexpr(L.COEF_CX)
_CM = tl.constexpr(L.COEF_CM)
_EX = tl.constexpr(L.COEF_EX)
_EM = tl.constexpr(L.COEF_EM)
_E0 = tl.constexpr(L.COEF_E0)
_P0 = tl.constexpr(L.COEF_P0)
_PX = tl.constexpr(L.COEF_PX)
_PE = tl.constexpr(L.COEF_PE)
_STD = tl.constexpr(L.COEF_STD)
_LVA = tl.constexpr(L.COEF_LVA)
_LVB = tl.constexpr(L.COEF_LVB)
_GATE = tl.constexpr(L.COEF_GATE)

_CLIP_RANGE = tl.constexpr(L.CLIP_RANGE)
_CLIP_THRESHOLD = tl.constexpr(L.CLIP_THRESHOLD)
_VAR_LEARNED = tl.constexpr(L.VAR_LEARNED)
_NOISE_NONE = tl.constexpr(L.NOISE_NONE)
_NOISE_TENSOR = tl.constexpr(L.NOISE_TENSOR)
_NOISE_PHILOX = tl.constexpr(L.NOISE_PHILOX)
_STREAM_STEP = tl.constexpr(L.STREAM_STEP)
_NAN_BITS = tl.constexpr(0x7FC00000)  # quiet NaN (a NaN constexpr breaks the dependency hash)


@triton.jit
def _coef(c, k, poison):
    """Coefficient column ``k`` of the row at ``c``; NaN when ``poison`` (a bad row index)."""
    return tl.where(poison, tl.full([], _NAN_BITS, tl.uint32).to(tl.float32, bitcast=True), tl.load(c + k))


@triton.jit
def _cmul(c, a):
    """The spec's coefficient product ``c (*) a``: +0 for a zero coefficient, even for an infinite ``a``."""
    return tl.where(c != 0.0, c * a, 0.0)


@triton.jit
def _clamp(x, lo, hi):
    """``clamp`` as the spec's selects (NaN kept)."""
    x = tl.where(x < lo, lo, x)
    return tl.where(x > hi, hi, x)


@triton.jit
def ddpm_step_kernel(
    x_ptr,  # [B, N] sample x_t, fp32/fp16/bf16; element (b, e) at b * x_stride_b + e
    m_ptr,  # [B, N] model output (first C channels), dtype of x; at b * m_stride_b + e
    v_ptr,  # [B, N] learned-variance channels, dtype of x; read only when VAR_MODE == VAR_LEARNED
    noise_ptr,  # [B, N] caller noise z, any float dtype; read only when NOISE_MODE == NOISE_TENSOR
    prev_ptr,  # [B, N] output x_{t-1} (cast to its dtype); written unless X0_ONLY
    x0_ptr,  # [B, N] output x0 (cast to its dtype); written only when WRITE_X0
    coef_ptr,  # [R, NCOEF] float32, contiguous: per-step coefficient table
    tval_ptr,  # [R] int64: timestep value of row r is tval[r * tval_stride], the Philox counter's t
    rows_ptr,  # [.] int64: row of coef/tval used by sample b is rows[b * rows_stride]
    thresh_ptr,  # [.] float32: dynamic threshold of sample b is thresh[b * thresh_stride] (CLIP_THRESHOLD)
    rng_ptr,  # [2] int64: (seed, sample_offset), read on the device
    N,  # elements per sample
    num_rows,  # R, rows of coef / tval: a row index outside [0, R) gives NaN outputs
    b_base,  # index of this launch's first sample in the batch (launches are split past grid limits)
    x_stride_b,  # per-sample stride of x, in elements (likewise for the strides below)
    m_stride_b,
    v_stride_b,
    noise_stride_b,
    prev_stride_b,
    x0_stride_b,
    rows_stride,  # stride of rows, in elements (0 for an expanded device-resident step index)
    tval_stride,  # stride of tval, in elements (0 for one timestep expanded over every row)
    thresh_stride,  # stride of thresh, in elements
    clip_range,  # float32 bound of CLIP_RANGE: x0 = clamp(x0, -clip_range, clip_range)
    CLIP_MODE: tl.constexpr,  # _layout.CLIP_*
    VAR_MODE: tl.constexpr,  # _layout.VAR_*
    NOISE_MODE: tl.constexpr,  # _layout.NOISE_*
    X0_ONLY: tl.constexpr,  # write only the clipped (not thresholded) x0, nothing else
    WRITE_X0: tl.constexpr,  # write x0 to x0_ptr
    BLOCK_G: tl.constexpr,  # 4-element groups per program (power of two)
):
    pid = tl.program_id(0)
    b = b_base + tl.program_id(1).to(tl.int64)

    # Per-sample scalars, loaded once per program. A bad row index is clamped and poisons the row.
    row = tl.load(rows_ptr + b * rows_stride)
    bad_row = (row < 0) | (row >= num_rows)
    row = tl.where(bad_row, 0, row)
    c = coef_ptr + row * _NCOEF
    cx = _coef(c, _CX, bad_row)
    cm = _coef(c, _CM, bad_row)

    q = pid * BLOCK_G + tl.arange(0, BLOCK_G)  # 4-element group index inside the sample
    offs = q[:, None] * 4 + tl.arange(0, 4)[None, :]  # [BLOCK_G, 4] element index e
    mask = offs < N

    x = tl.load(x_ptr + b * x_stride_b + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + b * m_stride_b + offs, mask=mask, other=0.0).to(tl.float32)

    # Predict x0 (eq. 15 of Ho et al.) and clip it.
    x0 = _cmul(cx, x) + _cmul(cm, m)
    if CLIP_MODE == _CLIP_RANGE:
        x0 = _clamp(x0, -clip_range, clip_range)
    if X0_ONLY:
        tl.store(x0_ptr + b * x0_stride_b + offs, cast_rne(x0, x0_ptr.dtype.element_ty), mask=mask)
    else:
        if CLIP_MODE == _CLIP_THRESHOLD:
            s = tl.load(thresh_ptr + b * thresh_stride)
            x0 = tl.div_rn(_clamp(x0, -s, s), s)
        if WRITE_X0:
            tl.store(x0_ptr + b * x0_stride_b + offs, cast_rne(x0, x0_ptr.dtype.element_ty), mask=mask)

        # eps from the (clipped) x0, then the posterior mean (eq. 7) or the DDIM update (eq. 12).
        eps = (_cmul(_coef(c, _EX, bad_row), x) + _cmul(_coef(c, _EM, bad_row), m)) + _cmul(_coef(c, _E0, bad_row), x0)
        mean = (_cmul(_coef(c, _P0, bad_row), x0) + _cmul(_coef(c, _PX, bad_row), x)) + _cmul(
            _coef(c, _PE, bad_row), eps
        )

        if NOISE_MODE == _NOISE_NONE:
            prev = mean
        else:
            if NOISE_MODE == _NOISE_TENSOR:
                z = tl.load(noise_ptr + b * noise_stride_b + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                tl.static_assert(NOISE_MODE == _NOISE_PHILOX, "unknown NOISE_MODE")
                seed = tl.load(rng_ptr)
                g = tl.load(rng_ptr + 1) + b
                t = tl.where(bad_row, 0, tl.load(tval_ptr + row * tval_stride))
                z = normal_tile(seed, q, g, t, _STREAM_STEP)
            if VAR_MODE == _VAR_LEARNED:
                v = tl.load(v_ptr + b * v_stride_b + offs, mask=mask, other=0.0).to(tl.float32)
                std = exp_f32(0.5 * (_coef(c, _LVA, bad_row) * v + _coef(c, _LVB, bad_row)))
            else:
                std = _coef(c, _STD, bad_row)
            gate = _coef(c, _GATE, bad_row)
            prev = tl.where(gate != 0.0, mean + std * z, mean)
        tl.store(prev_ptr + b * prev_stride_b + offs, cast_rne(prev, prev_ptr.dtype.element_ty), mask=mask)
