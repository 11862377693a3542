"""Counter-based normal noise: the plain-PyTorch definition every fused backend reproduces.

The exact counter layout is written down once, in :mod:`fastddpm._layout`. This module is the
readable spec of it: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC'11) in int64 arithmetic, followed by the Box-Muller transform used by Triton's ``tl.randn4``.
It runs on any device, with no state, so the noise for sample ``g`` at timestep ``t`` is the same
whatever batch, backend or process it is made in.

The float32 normals are bitwise those of every fused backend: the transcendental functions are the
polynomials of the "Bitwise rules" of :mod:`fastddpm._layout` (:func:`log_f32`,
:func:`sincos_2pi_f32`, :func:`exp_f32`), written here in plain elementwise float32 torch ops (each
correctly rounded, none fused), never ``torch.log``/``cos``/``sin``/``exp``; square roots and
divisions go through float64 (:func:`sqrt_f32`, :func:`div_f32`) because torch's float32 ``sqrt``
is not correctly rounded on CPU.
"""

from __future__ import annotations

import math

import torch

from . import _layout as L
from ._checks import int_arg

_MASK32 = 0xFFFFFFFF

# --- the valid keys and sample indices (one rule for every op, sampler and the CLI) -------------
SEED_LIMIT = 1 << 64
"""Seeds are unsigned 64-bit keys: ints in ``[0, 2**64)``. Nothing wraps, so two different seeds
never give the same noise (``-1`` is refused rather than read as ``2**64 - 1``)."""
SAMPLE_INDEX_LIMIT = 1 << 56
"""Global sample indices ``g = sample_offset + b`` must be ``< 2**56``: the counter holds
``g & 0xffffffff`` in ``c1`` and ``g >> 32`` in the top 24 bits of ``c3`` (:mod:`fastddpm._layout`)."""


def check_seed(seed: object) -> int:
    """``seed`` as a Python int in ``[0, 2**64)`` (Python or numpy integer; not bool/float/tensor)."""
    return int_arg("seed", seed, 0, SEED_LIMIT, allowed="an int in [0, 2**64)")


def seed_word(seed: object) -> int:
    """The validated ``seed`` as the signed int64 holding the same 64 bits.

    This is what the device-resident ``rng = [seed, sample_offset]`` tensor stores (int64); every
    kernel reads it back as the 64-bit key ``(k0, k1)``. Raises as :func:`check_seed`.
    """
    seed = check_seed(seed)
    return seed - SEED_LIMIT if seed >= 1 << 63 else seed


def check_sample_range(sample_offset: object, batch: int) -> int:
    """``sample_offset`` as a Python int such that the batch's indices ``[sample_offset, sample_offset +
    batch)`` lie in ``[0, 2**56)``; raises naming ``sample_offset`` otherwise."""
    off = int_arg("sample_offset", sample_offset, 0, SAMPLE_INDEX_LIMIT, allowed="an int >= 0")
    if off + batch > SAMPLE_INDEX_LIMIT:
        raise ValueError(
            f"sample_offset={off} with a batch of {batch} reaches sample index {off + batch - 1}; "
            f"sample indices must be < 2**56 (sample_offset + batch <= 2**56)"
        )
    return off


