"""What to run: row kinds, result columns, the :class:`Variant`/:class:`Row`/:class:`Case`/:class:`Task`
descriptions, the run-wide :class:`BenchConfig` and the default row matrix per device."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
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
    "KS": "solver step only: fused multistep kernel (fused_multistep), a loop over the plan's S steps, per step",
    "KSD": "solver step only: diffusers scheduler .step in a loop over its S timesteps (set_timesteps included)",
    "FS": "fastddpm sampler with a multistep solver, S steps (one CUDA graph per step on GPU, eager on CPU)",
    "BS": "diffusers DDPMPipeline loop with the same multistep scheduler, S steps",
    "E2E": "end to end: one whole fastddpm.sample() call at S steps (projected from a shorter run if too long)",
}
MODEL_ROWS = ("B0a", "B0b", "B1", "B2", "F1", "F2", "F3")
KERNEL_ROWS = ("COPY", "MM", "K0", "K1", "K2", "KD", "KS", "KSD")
#: Rows of the multistep solvers (a ``sampler`` each); their ratios are ``speedup_vs_diffusers`` (KS over KSD,
#: FS over BS, same sampler and S) and ``speedup_vs_ddpm1000`` (E2E rows over the ``E2E ddpm S=1000`` row).
SOLVER_ROWS = ("KS", "KSD", "FS", "BS", "E2E")
#: Samplers an E2E row may run besides the multistep solvers (the DDPM-1000 baseline).
E2E_SAMPLERS = ("ddpm", "ddim")
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
    "sampler", "e2e_s", "speedup_vs_diffusers", "speedup_vs_ddpm1000", "note",
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
    sampler: str = ""  # solver rows (SOLVER_ROWS) only: the sampler they run (default "dpmpp_2m")
    solver_steps: int | None = None  # solver rows only: S (None: the config's solver_steps)

    def __post_init__(self) -> None:
        from fastddpm.driver import MULTISTEP_SAMPLERS

        if self.kind not in ROW_KINDS:
            raise ValueError(f"unknown row {self.kind!r}; allowed: {', '.join(ROW_KINDS)}")
        if self.steps_per_graph < 1:
            raise ValueError(f"steps_per_graph must be >= 1, got {self.steps_per_graph}")
        if self.kind in SOLVER_ROWS:
            if not self.sampler:  # the headline solver
                object.__setattr__(self, "sampler", "dpmpp_2m")
            allowed = MULTISTEP_SAMPLERS + (E2E_SAMPLERS if self.kind == "E2E" else ())
            if self.sampler not in allowed:
                raise ValueError(f"row {self.kind}: unknown sampler {self.sampler!r}; allowed: {', '.join(allowed)}")
            if self.solver_steps is not None and self.solver_steps < 1:
                raise ValueError(f"solver_steps must be >= 1, got {self.solver_steps}")
        elif self.sampler or self.solver_steps is not None:
            raise ValueError(
                f"sampler and solver_steps are options of the {', '.join(SOLVER_ROWS)} rows, not {self.kind}"
            )

    @property
    def name(self) -> str:
        name = self.kind + (f" k={self.steps_per_graph}" if self.kind == "F3" else "")
        if self.sampler:
            name += f" {self.sampler}" + (f" S={self.solver_steps}" if self.solver_steps is not None else "")
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
        compile_reserve_s: expected seconds to compile one U-Net (with its first run); a compiling row
            starts only when this, times its kind's factor (``run.COMPILE_FACTOR``), fits the budget left.
        max_row_s: cap on the timed part of one row: fewer repeats (at least one) when the runs are
            slow; the ``repeats`` column says how many were made.
        seed: seed of the random U-Net weights and the inputs.
        solver_steps: S of the solver rows (KS, KSD, FS, BS) that do not set their own.
        e2e_full_max_s: an E2E row runs its whole S steps when one such run is expected to take at most this
            many seconds; otherwise it times runs of ``steps`` steps and projects to S (its ``note`` says so).
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
    solver_steps: int = 10
    e2e_full_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.solver_steps < 1:
            raise ValueError(f"solver_steps must be >= 1, got {self.solver_steps}")
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
        base = dict(steps=2, min_repeats=1, max_repeats=2, target_s=0.0, warmup=1, copy_numel=1 << 16, matmul_n=64,
                    solver_steps=3, e2e_full_max_s=1.0)  # fmt: skip
    elif cuda:
        base = dict(steps=20, min_repeats=3, max_repeats=30, target_s=0.5, copy_numel=1 << 27, matmul_n=8192,
                    compile_reserve_s=60.0, max_row_s=20.0, e2e_full_max_s=15.0)  # fmt: skip
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
    tasks += solver_tasks(device_type, cases, quick=quick)
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


def solver_tasks(device_type: str, cases: Sequence[Case], *, quick: bool = False) -> list[Task]:
    """The rows of the multistep solvers (:data:`SOLVER_ROWS`).

    For the digits cases (or the last model when there is none): the step alone (KS, one row per backend, vs
    KSD) for every solver, the sampling loop (FS vs BS) for ``dpmpp_2m``, ``dpmpp_2m_sde`` and ``unipc``, and
    end to end ``dpmpp_2m`` at 10 and 20 steps, ``unipc`` at 10 against DDPM at 1000 (E2E). Other model cases:
    KS/KSD and FS/BS of ``dpmpp_2m``. GPU: priority 1 (after the DDPM rows, before compiling); CPU: 1 for the
    digits case, 2 for the others. On GPU the step-only case at batch 8192 gets KS/KSD of every solver.
    ``quick``: the tiny case, every kind once, at priority 0.
    """
    from fastddpm.driver import MULTISTEP_SAMPLERS

    cuda = device_type == "cuda"
    model_cases = [c for c in cases if c.model != "step-only"]
    if not model_cases:
        return []
    if quick:
        c = model_cases[0]
        rows = [Row("KS", sampler="dpmpp_2m"), Row("KSD", sampler="dpmpp_2m"), Row("KS", sampler="unipc"),
                Row("KSD", sampler="unipc"), Row("FS", sampler="dpmpp_2m"), Row("BS", sampler="dpmpp_2m"),
                Row("E2E", sampler="dpmpp_2m", solver_steps=10), Row("E2E", sampler="ddpm", solver_steps=1000)]  # fmt: skip
        return [Task(c, r, 0) for r in rows]
    main = [c for c in model_cases if c.model == "digits"] or [
        c for c in model_cases if c.model == model_cases[-1].model
    ]
    full = [Row(k, sampler=s) for s in MULTISTEP_SAMPLERS for k in ("KS", "KSD")]
    full += [Row(k, sampler=s) for s in ("dpmpp_2m", "dpmpp_2m_sde", "unipc") for k in ("FS", "BS")]
    full += [Row("E2E", sampler="dpmpp_2m", solver_steps=10), Row("E2E", sampler="dpmpp_2m", solver_steps=20),
             Row("E2E", sampler="unipc", solver_steps=10), Row("E2E", sampler="ddpm", solver_steps=1000)]  # fmt: skip
    short = [Row(k, sampler="dpmpp_2m") for k in ("KS", "KSD", "FS", "BS")]
    tasks = [Task(c, r, 1) for c in main for r in full]
    tasks += [Task(c, r, 1 if cuda else 2) for c in model_cases if c not in main for r in short]
    if cuda:
        big = Case("step-only", 8192)
        tasks += [Task(big, Row(k, sampler=s), 1) for s in MULTISTEP_SAMPLERS for k in ("KS", "KSD")]
    return tasks


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
