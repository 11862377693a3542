"""Sampling speed of fastddpm against the ways people sample today, measured side by side in one run.

Every row times the same model, batch and number of sampling steps, so each figure is printed next to
its baseline as a ratio (``speedup_vs_B0b``, ``speedup_vs_B0a``). Rows (see ``ROW_KINDS``):

=====  ===========================================================================================
B0a    diffusers ``DDPMPipeline`` around a diffusers ``UNet2DModel`` holding the same weights
B0b    plain eager loop: U-Net forward + ``fastddpm.ddpm_step(..., backend="reference")`` with
       ``torch.randn`` noise (what a user writes by hand)
B1     ``torch.compile(unet)`` + the same reference step
B2     ``torch.compile`` of the whole step (U-Net + update); on CUDA with ``mode="reduce-overhead"``
       (CUDA graphs, ``torch.compiler.cudagraph_mark_step_begin()`` every step)
F1     fastddpm sampler, fused step kernel, eager (``sample(..., cuda_graph=False)``)
F2     fastddpm sampler, one CUDA graph per step (CUDA only)
F3     fastddpm sampler, ``k`` steps per CUDA graph (``steps_per_graph=k``; CUDA only)
COPY   ``x.copy_(y)`` on a large float32 tensor: the memory bandwidth yardstick of this run
K0     the step alone, reference formula with ``torch.randn`` noise (many small kernels)
K1     the step alone, the fused kernel launcher of one backend with in-kernel Philox noise
K2     the step alone, through the public op ``fastddpm.ddpm_step`` (validation, x0 output)
=====  ===========================================================================================

Row options (:class:`Variant`): U-Net autocast dtype (``bf16`` = ``sample(dtype=torch.bfloat16)``),
``channels_last``, the fused GroupNorm+SiLU Triton kernel on/off (env ``FASTDDPM_FUSED_NORM=0``),
attention through the fused SDPA kernels or the unfused math path, a compiled U-Net inside the F rows,
and the fused step backend.

Timing: on CUDA with CUDA events around each timed run; on CPU with ``time.perf_counter``. Host
timers (compile/capture time) are read only after ``torch.cuda.synchronize()``. A timed run is
``steps`` sampling steps of ``batch`` images; the run is repeated until about ``target_s`` seconds
were measured (at least ``min_repeats``, at most ``max_repeats``) and the per-step time is reported as
median and 20th/80th percentiles. ``proj_*`` columns are projections of a 1000-step DDPM run from the
measured per-step time, not measurements.

Run ``python benchmarks/harness.py --help`` or ``fastddpm bench --help``; file formats are in
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEMA = "fastddpm-bench/1"
JSON_NAME, CSV_NAME, PNG_NAME = "bench.json", "bench.csv", "bench.png"

ROW_KINDS: dict[str, str] = {
    "B0a": "diffusers DDPMPipeline (UNet2DModel with the same config and weights)",
    "B0b": "eager loop: U-Net + reference ddpm_step with torch.randn noise",
    "B1": "torch.compile(unet) + reference ddpm_step",
    "B2": "torch.compile of the whole step (U-Net + update); CUDA graphs (reduce-overhead) on GPU",
    "F1": "fastddpm sampler, fused step, eager (cuda_graph=False)",
    "F2": "fastddpm sampler, one CUDA graph per step",
    "F3": "fastddpm sampler, k steps per CUDA graph",
    "COPY": "x.copy_(y), large fp32 tensor: memory bandwidth yardstick",
    "K0": "step only: reference formula + torch.randn noise",
    "K1": "step only: fused kernel launcher, in-kernel Philox noise",
    "K2": "step only: public op fastddpm.ddpm_step (validation + x0 output)",
    "KD": "step only: diffusers DDPMScheduler.step (its own torch noise)",
    "MM": "bf16 matrix product (fp32 on CPU), square: matmul-rate yardstick",
}
MODEL_ROWS = ("B0a", "B0b", "B1", "B2", "F1", "F2", "F3")
KERNEL_ROWS = ("COPY", "MM", "K0", "K1", "K2", "KD")
COMPILE_ROWS = ("B1", "B2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Result columns, in CSV order (the environment columns of ``META_COLUMNS`` follow them).
COLUMNS = (
    "model", "batch", "steps", "row", "name", "status", "reason", "backend",
    "dtype", "channels_last", "fused_norm", "sdpa", "compile_unet", "steps_per_graph",
    "ms_per_step_median", "ms_per_step_p20", "ms_per_step_p80", "repeats",
    "images_per_s", "proj_1000_steps_s", "proj_images_per_s_1000_steps",
    "speedup_vs_B0b", "speedup_vs_B0a",
    "gflop_per_step", "tflops", "numel", "bytes_per_call", "gbps", "frac_of_copy_bw", "speedup_vs_K0",
    "speedup_vs_KD", "frac_of_matmul",
    "peak_mem_mb", "mem_note", "first_run_s", "compile_s", "capture_s", "output_finite", "description",
)  # fmt: skip
META_COLUMNS = ("device_name", "torch", "triton", "diffusers", "date")


# ----------------------------------------------------------------------------------------------------
# What to run
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """Options of one row.

    Attributes:
        dtype: U-Net autocast dtype, ``"fp32"`` (no autocast), ``"bf16"`` or ``"fp16"``; the step math
            stays float32 (this is ``sample(dtype=...)``).
        channels_last: U-Net weights and input in ``torch.channels_last``.
        fused_norm: the U-Net's fused GroupNorm+SiLU (the Triton kernel on CUDA, the C++ kernel on CPU for
            channels_last float32); ``False`` sets ``FASTDDPM_FUSED_NORM=0`` while the row runs.
        sdpa: ``"auto"`` (PyTorch picks flash / memory-efficient attention) or ``"math"`` (the unfused
            reference attention, forced with ``torch.nn.attention.sdpa_kernel``).
        compile_unet: F rows only: ``torch.compile`` the U-Net inside the fastddpm sampler.
        backend: fused step backend of F/K rows (``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"``,
            ``"reference"``).
    """

    dtype: str = "fp32"
    channels_last: bool = False
    fused_norm: bool = True
    sdpa: str = "auto"
    compile_unet: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.sdpa not in ("auto", "math"):
            raise ValueError(f"unknown sdpa mode {self.sdpa!r}; allowed: 'auto', 'math'")

    def label(self) -> str:
        """Short text of the non-default options (empty for the default variant)."""
        parts = []
        if self.compile_unet:
            parts.append("+compile")
        if self.dtype != "fp32":
            parts.append(self.dtype)
        if self.channels_last:
            parts.append("cl")
        if not self.fused_norm:
            parts.append("no-fused-norm")
        if self.sdpa != "auto":
            parts.append(f"sdpa={self.sdpa}")
        if self.backend != "auto":
            parts.append(self.backend)
        return " ".join(parts)


@dataclass(frozen=True)
class Row:
    """One benchmark row: a kind from :data:`ROW_KINDS` and its options."""

    kind: str
    variant: Variant = Variant()
    steps_per_graph: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ROW_KINDS:
            raise ValueError(f"unknown row {self.kind!r}; allowed: {', '.join(ROW_KINDS)}")
        if self.steps_per_graph < 1:
            raise ValueError(f"steps_per_graph must be >= 1, got {self.steps_per_graph}")

    @property
    def name(self) -> str:
        name = self.kind + (f" k={self.steps_per_graph}" if self.kind == "F3" else "")
        label = self.variant.label()
        return f"{name} {label}" if label else name

    @property
    def compiles(self) -> bool:
        """Whether the row runs ``torch.compile`` (slow to set up; budgeted separately)."""
        return self.kind in COMPILE_ROWS or (self.kind in ("F1", "F2", "F3") and self.variant.compile_unet)


@dataclass(frozen=True)
class Case:
    """A model at one batch size. ``model`` is a name understood by :func:`load_bench_model`, or
    ``"step-only"`` for kernel rows on a synthetic ``[batch, 3, 32, 32]`` sample."""

    model: str
    batch: int

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")


@dataclass(frozen=True)
class Task:
    """A row of a case, with its priority (lower runs first when the time budget is tight)."""

    case: Case
    row: Row
    priority: int = 0


@dataclass(frozen=True)
class BenchConfig:
    """Knobs shared by every row of a run.

    Attributes:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        steps: sampling steps per timed run (the respaced DDPM trajectory of that length).
        min_repeats, max_repeats, target_s: each row repeats its timed run until about ``target_s``
            seconds were measured, within these bounds.
        warmup: untimed runs after setup (compilation and autotuning happen in the first one).
        compile_backend: ``torch.compile`` backend of B1/B2/compiled-U-Net rows (``"inductor"``).
        copy_numel: float32 elements of each tensor of the COPY row.
        matmul_n: size of the square matrices of the MM row.
        kernel_backends: backends of the K1 rows (``None``: ``triton`` and ``cuda`` on CUDA, ``cpu``
            on CPU).
        time_budget_s: stop starting rows after this many seconds (``None``: no limit); rows not
            run are recorded as skipped with the reason.
        compile_reserve_s: do not start a compiling row with less than this much budget left.
        max_row_s: cap on the timed part of one row: fewer repeats (at least one) when the runs are
            slow; the ``repeats`` column says how many were made.
        seed: seed of the random U-Net weights and the inputs.
    """

    device: str = "cpu"
    steps: int = 3
    min_repeats: int = 3
    max_repeats: int = 30
    target_s: float = 0.5
    warmup: int = 1
    compile_backend: str = "inductor"
    copy_numel: int = 1 << 23
    matmul_n: int = 2048
    kernel_backends: tuple[str, ...] | None = None
    time_budget_s: float | None = None
    compile_reserve_s: float = 60.0
    max_row_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 1 <= self.min_repeats <= self.max_repeats:
            raise ValueError(f"need 1 <= min_repeats <= max_repeats, got {self.min_repeats}, {self.max_repeats}")


def default_cases(device_type: str) -> list[Case]:
    """The cases of the full run: batch 1, 16, 256 on GPU; small ones on CPU."""
    if device_type == "cuda":
        return [Case(m, b) for m in ("ddpm-cifar10", "digits") for b in (1, 16, 256)]
    return [Case("ddpm-cifar10", 1), Case("ddpm-cifar10", 8), Case("digits", 64)]


def default_config(device: str, *, quick: bool = False, **overrides: Any) -> BenchConfig:
    """Sensible :class:`BenchConfig` for a device (``quick``: a smoke test of every code path)."""
    cuda = torch.device(device).type == "cuda"
    if quick:
        base = dict(steps=2, min_repeats=1, max_repeats=2, target_s=0.0, warmup=1, copy_numel=1 << 16, matmul_n=64)
    elif cuda:
        base = dict(steps=20, min_repeats=3, max_repeats=30, target_s=0.5, copy_numel=1 << 27, matmul_n=8192,
                    compile_reserve_s=60.0, max_row_s=20.0)  # fmt: skip
    else:  # inductor compiles a U-Net for minutes on a small CPU
        base = dict(steps=3, min_repeats=3, max_repeats=10, target_s=1.0, copy_numel=1 << 23, compile_reserve_s=300.0,
                    max_row_s=90.0)  # fmt: skip
    base.update(overrides)
    return BenchConfig(device=device, **base)


def default_tasks(device_type: str, cases: Sequence[Case] | None = None, *, quick: bool = False) -> list[Task]:
    """The row matrix, ordered by priority.

    GPU: for every case the baselines and the fastddpm rows in fp32 and bf16/channels_last
    (priority 0); compiled rows at the first and last batch of the first model (1); option ablations
    (fused GroupNorm off, math attention, CUDA-C step backend) at the largest batch of the first model
    (2); compiled rows everywhere else (3). CPU: the same rows (F2/F3 are recorded as skipped), the
    bf16 and channels_last rows at the first batch of each model, compiled rows for the last model
    first (1), the others last (3). ``quick``: one tiny case, every CPU row.
    """
    cuda = device_type == "cuda"
    if quick:
        cases = list(cases) if cases else [Case("tiny", 2)]
    cases = list(cases) if cases is not None else default_cases(device_type)
    bf16cl = Variant(dtype="bf16", channels_last=True)
    tasks: list[Task] = []
    model_cases = [c for c in cases if c.model != "step-only"]
    k = 10 if cuda else 2
    for c in cases:
        if c.model == "step-only":
            tasks += [Task(c, Row("K0")), Task(c, Row("KD")), Task(c, Row("K1")), Task(c, Row("K2"))]
            continue
        rows = [Row("B0b"), Row("B0a"), Row("F1"), Row("F2"), Row("F3", steps_per_graph=k)]
        if cuda:
            rows += [Row("F2", Variant(dtype="bf16")), Row("F2", bf16cl), Row("F3", bf16cl, steps_per_graph=k)]
        elif c == next(x for x in cases if x.model == c.model):  # CPU: option rows at one batch per model
            rows += [Row("F1", Variant(dtype="bf16")), Row("F1", Variant(channels_last=True)),
                     Row("F1", Variant(channels_last=True, fused_norm=False))]  # fmt: skip
        rows += [Row("K0"), Row("KD"), Row("K1"), Row("K2")]
        tasks += [Task(c, r, 0) for r in rows]
    compiled = [Row("B1"), Row("B2")]
    if cuda:
        compiled += [Row("F2", dataclasses.replace(bf16cl, compile_unet=True))]
    if cuda and model_cases:
        first = model_cases[0].model
        mine = [c for c in model_cases if c.model == first]
        top = max(mine, key=lambda c: c.batch)
        early = [top] + [c for c in mine if c.batch == min(x.batch for x in mine) and c != top]
        for c in early:
            tasks += [Task(c, r, 1) for r in compiled]
        ablations = [
            Row("F2", Variant(dtype="bf16", channels_last=True, fused_norm=False)),
            Row("F2", Variant(dtype="bf16", channels_last=True, sdpa="math")),
            Row("F2", Variant(dtype="bf16", channels_last=True, backend="cuda")),
            Row("F2", Variant(channels_last=True)),
            Row("B0b", Variant(dtype="bf16")),
        ]
        tasks += [Task(top, r, 2) for r in ablations]
        tasks += [Task(c, r, 3) for c in model_cases if c not in early for r in compiled]
    elif model_cases:
        last = model_cases[-1]
        tasks += [Task(c, r, 1) for c in model_cases if c.model == last.model for r in compiled]
        tasks += [Task(c, r, 3) for c in model_cases if c.model != last.model for r in compiled]
    tasks.append(Task(Case("step-only", 8192 if cuda else (4 if quick else 512)), Row("COPY"), -1))
    tasks.append(Task(Case("step-only", 1), Row("MM"), -1))
    if not quick:
        big = Case("step-only", 8192 if cuda else 512)  # 8192 x 3 x 32 x 32 fp32 = 100 MB per tensor on GPU
        tasks += [Task(big, Row("K0")), Task(big, Row("KD")), Task(big, Row("K1")), Task(big, Row("K2"))]
    return sorted(tasks, key=lambda t: t.priority)


def filter_tasks(tasks: Sequence[Task], rows: Sequence[str] | None = None, *, no_compile: bool = False) -> list[Task]:
    """Keep the tasks whose row kind is in ``rows`` (all if ``None``); ``no_compile`` drops compiling rows.
    The COPY row is always kept: GB/s figures are reported against it."""
    if rows is not None:
        unknown = sorted(set(rows) - set(ROW_KINDS))
        if unknown:
            raise ValueError(f"unknown row(s) {unknown}; allowed: {', '.join(ROW_KINDS)}")
    out = []
    for t in tasks:
        if t.row.kind != "COPY" and rows is not None and t.row.kind not in rows:
            continue
        if no_compile and t.row.compiles:
            continue
        out.append(t)
    return out


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------


class Clock:
    """Times a callable: CUDA events on a CUDA device, ``time.perf_counter`` on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any]) -> float:
        """Seconds ``fn()`` took on the device timeline (GPU work included)."""
        if self.cuda:
            self.sync()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def wall(self, fn: Callable[[], Any]) -> float:
        """Host seconds for ``fn()`` plus the GPU work it queued (synchronised before and after)."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def repeat_count(first_s: float, cfg: BenchConfig, left_s: float | None = None) -> int:
    """Timed runs for a row whose first timed run took ``first_s``: enough for ``cfg.target_s``,
    within ``[min_repeats, max_repeats]``, cut (to no fewer than one) so the row stays within
    ``cfg.max_row_s`` and the ``left_s`` seconds left of the run's budget."""
    first_s = max(first_s, 1e-9)
    want = math.ceil(cfg.target_s / first_s) if cfg.target_s > 0 else 1
    n = min(max(want, cfg.min_repeats), cfg.max_repeats)
    cap = cfg.max_row_s if left_s is None else min(cfg.max_row_s, left_s)
    return max(1, min(n, int(cap // first_s)))


def repeat_times(clock: Clock, fn: Callable[[], Any], cfg: BenchConfig, left_s: float | None = None) -> list[float]:
    """Run ``fn`` :func:`repeat_count` times; seconds of each run."""
    times = [clock.time(fn)]
    for _ in range(repeat_count(times[0], cfg, left_s) - 1):
        times.append(clock.time(fn))
    return times


def percentiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) with linear interpolation (numpy's default)."""
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no values")
    p20, p50, p80 = np.percentile(arr, [20, 50, 80])
    return float(p50), float(p20), float(p80)


class MemoryProbe:
    """Peak memory of a row: ``torch.cuda.max_memory_allocated`` on CUDA, ``ru_maxrss`` growth on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> MemoryProbe:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def read(self) -> tuple[float, str]:
        """(megabytes, what the number means)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda max_memory_allocated (incl. weights)"
        grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.rss0
        scale = 1.0 / 2**20 if sys.platform == "darwin" else 1.0 / 1024  # bytes on macOS, KiB on Linux
        return grow * scale, "cpu ru_maxrss growth (process high-water mark: 0 if below an earlier peak)"


@contextlib.contextmanager
def variant_context(variant: Variant, device: torch.device) -> Iterator[None]:
    """Environment of a row: ``FASTDDPM_FUSED_NORM`` and the SDPA backend choice."""
    old = os.environ.get("FASTDDPM_FUSED_NORM")
    with contextlib.ExitStack() as stack:
        if not variant.fused_norm:
            os.environ["FASTDDPM_FUSED_NORM"] = "0"
        if variant.sdpa == "math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("FASTDDPM_FUSED_NORM", None)
            else:
                os.environ["FASTDDPM_FUSED_NORM"] = old


def autocast_context(variant: Variant, device: torch.device) -> contextlib.AbstractContextManager:
    if variant.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[variant.dtype])


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


def tiny_unet_config() -> Any:
    """A 2-level, 8x8x1 U-Net with attention, about 0.17M parameters: the smoke-test model."""
    from fastddpm.unet import UNetConfig

    return UNetConfig(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, time_embedding_dim=32,
    )  # fmt: skip


def load_bench_model(name: str, device: torch.device, seed: int = 0) -> tuple[torch.nn.Module, Any, str]:
    """``(UNet in eval mode on device, Schedule, description)``.

    ``"ddpm-cifar10"`` / ``"ddpm-256"``: the preset with random weights (speed does not depend on
    them) and the default DDPM schedule. ``"digits"``: the bundled model, or the preset with random
    weights when it is not installed. ``"tiny"``: :func:`tiny_unet_config`. Anything else goes to
    :func:`fastddpm.registry.load_model` (bundled name or checkpoint directory).
    """
    from fastddpm import Schedule
    from fastddpm.unet import PRESETS, UNet

    torch.manual_seed(seed)
    if name == "tiny":
        model, schedule, desc = UNet(tiny_unet_config()), Schedule(), "tiny U-Net, random weights"
    elif name == "digits":
        try:
            from fastddpm.registry import load_model

            model, schedule, desc = load_model("digits", device)
        except Exception as e:  # not trained yet, half-written, or unreadable: speed does not need the weights
            model, schedule = UNet.from_preset("digits"), Schedule()
            desc = f"digits preset, random weights (bundled model not loadable: {str(e).splitlines()[0][:120]})"
    elif name in PRESETS:
        model, schedule, desc = UNet.from_preset(name), Schedule(), f"{name} preset, random weights"
    else:
        from fastddpm.registry import load_model

        model, schedule, desc = load_model(name, device)
    model = model.to(device).eval().requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    return model, schedule, f"{desc}; {n:,} parameters"


def sample_shape(model: Any) -> tuple[int, int, int]:
    from fastddpm.sampling import infer_shape

    return infer_shape(model, None)


def unet_flops_per_image(model: torch.nn.Module, chw: tuple[int, int, int], device: torch.device) -> int:
    """FLOPs of one U-Net forward on one image, counted once with ``torch.utils.flop_counter``.

    Counted at batch 1 (every layer is per-sample, so FLOPs scale linearly with the batch); a
    multiply-add counts as 2 FLOPs (FlopCounterMode's convention).
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *chw, device=device)
    t = torch.full((1,), 500, dtype=torch.int64, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------


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


class CaseContext:
    """Everything rows of one case share: the model (and its channels_last copy), schedule, plan,
    FLOPs, inputs. ``models`` caches loaded models by name across cases of a run."""

    def __init__(self, case: Case, cfg: BenchConfig, device: torch.device, models: dict[str, Any] | None = None):
        from fastddpm.sampling import make_plan

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
        self.plan = make_plan(self.schedule, "ddpm", min(cfg.steps, self.schedule.num_train_timesteps),
                              "leading", 0.0, device)  # fmt: skip
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
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # to_diffusers' dtype cast logs a harmless warning
    try:
        dunet = ctx.model.to_diffusers().eval().requires_grad_(False)
    finally:
        diffusers_logging.set_verbosity(level)
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


def expand_kernel_rows(tasks: Sequence[Task], cfg: BenchConfig, device: torch.device) -> list[Task]:
    """Give every K1 row with ``backend="auto"`` one copy per backend of ``cfg.kernel_backends``."""
    backends = cfg.kernel_backends
    if backends is None:
        backends = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    out = []
    for t in tasks:
        if t.row.kind == "K1" and t.row.variant.backend == "auto":
            out += [dataclasses.replace(t, row=Row("K1", Variant(backend=b))) for b in backends]
        else:
            out.append(t)
    return out


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------


def _empty_row(task: Task, steps: int | None) -> dict[str, Any]:
    r = dict.fromkeys(COLUMNS)
    v, row = task.row.variant, task.row
    r.update(
        model=task.case.model, batch=task.case.batch, steps=steps, row=row.kind, name=row.name,
        dtype=v.dtype, channels_last=v.channels_last, fused_norm=v.fused_norm, sdpa=v.sdpa,
        compile_unet=v.compile_unet or row.kind in COMPILE_ROWS,
        steps_per_graph=row.steps_per_graph if row.kind == "F3" else (1 if row.kind == "F2" else None),
        description=ROW_KINDS[row.kind],
    )  # fmt: skip
    return r


def measure_task(task: Task, ctx: CaseContext, cfg: BenchConfig, left_s: float | None = None) -> dict[str, Any]:
    """Prepare, warm up and time one row; never raises (errors become ``status="error"``)."""
    kernel = task.row.kind in KERNEL_ROWS
    out = _empty_row(task, None if kernel else ctx.steps)
    device = ctx.device
    clock = Clock(device)
    prepared: Prepared | None = None
    try:
        with torch.inference_mode(), variant_context(task.row.variant, device), MemoryProbe(device) as mem:
            prepared = PREPARERS[task.row.kind](ctx, task.row)
            first = clock.wall(prepared.run)
            for _ in range(max(0, cfg.warmup - 1)):
                prepared.run()
            times = repeat_times(clock, prepared.run, cfg, left_s)
            peak, note = mem.read()
            images = prepared.output()
            out["output_finite"] = None if images is None else bool(torch.isfinite(images).all())
        units = prepared.inner if kernel else ctx.steps
        med, p20, p80 = percentiles([1e3 * s / units for s in times])
        out.update(status="ok", reason="", backend=prepared.backend, ms_per_step_median=med, ms_per_step_p20=p20,
                   ms_per_step_p80=p80, repeats=len(times), peak_mem_mb=peak, mem_note=note,
                   first_run_s=first, capture_s=prepared.capture_s)  # fmt: skip
        run_s = statistics_median(times)
        if prepared.compiled:
            out["compile_s"] = max(0.0, first - run_s)
        if kernel:
            out.update(numel=prepared.numel, bytes_per_call=prepared.bytes_per_call)
            if prepared.bytes_per_call:
                out["gbps"] = prepared.bytes_per_call / (med / 1e3) / 1e9
            if prepared.flops_per_call:
                out["tflops"] = prepared.flops_per_call / (med / 1e3) / 1e12
        else:
            sec_step = med / 1e3
            gflop = ctx.flops_per_image * ctx.batch / 1e9
            out.update(images_per_s=ctx.batch / (sec_step * ctx.steps), proj_1000_steps_s=1000 * sec_step,
                       proj_images_per_s_1000_steps=ctx.batch / (1000 * sec_step), gflop_per_step=gflop,
                       tflops=gflop / sec_step / 1e3)  # fmt: skip
    except Skip as e:
        out.update(status="skipped", reason=str(e))
    except Exception as e:  # a row that fails must not stop the run
        first_line = (str(e).strip().splitlines() or [""])[0]
        out.update(status="error", reason=f"{type(e).__name__}: {first_line[:300]}")
        out["_traceback"] = traceback.format_exc(limit=8)
    finally:
        if prepared is not None:
            prepared.keep.clear()
        compiled = task.row.compiles
        del prepared
        _release(device, compiled)
    return out


def statistics_median(values: Sequence[float]) -> float:
    return percentiles(values)[0]


def _release(device: torch.device, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()  # frees CUDA-graph pools of reduce-overhead and the compiled code
    if compiled or device.type == "cuda":  # a full collection takes ~0.5 s with diffusers loaded
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Fill the ratio columns from baselines of the same case measured in the same run.

    ``speedup_vs_B0b`` / ``speedup_vs_B0a``: baseline ms/step divided by the row's (same model,
    batch, steps; default-variant baseline). ``frac_of_copy_bw``: the row's GB/s over the COPY row's.
    ``speedup_vs_K0`` / ``speedup_vs_KD``: the K0 / KD (diffusers) row's ms per call over the row's
    (same case). ``frac_of_matmul``: a model row's U-Net TFLOP/s over the MM row's.
    """

    def ok(r: dict[str, Any]) -> bool:
        return r["status"] == "ok" and r["ms_per_step_median"]

    def base(kind: str, r: dict[str, Any]) -> dict[str, Any] | None:
        for b in rows:
            if (
                b["row"] == kind
                and b["name"] == kind
                and ok(b)
                and (b["model"], b["batch"]) == (r["model"], r["batch"])
            ):
                return b
        return None

    copy_rows = [r for r in rows if r["row"] == "COPY" and ok(r)]
    copy_gbps = copy_rows[0]["gbps"] if copy_rows else None
    mm_rows = [r for r in rows if r["row"] == "MM" and ok(r)]
    mm_tflops = mm_rows[0]["tflops"] if mm_rows else None
    for r in rows:
        if not ok(r):
            continue
        if r["row"] in MODEL_ROWS:
            for kind in ("B0b", "B0a"):
                b = base(kind, r)
                if b is not None and b["steps"] == r["steps"]:
                    r[f"speedup_vs_{kind}"] = b["ms_per_step_median"] / r["ms_per_step_median"]
            if mm_tflops and r.get("tflops"):
                r["frac_of_matmul"] = r["tflops"] / mm_tflops
        else:
            if copy_gbps and r.get("gbps"):
                r["frac_of_copy_bw"] = r["gbps"] / copy_gbps
            if r["row"] in ("COPY", "MM"):
                continue
            for kind in ("K0", "KD"):
                b = base(kind, r)
                if b is not None:
                    r[f"speedup_vs_{kind}"] = b["ms_per_step_median"] / r["ms_per_step_median"]


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, versions and settings saved with every result."""
    import fastddpm

    def version(mod: str) -> str | None:
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
    env = dict(
        device=str(device), device_name=name, fastddpm=fastddpm.__version__, torch=torch.__version__,
        triton=version("triton"), diffusers=version("diffusers"), python=platform.python_version(),
        platform=platform.platform(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32, allow_tf32_cudnn=torch.backends.cudnn.allow_tf32,
        triton_interpret=os.environ.get("TRITON_INTERPRET", ""), fused_norm_env=os.environ.get("FASTDDPM_FUSED_NORM", ""),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )  # fmt: skip
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    return env


@dataclass
class BenchResult:
    """Rows (dicts with :data:`COLUMNS`), the environment, the config and notes of one run."""

    meta: dict[str, Any]
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(schema=SCHEMA, meta=self.meta, config=self.config, notes=self.notes, columns=list(COLUMNS),
                    row_kinds=ROW_KINDS, rows=self.rows, targets=evaluate_targets(self.rows))  # fmt: skip

    def write(self, out_dir: str | os.PathLike, *, plot: bool = True) -> list[Path]:
        """Write ``bench.json``, ``bench.csv`` and (when matplotlib is present) ``bench.png``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [write_json(self, out / JSON_NAME), write_csv(self, out / CSV_NAME)]
        if plot:
            png = plot_result(self.to_json(), out / PNG_NAME)
            if png is None:
                self.notes.append("bench.png not written: matplotlib is not installed")
                write_json(self, out / JSON_NAME)
            else:
                paths.append(png)
        return paths


def _atomic_text(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(result: BenchResult, path: Path) -> Path:
    data = result.to_json()
    data["rows"] = [{k: _jsonable(v) for k, v in r.items()} for r in data["rows"]]
    return _atomic_text(path, json.dumps(data, indent=1, default=str) + "\n")


def write_csv(result: BenchResult, path: Path) -> Path:
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*COLUMNS, *META_COLUMNS])
    meta = [result.meta.get(k) for k in META_COLUMNS]
    for r in result.rows:
        w.writerow([_csv_cell(r.get(k)) for k in COLUMNS] + [_csv_cell(v) for v in meta])
    return _atomic_text(path, buf.getvalue())


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def run_benchmark(
    cfg: BenchConfig,
    tasks: Sequence[Task],
    out_dir: str | os.PathLike | None = None,
    *,
    log: Callable[[str], Any] | None = print,
    plot: bool = True,
) -> BenchResult:
    """Run ``tasks`` in order (priority first), filling a :class:`BenchResult`.

    Results are written to ``out_dir`` after every row (JSON and CSV, so a run killed from outside
    keeps what it measured) and the PNG chart at the end. Rows that cannot run here, fail, or do not
    fit the time budget are recorded with ``status`` ``"skipped"``/``"error"`` and a reason.
    """
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("cfg.device is CUDA but no CUDA device is available")
    say = log or (lambda s: None)
    t_start = time.perf_counter()
    tasks = expand_kernel_rows(tasks, cfg, device)
    order = {t: i for i, t in enumerate(sorted(tasks, key=_display_key(tasks)))}
    result = BenchResult(environment(device), _config_dict(cfg, tasks), [])
    result.notes.append(
        "proj_* columns are projections to a 1000-step DDPM trajectory from the measured per-step time, not "
        "measurements; ms_per_step is measured over `steps` steps per timed run."
    )
    if device.type == "cpu":
        result.notes.append("CPU timings: other processes on this machine may share the cores (see loadavg).")
    contexts: dict[Case, CaseContext] = {}
    models: dict[str, Any] = {}
    done: list[tuple[int, dict[str, Any]]] = []
    for task in tasks:
        elapsed = time.perf_counter() - t_start
        left = None if cfg.time_budget_s is None else cfg.time_budget_s - elapsed
        reason = None
        if left is not None and left <= 0:
            reason = f"time budget exhausted ({elapsed:.0f} s of {cfg.time_budget_s:.0f} s used)"
        elif left is not None and task.row.compiles and left < cfg.compile_reserve_s:
            reason = f"not started: compiling rows need ~{cfg.compile_reserve_s:.0f} s and {left:.0f} s are left"
        if reason is None and task.case not in contexts:
            try:
                with torch.inference_mode():
                    contexts[task.case] = CaseContext(task.case, cfg, device, models)
            except Exception as e:
                reason = f"case setup failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if reason is not None:
            row = _empty_row(task, None)
            row.update(status="skipped" if "budget" in reason or "not started" in reason else "error", reason=reason)
        else:
            row = measure_task(task, contexts[task.case], cfg, left)
        done.append((order[task], row))
        say(_log_line(row, time.perf_counter() - t_start))
        if row.get("_traceback"):
            say(row.pop("_traceback").rstrip())
        result.rows = [r for _, r in sorted(done, key=lambda x: x[0])]
        add_ratios(result.rows)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_json(result, Path(out_dir) / JSON_NAME)
            write_csv(result, Path(out_dir) / CSV_NAME)
    for name, entry in models.items():
        result.notes.append(f"{name}: {entry[2]}")
    for ctx in contexts.values():
        ctx.close()
    models.clear()
    if hasattr(os, "getloadavg"):
        result.meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result.meta["total_s"] = round(time.perf_counter() - t_start, 1)
    if out_dir is not None:
        result.write(out_dir, plot=plot)
    return result


def _display_key(tasks: Sequence[Task]) -> Callable[[Task], tuple]:
    case_order: dict[Case, int] = {}
    for t in tasks:
        case_order.setdefault(t.case, len(case_order))
    kinds = list(ROW_KINDS)
    first_seen = {t: i for i, t in enumerate(tasks)}
    return lambda t: (t.case.model == "step-only", case_order[t.case], kinds.index(t.row.kind), first_seen[t])


def _config_dict(cfg: BenchConfig, tasks: Sequence[Task]) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["tasks"] = [dict(model=t.case.model, batch=t.case.batch, row=t.row.name, priority=t.priority) for t in tasks]
    return d


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _log_line(r: dict[str, Any], elapsed: float) -> str:
    head = f"[{elapsed:6.1f}s] {r['model']:>12s} b={r['batch']:<5d} {r['name']:<34s}"
    if r["status"] != "ok":
        return f"{head} {r['status'].upper()}: {r['reason']}"
    if r["row"] in KERNEL_ROWS:
        return f"{head} {r['ms_per_step_median'] * 1e3:9.1f} us/call  {_fmt(r['gbps'], '.4g')} GB/s  [{r['backend']}]"
    return (
        f"{head} {r['ms_per_step_median']:9.3f} ms/step [{r['ms_per_step_p20']:.3f}-{r['ms_per_step_p80']:.3f}]"
        f"  {_fmt(r['tflops'], '.3g')} TFLOP/s  [{r['backend']}]"
    )


#: The speed targets of the benchmark issue (set for an H200, the ``ddpm-cifar10`` U-Net, 1000 steps).
TARGET_MODEL = "ddpm-cifar10"
TARGET_SAMPLES, TARGET_MINUTES = 50_000, 35.0


def evaluate_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check the issue's targets against the rows of one run.

    Each entry: ``target`` (text), ``value``, ``threshold``, ``status`` (``met``, ``missed``, or
    ``unmeasured`` when a row it needs did not run) and ``evidence`` (the rows used). "Best F" is the
    fastest ok F1/F2/F3 row of the case. The 50k-sample time is a projection from the measured
    per-step time of that row (``50000 / batch`` batches of 1000 steps), not a timed 50k run.
    """

    def ok(r: dict[str, Any]) -> bool:  # a row whose images are not finite never counts
        return r["status"] == "ok" and bool(r.get("ms_per_step_median")) and r.get("output_finite") is not False

    def fastest(kinds: Sequence[str], model: str, batch: int, *, default_only: bool = False) -> dict | None:
        """The fastest ok row of these kinds for the case (``default_only``: the option-free row only)."""
        cand = [r for r in rows if ok(r) and r["row"] in kinds and (r["model"], r["batch"]) == (model, batch)
                and (not default_only or r["name"] == r["row"])]  # fmt: skip
        return min(cand, key=lambda r: r["ms_per_step_median"]) if cand else None

    def pick(kind: str, model: str, batch: int) -> dict | None:
        return fastest((kind,), model, batch, default_only=True)

    def best_f(batch: int) -> dict | None:
        return fastest(("F1", "F2", "F3"), TARGET_MODEL, batch)

    def entry(target: str, value: float | None, threshold: float, evidence: list, higher: bool = True) -> dict:
        if value is None:
            status = "unmeasured"
        else:
            status = "met" if (value >= threshold if higher else value <= threshold) else "missed"
        return dict(target=target, value=value, threshold=threshold, status=status,
                    evidence=[f"{r['row']} '{r['name']}' {r['model']} b={r['batch']}: {r['ms_per_step_median']:.4g} ms"
                              for r in evidence if r is not None])  # fmt: skip

    out = []
    big = [r for r in rows if ok(r) and r["row"] == "K1" and r["model"] == "step-only" and r.get("numel")
           and r["numel"] * 4 >= 64 * 2**20]  # fmt: skip
    k1 = max(big, key=lambda r: r.get("frac_of_copy_bw") or 0.0) if big else None
    out.append(entry("step kernel >= 80% of the copy bandwidth at >= 64 MB tensors",
                     None if k1 is None else k1.get("frac_of_copy_bw"), 0.8, [k1]))  # fmt: skip
    kd = None if k1 is None else pick("KD", "step-only", k1["batch"])
    k1_fast = None if k1 is None else fastest(("K1",), "step-only", k1["batch"])
    out.append(entry("step kernel >= 5x less GPU time than diffusers' DDPMScheduler.step (same tensors)",
                     None if kd is None or k1_fast is None else kd["ms_per_step_median"] / k1_fast["ms_per_step_median"],
                     5.0, [k1_fast, kd]))  # fmt: skip
    f1, a1, b1 = best_f(1), pick("B0a", TARGET_MODEL, 1), pick("B2", TARGET_MODEL, 1)
    ratio = lambda base, f: None if base is None or f is None else base["ms_per_step_median"] / f["ms_per_step_median"]  # noqa: E731
    out.append(entry("batch 1: >= 10x diffusers DDPMPipeline (B0a)", ratio(a1, f1), 10.0, [f1, a1]))
    out.append(entry("batch 1: >= 1.2x torch.compile whole step with CUDA graphs (B2)", ratio(b1, f1), 1.2, [f1, b1]))
    f256, b256 = best_f(256), pick("B2", TARGET_MODEL, 256)
    out.append(entry("batch 256: >= 1.0x B2", ratio(b256, f256), 1.0, [f256, b256]))
    mm = next((r for r in rows if ok(r) and r["row"] == "MM"), None)
    out.append(entry("batch 256: U-Net >= 40% of the measured bf16 matmul rate",
                     None if f256 is None else f256.get("frac_of_matmul"), 0.4, [f256, mm]))  # fmt: skip
    f_batches = [r["batch"] for r in rows if ok(r) and r["row"] in ("F1", "F2", "F3") and r["model"] == TARGET_MODEL]
    fmax = best_f(max(f_batches)) if f_batches else None
    minutes = (
        None if fmax is None else math.ceil(TARGET_SAMPLES / fmax["batch"]) * 1000 * fmax["ms_per_step_median"] / 6e4
    )
    out.append(entry(f"{TARGET_SAMPLES:,} CIFAR-10-sized samples (1000 steps) in under {TARGET_MINUTES:.0f} minutes "
                     "(projected from the measured ms/step)", minutes, TARGET_MINUTES, [fmax], higher=False))  # fmt: skip
    return out


def format_targets(targets: Sequence[dict[str, Any]], device_name: str | None = None) -> str:
    """The targets as text lines (value, threshold, status, evidence)."""
    head = "targets (set for an H200" + (f"; measured on {device_name})" if device_name else ")")
    lines = [head]
    for t in targets:
        v = "-" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"  [{t['status']:>10s}] {t['target']}: {v} (threshold {t['threshold']:g})")
        lines += [f"                 {e}" for e in t["evidence"]]
    return "\n".join(lines)


def format_table(result: BenchResult | dict[str, Any]) -> str:
    """A plain-text table of the rows with their ratios."""
    rows = result.rows if isinstance(result, BenchResult) else result["rows"]
    lines = [
        f"{'model':>12s} {'batch':>5s} {'row':<34s} {'ms/step':>9s} {'p20-p80':>17s} {'vs B0b':>7s} {'vs B0a':>7s} "
        f"{'proj 1000 s':>11s} {'proj img/s':>10s} {'TFLOP/s':>7s} {'GB/s':>7s} {'%copy':>6s} {'vs KD':>6s} {'MB':>8s}"
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['model']:>12s} {r['batch']:>5d} {r['name']:<34s} {r['status']}: {r['reason']}")
            continue
        spread = f"{r['ms_per_step_p20']:.3f}-{r['ms_per_step_p80']:.3f}"
        pct = None if r.get("frac_of_copy_bw") is None else 100 * r["frac_of_copy_bw"]
        lines.append(
            f"{r['model']:>12s} {r['batch']:>5d} {r['name']:<34s} {r['ms_per_step_median']:9.3f} {spread:>17s} "
            f"{_fmt(r.get('speedup_vs_B0b'), '7.2f')} {_fmt(r.get('speedup_vs_B0a'), '7.2f')} "
            f"{_fmt(r.get('proj_1000_steps_s'), '11.2f')} {_fmt(r.get('proj_images_per_s_1000_steps'), '10.3g')} "
            f"{_fmt(r.get('tflops'), '7.3g')} {_fmt(r.get('gbps'), '7.4g')} {_fmt(pct, '6.1f')} "
            f"{_fmt(r.get('speedup_vs_KD'), '6.2f')} {_fmt(r.get('peak_mem_mb'), '8.0f')}"
        )
    meta = result.meta if isinstance(result, BenchResult) else result.get("meta", {})
    return "\n".join(lines) + "\n\n" + format_targets(evaluate_targets(rows), meta.get("device_name"))


# ----------------------------------------------------------------------------------------------------
# Chart
# ----------------------------------------------------------------------------------------------------


def plot_result(data: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Bar chart of a result (the ``to_json()`` dict): per case, speedup over B0b of every model row
    (ms/step written on the bar); one panel of kernel rows in GB/s against the COPY bandwidth.

    Returns the path, or ``None`` when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = data["rows"]
    cases: list[tuple[str, int]] = []
    for r in rows:
        key = (r["model"], r["batch"])
        if r["row"] in MODEL_ROWS and key not in cases:
            cases.append(key)
    kernel_rows = [r for r in rows if r["row"] in KERNEL_ROWS and r["row"] != "MM"]  # MM: TFLOP/s, in the title
    panels = [(c, [r for r in rows if (r["model"], r["batch"]) == c and r["row"] in MODEL_ROWS]) for c in cases]
    if kernel_rows:
        panels.append((None, kernel_rows))
    if not panels:
        panels = [(None, [])]
    heights = [max(1.5, 0.32 * len(p[1]) + 0.9) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights)), gridspec_kw=dict(height_ratios=heights),
                             squeeze=False)  # fmt: skip
    meta = data.get("meta", {})
    fig.suptitle(f"fastddpm bench on {meta.get('device_name', '?')} (torch {meta.get('torch', '?')}, "
                 f"triton {meta.get('triton', '-')}) {meta.get('date', '')}", fontsize=9)  # fmt: skip
    for ax, (case, prs) in zip(axes[:, 0], panels):
        labels = [_bar_label(r, case is None) for r in prs]
        ypos = list(range(len(prs)))[::-1]
        if case is not None:
            vals = [r.get("speedup_vs_B0b") if r["status"] == "ok" else None for r in prs]
            ax.set_xlabel("speedup over B0b (eager loop), same run")
            ax.set_title(f"{case[0]}, batch {case[1]}, {prs[0].get('steps') or '?'} timed steps", fontsize=9)
            ax.axvline(1.0, color="gray", lw=0.8)
        else:
            vals = [r.get("gbps") if r["status"] == "ok" else None for r in prs]
            copy = next((r["gbps"] for r in prs if r["row"] == "COPY" and r["status"] == "ok"), None)
            ax.set_xlabel("GB/s (bytes the op must move / time)")
            mm = next((r for r in rows if r["row"] == "MM" and r["status"] == "ok" and r.get("tflops")), None)
            mm_text = f"; matmul yardstick (MM): {mm['tflops']:.3g} TFLOP/s" if mm else ""
            ax.set_title(f"step kernel alone vs copy bandwidth{mm_text}", fontsize=9)
            if copy:
                ax.axvline(copy, color="gray", lw=0.8, ls="--")
        finite = [v for v in vals if v]
        if finite and max(finite) / min(finite) > 30:  # wide range: log axis
            ax.set_xscale("log")
            ax.set_xlim(min(finite) / 2, max(finite) * 8)
        elif finite:
            ax.set_xlim(0, max(finite) * 1.6)
        left = ax.get_xlim()[0]
        colors = ["tab:blue" if r["row"].startswith(("F", "K1")) else "tab:gray" for r in prs]
        ax.barh(ypos, [v if v else left for v in vals], left=0 if left <= 0 else None, color=colors)
        for y, v, r in zip(ypos, vals, prs):
            if r["status"] != "ok":
                text = f"{r['status']}: {str(r['reason'])[:70]}"
            elif r["row"] in KERNEL_ROWS:
                text = f"{r['ms_per_step_median'] * 1e3:.1f} us"
            else:
                text = f"{r['ms_per_step_median']:.3g} ms/step"
            ax.text(v if v else left, y, " " + text, va="center", fontsize=7)
        ax.set_yticks(ypos, labels, fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _bar_label(r: dict[str, Any], kernel_panel: bool) -> str:
    if not kernel_panel:
        return r["name"]
    if r["row"] == "COPY":
        return f"COPY {r['numel'] * 4 / 2**20:.0f} MiB" if r.get("numel") else "COPY"
    return f"{r['name']}  {r['model']} b={r['batch']}"


def plot_json(json_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Chart of a ``bench.json`` written earlier (used when a run was killed before its chart)."""
    return plot_result(json.loads(Path(json_path).read_text(encoding="utf-8")), png_path)


# ----------------------------------------------------------------------------------------------------
# Command line (also ``fastddpm bench``)
# ----------------------------------------------------------------------------------------------------


def parse_cases(specs: Sequence[str]) -> list[Case]:
    """``["ddpm-cifar10:1,16", "digits:64"]`` -> cases."""
    cases = []
    for spec in specs:
        model, sep, batches = spec.rpartition(":")
        if not sep or not model:
            raise ValueError(f"--case must look like MODEL:B[,B...], got {spec!r}")
        try:
            cases += [Case(model, int(b)) for b in batches.split(",") if b]
        except ValueError:
            raise ValueError(f"--case {spec!r}: batch sizes must be positive integers") from None
    return cases


def config_from_args(args: argparse.Namespace) -> tuple[BenchConfig, list[Task]]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides: dict[str, Any] = {"compile_backend": args.compile_backend, "time_budget_s": args.time_budget}
    for name in ("steps", "target_s", "min_repeats", "max_repeats"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.kernel_backends:
        overrides["kernel_backends"] = tuple(b.strip() for b in args.kernel_backends.split(",") if b.strip())
    cfg = default_config(device, quick=args.quick, **overrides)
    cases = parse_cases(args.case) if args.case else None
    tasks = default_tasks(torch.device(device).type, cases, quick=args.quick)
    rows = [r.strip() for r in args.rows.split(",")] if args.rows else None
    return cfg, filter_tasks(tasks, rows, no_compile=args.no_compile)


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/harness.py [options]``: the same as ``fastddpm bench [options]``."""
    from fastddpm.cli_bench import add_bench_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(p)
    return run_from_args(p.parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    cfg, tasks = config_from_args(args)
    out = args.out or f"bench-results/{torch.device(cfg.device).type}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    result = run_benchmark(cfg, tasks, out, log=None if args.quiet else print, plot=not args.no_plot)
    print(format_table(result))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(str(Path(out) / n) for n in (JSON_NAME, CSV_NAME, PNG_NAME) if (Path(out) / n).exists())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