def _mul_hilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of uint32 values held in int64 tensors.

    ``a * b`` can reach 2**64, past int64, so ``b`` is split into 16-bit halves (each partial
    product stays below 2**48).
    """
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo
    p_hi = a * b_hi
    mid = p_hi + (p_lo >> 16)
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with ``PHILOX_ROUNDS`` rounds, on int64 tensors holding uint32 values.

    Args:
        c0..c3: broadcastable int64 tensors in ``[0, 2**32)``, the counter.
        seed: 64-bit key, ``k0 = seed & 0xffffffff``, ``k1 = seed >> 32``.
    Returns:
        four int64 tensors in ``[0, 2**32)``, identical to ``tl.philox(seed, c0, c1, c2, c3)``.
    """
    seed &= (1 << 64) - 1
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(L.PHILOX_ROUNDS):
        hi0, lo0 = _mul_hilo(c0, L.PHILOX_M0)
        hi1, lo1 = _mul_hilo(c2, L.PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + L.PHILOX_W0) & _MASK32
        k1 = (k1 + L.PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _uniform(r: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float32 in [0, 1), bit-for-bit as Triton's ``uint_to_uniform_float``."""
    s = torch.where(r >= 2**31, r - 2**32, r)  # bitcast to int32
    s = torch.where(s < 0, -s - 1, s)
    return s.to(torch.float32) * L.UNIFORM_SCALE


# --- the float32 functions of the kernel spec (see "Bitwise rules" in fastddpm._layout) ----------
# Every line is one or two correctly rounded float32 ops on tensors (a Python float operand is an
# exact float32 constant, so torch rounds it to itself); keep the order and the parentheses.


def sqrt_f32(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (IEEE ``sqrt``), as ``sqrtss`` / ``sqrt.rn.f32``.

    ``torch.sqrt`` on float32 CPU tensors is not correctly rounded (about 15 % of the results are
    1 ulp off on torch 2.x, whatever ``ATEN_CPU_CAPABILITY``), so the root is taken in float64 and
    rounded once: for ``+ - * / sqrt`` float64 has more than ``2 * 24 + 2`` bits, so that double
    rounding is exact (Figueroa, "When is double rounding innocuous?", 1995).
    """
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def div_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 division (IEEE), independent of torch's kernels (see :func:`sqrt_f32`)."""
    return (a.to(torch.float64) / b.to(torch.float64)).to(torch.float32)


def round_small(x: torch.Tensor) -> torch.Tensor:
    """Round float32 ``x`` (``|x| < 2**22``) to the nearest integer, ties to even."""
    return (x + L.ROUND_MAGIC) - L.ROUND_MAGIC


def _bits_to_float(i: torch.Tensor) -> torch.Tensor:
    return i.to(torch.int32).contiguous().view(torch.float32)


def log_f32(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal float32 ``x`` (``_layout.log_f32``, about 1 ulp). Float32 out."""
    ix = x.contiguous().view(torch.int32)
    e = ((ix >> 23) - 126).to(torch.float32)
    f = _bits_to_float((ix & 0x7FFFFF) | 0x3F000000)  # x = f * 2**e, f in [0.5, 1)
    small = f < L.SQRTH
    e = e - small.to(torch.float32)
    f = (f + torch.where(small, f, 0.0)) - 1.0
    z = f * f
    z2 = z * z
    p01 = L.LOG_P7 * f + L.LOG_P8
    p23 = L.LOG_P5 * f + L.LOG_P6
    p45 = L.LOG_P3 * f + L.LOG_P4
    p67 = L.LOG_P1 * f + L.LOG_P2
    q0 = p23 * z + p01
    q1 = p67 * z + p45
    y = (L.LOG_P0 * z2 + q1) * z2 + q0
    y = (y * f) * z
    y = y + L.LOG_Q1 * e
    y = y + -0.5 * z
    return (f + y) + L.LOG_Q2 * e


def sincos_2pi_f32(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sin(2 pi u), cos(2 pi u))`` for float32 ``0 <= u <= 1`` (``_layout.sincos_2pi_f32``)."""
    q = round_small(4.0 * u)
    r = u - 0.25 * q
    a = r * L.TWO_PI
    z = a * a
    ps = L.SIN_P0 * z + L.SIN_P1
    ps = ps * z + L.SIN_P2
    ps = (ps * z) * a + a
    pc = L.COS_P0 * z + L.COS_P1
    pc = pc * z + L.COS_P2
    pc = ((pc * z) * z - 0.5 * z) + 1.0
    k = q.to(torch.int32) & 3
    swap = (k & 1) != 0
    sv = torch.where(swap, pc, ps)
    cv = torch.where(swap, ps, pc)
    return torch.where((k & 2) != 0, -sv, sv), torch.where(((k + 1) & 2) != 0, -cv, cv)


def exp_f32(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` for any float32 ``x`` (``_layout.exp_f32``: NaN kept, 0 / +inf past the range)."""
    nan = torch.isnan(x)
    xc = torch.where(nan, 0.0, x)
    xc = torch.where(xc < L.EXP_LO, L.EXP_LO, xc)
    xc = torch.where(xc > L.EXP_HI, L.EXP_HI, xc)
    n = round_small(xc * L.LOG2E)
    r = xc - n * L.EXP_C1
    r = r - n * L.EXP_C2
    z = r * r
    y = L.EXP_P0 * r + L.EXP_P1
    y = y * r + L.EXP_P2
    y = y * r + L.EXP_P3
    y = y * r + L.EXP_P4
    y = y * r + L.EXP_P5
    y = (y * z + r) + 1.0
    ni = n.to(torch.int32)
    n1 = ni >> 1
    n2 = ni - n1
    y = (y * _bits_to_float((n1 + 127) << 23)) * _bits_to_float((n2 + 127) << 23)
    return torch.where(nan, x, y)


def _box_muller_f32(ua: torch.Tensor, ub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 standard normals from two uniforms, as the kernels' Box-Muller."""
    radius = sqrt_f32(-2.0 * log_f32(torch.where(ua < L.UNIFORM_MIN, L.UNIFORM_MIN, ua)))
    s, c = sincos_2pi_f32(ub)
    return radius * c, radius * s


def _box_muller_f64(ua: torch.Tensor, ub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same transform in float64 with libm functions: a high-precision reference of the above."""
    ua, ub = ua.to(torch.float64), ub.to(torch.float64)
    radius = torch.sqrt(-2.0 * torch.log(torch.clamp(ua, min=L.UNIFORM_MIN)))
    theta = (2 * math.pi) * ub
    return radius * torch.cos(theta), radius * torch.sin(theta)


def philox_normal(
    seed: int,
    sample_index: torch.Tensor,
    t: torch.Tensor,
    numel: int,
    stream: int,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise ``[B, numel]`` from the counter layout of :mod:`fastddpm._layout`.

    Args:
        seed: the 64-bit key: a seed in ``[0, 2**64)`` or its signed int64 word (:func:`seed_word`),
            taken modulo 2**64. Callers validate user seeds with :func:`check_seed` first.
        sample_index: int64 ``[B]``, global sample indices ``g`` (``sample_offset + b``).
        t: int64 ``[B]`` (or broadcastable), timestep value of each row.
        numel: elements per sample ``N``.
        stream: one of ``STREAM_*``.
        dtype: float32 (as the kernels compute, bit for bit), float64 (Box-Muller in float64 with
            libm functions on the same uniforms: a high-precision reference of the float32 values),
            or float16 / bfloat16 (the float32 values rounded).
    Returns:
        ``[B, numel]`` tensor of ``dtype`` on ``sample_index.device``.
    """
    device = sample_index.device
    g = sample_index.to(torch.int64).reshape(-1, 1)
    tt = torch.as_tensor(t, dtype=torch.int64, device=device).reshape(-1, 1).expand_as(g)
    ngroups = (numel + 3) // 4
    e4 = torch.arange(ngroups, dtype=torch.int64, device=device).reshape(1, -1)
    c0 = e4.expand(g.shape[0], ngroups)
    c1 = (g & _MASK32).expand_as(c0)
    c2 = (tt & _MASK32).expand_as(c0)
    c3 = (stream | ((g >> 32) << 8)).expand_as(c0)
    r = philox4x32(c0, c1, c2, c3, seed)
    u = [_uniform(ri) for ri in r]
    if dtype == torch.float64:
        n0, n1 = _box_muller_f64(u[0], u[1])
        n2, n3 = _box_muller_f64(u[2], u[3])
    else:
        n0, n1 = _box_muller_f32(u[0], u[1])
        n2, n3 = _box_muller_f32(u[2], u[3])
    n = torch.stack([n0, n1, n2, n3], dim=-1)
    return n.reshape(g.shape[0], ngroups * 4)[:, :numel].to(dtype)


def randn(
    shape: tuple[int, ...] | torch.Size,
    seed: int,
    *,
    sample_offset: int = 0,
    t: int | torch.Tensor = 0,
    stream: int = L.STREAM_INIT,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Counter-based standard normal tensor of ``shape`` (first dim = samples), reference backend.

    Sample ``b`` of the result is keyed by global index ``sample_offset + b``; the rest of the shape
    is flattened into the element index. For the fused backends use :func:`fastddpm.randn`.
    """
    shape = tuple(shape)
    b = shape[0]
    numel = math.prod(shape[1:])
    seed = check_seed(seed)
    sample_offset = check_sample_range(sample_offset, b)
    g = torch.arange(sample_offset, sample_offset + b, dtype=torch.int64, device=device)
    z = philox_normal(seed, g, torch.as_tensor(t, device=device), numel, stream)
    return z.reshape(shape).to(dtype)
