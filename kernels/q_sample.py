"""Forward-process sample ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * z`` in one pass.

Reads the ``[T, 2]`` float32 table ``(sqrt(abar_t), sqrt(1 - abar_t))`` of :mod:`fastddpm._layout`
(columns ``QS_A``, ``QS_B``) at ``t[b]``. With NOISE_PHILOX, ``z`` is the counter-based normal of
stream ``STREAM_QSAMPLE`` with counter timestep ``t[b]``. Float32 order of the "Bitwise rules" of
:mod:`fastddpm._layout` (launch with ``philox.LAUNCH_OPTIONS``). A timestep outside
``[0, num_timesteps)`` is clamped for the table load and the sample's outputs are NaN.

Grid: ``(cdiv(cdiv(N, 4), BLOCK_G), B)``, ``[BLOCK_G, 4]`` element tiles as in :mod:`.ddpm_step`.

Bytes per element, for ``s`` the size of the input dtype: read ``x0`` (s) ``+ s`` for ``noise``
(NOISE_TENSOR), write ``out`` (s).
"""

import triton
import triton.language as tl

from fastddpm import _layout as L

from .philox import cast_rne, normal_tile

_QS_A = tl.constexpr(L.QS_A)
_QS_B = tl.constexpr(L.QS_B)
_NOISE_TENSOR = tl.constexpr(L.NOISE_TENSOR)
_NOISE_PHILOX = tl.constexpr(L.NOISE_PHILOX)
_STREAM_QSAMPLE = tl.constexpr(L.STREAM_QSAMPLE)
_NAN_BITS = tl.constexpr(0x7FC00000)  # quiet NaN (a NaN constexpr breaks the dependency hash)


@triton.jit
def q_sample_kernel(
    x0_ptr,  # [B, N] clean sample x0, fp32/fp16/bf16; element (b, e) at b * x0_stride_b + e
    noise_ptr,  # [B, N] caller noise z, any float dtype; read only when NOISE_MODE == NOISE_TENSOR
    out_ptr,  # [B, N] output x_t (cast to its dtype)
    table_ptr,  # [T, 2] float32, contiguous: (sqrt(abar_t), sqrt(1 - abar_t))
    t_ptr,  # [.] int64: timestep of sample b is t[b * t_stride]
    rng_ptr,  # [2] int64: (seed, sample_offset), read on the device
    N,  # elements per sample
    num_timesteps,  # T, rows of table: a timestep outside [0, T) gives NaN outputs
    b_base,  # index of this launch's first sample in the batch (launches are split past grid limits)
    x0_stride_b,  # per-sample stride of x0, in elements
    noise_stride_b,  # per-sample stride of noise, in elements
    out_stride_b,  # per-sample stride of out, in elements
    t_stride,  # stride of t, in elements (0 when one timestep is expanded over the batch)
    NOISE_MODE: tl.constexpr,  # _layout.NOISE_TENSOR or _layout.NOISE_PHILOX
    BLOCK_G: tl.constexpr,  # 4-element groups per program (power of two)
):
    pid = tl.program_id(0)
    b = b_base + tl.program_id(1).to(tl.int64)

    t = tl.load(t_ptr + b * t_stride)
    bad_t = (t < 0) | (t >= num_timesteps)
    tc = tl.where(bad_t, 0, t)
    nan = tl.full([], _NAN_BITS, tl.uint32).to(tl.float32, bitcast=True)
    qa = tl.where(bad_t, nan, tl.load(table_ptr + tc * 2 + _QS_A))
    qb = tl.where(bad_t, nan, tl.load(table_ptr + tc * 2 + _QS_B))

    q = pid * BLOCK_G + tl.arange(0, BLOCK_G)  # 4-element group index inside the sample
    offs = q[:, None] * 4 + tl.arange(0, 4)[None, :]  # [BLOCK_G, 4] element index e
    mask = offs < N

    x0 = tl.load(x0_ptr + b * x0_stride_b + offs, mask=mask, other=0.0).to(tl.float32)
    if NOISE_MODE == _NOISE_TENSOR:
        z = tl.load(noise_ptr + b * noise_stride_b + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        tl.static_assert(NOISE_MODE == _NOISE_PHILOX, "q_sample needs NOISE_TENSOR or NOISE_PHILOX")
        seed = tl.load(rng_ptr)
        g = tl.load(rng_ptr + 1) + b
        z = normal_tile(seed, q, g, t, _STREAM_QSAMPLE)
    xt = qa * x0 + qb * z
    tl.store(out_ptr + b * out_stride_b + offs, cast_rne(xt, out_ptr.dtype.element_ty), mask=mask)
