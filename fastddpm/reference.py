"""The reference backend: the spec every fused backend is tested against.

Plain PyTorch, any device, any float dtype (float64 in, float64 arithmetic out). Each stage cites
its equation: Ho et al. 2020 "Denoising Diffusion Probabilistic Models" (DDPM), Song et al. 2021
"Denoising Diffusion Implicit Models" (DDIM), Nichol & Dhariwal 2021 "Improved DDPM" (learned
variances), Saharia et al. 2022 (dynamic thresholding). Behaviour follows diffusers'
``DDPMScheduler.step``/``DDIMScheduler.step``/``add_noise`` except where diffusers is wrong:

* ``fixed_large_log``: diffusers takes the square root of ``log(beta_t)`` (NaN, its bug #14569);
  here the standard deviation is ``sqrt(beta_t)``, as for ``fixed_large``.
* ``learned``: diffusers takes the square root of the raw model output (NaN when negative); here,
  as in improved-diffusion and the original DDPM code, the output is a LOG variance: ``std = exp(v/2)``.

Two specs live here, chosen by the sample's dtype:

* float64 samples: the high-precision spec, the formulas below in float64 (numbered stages).
* float32 / float16 / bfloat16 samples: the kernel spec of :mod:`fastddpm._layout`, in plain torch
  float32 ops in its exact operation order (:func:`fused_update_f32`: the float32 coefficient table of
  :mod:`fastddpm.coefficients`, then the per-element update), so that the result is bitwise that of
  every fused backend ("Bitwise rules" in :mod:`fastddpm._layout`). It is tested against the float64
  spec with tolerances tied to float32 arithmetic, and against the fused backends with ``torch.equal``.

Inputs are already validated by :mod:`fastddpm.ops`: ``t``, ``prev_t`` are int64 ``[B]`` on the
sample's device, ``noise`` (if given) has the sample's shape.
"""

from __future__ import annotations

import math

import torch

from . import _layout as L
from .coefficients import ddim_coefficients, ddpm_coefficients
from .noise import div_f32, exp_f32, philox_normal
from .schedule import LEARNED_VARIANCES, Schedule


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, 1, ...]`` in ``like``'s dtype, to broadcast over a sample."""
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def step_noise(
    shape: torch.Size, t: torch.Tensor, seed: int, sample_offset: int, stream: int, dtype: torch.dtype
) -> torch.Tensor:
    """Counter-based noise of ``shape`` for timesteps ``t`` ``[B]`` (see :mod:`fastddpm._layout`)."""
    b = shape[0]
    g = torch.arange(sample_offset, sample_offset + b, dtype=torch.int64, device=t.device)
    numel = 1
    for s in shape[1:]:
        numel *= s
    return philox_normal(seed, g, t, numel, stream, dtype=torch.float32).to(dtype).reshape(shape)


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Per-sample threshold ``s`` ``[B]`` (Saharia et al. 2022, sec. 3): the ``ratio`` quantile of |x0|,
    clamped to ``[1, max_value]``. Computed in float32 (float64 for float64 input), as diffusers."""
    b, n = x0.shape[0], math.prod(x0.shape[1:])
    a = x0.reshape(b, n).abs().to(torch.float64 if x0.dtype == torch.float64 else torch.float32)
    if b == 0 or n == 0:  # nothing to threshold: s = 1 (the lower clamp)
        return torch.ones(b, dtype=a.dtype, device=a.device)
    # Linear-interpolated quantile via kthvalue (torch.quantile caps its input at 2**24 elements).
    pos = ratio * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = a.kthvalue(lo + 1, dim=1).values
    v_hi = a.kthvalue(hi + 1, dim=1).values if hi != lo else v_lo
    s = v_lo + (v_hi - v_lo) * (pos - lo)
    return s.clamp(min=1.0, max=max_value)


def predict_x0(
    schedule: Schedule, model_output: torch.Tensor, sample: torch.Tensor, abar_t: torch.Tensor
) -> torch.Tensor:
    """x0 from the model output for the schedule's ``prediction_type``."""
    a = _per_sample(abar_t, sample)
    if schedule.prediction_type == "epsilon":  # DDPM eq. 15: x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)
        return (sample - (1 - a).sqrt() * model_output) / a.sqrt()
    if schedule.prediction_type == "sample":
        return model_output
    return a.sqrt() * sample - (1 - a).sqrt() * model_output  # v-prediction (Salimans & Ho 2022, eq. 12)


