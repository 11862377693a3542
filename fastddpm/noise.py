"""Counter-based normal noise: the plain-PyTorch definition every fused backend reproduces.

The exact counter layout is written down once, in :mod:`fastddpm._layout`. This module is the
readable spec of it: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC'11) in int64 arithmetic, followed by the Box-Muller transform used by Triton's ``tl.randn4``.
It runs on any device, with no state, so the noise for sample ``g`` at timestep ``t`` is the same
whatever batch, backend or process it is made in.
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
    return s.to(torch.float32) * torch.tensor(L.UNIFORM_SCALE, dtype=torch.float32)


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
        dtype: float32 (as the kernels compute) or float64 (Box-Muller in float64 on the same
            uniforms, for references).
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
    u = [_uniform(ri).to(dtype) for ri in r]
    two_pi = L.TWO_PI
    ra = torch.sqrt(-2.0 * torch.log(torch.clamp(u[0], min=L.UNIFORM_MIN)))
    rb = torch.sqrt(-2.0 * torch.log(torch.clamp(u[2], min=L.UNIFORM_MIN)))
    th_a, th_b = two_pi * u[1], two_pi * u[3]
    n = torch.stack([ra * torch.cos(th_a), ra * torch.sin(th_a), rb * torch.cos(th_b), rb * torch.sin(th_b)], dim=-1)
    return n.reshape(g.shape[0], ngroups * 4)[:, :numel]


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
