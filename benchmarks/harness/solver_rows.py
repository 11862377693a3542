"""Preparers of the multistep-solver rows (``SOLVER_ROWS``): the fused solver step alone (KS) against
diffusers' ``step`` of the same scheduler (KSD), the sampling loop (FS) against diffusers' pipeline with
that scheduler (BS), and one whole ``fastddpm.sample()`` call (E2E), the few-step solvers against DDPM at
1000 steps. Every solver row runs ``S`` steps per timed run (``Row.solver_steps`` or the config's
``solver_steps``), on the schedule's own timestep spacing on both sides (``"linspace"`` when it has none)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .prepare import CaseContext, Prepared, Skip, _backend_or_skip, _diffusers_unet, _inner_calls, _step_inputs
from .rows import DTYPES, Row, Variant
from .timing import Clock

#: diffusers' scheduler class and options of each multistep sampler (the configurations fastddpm equals).
DIFFUSERS_SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=3)),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=2)),
    "unipc": ("UniPCMultistepScheduler", dict(solver_type="bh2", predict_x0=True, solver_order=2)),
}
#: Bytes per element one fused multistep pass moves: reads x, m, xp and the three history slots, writes x,
#: xp and one history slot, float32 (``fastddpm/kernels/multistep.py`` loads every term unconditionally).
MULTISTEP_BYTES_PER_ELEMENT = 36


def solver_steps(ctx: CaseContext, row: Row) -> int:
    return row.solver_steps if row.solver_steps is not None else ctx.cfg.solver_steps


def spacing(ctx: CaseContext) -> str:
    """The timestep spacing both sides use: the schedule's own, else diffusers' default for these solvers."""
    from fastddpm.schedule import SPACINGS

    return ctx.schedule.timestep_spacing if ctx.schedule.timestep_spacing in SPACINGS else "linspace"


def solver_plan(ctx: CaseContext, sampler: str, steps: int) -> Any:
    from fastddpm.driver import make_plan

    return make_plan(ctx.schedule, sampler, steps, spacing(ctx), 0.0, ctx.device)


def diffusers_scheduler(ctx: CaseContext, sampler: str) -> Any:
    """diffusers' scheduler of ``sampler`` from the case's schedule (:data:`DIFFUSERS_SOLVERS`); Skip without diffusers."""
    try:
        import diffusers
    except ImportError as e:
        raise Skip(f"diffusers is not installed ({e})") from None
    cls_name, options = DIFFUSERS_SOLVERS[sampler]
    return getattr(diffusers, cls_name).from_config(ctx.schedule.to_dict(), timestep_spacing=spacing(ctx), **options)


def _prep_solver_step(ctx: CaseContext, row: Row) -> Prepared:
    """KS: ``fastddpm.driver.fused_multistep`` of one backend over the plan's S steps on ``[B, N]`` state (the
    Stepper's buffers); x is restored from the same x_T at the start of every loop (one copy per S steps)."""
    from fastddpm.dispatch import availability
    from fastddpm.driver import Stepper, fused_multistep

    device, backend = ctx.device, row.variant.backend
    if backend == "auto":
        raise Skip("KS needs an explicit backend (one row per backend)")
    ok, why = availability(backend, device)
    if not ok:
        raise Skip(f"backend {backend!r} unavailable: {why}")
    steps = solver_steps(ctx, row)
    plan = solver_plan(ctx, row.sampler, steps)
    x, m, _, _ = _step_inputs(ctx)
    b = ctx.batch
    stepper = Stepper(plan, ctx.schedule, b, ctx.chw, device, backend)
    stepper.reset(x, ctx.cfg.seed, 0)
    x2, m2 = stepper.x.view(b, -1), m.reshape(b, -1)

    def loop() -> None:
        x2.copy_(x.view(b, -1))
        stepper.step.zero_()
        for _ in range(steps):
            fused_multistep(backend, x2, m2, stepper.xp, stepper.hist, None, plan.coef, plan.tval, stepper.step,
                            stepper.rng, schedule=ctx.schedule, clip=plan.clip_mode, noise_mode=plan.noise_mode)  # fmt: skip
            stepper.step.add_(1)

    nbytes = MULTISTEP_BYTES_PER_ELEMENT * x.numel()
    return _kernel_prepared(ctx, loop, lambda: stepper.x, steps, backend, nbytes, [stepper, x, m])


