"""Counter-based normal noise inside Triton kernels: Philox4x32-10 + Box-Muller, and the float32
transcendental functions of the kernel spec (``log_f32``, ``sincos_2pi_f32``, ``exp_f32``).

Every function here is the operation sequence of the "Bitwise rules" of :mod:`fastddpm._layout`,
the same as ``csrc/fastddpm_math.h`` and :mod:`fastddpm.noise`, so the noise and the step are
bitwise identical on every backend. Launch kernels that use them with ``**LAUNCH_OPTIONS``
(``enable_fp_fusion=False``); use ``tl.div_rn`` / ``tl.sqrt_rn`` and never ``tl.exp`` / ``tl.log``
/ ``tl.cos`` / ``tl.sin`` around them.

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

_ROUNDS = tl.constexpr(L.PHILOX_ROUNDS)
# float32 constants of the "Bitwise rules" of fastddpm._layout (exact float32 values)
_UNIFORM_SCALE = tl.constexpr(L.UNIFORM_SCALE)
_UNIFORM_MIN = tl.constexpr(L.UNIFORM_MIN)
_TWO_PI = tl.constexpr(L.TWO_PI)
_ROUND_MAGIC = tl.constexpr(L.ROUND_MAGIC)
_SQRTH = tl.constexpr(L.SQRTH)
_LOG_P0 = tl.constexpr(L.LOG_P0)
_LOG_P1 = tl.constexpr(L.LOG_P1)
_LOG_P2 = tl.constexpr(L.LOG_P2)
_LOG_P3 = tl.constexpr(L.LOG_P3)
_LOG_P4 = tl.constexpr(L.LOG_P4)
_LOG_P5 = tl.constexpr(L.LOG_P5)
_LOG_P6 = tl.constexpr(L.LOG_P6)
_LOG_P7 = tl.constexpr(L.LOG_P7)
_LOG_P8 = tl.constexpr(L.LOG_P8)
_LOG_Q1 = tl.constexpr(L.LOG_Q1)
_LOG_Q2 = tl.constexpr(L.LOG_Q2)
_SIN_P0 = tl.constexpr(L.SIN_P0)
_SIN_P1 = tl.constexpr(L.SIN_P1)
_SIN_P2 = tl.constexpr(L.SIN_P2)
_COS_P0 = tl.constexpr(L.COS_P0)
_COS_P1 = tl.constexpr(L.COS_P1)
_COS_P2 = tl.constexpr(L.COS_P2)
_EXP_LO = tl.constexpr(L.EXP_LO)
_EXP_HI = tl.constexpr(L.EXP_HI)
_LOG2E = tl.constexpr(L.LOG2E)
_EXP_C1 = tl.constexpr(L.EXP_C1)
_EXP_C2 = tl.constexpr(L.EXP_C2)
_EXP_P0 = tl.constexpr(L.EXP_P0)
_EXP_P1 = tl.constexpr(L.EXP_P1)
_EXP_P2 = tl.constexpr(L.EXP_P2)
_EXP_P3 = tl.constexpr(L.EXP_P3)
_EXP_P4 = tl.constexpr(L.EXP_P4)
_EXP_P5 = tl.constexpr(L.EXP_P5)

# Launch option every kernel that uses these functions must be started with (rule 1 of the
# "Bitwise rules"): no contraction of a*b + c into an FMA, so the GPU rounds every step as the
# CPU backends and the reference do. The interpreter ignores it (numpy never fuses).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


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
def cast_rne(x, dtype: tl.constexpr):
    """float32 ``x`` -> ``dtype`` rounded to nearest even, as torch and the C++/CUDA kernels store.

    bfloat16 is rounded with integer ops (NaN -> 0x7fc0, as ``c10::BFloat16``): the interpreter's
    own float32 -> bfloat16 cast truncates, and a GPU's ``cvt.rn.bf16.f32`` writes NaN as 0x7fff.
    Every store of a float32 result to a tensor goes through this (rule 3 of the "Bitwise rules").
    """
    if dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def round_small(x):
    """Round float32 ``x`` (``|x| < 2**22``) to the nearest integer, ties to even."""
    return (x + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def log_f32(x):
    """Natural log of positive normal float32 ``x`` (``_layout.log_f32``, about 1 ulp)."""
    ix = x.to(tl.uint32, bitcast=True)
    e = ((ix >> 23).to(tl.int32) - 126).to(tl.float32)
    f = ((ix & 0x7FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)  # x = f * 2**e, f in [0.5, 1)
    small = f < _SQRTH
    e = e - tl.where(small, 1.0, 0.0)
    f = (f + tl.where(small, f, 0.0)) - 1.0
    z = f * f
    z2 = z * z
    p01 = _LOG_P7 * f + _LOG_P8
    p23 = _LOG_P5 * f + _LOG_P6
    p45 = _LOG_P3 * f + _LOG_P4
    p67 = _LOG_P1 * f + _LOG_P2
    q0 = p23 * z + p01
    q1 = p67 * z + p45
    y = (_LOG_P0 * z2 + q1) * z2 + q0
    y = (y * f) * z
    y = y + _LOG_Q1 * e
    y = y + -0.5 * z
    return (f + y) + _LOG_Q2 * e


@triton.jit
def sincos_2pi_f32(u):
    """``(sin(2 pi u), cos(2 pi u))`` for float32 ``0 <= u <= 1`` (``_layout.sincos_2pi_f32``)."""
    q = round_small(4.0 * u)
    r = u - 0.25 * q
    a = r * _TWO_PI
    z = a * a
    ps = _SIN_P0 * z + _SIN_P1
    ps = ps * z + _SIN_P2
    ps = (ps * z) * a + a
    pc = _COS_P0 * z + _COS_P1
    pc = pc * z + _COS_P2
    pc = ((pc * z) * z - 0.5 * z) + 1.0
    k = q.to(tl.int32) & 3
    swap = (k & 1) != 0
    sv = tl.where(swap, pc, ps)
    cv = tl.where(swap, ps, pc)
    return tl.where((k & 2) != 0, -sv, sv), tl.where(((k + 1) & 2) != 0, -cv, cv)


@triton.jit
def exp_f32(x):
    """``exp(x)`` for any float32 ``x`` (``_layout.exp_f32``: NaN kept, 0 / +inf past the range)."""
    nan = x != x
    xc = tl.where(nan, 0.0, x)
    xc = tl.where(xc < _EXP_LO, _EXP_LO, xc)
    xc = tl.where(xc > _EXP_HI, _EXP_HI, xc)
    n = round_small(xc * _LOG2E)
    r = xc - n * _EXP_C1
    r = r - n * _EXP_C2
    z = r * r
    y = _EXP_P0 * r + _EXP_P1
    y = y * r + _EXP_P2
    y = y * r + _EXP_P3
    y = y * r + _EXP_P4
    y = y * r + _EXP_P5
    y = (y * z + r) + 1.0
    ni = n.to(tl.int32)
    n1 = ni >> 1
    n2 = ni - n1
    y = (y * ((n1 + 127) << 23).to(tl.float32, bitcast=True)) * ((n2 + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(nan, x, y)


@triton.jit
def _box_muller(ua, ub):
    """Two standard normals from two uniforms (the ``tl.randn4x`` transform, with the spec's math)."""
    radius = tl.sqrt_rn(-2.0 * log_f32(tl.where(ua < _UNIFORM_MIN, _UNIFORM_MIN, ua)))
    s, c = sincos_2pi_f32(ub)
    return radius * c, radius * s


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
