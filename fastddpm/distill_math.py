"""The math of progressive distillation (Salimans & Ho 2022, Algorithm 2): the step grid, the student's
schedule, the two-step teacher target and the truncated-SNR weight. The loop is in :mod:`fastddpm.distillation`."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .ops import ddim_step
from .sampling import model_call
from .schedule import PREDICTION_TYPES, Schedule

__all__ = [
    "distillation_target",
    "predicted_x0",
    "round_timesteps",
    "student_grid",
    "student_schedule",
    "target_from_two_steps",
    "truncated_snr_weight",
]


def student_schedule(teacher: Schedule, prediction_type: str = "v_prediction") -> Schedule:
    """The student's schedule: the teacher's betas with ``prediction_type``, no clipping or thresholding
    (the two-step target may leave ``[-1, 1]``), and ``"trailing"`` spacing (the distillation grid)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    return dataclasses.replace(
        teacher, prediction_type=prediction_type, clip_sample=False, thresholding=False, timestep_spacing="trailing"
    )


def student_grid(schedule: Schedule, num_steps: int) -> torch.Tensor:
    """The ``num_steps``-step distillation grid: int64 ``[num_steps, 2]`` of ``(t, prev_t)``, trailing
    spacing (first ``t = T - 1``), ``prev_t`` the next grid point, ``-1`` at the end."""
    return schedule.timesteps(num_steps, "trailing", sampler="ddpm")


def round_timesteps(schedule: Schedule, student_steps: int) -> torch.Tensor:
    """``(t, t', t'')`` of every student step of a round, int64 ``[student_steps, 3]``: the student's step
    ``t -> t''`` and the midpoint ``t'`` where the teacher's ``2 * student_steps``-step grid takes two steps."""
    teacher = student_grid(schedule, 2 * student_steps)
    student = student_grid(schedule, student_steps)
    out = torch.stack([teacher[0::2, 0], teacher[0::2, 1], teacher[1::2, 1]], dim=1)
    if not torch.equal(out[:, 0], student[:, 0]) or not torch.equal(out[:, 2], student[:, 1]):
        raise RuntimeError(  # the trailing grids nest for every n; this guards the invariant the math needs
            f"the {student_steps}-step grid is not every other point of the {2 * student_steps}-step grid"
        )
    return out


def _coef(schedule: Schedule, t: torch.Tensor, ndim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sqrt(abar_t), sqrt(1 - abar_t))`` of int64 ``t`` ``[B]`` (``t = -1``: the DDIM end,
    ``abar = schedule.final_alphas_cumprod``), from the float64 table, shaped ``[B, 1, ...]`` for ``ndim``."""
    ac = schedule.table("alphas_cumprod", t.device, torch.float64)
    abar = torch.where(t >= 0, ac[t.clamp(min=0)], torch.full(t.shape, schedule.final_alphas_cumprod,
                                                               dtype=torch.float64, device=t.device))  # fmt: skip
    shape = (-1,) + (1,) * (ndim - 1)
    return abar.sqrt().to(dtype).reshape(shape), (1.0 - abar).sqrt().to(dtype).reshape(shape)


def predicted_x0(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """The ``x0`` a model output means under ``schedule.prediction_type`` (no clipping).

    Args:
        output, x_t: ``[B, ...]`` float tensors; t: int64 ``[B]`` (>= 0).
    Returns:
        ``output`` (sample), ``(x_t - s eps) / a`` (epsilon) or ``a x_t - s v`` (v_prediction), in ``x_t``'s dtype.
    """
    a, s = _coef(schedule, t, x_t.dim(), x_t.dtype)
    kind = schedule.prediction_type
    if kind == "sample":
        return output.to(x_t.dtype)
    if kind == "epsilon":
        return (x_t - s * output) / a
    return a * x_t - s * output


def target_from_two_steps(
    x_t: torch.Tensor, x_end: torch.Tensor, t: torch.Tensor, t_end: torch.Tensor, schedule: Schedule
) -> torch.Tensor:
    """Paper Algorithm 2: ``x~ = (x_t'' - (s''/s) x_t) / (a'' - (s''/s) a)``, the ``x0`` whose deterministic
    DDIM step ``t -> t''`` from ``x_t`` gives ``x_end``. Shapes ``[B, ...]``; ``t``, ``t_end`` int64 ``[B]``."""
    a, s = _coef(schedule, t, x_t.dim(), x_t.dtype)
    a2, s2 = _coef(schedule, t_end, x_t.dim(), x_t.dtype)
    ratio = s2 / s
    return (x_end - ratio * x_t) / (a2 - ratio * a)


@torch.no_grad()
def distillation_target(
    teacher: nn.Module,
    schedule: Schedule,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_mid: torch.Tensor,
    t_end: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two deterministic teacher DDIM steps ``t -> t' -> t''`` and the student's ``x0`` target.

    Args:
        teacher: ``model(x [B, ...], t [B]) -> output`` under ``schedule.prediction_type``.
        schedule: the teacher's schedule (its clipping applies, as when the teacher samples).
        x_t: noisy inputs ``[B, ...]``; t, t_mid, t_end: int64 ``[B]`` with ``t > t_mid > t_end >= -1``.
        backend: fused-op backend of :func:`fastddpm.ddim_step`.
    Returns:
        ``(x_target, x_end)``: the ``x0`` target and the teacher's ``x_t''``, both shaped and typed like ``x_t``.
    """
    x_mid, _ = ddim_step(model_call(teacher, x_t, t), t, x_t, schedule, prev_t=t_mid, backend=backend)
    x_end, _ = ddim_step(model_call(teacher, x_mid, t_mid), t_mid, x_mid, schedule, prev_t=t_end, backend=backend)
    return target_from_two_steps(x_t, x_end, t, t_end, schedule), x_end


def truncated_snr_weight(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """``max(SNR_t, 1)`` with ``SNR_t = abar_t / (1 - abar_t)``, float32 ``[B]`` for int64 ``t`` ``[B]``."""
    abar = schedule.table("alphas_cumprod", t.device, torch.float64)[t]
    return (abar / (1.0 - abar)).clamp(min=1.0).to(torch.float32)