def _prep_diffusers_solver_step(ctx: CaseContext, row: Row) -> Prepared:
    """KSD: diffusers' ``step`` of the same scheduler as a user calls it: ``set_timesteps(S)``, then a loop over
    its timesteps feeding each output back (its host syncs and Python lists included), the same x_T and model
    output as KS; the SDE variant draws its noise from a generator (UniPC's ``step`` takes none)."""
    steps = solver_steps(ctx, row)
    scheduler = diffusers_scheduler(ctx, row.sampler)
    x, m, _, _ = _step_inputs(ctx)
    kw = {} if row.sampler == "unipc" else dict(generator=torch.Generator(device=x.device).manual_seed(0))

    last: list[torch.Tensor] = []

    def loop() -> None:
        scheduler.set_timesteps(steps)
        sample = x
        for t in scheduler.timesteps:
            sample = scheduler.step(m, t, sample, return_dict=False, **kw)[0]
        last[:] = [sample]

    name = f"diffusers {DIFFUSERS_SOLVERS[row.sampler][0]}"
    return _kernel_prepared(ctx, loop, lambda: last[0], steps, name, None, [scheduler, x, m])


def _kernel_prepared(ctx: CaseContext, loop: Callable[[], None], output: Callable[[], torch.Tensor], steps: int,
                     backend: str, nbytes: int | None, keep: list) -> Prepared:  # fmt: skip
    """A KS/KSD row: ``loop`` runs the S steps once; a timed unit is enough loops for about a millisecond;
    ``output`` is the sample after the last loop (the same trajectory on both rows: a test compares them)."""
    loop()  # first call: lazy initialisation, kernel compilation
    loops = _inner_calls(Clock(ctx.device), loop)

    def run() -> None:
        for _ in range(loops):
            loop()

    n = ctx.batch * math.prod(ctx.chw)
    return Prepared(run, output, backend=backend, inner=loops * steps, numel=n, bytes_per_call=nbytes, steps=steps,
                    keep=keep)  # fmt: skip


def _prep_solver_sampler(ctx: CaseContext, row: Row) -> Prepared:
    """FS: the fastddpm sampling loop (U-Net + fused solver step) of S steps: one CUDA graph per step on CUDA
    (``sample()``'s default there), eager on CPU."""
    from fastddpm.graphs import EagerRunner, GraphRunner
    from fastddpm.sampling import Trajectory

    v, device = row.variant, ctx.device
    steps = solver_steps(ctx, row)
    plan = solver_plan(ctx, row.sampler, steps)
    name = _backend_or_skip(v.backend, device)
    traj = Trajectory(ctx.forward_fn(v), ctx.schedule, plan, ctx.batch, ctx.chw, device, name, DTYPES[v.dtype])
    capture_s = None
    if device.type == "cuda":
        traj.reset(ctx.x_init, ctx.cfg.seed, 0)
        holder: list[Any] = []
        capture_s = Clock(device).wall(lambda: holder.append(GraphRunner(traj, 1)))
        runner, how = holder[0], "graphs"
    else:
        runner, how = EagerRunner(traj), "eager"

    def run() -> None:
        traj.reset(ctx.x_init, ctx.cfg.seed, 0)
        runner.run()

    return Prepared(run, traj.result, backend=f"{name} ({how})", capture_s=capture_s, steps=steps, keep=[traj, runner])


