"""``fastddpm.sample``: the sampling loop.

Two noise modes:

* **seed mode** (default): x_T and every step's noise come from the counter-based generator keyed by
  global sample index, so sample ``i`` is the same image whatever the batch size, backend, device or
  number of processes.
* **generator mode** (``generator=torch.Generator``): noise is drawn from the generator exactly as
  diffusers' ``DDPMPipeline`` draws it (x_T first, then one z per step with t > 0), so the result
  equals the pipeline's.

On CUDA (``cuda_graph="auto"``) a whole step, U-Net forward plus the fused update, is captured once in a
CUDA graph (optionally several steps per graph) and replayed: the step counter, the coefficient table,
the timestep table and the RNG key live on the device, so the loop does no host sync and no
host-to-device copy per step (see :mod:`fastddpm.graphs`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import _layout as L
from .config import SamplingConfig, takes_config
from .dispatch import resolve_backend
from .driver import SAMPLERS, Stepper, StepPlan, make_plan
from .schedule import Schedule

__all__ = ["SAMPLERS", "NonFiniteSampleError", "StepPlan", "Trajectory", "make_plan", "sample", "iter_batches"]


class NonFiniteSampleError(FloatingPointError):
    """Sampling produced NaN or Inf; ``step`` is the index of the first step where it appeared."""

    def __init__(self, step: int, timestep: int, num_steps: int):
        self.step, self.timestep = step, timestep
        super().__init__(
            f"non-finite values appeared at sampling step {step} of {num_steps} (timestep t={timestep}); "
            "check the model (try dtype=torch.float32) and the schedule"
        )


def model_call(model: Callable[..., Any], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Run ``model(x, t)`` and return a tensor (unwraps diffusers' ``.sample`` outputs and tuples)."""
    out = model(x, t)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected a tensor or an object with .sample")


def infer_shape(model: Any, shape: tuple[int, ...] | None) -> tuple[int, int, int]:
    """(C, H, W) of one sample: ``shape`` if given, else from ``model.config`` (sample_size, in_channels)."""
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be (C, H, W), got {shape}")
        return shape  # type: ignore[return-value]
    cfg = getattr(model, "config", None)
    get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    if cfg is not None and get("sample_size") is not None and get("in_channels") is not None:
        size = get("sample_size")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(get("in_channels")), int(h), int(w)
    raise ValueError("cannot tell the sample shape from this model: pass shape=(C, H, W)")


