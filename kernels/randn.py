"""Counter-based standard normal noise, written straight into a ``[B, N]`` tensor.

``out[b, e]`` is the normal of ``(seed, sample_offset + b, t[b], e, STREAM)`` in the layout of
:mod:`fastddpm._layout`, identical to what the fused step and q_sample kernels draw in-register.

Grid: ``(cdiv(cdiv(N, 4), BLOCK_G), B)``, ``[BLOCK_G, 4]`` element tiles as in :mod:`.ddpm_step`.

Bytes per element: write ``out`` (size of its dtype); nothing is read per element.
"""

import triton
import triton.language as tl

from .philox import cast_rne, normal_tile


@triton.jit
def randn_kernel(
    out_ptr,  # [B, N] output, any float dtype; element (b, e) at b * out_stride_b + e
    t_ptr,  # [.] int64: timestep (counter t) of sample b is t[b * t_stride]
    rng_ptr,  # [2] int64: (seed, sample_offset), read on the device
    N,  # elements per sample
    b_base,  # index of this launch's first sample in the batch (launches are split past grid limits)
    out_stride_b,  # per-sample stride of out, in elements
    t_stride,  # stride of t, in elements (0 when one timestep is expanded over the batch)
    STREAM: tl.constexpr,  # _layout.STREAM_*
    BLOCK_G: tl.constexpr,  # 4-element groups per program (power of two)
):
    pid = tl.program_id(0)
    b = b_base + tl.program_id(1).to(tl.int64)

    q = pid * BLOCK_G + tl.arange(0, BLOCK_G)  # 4-element group index inside the sample
    offs = q[:, None] * 4 + tl.arange(0, 4)[None, :]  # [BLOCK_G, 4] element index e
    mask = offs < N

    seed = tl.load(rng_ptr)
    g = tl.load(rng_ptr + 1) + b
    z = normal_tile(seed, q, g, tl.load(t_ptr + b * t_stride), STREAM)
    tl.store(out_ptr + b * out_stride_b + offs, cast_rne(z, out_ptr.dtype.element_ty), mask=mask)