def clip_x0(schedule: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """Dynamic thresholding if enabled, else clipping to ``[-clip_sample_range, clip_sample_range]``."""
    if schedule.thresholding:
        s = _per_sample(dynamic_threshold(x0, schedule.dynamic_thresholding_ratio, schedule.sample_max_value), x0)
        return torch.clamp(x0, -s, s) / s
    if schedule.clip_sample:
        return x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def _noise_for(
    noise: torch.Tensor | None, x: torch.Tensor, t: torch.Tensor, seed: int | None, sample_offset: int
) -> torch.Tensor:
    if noise is not None:
        return noise.to(x.dtype)
    assert seed is not None
    return step_noise(x.shape, t, seed, sample_offset, L.STREAM_STEP, x.dtype)


# ----------------------------------------------------------------------------- float32 kernel spec
def _cmul(c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The spec's coefficient product ``c (*) a``: +0 where the coefficient is 0, even for an infinite ``a``."""
    return torch.where(c != 0, c * a, 0.0)


def _clamp(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``clamp`` as the spec's two selects (NaN kept, bounds as given)."""
    x = torch.where(x < lo, lo, x)
    return torch.where(x > hi, hi, x)


def fused_update_f32(
    x: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor | None,
    z: torch.Tensor | None,
    coef: torch.Tensor,
    *,
    clip_mode: int,
    clip_range: float = 1.0,
    thresh: torch.Tensor | None = None,
    x0_only: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The per-element update of :mod:`fastddpm._layout` in float32 torch ops, bit for bit as the kernels.

    Args:
        x, m: float32 ``[B, ...]`` sample and model output (first C channels).
        v: float32 ``[B, ...]`` learned log-variance channels (VAR_LEARNED) or None (fixed std).
        z: float32 ``[B, ...]`` standard normal noise, or None (no noise: ``prev = mean``).
        coef: float32 ``[B, NCOEF]``, the coefficient row of each sample.
        clip_mode: ``CLIP_NONE``, ``CLIP_RANGE`` or ``CLIP_THRESHOLD``.
        clip_range: bound of CLIP_RANGE (rounded to float32, as the kernels take it).
        thresh: float32 ``[B]`` dynamic thresholds ``s`` (CLIP_THRESHOLD).
        x0_only: return ``(None, x0)`` with x0 not thresholded (the first pass of thresholding).
    Returns:
        ``(prev, x0)``, float32 ``[B, ...]``.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    col = lambda k: coef[:, k].reshape(shape)  # noqa: E731
    x0 = _cmul(col(L.COEF_CX), x) + _cmul(col(L.COEF_CM), m)
    if clip_mode == L.CLIP_RANGE:
        r = torch.tensor(clip_range, dtype=torch.float32, device=x.device)
        x0 = _clamp(x0, -r, r)
    elif clip_mode == L.CLIP_THRESHOLD and not x0_only:
        s = thresh.to(torch.float32).reshape(shape)
        x0 = div_f32(_clamp(x0, -s, s), s)
    if x0_only:
        return None, x0
    eps = (_cmul(col(L.COEF_EX), x) + _cmul(col(L.COEF_EM), m)) + _cmul(col(L.COEF_E0), x0)
    mean = (_cmul(col(L.COEF_P0), x0) + _cmul(col(L.COEF_PX), x)) + _cmul(col(L.COEF_PE), eps)
    if z is None:
        return mean, x0
    std = exp_f32(0.5 * (col(L.COEF_LVA) * v + col(L.COEF_LVB))) if v is not None else col(L.COEF_STD)
    return torch.where(col(L.COEF_GATE) != 0, mean + std * z, mean), x0


def _f32_inputs(model_output: torch.Tensor, sample: torch.Tensor, schedule: Schedule, split_variance: bool):
    """``(x, m, v)`` in float32 as the fused path sees them: the output rounded to the sample's dtype first."""
    x = sample.to(torch.float32)
    mo = model_output.to(sample.dtype).to(torch.float32)
    c = sample.shape[1]
    if schedule.variance_type in LEARNED_VARIANCES:
        return x, mo[:, :c], (mo[:, c:] if split_variance else None)
    return x, mo, None


def _f32_noise(
    noise: torch.Tensor | None, sample: torch.Tensor, t: torch.Tensor, seed: int | None, sample_offset: int
) -> torch.Tensor:
    """Step noise in float32: the caller's rounded to the sample's dtype (as the fused path), or Philox."""
    if noise is not None:
        return noise.to(sample.dtype).to(torch.float32)
    assert seed is not None
    return step_noise(sample.shape, t, seed, sample_offset, L.STREAM_STEP, torch.float32)


def _f32_step(
    schedule: Schedule, coef: torch.Tensor, x: torch.Tensor, m: torch.Tensor, v: torch.Tensor | None,
    z: torch.Tensor | None, sample: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Clip mode, the thresholding pass if any, and the update; outputs in the sample's dtype."""
    thresh = None
    if schedule.thresholding:
        clip_mode = L.CLIP_THRESHOLD
        _, x0 = fused_update_f32(x, m, None, None, coef, clip_mode=L.CLIP_NONE, x0_only=True)
        thresh = dynamic_threshold(x0, schedule.dynamic_thresholding_ratio, schedule.sample_max_value)
    else:
        clip_mode = L.CLIP_RANGE if schedule.clip_sample else L.CLIP_NONE
    prev, x0 = fused_update_f32(
        x, m, v, z, coef, clip_mode=clip_mode, clip_range=float(schedule.clip_sample_range), thresh=thresh
    )
    return prev.to(sample.dtype), x0.to(sample.dtype)


# ----------------------------------------------------------------------------- public steps
def ddpm_step(
    model_output: torch.Tensor,
    t: torch.Tensor,
    sample: torch.Tensor,
    schedule: Schedule,
    prev_t: torch.Tensor,
    noise: torch.Tensor | None,
    seed: int | None,
    sample_offset: int = 0,
    *,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse DDPM step x_t -> x_{prev_t}; returns ``(prev_sample, pred_original_sample)``.

    ``compute_dtype`` None: the float64 formulas for float64 samples, the float32 kernel spec
    otherwise. ``torch.float64`` / ``torch.float32``: the formulas below in that dtype whatever the
    sample's (float32: what plain PyTorch arithmetic gives, the baseline fused errors are held to).
    """
    if (
        compute_dtype is None and sample.dtype != torch.float64
    ):  # the float32 kernel spec, bitwise as the fused backends
        coef = ddpm_coefficients(schedule, t, prev_t)
        x, m, v = _f32_inputs(model_output, sample, schedule, split_variance=True)
        z = _f32_noise(noise, sample, t, seed, sample_offset)
        return _f32_step(schedule, coef, x, m, v, z, sample)
    dtype = compute_dtype or torch.float64
    x = sample.to(dtype)
    m = model_output.to(dtype)
    c = sample.shape[1]
    v = None
    if schedule.variance_type in ("learned", "learned_range"):  # model predicts [eps, v] on 2C channels
        m, v = m[:, :c], m[:, c:]

    # 1. alphas and betas of the (possibly skipped) step: diffusers re-derives beta_t from abar.
    s = schedule.step_terms(t, prev_t, final_abar=1.0)
    # 2. predicted x0 (eq. 15), then 3. clip or threshold it.
    x0 = clip_x0(schedule, predict_x0(schedule, m, x, s.abar_t))
    # 4. posterior mean mu~_t(x_t, x0) (eq. 7).
    mean = _per_sample(s.mean_coef_x0, x) * x0 + _per_sample(s.mean_coef_xt, x) * x
    # 5. standard deviation of q(x_{t-1} | x_t, x0) or the model's learned one.
    vt = schedule.variance_type
    if vt in ("fixed_small", "fixed_small_log"):
        std = _per_sample(s.posterior_variance.sqrt(), x)
    elif vt in ("fixed_large", "fixed_large_log"):
        std = _per_sample(s.beta_t.sqrt(), x)
    elif vt == "learned_range":  # Nichol & Dhariwal eq. 15: interpolate log beta~ and log beta
        frac = (v + 1) / 2
        log_var = frac * _per_sample(s.beta_t.log(), x) + (1 - frac) * _per_sample(s.posterior_variance.log(), x)
        std = torch.exp(0.5 * log_var)
    else:  # learned: v is a log variance
        std = torch.exp(0.5 * v)
    # 6. x_{t-1} = mean + std * z, z ~ N(0, I), only where t > 0 (diffusers' rule).
    z = _noise_for(noise, x, t, seed, sample_offset)
    gate = _per_sample(s.noise_gate, x)
    prev = torch.where(gate > 0, mean + std * z, mean)
    return prev.to(sample.dtype), x0.to(sample.dtype)


def ddim_step(
    model_output: torch.Tensor,
    t: torch.Tensor,
    sample: torch.Tensor,
    schedule: Schedule,
    prev_t: torch.Tensor,
    eta: float,
    use_clipped_model_output: bool,
    noise: torch.Tensor | None,
    seed: int | None,
    sample_offset: int = 0,
    *,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (Song et al. 2021, eq. 12); returns ``(prev_sample, pred_original_sample)``.

    ``compute_dtype`` as in :func:`ddpm_step`."""
    if (
        compute_dtype is None and sample.dtype != torch.float64
    ):  # the float32 kernel spec, bitwise as the fused backends
        coef = ddim_coefficients(schedule, t, prev_t, eta=eta, use_clipped_model_output=use_clipped_model_output)
        x, m, _ = _f32_inputs(model_output, sample, schedule, split_variance=False)
        z = _f32_noise(noise, sample, t, seed, sample_offset) if eta > 0 else None
        return _f32_step(schedule, coef, x, m, None, z, sample)
    dtype = compute_dtype or torch.float64
    x = sample.to(dtype)
    m = model_output.to(dtype)
    if schedule.variance_type in ("learned", "learned_range"):
        m = m[:, : sample.shape[1]]  # DDIM ignores a learned variance
    s = schedule.step_terms(t, prev_t, final_abar=schedule.final_alphas_cumprod)
    a_t, a_p = _per_sample(s.abar_t, x), _per_sample(s.abar_prev, x)

    # 1. predicted x0 and epsilon.
    x0 = predict_x0(schedule, m, x, s.abar_t)
    if schedule.prediction_type == "epsilon":
        eps = m
    elif schedule.prediction_type == "sample":
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    else:
        eps = a_t.sqrt() * m + (1 - a_t).sqrt() * x
    # 2. clip or threshold x0; optionally re-derive eps from the clipped x0.
    x0 = clip_x0(schedule, x0)
    if use_clipped_model_output:
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    # 3. sigma_t(eta) (eq. 16) and the direction pointing to x_t.
    sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
    direction = (1 - a_p - sigma**2).clamp(min=0).sqrt() * eps
    prev = a_p.sqrt() * x0 + direction
    # 4. random noise sigma_t z (only when eta > 0, as diffusers).
    if eta > 0:
        prev = prev + sigma * _noise_for(noise, x, t, seed, sample_offset)
    return prev.to(sample.dtype), x0.to(sample.dtype)


def q_sample(
    x0: torch.Tensor,
    t: torch.Tensor,
    schedule: Schedule,
    noise: torch.Tensor | None,
    seed: int | None,
    sample_offset: int = 0,
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Forward noising q(x_t | x_0) (DDPM eq. 4): ``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.

    Float32/16/bf16 ``x0`` (``compute_dtype`` None): the kernel spec (the float32 ``[T, 2]`` table,
    ``(QA * x0) + (QB * z)``), bitwise as the fused backends and differentiable with respect to
    ``x0``. Otherwise the formula in ``compute_dtype`` (float64 for float64 ``x0``)."""
    if compute_dtype is None and x0.dtype != torch.float64:
        table = schedule.table("q_sample", x0.device)[t]  # [B, 2] float32
        shape = (-1,) + (1,) * (x0.dim() - 1)
        if noise is None:
            assert seed is not None
            z = step_noise(x0.shape, t, seed, sample_offset, L.STREAM_QSAMPLE, torch.float32)
        else:
            z = noise.to(x0.dtype).to(torch.float32)
        xt = table[:, L.QS_A].reshape(shape) * x0.to(torch.float32) + table[:, L.QS_B].reshape(shape) * z
        return xt.to(x0.dtype)
    dtype = compute_dtype or torch.float64
    x = x0.to(dtype)
    abar = _per_sample(schedule.table("alphas_cumprod", x.device, torch.float64)[t], x)
    if noise is None:
        assert seed is not None
        z = step_noise(x.shape, t, seed, sample_offset, L.STREAM_QSAMPLE, dtype)
    else:
        z = noise.to(dtype)
    return (abar.sqrt() * x + (1 - abar).sqrt() * z).to(x0.dtype)
