"""The one step driver: a sampler is a plan (coefficient rows) plus a kernel variant.

Every fused update in fastddpm goes through this module: the public ops (:func:`fastddpm.ddpm_step`,
:func:`fastddpm.ddim_step`), the sampling loop (:class:`fastddpm.sampling.Trajectory`, eager or
CUDA-graph captured), the quality study and the benchmarks. Adding a sampler means adding its plan
here (its coefficient rows, computed once in float64) and, if no existing kernel variant computes its
update, one kernel per backend.

Kernel variants (the per-element math is written down in :mod:`fastddpm._layout`):

* ``"step"``: the DDPM/DDIM kernel (``COEF_*`` columns): x0 prediction, clipping, posterior or DDIM
  mean, fixed or learned variance, noise. Samplers ``ddpm``, ``ddim``, ``x0``.
* ``"multistep"``: the multistep-solver kernel (``MS_*`` columns): data prediction, clipping, UniPC's
  corrector, the solver update, SDE noise and the history update, device-resident state
  ``x, xp, hist[3]``. Samplers ``dpmpp_2m``, ``dpmpp_3m``, ``dpmpp_2m_sde``, ``unipc``
  (plans from :func:`fastddpm.solvers.multistep_plan`).

Both variants run dynamic thresholding (``CLIP_THRESHOLD``) as two passes: an x0-only pass, the
per-sample quantile, then the fused pass. Nothing here syncs with the host: the row of a step is the
device step counter, so :meth:`Stepper.advance` can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _layout as L
from .coefficients import ddim_coefficients, ddpm_coefficients
from .dispatch import backend_module
from .reference import dynamic_threshold
from .schedule import LEARNED_VARIANCES, SPACINGS, Schedule

MULTISTEP_SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")
SAMPLERS = ("ddpm", "ddim", "x0", *MULTISTEP_SAMPLERS)
KERNEL_STEP = "step"
KERNEL_MULTISTEP = "multistep"


def clip_mode(schedule: Schedule) -> int:
    """The DDPM/DDIM kernel's clip mode for ``schedule``: threshold, clamp to the range, or none."""
    if schedule.thresholding:
        return L.CLIP_THRESHOLD
    return L.CLIP_RANGE if schedule.clip_sample else L.CLIP_NONE