class Trajectory:
    """Runs one batch through every step of a :class:`StepPlan`: the model call here, the fused update in
    :class:`fastddpm.driver.Stepper` (the one step driver).

    All per-step state is on the device: ``x`` (float32 ``[B, C, H, W]``, updated in place), ``step``
    (int64 ``[1]``), ``rng`` (int64 ``[2]`` = seed, sample offset), ``first_bad`` (int64 ``[1]``, the
    first step whose output was not finite, ``S`` if none) and, for the multistep solvers, the history.
    :meth:`step_once` is what a CUDA graph captures.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        schedule: Schedule,
        plan: StepPlan,
        batch: int,
        shape: tuple[int, int, int],
        device: torch.device,
        backend: str,
        dtype: torch.dtype | None,
    ):
        self.model, self.schedule, self.plan, self.backend = model, schedule, plan, backend
        self.device, self.batch, self.shape = device, batch, shape
        self.autocast_dtype = dtype if dtype not in (None, torch.float32) else None
        self.stepper = Stepper(plan, schedule, batch, shape, device, backend)
        self.x, self.x0 = self.stepper.x, self.stepper.x0
        self.step, self.rng, self.first_bad = self.stepper.step, self.stepper.rng, self.stepper.first_bad
        self.channels_last = wants_channels_last(model)  # channels_last input for channels_last weights

    # -- one step, device-resident state only ---------------------------------------------------
    def model_output(self) -> torch.Tensor:
        t = self.plan.tval.index_select(0, self.step).expand(self.batch)
        x = self.x.contiguous(memory_format=torch.channels_last) if self.channels_last else self.x
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                out = model_call(self.model, x, t)
        else:
            out = model_call(self.model, x, t)
        return out.float()

    def step_once(self, noise: torch.Tensor | None = None) -> None:
        """x <- step(x) for the step at ``self.step``; then ``step += 1``. No host sync."""
        self.stepper.advance(self.model_output(), noise)

    def reset(self, x_init: torch.Tensor, seed: int, sample_offset: int) -> None:
        self.stepper.reset(x_init, seed, sample_offset)

    def check_finite(self) -> None:
        bad = int(self.first_bad.item())
        if bad < self.plan.num_steps:
            raise NonFiniteSampleError(bad, int(self.plan.pairs[bad, 0]), self.plan.num_steps)

    def result(self) -> torch.Tensor:
        return self.x0 if self.x0 is not None else self.x


def _resolve_device(model: Any, device: torch.device | str | None) -> torch.device:
    if device is not None:
        from .ops import concrete_device

        return concrete_device(device)
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        if p is not None:
            return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _want_graphs(config: SamplingConfig, device: torch.device, generator: Any) -> bool:
    if config.cuda_graph == "off":
        return False
    if config.cuda_graph == "on":
        if device.type != "cuda":
            raise ValueError(f"cuda_graph='on' needs a CUDA device, got {device}")
        if generator is not None:
            raise ValueError("cuda_graph='on' cannot be used with generator= (generator mode samples eagerly)")
    return device.type == "cuda" and generator is None


def wants_channels_last(model: Any) -> bool:
    """Whether the sampler feeds ``model`` channels_last input: its conv weights are channels_last (cuDNN's
    and oneDNN's fast layout). A conv weight with one input channel or a 1x1 kernel is both layouts at once,
    so those are looked past."""
    first = next((p for p in getattr(model, "parameters", lambda: iter(()))()
                  if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1), None)  # fmt: skip
    return first is not None and first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()


def resolve_auto_dtype(
    model: Any, config: SamplingConfig, device: torch.device | str, batch: int | None = None
) -> tuple[SamplingConfig, Any]:
    """``config`` with ``dtype="auto"`` replaced by the dtype :func:`fastddpm.autodtype.resolve_dtype` picks for
    this model, device and batch (``batch``: the batch size to time, default ``config.batch_size`` or 1), and
    that :class:`~fastddpm.autodtype.DtypeChoice` (None when the dtype was explicit).

    Under an initialised ``torch.distributed`` group rank 0's choice is broadcast, so every rank samples with
    the same dtype (a timing could otherwise differ between ranks, and with it the images).
    """
    if config.dtype != "auto":
        return config, None
    from .autodtype import resolve_dtype

    device = torch.device(device)
    chw = infer_shape(model, config.shape)
    b = int(batch or config.batch_size or 1)
    example = torch.zeros((b, *chw), dtype=torch.float32, device=device)
    if wants_channels_last(model):
        example = example.contiguous(memory_format=torch.channels_last)
    choice = resolve_dtype("auto", model, example)
    name = str(choice.dtype).removeprefix("torch.")
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        box = [name]
        torch.distributed.broadcast_object_list(box, src=0)
        name = box[0]
    return config.replace(dtype=name), choice


def plan_for(schedule: Schedule, config: SamplingConfig, device: torch.device | str) -> StepPlan:
    """The :class:`StepPlan` a config asks for (``x0``: one model evaluation at the schedule's first timestep)."""
    steps = None if config.sampler == "x0" else config.num_inference_steps
    return make_plan(
        schedule, config.sampler, steps, config.timestep_spacing, config.eta, device, config.use_clipped_model_output,
        solver_order=config.solver_order, use_karras_sigmas=config.use_karras_sigmas,
        lower_order_final=config.lower_order_final, final_sigmas_type=config.final_sigmas_type,
    )  # fmt: skip


def plan_steps(schedule: Schedule, config: SamplingConfig) -> int:
    """Model evaluations per image of a config (for progress bars and summaries)."""
    if config.sampler == "x0":
        return 1
    return plan_for(schedule, config, "cpu").num_steps


@takes_config
def iter_batches(
    model: Callable[..., Any],
    schedule: Schedule,
    start: int,
    stop: int,
    *,
    num_inference_steps: int | None = None,
    sampler: str = "ddpm",
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    timestep_spacing: str | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = "auto",
    cuda_graph: Any = "auto",
    shape: tuple[int, int, int] | None = None,
    steps_per_graph: int = 1,
    backend: str = "auto",
    solver_order: int | None = None,
    use_karras_sigmas: bool = False,
    lower_order_final: bool = True,
    final_sigmas_type: str = "zero",
    progress: Any = None,
    config: SamplingConfig | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Seed-mode sampling of global sample indices ``[start, stop)``; yields ``(first_index, images)``.

    The run options are those of :func:`sample` (keywords or ``config=``; see :class:`SamplingConfig`).
    ``images`` is float32 ``[b, C, H, W]`` in [-1, 1] on the sampling device. Used by :func:`sample`
    and by the sharded writer (each shard is a range of global indices).
    """
    assert config is not None  # set by @takes_config
    device = _resolve_device(model, device)
    chw = infer_shape(model, config.shape)
    n = stop - start
    if n <= 0:
        return
    bs = min(config.batch_size or n, n)
    config, _ = resolve_auto_dtype(model, config, device, bs)
    plan = plan_for(schedule, config, device)
    name = resolve_backend(config.backend, device, torch.float32)
    use_graphs = _want_graphs(config, device, None)
    runners: dict[int, Any] = {}
    for off in range(start, stop, bs):
        b = min(bs, stop - off)
        if b not in runners:
            traj = Trajectory(model, schedule, plan, b, chw, device, name, config.autocast_dtype)
            runners[b] = _make_runner(traj, use_graphs, config)
        runner = runners[b]
        traj = runner.traj
        x_init = _init_noise(b, chw, config.seed, off, schedule, device, name)
        traj.reset(x_init, config.seed, off)
        runner.run(progress)
        traj.check_finite()
        yield off, traj.result().clamp(-1.0, 1.0).clone()


def _init_noise(b, chw, seed, offset, schedule, device, backend) -> torch.Tensor:
    from .ops import randn

    t = schedule.num_train_timesteps  # x_T is keyed by t = T, stream STREAM_INIT
    return randn((b, *chw), seed=seed, sample_offset=offset, t=t, stream=L.STREAM_INIT, device=device, backend=backend)


def _make_runner(traj: Trajectory, use_graphs: bool, config: SamplingConfig):
    from .graphs import EagerRunner, GraphRunner

    if use_graphs:
        try:
            return GraphRunner(traj, config.steps_per_graph)
        except Exception as e:  # a model that syncs or allocates on the host during capture
            if config.cuda_graph == "on":
                raise
            warnings.warn(
                f"fastddpm: CUDA graph capture failed ({type(e).__name__}: {e}); sampling eagerly", stacklevel=3
            )
    return EagerRunner(traj)


def _generator_mode(
    model, schedule, num_samples, plan: StepPlan, generator: torch.Generator, device, config, chw, progress
) -> torch.Tensor:
    """Noise drawn from ``generator`` in DDPMPipeline's order: x_T, then each step's z as the scheduler draws it
    (:meth:`fastddpm.driver.StepPlan.generator_noise`)."""
    model_dtype = next(model.parameters()).dtype if isinstance(model, torch.nn.Module) else torch.float32
    gdev = generator.device

    def draw(shape):
        return torch.randn(shape, generator=generator, device=gdev, dtype=model_dtype).to(device)

    name = resolve_backend(config.backend, device, torch.float32)
    traj = Trajectory(model, schedule, plan, num_samples, chw, device, name, config.autocast_dtype)
    traj.reset(draw((num_samples, *chw)).float(), 0, 0)
    for i in range(plan.num_steps):
        z = plan.generator_noise(i, (num_samples, *chw), generator, model_dtype)
        z = z.to(device) if z is not None else None
        traj.step_once(z)
        if progress is not None:
            progress.update(1)
    traj.check_finite()
    return traj.result().clamp(-1.0, 1.0)


# Parameters of sample() that are not SamplingConfig fields: what to sample, where, and how to report it.
NON_CONFIG_ARGS = ("model", "schedule", "num_samples", "generator", "device", "progress", "config")


@takes_config
def sample(
    model: Callable[..., Any],
    schedule: Schedule,
    num_samples: int,
    *,
    num_inference_steps: int | None = None,
    sampler: str = "ddpm",
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    timestep_spacing: str | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = "auto",
    cuda_graph: Any = "auto",
    progress: bool = True,
    shape: tuple[int, int, int] | None = None,
    steps_per_graph: int = 1,
    backend: str = "auto",
    solver_order: int | None = None,
    use_karras_sigmas: bool = False,
    lower_order_final: bool = True,
    final_sigmas_type: str = "zero",
    config: SamplingConfig | None = None,
) -> torch.Tensor:
    """Draw ``num_samples`` images from a diffusion model.

    The run options (every keyword below but ``generator``, ``device`` and ``progress``) are the fields of
    :class:`~fastddpm.SamplingConfig`; pass them as keywords or whole as ``config=`` (not both).

    Args:
        model: a callable ``(x [B, C, H, W] float, t [B] int64) -> [B, C or 2C, H, W]``, or a module whose
            output has ``.sample`` (a diffusers ``UNet2DModel`` works as is).
        schedule: the :class:`Schedule` the model was trained with.
        num_samples: number of images N.
        num_inference_steps: steps (``None``: all ``num_train_timesteps``); fewer use the schedule's
            respacing with ``timestep_spacing`` (``"leading"``, ``"linspace"``, ``"trailing"``, ``None`` for
            the schedule's own, or a respacing string such as ``"ddim50"``).
        sampler: ``"ddpm"`` (ancestral), ``"ddim"`` (with ``eta``), ``"x0"`` (one shot: x0 predicted
            from x_T at the first timestep ``T - 1``; ``num_inference_steps`` must be ``None`` or 1), or a
            few-step multistep solver: ``"dpmpp_2m"``, ``"dpmpp_3m"``, ``"dpmpp_2m_sde"`` (diffusers'
            ``DPMSolverMultistepScheduler``) or ``"unipc"`` (``UniPCMultistepScheduler``, bh2).
        eta: DDIM only: noise scale (0 is deterministic DDIM).
        use_clipped_model_output: DDIM only: re-derive epsilon from the clipped x0 (diffusers' option of
            the same name). With ``clip_sample`` and many DDIM steps this keeps x0 and eps consistent.
        batch_size: images per batch (default all). In seed mode the images do not depend on it.
        seed: key of the counter-based noise (seed mode), an int in ``[0, 2**64)``.
        generator: a ``torch.Generator``: draw noise from it exactly as diffusers' ``DDPMPipeline`` does
            (single batch, eager).
        device: where to sample (default: the model's device).
        dtype: ``"auto"`` (default): float32, except bf16 autocast on a CPU with native bf16 (AVX512-BF16,
            AMX) where a timed forward on these shapes is faster (:mod:`fastddpm.autodtype`; cached, so a
            machine keeps its choice). ``torch.float32``/``"fp32"`` for exact equality with diffusers'
            pipelines; ``torch.bfloat16``/``torch.float16`` (or their names) run the model under autocast.
            The step math is float32 in every case.
        cuda_graph: ``"auto"`` captures steps in CUDA graphs on GPU (falls back to eager with one warning if
            capture fails), ``"on"``/``True`` requires it, ``"off"``/``False`` disables it.
        progress: show a tqdm bar (steps/s and images).
        shape: ``(C, H, W)`` when the model has no ``config`` with ``sample_size``/``in_channels``.
        steps_per_graph: steps captured per CUDA graph (fewer launches; same images).
        backend: fused backend for the step (``"auto"`` picks one).
        solver_order, use_karras_sigmas, lower_order_final, final_sigmas_type: options of the multistep
            solvers (diffusers' names and defaults); an error with the other samplers unless left default.
        config: the whole :class:`~fastddpm.SamplingConfig` instead of the keywords above.
    Returns:
        float32 ``[N, C, H, W]`` in [-1, 1], on ``device``.

    When ``torch.distributed`` is initialised, each rank samples a disjoint contiguous range of global
    indices and the result is all-gathered, so every rank returns the same N images, equal to a
    single-process run with the same seed.
    """
    assert config is not None  # set by @takes_config
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    device = _resolve_device(model, device)
    chw = infer_shape(model, config.shape)
    config = config.replace(shape=chw)
    batch_size = config.batch_size
    config, _ = resolve_auto_dtype(model, config, device, batch_size or num_samples)
    from .progress import progress_bar

    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        with torch.inference_mode(), progress_bar(
            progress, num_samples, plan_steps(schedule, config), batch_size
        ) as bar:  # fmt: skip
            if generator is not None:
                if batch_size is not None and batch_size < num_samples:
                    raise ValueError(
                        "generator mode draws noise for the whole batch at each step, as DDPMPipeline does; "
                        "use batch_size=None (or >= num_samples), or seed mode for batched sampling"
                    )
                _want_graphs(config, device, generator)  # refuses cuda_graph='on'
                plan = plan_for(schedule, config, device)
                return _generator_mode(model, schedule, num_samples, plan, generator, device, config, chw, bar)
            from .distributed import gather_samples, rank_range

            align = batch_size or 1  # rank boundaries on batch boundaries: bit-identical to one process
            start, stop = rank_range(num_samples, align=align)
            parts = []
            t0 = time.perf_counter()
            for _, images in iter_batches(model, schedule, start, stop, device=device, progress=bar, config=config):
                parts.append(images)
                if bar is not None:
                    bar.set_postfix(images=f"{sum(p.shape[0] for p in parts)}/{stop - start}",
                                    elapsed=f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
            local = torch.cat(parts) if parts else torch.empty((0, *chw), device=device)
            return gather_samples(local, num_samples, align=align)
    finally:
        if was_training:
            model.train()


def num_batches(n: int, batch_size: int | None) -> int:
    return 1 if not batch_size else math.ceil(n / batch_size)
