"""The kernel contract of :mod:`fastddpm._layout` in plain PyTorch (any device, float32 math).

The readable spec of the *diffusion math* is :mod:`fastddpm.reference`; this module is the spec of
the *kernel interface* (coefficient rows, modes, counter noise) that the fused backends implement.
The sampler uses it when no fused backend can run (no compiler, float64, an unusual device).
"""

from __future__ import annotations

import torch

from .. import _layout as L
from ..noise import philox_normal
from ..reference import fused_update_f32


def available(device=None) -> tuple[bool, str]:
    return True, "plain PyTorch"


def _rng_values(rng: torch.Tensor) -> tuple[int, int]:
    seed, offset = (int(v) for v in rng.tolist())
    return seed, offset


def step(x, m, v, noise, prev_out, x0_out, coef, tval, rows, thresh, rng, *, clip_mode, clip_range, var_mode,
         noise_mode, x0_only) -> None:  # fmt: skip
    """See :mod:`fastddpm.backends`. Reads ``rng`` on the host (one sync), so it is not graph-safe.

    The update is :func:`fastddpm.reference.fused_update_f32`: bitwise the fused kernels' result."""
    c = coef.index_select(0, rows)  # [B, NCOEF]
    xf, mf = x.float(), m.float()
    if x0_only:
        _, x0 = fused_update_f32(xf, mf, None, None, c, clip_mode=clip_mode, clip_range=clip_range, x0_only=True)
        x0_out.copy_(x0)
        return
    z = None
    if noise_mode == L.NOISE_TENSOR:
        z = noise.float()
    elif noise_mode == L.NOISE_PHILOX:
        seed, offset = _rng_values(rng)
        g = torch.arange(offset, offset + x.shape[0], dtype=torch.int64, device=x.device)
        z = philox_normal(seed, g, tval.index_select(0, rows), x.shape[1], L.STREAM_STEP)
    vf = v.float() if var_mode == L.VAR_LEARNED and z is not None else None
    prev, x0 = fused_update_f32(xf, mf, vf, z, c, clip_mode=clip_mode, clip_range=clip_range, thresh=thresh)
    if x0_out is not None:
        x0_out.copy_(x0)
    prev_out.copy_(prev)


def q_sample(x0, noise, out, table, t, rng, *, noise_mode) -> None:
    """See :mod:`fastddpm.backends`."""
    coef = table.index_select(0, t)
    if noise_mode == L.NOISE_TENSOR:
        z = noise.float()
    elif noise_mode == L.NOISE_PHILOX:
        seed, offset = _rng_values(rng)
        g = torch.arange(offset, offset + x0.shape[0], dtype=torch.int64, device=x0.device)
        z = philox_normal(seed, g, t, x0.shape[1], L.STREAM_QSAMPLE)
    else:  # NOISE_NONE
        z = torch.zeros_like(x0, dtype=torch.float32)
    out.copy_(coef[:, L.QS_A : L.QS_A + 1] * x0.float() + coef[:, L.QS_B : L.QS_B + 1] * z)


def randn(out, t, rng, *, stream) -> None:
    """See :mod:`fastddpm.backends`."""
    seed, offset = _rng_values(rng)
    g = torch.arange(offset, offset + out.shape[0], dtype=torch.int64, device=out.device)
    out.copy_(philox_normal(seed, g, t, out.shape[1], stream))
