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
KS     a multistep solver's step alone: ``fastddpm.driver.fused_multistep`` over the plan's S steps
KSD    diffusers' ``step`` of the same scheduler in a loop over its S timesteps
FS     fastddpm sampler with a multistep solver (U-Net + fused solver step), S steps
BS     diffusers ``DDPMPipeline`` with the same multistep scheduler, S steps
E2E    one whole ``fastddpm.sample()`` call at S steps (few-step solvers against DDPM at 1000)
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

Run ``python benchmarks/harness --help`` or ``fastddpm bench --help``; file formats are in
``benchmarks/README.md``.

Modules, in the order a run goes through them: ``rows`` (what to run: row kinds, columns, the
default matrix), ``models`` (the U-Nets), ``prepare`` (one preparer per row kind; ``solver_rows``
those of the multistep solvers), ``timing``
(clock, repeats, percentiles, memory), ``run`` (the budgeted loop, ratios, JSON/CSV), ``report``
(targets, table, chart) and ``cli``. This package re-exports their public names, so
``import harness`` (with ``benchmarks/`` on ``sys.path``) or ``fastddpm.cli.bench.load_harness()``
gives all of them.
"""

from __future__ import annotations

from .cli import DESCRIPTION, config_from_args, main, parse_cases, run_from_args
from .models import load_bench_model, sample_shape, tiny_unet_config, unet_flops_per_image
from .prepare import PREPARERS, CaseContext, Prepared, Skip, expand_kernel_rows
from .report import (
    TARGET_MINUTES,
    TARGET_MODEL,
    TARGET_SAMPLES,
    evaluate_targets,
    format_table,
    format_targets,
    plot_json,
    plot_result,
)
from .rows import (
    COLUMNS,
    COMPILE_ROWS,
    CSV_NAME,
    DTYPES,
    JSON_NAME,
    KERNEL_ROWS,
    META_COLUMNS,
    MODEL_ROWS,
    PNG_NAME,
    ROW_KINDS,
    SCHEMA,
    SOLVER_ROWS,
    BenchConfig,
    Case,
    Row,
    Task,
    Variant,
    default_cases,
    default_config,
    default_tasks,
    filter_tasks,
    solver_tasks,
)
from .run import (
    BenchResult,
    add_ratios,
    environment,
    expected_setup_s,
    measure_task,
    run_benchmark,
    write_csv,
    write_json,
)
from .solver_rows import DIFFUSERS_SOLVERS, SOLVER_PREPARERS
from .timing import (
    Clock,
    MemoryProbe,
    autocast_context,
    percentiles,
    repeat_count,
    repeat_times,
    variant_context,
)

__all__ = [
    "BenchConfig", "BenchResult", "COLUMNS", "COMPILE_ROWS", "CSV_NAME", "Case", "CaseContext", "Clock",
    "DESCRIPTION", "DIFFUSERS_SOLVERS", "DTYPES", "JSON_NAME", "KERNEL_ROWS", "META_COLUMNS", "MODEL_ROWS",
    "MemoryProbe", "PNG_NAME", "PREPARERS", "Prepared", "ROW_KINDS", "Row", "SCHEMA", "SOLVER_PREPARERS",
    "SOLVER_ROWS", "Skip", "TARGET_MINUTES", "TARGET_MODEL", "TARGET_SAMPLES", "Task", "Variant", "add_ratios",
    "autocast_context", "config_from_args", "default_cases", "default_config", "default_tasks", "environment",
    "evaluate_targets", "expand_kernel_rows", "expected_setup_s", "filter_tasks", "format_table", "format_targets",
    "load_bench_model", "main", "measure_task", "parse_cases", "percentiles", "plot_json", "plot_result",
    "repeat_count", "repeat_times", "run_benchmark", "run_from_args", "sample_shape", "solver_tasks",
    "tiny_unet_config", "unet_flops_per_image", "variant_context", "write_csv", "write_json",
]  # fmt: skip