# ----------------------------------------------------------------------------------------- plans
@dataclass
class StepPlan:
    """A trajectory's timesteps and coefficient rows, resident on the sampling device.

    Attributes:
        sampler: one of :data:`SAMPLERS`.
        pairs: host int64 ``[S, 2]``: ``(t_i, t_{i+1})``, ``-1`` after the last step.
        coef: device float32 ``[S, NCOEF]`` (kernel ``"step"``) or ``[S, NMS]`` (``"multistep"``).
        tval: device int64 ``[S]``: the model's timestep input of step i, and the noise counter's t.
        noise_mode: ``NOISE_PHILOX`` when the sampler adds noise in seed mode, else ``NOISE_NONE``.
        kernel: ``"step"`` or ``"multistep"``.
        clip_mode: the ``CLIP_*`` mode of every step.
        coef64: host float64 table of a multistep plan (the spec the float32 rows were cast from).
    """

    sampler: str
    pairs: torch.Tensor
    coef: torch.Tensor
    tval: torch.Tensor
    noise_mode: int
    kernel: str = KERNEL_STEP
    clip_mode: int = L.CLIP_NONE
    coef64: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.pairs.shape[0]

    def generator_noise(
        self, i: int, shape: tuple[int, ...], generator: torch.Generator, model_dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The noise diffusers draws from ``generator`` at step ``i`` (``None``: no draw), in its order and dtype.

        ``DDPMScheduler`` draws z (model dtype) only where t > 0, ``DDIMScheduler`` at every step when
        eta > 0, ``DPMSolverMultistepScheduler``'s SDE variant a float32 z at every step.
        """
        if self.noise_mode == L.NOISE_NONE:
            return None
        dev = generator.device
        if self.kernel == KERNEL_MULTISTEP:
            return torch.randn(shape, generator=generator, device=dev, dtype=torch.float32)
        if self.sampler == "ddim" or int(self.pairs[i, 0]) > 0:
            return torch.randn(shape, generator=generator, device=dev, dtype=model_dtype).float()
        return torch.zeros(shape, device=dev)


def make_plan(
    schedule: Schedule,
    sampler: str,
    num_inference_steps: int | None,
    timestep_spacing: str | None,
    eta: float,
    device: torch.device | str,
    use_clipped_model_output: bool = False,
    *,
    solver_order: int | None = None,
    use_karras_sigmas: bool = False,
    lower_order_final: bool = True,
    final_sigmas_type: str = "zero",
) -> StepPlan:
    """Timesteps of ``sampler`` and their float32 coefficient rows on ``device`` (checked finite once, here).

    ``timestep_spacing=None`` uses the schedule's own. ``eta`` and ``use_clipped_model_output`` are DDIM's;
    ``solver_order``, ``use_karras_sigmas``, ``lower_order_final`` and ``final_sigmas_type`` the multistep
    solvers' (diffusers' names and defaults; :func:`fastddpm.solvers.multistep_plan`).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(repr(s) for s in SAMPLERS)}")
    device = torch.device(device)
    if sampler in MULTISTEP_SAMPLERS:
        options = dict(solver_order=solver_order, use_karras_sigmas=bool(use_karras_sigmas),
                       lower_order_final=lower_order_final, final_sigmas_type=final_sigmas_type)  # fmt: skip
        return _multistep_plan(schedule, sampler, num_inference_steps, timestep_spacing, device, options)
    if solver_order is not None or use_karras_sigmas or not lower_order_final or final_sigmas_type != "zero":
        raise ValueError(
            "solver_order, use_karras_sigmas, lower_order_final and final_sigmas_type apply to "
            f"{', '.join(MULTISTEP_SAMPLERS)}, not {sampler!r}"
        )
    if sampler == "x0":  # one shot: x0 predicted from x_T at the first timestep, nothing after it
        pairs = schedule.timesteps(num_inference_steps, timestep_spacing)[:1].clone()
        pairs[0, 1] = -1
    else:
        pairs = schedule.timesteps(num_inference_steps, timestep_spacing, sampler=sampler)
    t, prev = pairs[:, 0].to(device), pairs[:, 1].to(device)
    if sampler == "ddim":
        coef = ddim_coefficients(
            schedule, t, prev, eta=eta, use_clipped_model_output=use_clipped_model_output, check=True
        )
        noise_mode = L.NOISE_PHILOX if eta > 0 else L.NOISE_NONE
    else:
        coef = ddpm_coefficients(schedule, t, prev, check=True)
        noise_mode = L.NOISE_PHILOX if sampler == "ddpm" else L.NOISE_NONE
    return StepPlan(sampler, pairs, coef.contiguous(), t.contiguous(), noise_mode, KERNEL_STEP, clip_mode(schedule))


def _multistep_plan(schedule, sampler, steps, spacing, device, options) -> StepPlan:
    from .solvers import multistep_plan

    if steps is None:
        raise ValueError(f"num_inference_steps is required for the {sampler!r} sampler (a few, e.g. 10-25)")
    if spacing is None:
        spacing = schedule.timestep_spacing if schedule.timestep_spacing in SPACINGS else "linspace"
    mp = multistep_plan(schedule, sampler, int(steps), timestep_spacing=spacing, **options)
    coef = mp.coef.to(torch.float32)
    if not bool(torch.isfinite(coef).all()):
        bad = (~torch.isfinite(coef)).nonzero()[0].tolist()
        raise ValueError(f"{sampler}: coefficient (row {bad[0]}, column {bad[1]}) is not finite in float32")
    ts = mp.timesteps.to(torch.int64)
    pairs = torch.stack([ts, torch.cat([ts[1:], ts.new_tensor([-1])])], dim=1)
    noise_mode = L.NOISE_PHILOX if mp.noise else L.NOISE_NONE
    return StepPlan(sampler, pairs, coef.to(device).contiguous(), ts.to(device).contiguous(), noise_mode,
                    KERNEL_MULTISTEP, mp.clip_mode, mp.coef)  # fmt: skip