def _prep_diffusers_solver_pipeline(ctx: CaseContext, row: Row) -> Prepared:
    """BS: ``DDPMPipeline(unet, <the sampler's diffusers scheduler>)`` at S steps (UNet2DModel with the same
    weights). UniPC's ``step`` takes no ``generator``, which ``DDPMPipeline`` passes, so for ``unipc`` the
    pipeline's loop runs written out (x_T draw, the loop, the final [0, 1] scaling), as the note says."""
    if row.variant != Variant():
        raise Skip("the diffusers pipeline row runs in its default configuration only")
    scheduler = diffusers_scheduler(ctx, row.sampler)
    from diffusers import DDPMPipeline

    dunet = _diffusers_unet(ctx)
    steps, b = solver_steps(ctx, row), ctx.batch
    last: list[Any] = []
    note = ""
    if row.sampler != "unipc":
        pipe = DDPMPipeline(unet=dunet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)

        def run() -> None:
            last[:] = [pipe(batch_size=b, num_inference_steps=steps, output_type="pt", return_dict=False)[0]]

    else:
        pipe = None
        note = "DDPMPipeline's loop written out: UniPCMultistepScheduler.step takes no generator"

        def run() -> None:
            image = torch.randn((b, *ctx.chw), device=ctx.device, dtype=dunet.dtype)
            scheduler.set_timesteps(steps)
            for t in scheduler.timesteps:
                image = scheduler.step(dunet(image, t).sample, t, image).prev_sample
            last[:] = [(image / 2 + 0.5).clamp(0, 1)]

    def output() -> torch.Tensor | None:
        return torch.as_tensor(last[0]) * 2 - 1 if last else None

    name = f"diffusers {DIFFUSERS_SOLVERS[row.sampler][0]}"
    return Prepared(run, output, backend=name, steps=steps, note=note, keep=[pipe, dunet, scheduler])


def _prep_end_to_end(ctx: CaseContext, row: Row) -> Prepared:
    """E2E: one whole ``fastddpm.sample()`` call (x_T, plan, graph capture on CUDA, S steps, clamp) in seed mode.

    Probe calls of ``p = min(S, cfg.steps)`` and ``min(S, 2p)`` steps estimate a whole run (the call's fixed
    cost, e.g. graph capture, plus S - p marginal steps); when it would take longer than ``cfg.e2e_full_max_s``
    the timed runs are p-step calls and ``e2e_s`` is their per-step time x S (a projection, said in ``note``);
    otherwise the timed runs are whole S-step calls.
    """
    import fastddpm

    v, device, cfg = row.variant, ctx.device, ctx.cfg
    steps = solver_steps(ctx, row)
    name = _backend_or_skip(v.backend, device)
    net = ctx.unet(v)
    kw = dict(sampler=row.sampler, seed=cfg.seed, device=device, dtype=DTYPES[v.dtype], progress=False,
              backend=name, timestep_spacing=spacing(ctx))  # fmt: skip
    last: list[torch.Tensor] = []

    def call(n: int) -> None:
        last[:] = [fastddpm.sample(net, ctx.schedule, ctx.batch, num_inference_steps=n, **kw)]

    probe = min(steps, cfg.steps)
    clock = Clock(device)
    clock.wall(lambda: call(probe))  # first call: lazy initialisation, autotuning
    t_probe = clock.wall(lambda: call(probe))
    full = probe == steps
    if not full:  # the whole run's estimate: the call's fixed cost (x_T, plan, graph capture) + marginal steps
        longer = min(steps, 2 * probe)
        marginal = max(0.0, (clock.wall(lambda: call(longer)) - t_probe) / (longer - probe))
        estimate = t_probe + marginal * (steps - probe)
        full = estimate <= cfg.e2e_full_max_s
    n = steps if full else probe
    if full:
        note = f"measured: whole sample() calls of {steps} steps"
    else:
        note = (f"projected: timed {probe}-step sample() calls, per-step time x {steps} (a whole run would take "
                f"~{estimate:.0f} s > e2e_full_max_s={cfg.e2e_full_max_s:g}; the call's fixed cost is scaled "
                "too)")  # fmt: skip
    return Prepared(lambda: call(n), lambda: last[0] if last else None, backend=name, steps=n, e2e_steps=steps,
                    note=note, keep=[net])  # fmt: skip


SOLVER_PREPARERS: dict[str, Callable[[CaseContext, Row], Prepared]] = {
    "KS": _prep_solver_step,
    "KSD": _prep_diffusers_solver_step,
    "FS": _prep_solver_sampler,
    "BS": _prep_diffusers_solver_pipeline,
    "E2E": _prep_end_to_end,
}
