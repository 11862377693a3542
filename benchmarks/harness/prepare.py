"""Rows: for each row kind, a preparer that builds a ready-to-time :class:`Prepared` from the shared
:class:`CaseContext` (model, schedule, plan, inputs), or raises :class:`Skip` saying why it cannot run."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .models import load_bench_model, sample_shape, unet_flops_per_image
from .rows import DTYPES, BenchConfig, Case, Row, Task, Variant
from .timing import Clock, autocast_context


class Skip(Exception):
    """A row that cannot run here; the message says why."""


@dataclass
class Prepared:
    """A ready-to-time row: ``run()`` executes one timed unit (``steps`` sampling steps, or ``inner``
    kernel calls)."""

    run: Callable[[], Any]
    output: Callable[[], torch.Tensor | None] = lambda: None  # images of the last run (model rows)
    backend: str = ""
    capture_s: float | None = None
    inner: int = 1
    numel: int | None = None
    bytes_per_call: int | None = None
    flops_per_call: int | None = None
    compiled: bool = False
    keep: list[Any] = field(default_factory=list)  # objects to free after the row
    steps: int | None = None  # solver rows: steps per timed run (model rows: instead of the case's steps)
    e2e_steps: int | None = None  # E2E rows: the S of the whole run (``e2e_s`` = ms/step x S)
    note: str = ""  # how the row was measured, when that needs saying (the ``note`` column)


class CaseContext:
    """Everything rows of one case share: the model (and its channels_last copy), schedule, plan,
    FLOPs, inputs. ``models`` caches loaded models by name across cases of a run."""

    def __init__(self, case: Case, cfg: BenchConfig, device: torch.device, models: dict[str, Any] | None = None):
        from fastddpm.config import SamplingConfig
        from fastddpm.sampling import plan_for

        self.case, self.cfg, self.device = case, cfg, device
        self.batch = case.batch
        if case.model == "step-only":
            from fastddpm import Schedule

            self.model, self.schedule, self.description = None, Schedule(), "synthetic [B, 3, 32, 32] sample"
            self.chw = (3, 32, 32)
            self.flops_per_image = 0
        else:
            models = {} if models is None else models
            if case.model not in models:
                model, schedule, desc = load_bench_model(case.model, device, cfg.seed)
                chw = sample_shape(model)
                models[case.model] = (model, schedule, desc, chw, unet_flops_per_image(model, chw, device), {})
            self.model, self.schedule, self.description, self.chw, self.flops_per_image, self._variants = models[
                case.model
            ]
        # The run every model row times, as one SamplingConfig (the description sample() and the CLI use).
        self.sampling = SamplingConfig(
            sampler="ddpm", num_inference_steps=min(cfg.steps, self.schedule.num_train_timesteps),
            timestep_spacing="leading", seed=cfg.seed, batch_size=self.batch, dtype="float32",
        )  # fmt: skip
        self.plan = plan_for(self.schedule, self.sampling, device)
        self.pairs = [(int(t), int(p)) for t, p in self.plan.pairs.tolist()]
        gen = torch.Generator().manual_seed(cfg.seed)
        self.x_init = torch.randn((self.batch, *self.chw), generator=gen).to(device)

    @property
    def steps(self) -> int:
        return len(self.pairs)

    def unet(self, variant: Variant) -> torch.nn.Module:
        """The model in the variant's memory format (a channels_last copy is made once)."""
        if not variant.channels_last:
            return self.model
        if "cl" not in self._variants:  # shared by every case of this model
            self._variants["cl"] = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
        return self._variants["cl"]

    def forward_fn(self, variant: Variant) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(x, t) -> U-Net output``: channels_last input when asked, no autocast (callers add it)."""
        net = self.unet(variant)
        if not variant.channels_last:
            return net

        def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net(x.contiguous(memory_format=torch.channels_last), t)

        return forward

    def close(self) -> None:
        self.model = self._variants = None


def _compile(fn: Any, cfg: BenchConfig, mode: str | None = None) -> Any:
    if cfg.compile_backend != "inductor":
        mode = None  # modes are inductor options
    return torch.compile(fn, backend=cfg.compile_backend, mode=mode, dynamic=False)


def _prep_reference_loop(ctx: CaseContext, row: Row) -> Prepared:
    """B0b / B1: U-Net forward (compiled for B1) + reference step with torch.randn noise, per step."""
    import fastddpm

    v = row.variant
    net = ctx.forward_fn(v)
    if row.kind == "B1":
        net = _compile(net, ctx.cfg)
    schedule, pairs = ctx.schedule, ctx.pairs
    # The U-Net gets each timestep as a [B] tensor (as diffusers passes it): a Python int would make
    # torch.compile specialise and recompile for every timestep value.
    ts = [torch.full((ctx.batch,), t, dtype=torch.int64, device=ctx.device) for t, _ in pairs]
    last: list[torch.Tensor] = []

    def run() -> None:
        x = torch.randn_like(ctx.x_init)
        for (t, prev), t_dev in zip(pairs, ts):
            with autocast_context(v, ctx.device):
                out = net(x, t_dev)
            x, _ = fastddpm.ddpm_step(out.float(), t, x, schedule, prev_t=prev, noise=torch.randn_like(x),
                                      backend="reference")  # fmt: skip
        last[:] = [x]

    return Prepared(run, lambda: last[0] if last else None, backend="reference", compiled=row.kind == "B1", keep=[net])


def _prep_compiled_step(ctx: CaseContext, row: Row) -> Prepared:
    """B2: torch.compile of U-Net + reference update; CUDA graphs through mode="reduce-overhead"."""
    import fastddpm

    v, schedule, device = row.variant, ctx.schedule, ctx.device
    net = ctx.forward_fn(v)
    graphs = device.type == "cuda" and ctx.cfg.compile_backend == "inductor"

    def full_step(x: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor) -> torch.Tensor:
        with autocast_context(v, device):
            out = net(x, t)
        prev, _ = fastddpm.ddpm_step(out.float(), t, x, schedule, prev_t=prev_t, noise=torch.randn_like(x),
                                     backend="reference")  # fmt: skip
        return prev

    step = _compile(full_step, ctx.cfg, mode="reduce-overhead" if graphs else None)
    b = ctx.batch
    ts = [torch.full((b,), t, dtype=torch.int64, device=device) for t, _ in ctx.pairs]
    ps = [torch.full((b,), p, dtype=torch.int64, device=device) for _, p in ctx.pairs]

    last: list[torch.Tensor] = []

    def run() -> None:
        x = torch.randn_like(ctx.x_init)
        for t, p in zip(ts, ps):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
                # A cudagraph output is overwritten by the next replay: clone what crosses iterations.
                x = step(x, t, p).clone()
            else:
                x = step(x, t, p)
        last[:] = [x]

    return Prepared(run, lambda: last[0] if last else None, backend="reference", compiled=True, keep=[step])


def _prep_fastddpm(ctx: CaseContext, row: Row) -> Prepared:
    """F1/F2/F3: the fastddpm sampler's trajectory with an eager or CUDA-graph runner."""
    from fastddpm.graphs import EagerRunner, GraphRunner
    from fastddpm.sampling import Trajectory

    v, device = row.variant, ctx.device
    graphed = row.kind in ("F2", "F3")
    if graphed and device.type != "cuda":
        raise Skip("CUDA graphs need a CUDA device")
    name = _backend_or_skip(v.backend, device)
    fallback = name == "reference" and v.backend == "auto"
    note = " (fallback: no fused backend runs here, see `fastddpm info`)" if fallback else ""
    net = ctx.forward_fn(v)
    if v.compile_unet:
        net = _compile(net, ctx.cfg)
    traj = Trajectory(net, ctx.schedule, ctx.plan, ctx.batch, ctx.chw, device, name, DTYPES[v.dtype])
    clock = Clock(device)
    capture_s = None
    if graphed:
        k = row.steps_per_graph if row.kind == "F3" else 1
        if k > ctx.steps:
            raise Skip(f"steps_per_graph={k} exceeds the {ctx.steps} timed steps")
        traj.reset(ctx.x_init, ctx.cfg.seed, 0)
        holder: list[Any] = []
        capture_s = clock.wall(lambda: holder.append(GraphRunner(traj, k)))
        runner = holder[0]
    else:
        runner = EagerRunner(traj)

    def run() -> None:
        traj.reset(ctx.x_init, ctx.cfg.seed, 0)
        runner.run()

    return Prepared(run, traj.result, backend=name + note, capture_s=capture_s, compiled=v.compile_unet,
                    keep=[traj, runner, net])  # fmt: skip


