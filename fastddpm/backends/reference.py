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


def multistep(x, m, xp, hist, noise, x0_out, coef, tval, step, thresh, rng, *, clip_mode, clip_range, noise_mode,
              x0_only) -> None:  # fmt: skip
    """One multistep-solver step in plain PyTorch (see :mod:`fastddpm.backends`, ``MS_*`` in :mod:`fastddpm._layout`).

    Runs in the dtype of ``x`` (float32, bitwise as the fused kernels, or float64 as the spec); ``coef``
    and ``m`` are cast to it. Reads ``rng`` on the host only for in-kernel noise (NOISE_PHILOX).
    """
    dt = x.dtype
    i = step.reshape(1)
    c = coef.index_select(0, i).to(dt).reshape(-1)  # [NMS]
    xf, mf = x, m.to(dt)
    d0 = c[L.MS_CX] * xf + c[L.MS_CM] * mf
    if clip_mode == L.CLIP_RANGE:
        d0 = d0.clamp(-clip_range, clip_range)
    if x0_only:
        x0_out.copy_(d0)
        return
    if clip_mode == L.CLIP_THRESHOLD:
        s = thresh.to(dt).reshape(-1, 1)
        d0 = torch.clamp(d0, -s, s) / s
    slots = torch.remainder(i - torch.arange(1, L.MS_HIST + 1, device=i.device), L.MS_HIST)  # D1, D2, D3
    d1, d2, d3 = hist.index_select(0, slots).unbind(0)
    xc = c[L.MS_KX] * xf + c[L.MS_KXP] * xp + c[L.MS_KD0] * d0 + c[L.MS_KD1] * d1 + c[L.MS_KD2] * d2 + c[L.MS_KD3] * d3
    xn = c[L.MS_PX] * xc + c[L.MS_PD0] * d0 + c[L.MS_PD1] * d1 + c[L.MS_PD2] * d2
    if noise_mode == L.NOISE_TENSOR:
        xn = xn + c[L.MS_PZ] * noise.to(dt)
    elif noise_mode == L.NOISE_PHILOX:
        seed, offset = _rng_values(rng)
        g = torch.arange(offset, offset + x.shape[0], dtype=torch.int64, device=x.device)
        t = tval.index_select(0, i).expand(x.shape[0])
        z = philox_normal(seed, g, t, x.shape[1], L.STREAM_SDE, dtype=dt)
        xn = xn + c[L.MS_PZ] * z
    hist.index_copy_(0, torch.remainder(i, L.MS_HIST), d0.unsqueeze(0))
    xp.copy_(xc)
    x.copy_(xn)