def step_row(
    schedule: Schedule,
    sampler: str,
    t: int,
    prev_t: int,
    *,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row of the ``"step"`` kernel for a single step ``t -> prev_t``: ``(coef [1, NCOEF] float32,
    tval [1] int64)`` on ``device``. For ``ddpm`` and ``ddim`` (a benchmark or a single op call)."""
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"step_row makes rows of the 'ddpm' and 'ddim' samplers, not {sampler!r}")
    tt = torch.tensor([int(t)], dtype=torch.int64, device=device)
    pt = torch.tensor([int(prev_t)], dtype=torch.int64, device=device)
    if sampler == "ddpm":
        coef = ddpm_coefficients(schedule, tt, pt, check=True)
    else:
        coef = ddim_coefficients(schedule, tt, pt, eta=eta, use_clipped_model_output=use_clipped_model_output)
    return coef.contiguous(), tt


# ---------------------------------------------------------------------------------- kernel passes
#: ``launch(x, m, v, noise, prev_out, x0_out, coef, tval, rows, thresh, rng, clip_mode, clip_range, var_mode,
#: noise_mode, write_x0, x0_only) -> (prev, x0)``: one launch of the ``"step"`` kernel.
Launch = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def inplace_launch(backend: str) -> Launch:
    """A :data:`Launch` that runs backend ``backend`` into the given output buffers (graph-safe)."""
    step = backend_module(backend).step

    def launch(x, m, v, noise, prev_out, x0_out, coef, tval, rows, thresh, rng, clip_mode, clip_range, var_mode,
               noise_mode, write_x0, x0_only):  # fmt: skip
        if x0_only and x0_out is None:
            x0_out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        step(x, m, v, noise, None if x0_only else prev_out, x0_out if (write_x0 or x0_only) else None, coef, tval,
             rows, thresh, rng, clip_mode=clip_mode, clip_range=clip_range, var_mode=var_mode, noise_mode=noise_mode,
             x0_only=x0_only)  # fmt: skip
        return prev_out, x0_out

    return launch


def _thresholds(x0: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Dynamic thresholding's per-sample ``s`` (float32 ``[B]``) from an x0-only pass ``[B, N]``."""
    s = dynamic_threshold(x0, schedule.dynamic_thresholding_ratio, schedule.sample_max_value)
    return s.to(torch.float32).contiguous()


def fused_step(
    launch: Launch,
    x: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor | None,
    noise: torch.Tensor | None,
    coef: torch.Tensor,
    tval: torch.Tensor,
    rows: torch.Tensor,
    rng: torch.Tensor,
    *,
    schedule: Schedule,
    clip: int,
    noise_mode: int,
    prev_out: torch.Tensor | None = None,
    x0_out: torch.Tensor | None = None,
    write_x0: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"step"`` kernel variant on ``[B, N]`` views: with ``CLIP_THRESHOLD`` an x0-only pass and the
    per-sample quantile ``s`` first, then ONE fused pass. Sample ``b`` uses row ``rows[b]``.

    Returns ``(prev, x0)`` as ``launch`` gives them (``prev_out`` / ``x0_out`` for :func:`inplace_launch`).
    """
    var_mode = L.VAR_LEARNED if v is not None else L.VAR_FIXED
    thresh = None
    if clip == L.CLIP_THRESHOLD:
        _, x0 = launch(x, m, None, None, None, None, coef, tval, rows, None, rng, L.CLIP_NONE, 0.0, L.VAR_FIXED,
                       L.NOISE_NONE, False, True)  # fmt: skip
        thresh = _thresholds(x0, schedule)
    return launch(x, m, v, noise, prev_out, x0_out, coef, tval, rows, thresh, rng, clip,
                  float(schedule.clip_sample_range), var_mode, noise_mode, write_x0, False)  # fmt: skip


def fused_multistep(
    backend: str,
    x: torch.Tensor,
    m: torch.Tensor,
    xp: torch.Tensor,
    hist: torch.Tensor,
    noise: torch.Tensor | None,
    coef: torch.Tensor,
    tval: torch.Tensor,
    step: torch.Tensor,
    rng: torch.Tensor,
    *,
    schedule: Schedule,
    clip: int,
    noise_mode: int,
) -> None:
    """The ``"multistep"`` kernel variant on ``[B, N]`` views, in place on ``x``, ``xp`` and ``hist``: with
    ``CLIP_THRESHOLD`` a D0-only pass and the per-sample quantile first, then ONE fused pass."""
    launch = backend_module(backend).multistep
    thresh = None
    if clip == L.CLIP_THRESHOLD:
        d0 = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        launch(x, m, None, None, None, d0, coef, tval, step, None, rng, clip_mode=L.CLIP_NONE, clip_range=0.0,
               noise_mode=L.NOISE_NONE, x0_only=True)  # fmt: skip
        thresh = _thresholds(d0, schedule)
    launch(x, m, xp, hist, noise, None, coef, tval, step, thresh, rng, clip_mode=clip,
           clip_range=float(schedule.clip_sample_range), noise_mode=noise_mode, x0_only=False)  # fmt: skip


# ------------------------------------------------------------------------------------ the stepper
class Stepper:
    """Device-resident state of one batch along a :class:`StepPlan`, and its step.

    Buffers (float32, updated in place): ``x`` ``[B, *shape]``; ``x0`` (the ``x0`` sampler, or
    ``keep_x0``); for the multistep kernel ``xp`` ``[B, N]`` and the ring ``hist`` ``[3, B, N]``. Counters
    (int64, device): ``step`` ``[1]``, ``rng`` ``[2]`` = (seed, sample offset), ``first_bad`` ``[1]`` (first
    step whose output was not finite; ``S`` if none). :meth:`advance` never syncs with the host.
    """

    def __init__(
        self,
        plan: StepPlan,
        schedule: Schedule,
        batch: int,
        shape: tuple[int, ...],
        device: torch.device,
        backend: str,
        *,
        keep_x0: bool = False,
    ):
        self.plan, self.schedule, self.backend, self.batch = plan, schedule, backend, batch
        self.x = torch.zeros((batch, *shape), dtype=torch.float32, device=device)
        n = math.prod(shape)
        multistep = plan.kernel == KERNEL_MULTISTEP
        if multistep and keep_x0:
            raise ValueError("keep_x0 is for the 'step' kernel (ddpm, ddim, x0 samplers)")
        self.x0 = torch.zeros_like(self.x) if (plan.sampler == "x0" or keep_x0) else None
        self.xp = torch.zeros((batch, n), dtype=torch.float32, device=device) if multistep else None
        self.hist = torch.zeros((L.MS_HIST, batch, n), dtype=torch.float32, device=device) if multistep else None
        self.step = torch.zeros(1, dtype=torch.int64, device=device)
        self.rng = torch.zeros(2, dtype=torch.int64, device=device)
        self.first_bad = torch.full((1,), plan.num_steps, dtype=torch.int64, device=device)
        self.learned = schedule.variance_type in LEARNED_VARIANCES and plan.sampler == "ddpm"
        self._launch = None if multistep else inplace_launch(backend)

    def advance(self, model_output: torch.Tensor, noise: torch.Tensor | None = None) -> None:
        """x <- step(x) for the step at ``self.step`` given the model's output at x; then ``step += 1``.

        ``noise`` (the sample's shape, generator mode) replaces the in-kernel Philox noise."""
        from .ops import _split_model_output

        b, plan = self.batch, self.plan
        m, v = _split_model_output(model_output, self.x, self.schedule, learned_needed=self.learned)
        x2, m2 = self.x.view(b, -1), m.reshape(b, -1)
        noise_mode = plan.noise_mode if noise is None else L.NOISE_TENSOR
        n2 = noise.reshape(b, -1) if noise is not None else None
        if self._launch is None:
            fused_multistep(self.backend, x2, m2, self.xp, self.hist, n2, plan.coef, plan.tval, self.step, self.rng,
                            schedule=self.schedule, clip=plan.clip_mode, noise_mode=noise_mode)  # fmt: skip
        else:
            v2 = v.reshape(b, -1) if v is not None else None
            x0_out = self.x0.view(b, -1) if self.x0 is not None else None
            fused_step(self._launch, x2, m2, v2, n2, plan.coef, plan.tval, self.step.expand(b), self.rng,
                       schedule=self.schedule, clip=plan.clip_mode, noise_mode=noise_mode, prev_out=x2,
                       x0_out=x0_out, write_x0=x0_out is not None)  # fmt: skip
        bad = ~torch.isfinite(x2).all()
        self.first_bad.copy_(torch.where(bad & (self.first_bad == plan.num_steps), self.step, self.first_bad))
        self.step.add_(1)

    def reset(self, x_init: torch.Tensor, seed: int, sample_offset: int) -> None:
        """Start a new batch from ``x_init`` with noise key ``(seed, sample_offset)``; history cleared."""
        self.x.copy_(x_init)
        self.step.zero_()
        self.first_bad.fill_(self.plan.num_steps)
        if self.hist is not None:
            self.xp.zero_()
            self.hist.zero_()
        from .noise import seed_word  # the one seed rule: [0, 2**64) as an int64 bit pattern

        self.rng.copy_(torch.tensor([seed_word(seed), sample_offset], dtype=torch.int64))