def _backend_or_skip(requested: str, device: torch.device) -> str:
    """The backend ``requested`` resolves to, or :class:`Skip` when one asked for by name cannot run."""
    from fastddpm.dispatch import resolve_backend

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return resolve_backend(requested, device, torch.float32)
    except RuntimeError as e:
        raise Skip(str(e)) from None


def _prep_pipeline(ctx: CaseContext, row: Row) -> Prepared:
    """B0a: diffusers DDPMPipeline with a UNet2DModel holding the same weights and the same schedule."""
    if row.variant != Variant():
        raise Skip("the diffusers pipeline row runs in its default configuration only")
    try:
        from diffusers import DDPMPipeline, DDPMScheduler
    except ImportError as e:
        raise Skip(f"diffusers is not installed ({e})") from None
    dunet = _diffusers_unet(ctx)
    scheduler = DDPMScheduler.from_config(ctx.schedule.to_dict())
    pipe = DDPMPipeline(unet=dunet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    b, steps = ctx.batch, ctx.steps
    last: list[Any] = []

    def run() -> None:
        last[:] = [pipe(batch_size=b, num_inference_steps=steps, output_type="pt", return_dict=False)[0]]

    def output() -> torch.Tensor | None:  # the pipeline returns images in [0, 1] (pt) or NHWC numpy (older)
        return torch.as_tensor(last[0]) * 2 - 1 if last else None

    return Prepared(run, output, backend="diffusers DDPMScheduler", keep=[pipe, dunet])


def _diffusers_unet(ctx: CaseContext) -> Any:
    """A diffusers ``UNet2DModel`` with the case model's config and weights (``UNet.to_diffusers()``)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # to_diffusers' dtype cast logs a harmless warning
    try:
        return ctx.model.to_diffusers().eval().requires_grad_(False)
    finally:
        diffusers_logging.set_verbosity(level)


def _step_inputs(ctx: CaseContext) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    gen = torch.Generator().manual_seed(ctx.cfg.seed + 1)
    x = torch.randn((ctx.batch, *ctx.chw), generator=gen).to(ctx.device)
    m = torch.randn((ctx.batch, *ctx.chw), generator=gen).to(ctx.device)
    t, prev = ctx.pairs[0] if ctx.pairs[0][0] > 0 else (1, 0)  # a step that adds noise
    return x, m, t, prev


def _inner_calls(clock: Clock, fn: Callable[[], Any]) -> int:
    """Calls per timed unit so that one unit takes about a millisecond (timer resolution)."""
    one = clock.time(fn)
    return int(min(1000, max(1, math.ceil(1e-3 / max(one, 1e-7)))))


def _diffusers_step_fn(ctx: CaseContext, x: torch.Tensor, m: torch.Tensor, t: int) -> Callable[[], Any]:
    """KD: ``DDPMScheduler.step`` as a diffusers user calls it (its own noise, x0 computed inside)."""
    try:
        from diffusers import DDPMScheduler
    except ImportError as e:
        raise Skip(f"diffusers is not installed ({e})") from None
    scheduler = DDPMScheduler.from_config(ctx.schedule.to_dict())
    scheduler.set_timesteps(ctx.steps)
    step_t = int(scheduler.timesteps[0]) if t not in [int(v) for v in scheduler.timesteps] else t
    gen = torch.Generator(device=x.device).manual_seed(0)
    return lambda: scheduler.step(m, step_t, x, generator=gen, return_dict=False)


def _prep_kernel(ctx: CaseContext, row: Row) -> Prepared:
    """COPY, MM, K0, K1, K2, KD on ``[batch, C, H, W]`` float32 tensors."""
    import fastddpm
    from fastddpm import _layout as L
    from fastddpm.dispatch import availability, backend_module

    device, clock = ctx.device, Clock(ctx.device)
    flops = None
    if row.kind == "COPY":
        n = ctx.cfg.copy_numel
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        fn, backend, nbytes = (lambda: dst.copy_(src)), "torch", 2 * 4 * n
        keep = [src, dst]
    elif row.kind == "MM":  # random data, never zeros (zeros run faster than real data)
        n = ctx.cfg.matmul_n
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        a, b_ = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        c = torch.empty(n, n, device=device, dtype=dtype)
        fn, backend, nbytes, flops = (lambda: torch.mm(a, b_, out=c)), f"torch.mm {str(dtype)[6:]}", None, 2 * n**3
        keep = [a, b_, c]
    else:
        x, m, t, prev = _step_inputs(ctx)
        n = x.numel()
        schedule = ctx.schedule
        if row.kind == "K0":
            backend, nbytes = "reference", 16 * n  # reads x, m; returns x_prev and x0

            def fn() -> None:
                fastddpm.ddpm_step(m, t, x, schedule, prev_t=prev, noise=torch.randn_like(x), backend="reference")

        elif row.kind == "KD":
            backend, nbytes = "diffusers DDPMScheduler", 16 * n  # reads x, m; returns x_prev and x0
            fn = _diffusers_step_fn(ctx, x, m, t)

        elif row.kind == "K2":
            backend = _backend_or_skip(row.variant.backend, device)
            nbytes = 16 * n

            def fn() -> None:
                fastddpm.ddpm_step(m, t, x, schedule, prev_t=prev, seed=1, backend=backend)

        else:  # K1: the launcher alone, reading x and m, writing x_prev (12 bytes per element)
            backend = row.variant.backend
            if backend == "auto":
                raise Skip("K1 needs an explicit backend (one row per backend)")
            ok, why = availability(backend, device)
            if not ok:
                raise Skip(f"backend {backend!r} unavailable: {why}")
            launch = backend_module(backend).step
            b = ctx.batch
            x2, m2 = x.view(b, -1), m.view(b, -1)
            out = torch.empty_like(x2)
            coef, tval = ctx.plan.coef, ctx.plan.tval
            rows = torch.zeros(b, dtype=torch.int64, device=device)
            rng = torch.tensor([1, 0], dtype=torch.int64, device=device)
            clip = L.CLIP_RANGE if schedule.clip_sample else L.CLIP_NONE
            nbytes = 12 * n

            def fn() -> None:
                launch(x2, m2, None, None, out, None, coef, tval, rows, None, rng, clip_mode=clip,
                       clip_range=float(schedule.clip_sample_range), var_mode=L.VAR_FIXED,
                       noise_mode=L.NOISE_PHILOX, x0_only=False)  # fmt: skip

        keep = [x, m]
    fn()  # first call: lazy initialisation, kernel compilation
    inner = _inner_calls(clock, fn)

    def run() -> None:
        for _ in range(inner):
            fn()

    return Prepared(run, backend=backend, inner=inner, numel=n, bytes_per_call=nbytes, flops_per_call=flops,
                    keep=keep)  # fmt: skip


PREPARERS: dict[str, Callable[[CaseContext, Row], Prepared]] = {
    "B0a": _prep_pipeline,
    "B0b": _prep_reference_loop,
    "B1": _prep_reference_loop,
    "B2": _prep_compiled_step,
    "F1": _prep_fastddpm,
    "F2": _prep_fastddpm,
    "F3": _prep_fastddpm,
    "COPY": _prep_kernel,
    "K0": _prep_kernel,
    "K1": _prep_kernel,
    "K2": _prep_kernel,
    "KD": _prep_kernel,
    "MM": _prep_kernel,
}
from .solver_rows import SOLVER_PREPARERS  # noqa: E402  (it builds on the helpers above)

PREPARERS.update(SOLVER_PREPARERS)


def expand_kernel_rows(tasks: Sequence[Task], cfg: BenchConfig, device: torch.device) -> list[Task]:
    """Give every K1 and KS row with ``backend="auto"`` one copy per backend of ``cfg.kernel_backends``."""
    backends = cfg.kernel_backends
    if backends is None:
        backends = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    out = []
    for t in tasks:
        if t.row.kind in ("K1", "KS") and t.row.variant.backend == "auto":
            out += [
                dataclasses.replace(t, row=dataclasses.replace(t.row, variant=Variant(backend=b))) for b in backends
            ]
        else:
            out.append(t)
    return out
