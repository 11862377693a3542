"""Counter-based normal noise inside Triton kernels: Philox4x32-10 + Box-Muller.

Implements the counter layout of :mod:`fastddpm._layout` (its readable spec is
:func:`fastddpm.noise.philox_normal`). One Philox call yields the normals of four consecutive
elements ``4 * q .. 4 * q + 3`` of one sample, so kernels work on tiles of ``[BLOCK_G, 4]``
elements: row ``i`` of a tile is the 4-element group ``q = q0 + i``.

For sample ``g`` (global index ``sample_offset + b``), timestep value ``t`` and stream ``STREAM``::

    key     (k0, k1)         = (seed & 0xffffffff, seed >> 32)          # done by tl.philox
    counter (c0, c1, c2, c3) = (q, g & 0xffffffff, t & 0xffffffff, STREAM | (g >> 32) << 8)
"""

import triton
import triton.language as tl

from fastddpm import _layout as L

_UNIFORM_SCALE = tl.constexpr(L.UNIFORM_SCALE)
_UNIFORM_MIN = tl.constexpr(L.UNIFORM_MIN)
_TWO_PI = tl.constexpr(L.TWO_PI)
_ROUNDS = tl.constexpr(L.PHILOX_ROUNDS)


@triton.jit
def philox_bits(seed, q, g, t, STREAM: tl.constexpr):
    """Four uint32 blocks ``r0..r3`` of Philox4x32-10 for the counters of groups ``q``.

    Args:
        seed: int64 scalar, the key (bit pattern; ``tl.philox`` splits it into two uint32 words).
        q: int32/int64 ``[BLOCK_G]`` group indices (``element index >> 2``), ``0 <= q < 2**32``.
        g: int64 scalar, global sample index ``sample_offset + b``.
        t: int64 scalar, timestep value (the row's ``tval``, or ``t[b]``).
        STREAM: one of ``_layout.STREAM_*``.
    Returns:
        ``r0, r1, r2, r3``: uint32 ``[BLOCK_G]``.
    """
    c0 = q.to(tl.uint32)
    zero = tl.zeros_like(c0)
    # Scalars broadcast to the block shape first, so every Philox round works on full blocks.
    c1 = zero + (g & 0xFFFFFFFF).to(tl.uint32)
    c2 = zero + (t & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + (((g >> 32) << 8) | STREAM).to(tl.uint32)
    return tl.philox(seed, c0, c1, c2, c3, _ROUNDS)


@triton.jit
def _uniform(r):
    """uint32 -> float32 in [0, 1), exactly as ``tl.random.uint_to_uniform_float``."""
    s = r.to(tl.int32, bitcast=True)
    s = tl.where(s < 0, ~s, s)  # ~s == -s - 1, without the int32 overflow at -2**31
    return s.to(tl.float32) * _UNIFORM_SCALE


@triton.jit
def _box_muller(ua, ub):
    """Two standard normals from two uniforms (the ``tl.randn4x`` transform)."""
    radius = tl.sqrt(-2.0 * tl.log(tl.maximum(ua, _UNIFORM_MIN)))
    theta = _TWO_PI * ub
    return radius * tl.cos(theta), radius * tl.sin(theta)


@triton.jit
def normal_tile(seed, q, g, t, STREAM: tl.constexpr):
    """Standard normals of the ``[BLOCK_G, 4]`` element tile whose row ``i`` is group ``q[i]``.

    Element ``(i, j)`` is the normal of flat element index ``4 * q[i] + j`` of sample ``g`` at
    timestep ``t``: ``n_j`` of the group's Philox call. Returns float32 ``[BLOCK_G, 4]``.
    """
    r0, r1, r2, r3 = philox_bits(seed, q, g, t, STREAM)
    n0, n1 = _box_muller(_uniform(r0), _uniform(r1))
    n2, n3 = _box_muller(_uniform(r2), _uniform(r3))
    # Interleave (n0, n1, n2, n3) along the fast axis. A select keeps every value in the thread
    # that computed it; the compiler folds the comparisons on the constant column index.
    j = tl.arange(0, 4)[None, :]
    z = tl.where(j == 0, n0[:, None], n1[:, None])
    z = tl.where(j == 2, n2[:, None], z)
    z = tl.where(j == 3, n3[:, None], z)
    return z


def block_config(numel: int) -> tuple[int, int]:
    """``(BLOCK_G, num_warps)`` for an elementwise kernel over ``[BLOCK_G, 4]`` tiles of a sample.

    ``numel`` is the number of elements per sample. A program handles up to 1024 elements
    (256 groups of 4, two Philox calls per thread at 4 warps); small samples get one program each.
    """
    groups = max(1, triton.cdiv(numel, 4))
    block_g = min(256, max(16, triton.next_power_of_2(groups)))
    num_warps = max(1, min(4, block_g // 64))
    return block_g, num_warps
