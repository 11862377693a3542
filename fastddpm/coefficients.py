"""Packs the schedule's float64 step terms into the float32 coefficient table the fused kernels read.

Column meanings are defined in :mod:`fastddpm._layout`. Each row is one (t, prev_t) pair; the
algebra here only rearranges :class:`fastddpm.schedule.StepTerms` into ``x0 = CX*x + CM*m``,
``eps = EX*x + EM*m + E0*x0``, ``mean = P0*x0 + PX*x + PE*eps`` form (checked against the
reference backend in the tests).
"""

from __future__ import annotations

import math

import torch

from . import _layout as L
from .schedule import Schedule


def _x0_coefficients(schedule: Schedule, abar_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CX, CM) with x0 = CX * x_t + CM * model_output for the schedule's prediction type."""
    sa, sb = abar_t.sqrt(), (1.0 - abar_t).sqrt()
    if schedule.prediction_type == "epsilon":  # x0 = (x - sqrt(1-abar) eps) / sqrt(abar)      (eq. 15)
        return 1.0 / sa, -sb / sa
    if schedule.prediction_type == "sample":
        return torch.zeros_like(sa), torch.ones_like(sa)
    return sa, -sb  # v_prediction: x0 = sqrt(abar) x - sqrt(1-abar) v (Salimans & Ho 2022)


def _check_finite(coef: torch.Tensor, what: str) -> None:
    # One host read per call of the op-level API; the sampler checks its whole table once up front.
    if coef.device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        if not bool(torch.isfinite(coef).all()):
            bad = (~torch.isfinite(coef)).nonzero()[0].tolist()
            raise ValueError(
                f"{what}: a step coefficient is not finite (row {bad[0]}, column {bad[1]}); the schedule gives "
                "abar_t = 0 or 1 there (e.g. rescale_betas_zero_snr with epsilon prediction at the last step)"
            )


def ddpm_coefficients(schedule: Schedule, t: torch.Tensor, prev_t: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Float32 ``[B, NCOEF]`` table of DDPM steps ``t -> prev_t`` (int64 ``[B]`` each, on the target device)."""
    s = schedule.step_terms(t, prev_t, final_abar=1.0)
    coef = torch.zeros(t.shape[0], L.NCOEF, dtype=torch.float64, device=t.device)
    cx, cm = _x0_coefficients(schedule, s.abar_t)
    coef[:, L.COEF_CX], coef[:, L.COEF_CM] = cx, cm
    coef[:, L.COEF_P0], coef[:, L.COEF_PX] = s.mean_coef_x0, s.mean_coef_xt
    vt = schedule.variance_type
    if vt in ("fixed_small", "fixed_small_log"):
        coef[:, L.COEF_STD] = s.posterior_variance.sqrt()
    elif vt in ("fixed_large", "fixed_large_log"):
        coef[:, L.COEF_STD] = s.beta_t.sqrt()
    elif (
        vt == "learned_range"
    ):  # log var = frac*log(beta) + (1-frac)*log(beta~), frac = (v+1)/2  (Nichol & Dhariwal eq. 15)
        lo, hi = s.posterior_variance.log(), s.beta_t.log()
        coef[:, L.COEF_LVA], coef[:, L.COEF_LVB] = 0.5 * (hi - lo), 0.5 * (hi + lo)
    else:  # learned: the model outputs the log variance itself (improved-diffusion, original DDPM)
        coef[:, L.COEF_LVA] = 1.0
    coef[:, L.COEF_GATE] = s.noise_gate
    coef = coef.to(torch.float32)
    if check:
        _check_finite(coef, "ddpm_step")
    return coef


def ddim_coefficients(
    schedule: Schedule,
    t: torch.Tensor,
    prev_t: torch.Tensor,
    *,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    check: bool = True,
) -> torch.Tensor:
    """Float32 ``[B, NCOEF]`` table of DDIM steps (Song et al. 2021, eq. 12) ``t -> prev_t``."""
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    s = schedule.step_terms(t, prev_t, final_abar=schedule.final_alphas_cumprod)
    coef = torch.zeros(t.shape[0], L.NCOEF, dtype=torch.float64, device=t.device)
    sa, sb = s.abar_t.sqrt(), (1.0 - s.abar_t).sqrt()
    cx, cm = _x0_coefficients(schedule, s.abar_t)
    coef[:, L.COEF_CX], coef[:, L.COEF_CM] = cx, cm
    pt = schedule.prediction_type
    if use_clipped_model_output:  # eps re-derived from the clipped x0
        coef[:, L.COEF_EX], coef[:, L.COEF_E0] = 1.0 / sb, -sa / sb
    elif pt == "epsilon":
        coef[:, L.COEF_EM] = 1.0
    elif pt == "sample":  # eps from the unclipped prediction m = x0
        coef[:, L.COEF_EX], coef[:, L.COEF_EM] = 1.0 / sb, -sa / sb
    else:  # v_prediction: eps = sqrt(abar) v + sqrt(1-abar) x
        coef[:, L.COEF_EX], coef[:, L.COEF_EM] = sb, sa
    # sigma_t(eta) = eta * sqrt((1-abar_prev)/(1-abar_t) * (1 - abar_t/abar_prev))    (eq. 16)
    variance = (1.0 - s.abar_prev) / (1.0 - s.abar_t) * (1.0 - s.abar_t / s.abar_prev)
    sigma = eta * variance.sqrt()
    coef[:, L.COEF_P0] = s.abar_prev.sqrt()
    coef[:, L.COEF_PE] = (1.0 - s.abar_prev - sigma**2).clamp(min=0.0).sqrt()
    coef[:, L.COEF_STD] = sigma
    coef[:, L.COEF_GATE] = 1.0 if eta > 0 else 0.0
    coef = coef.to(torch.float32)
    if check:
        _check_finite(coef, "ddim_step")
    return coef
