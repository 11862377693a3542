"""Running: measure every task in priority order inside the time budget, derive the ratio columns,
record the environment, and write ``bench.json`` / ``bench.csv`` after every row."""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .prepare import PREPARERS, CaseContext, Prepared, Skip, expand_kernel_rows
from .report import evaluate_targets, fmt_value, plot_result
from .rows import (
    COLUMNS,
    COMPILE_ROWS,
    CSV_NAME,
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
)
from .timing import Clock, MemoryProbe, percentiles, repeat_times, variant_context


def _empty_row(task: Task, steps: int | None) -> dict[str, Any]:
    r = dict.fromkeys(COLUMNS)
    v, row = task.row.variant, task.row
    r.update(
        model=task.case.model, batch=task.case.batch, steps=steps, row=row.kind, name=row.name,
        dtype=v.dtype, channels_last=v.channels_last, fused_norm=v.fused_norm, sdpa=v.sdpa,
        compile_unet=v.compile_unet or row.kind in COMPILE_ROWS,
        steps_per_graph=row.steps_per_graph if row.kind == "F3" else (1 if row.kind == "F2" else None),
        description=ROW_KINDS[row.kind], sampler=row.sampler or None,
    )  # fmt: skip
    return r


#: Expected seconds of a row's untimed part (setup, compilation or capture, first run, warm-up), by
#: kind: a row is started only when this fits in what is left of the run's budget, and its timed
#: repeats are then cut to what is left after it (at least one timed run). Compiling rows take
#: ``cfg.compile_reserve_s`` (the expected Inductor compile of one U-Net: 60 s on CUDA, 300 s on a small
#: CPU) times the factor here (B2 also compiles the update and, on CUDA, records CUDA-graph trees);
#: the other estimates are seconds on CUDA and three times that on CPU. They are estimates, kept
#: deliberately high: revise them from the ``first_run_s``/``compile_s``/``capture_s`` columns of a run.
COMPILE_FACTOR = {"B1": 1.0, "B2": 1.5, "F1": 1.0, "F2": 1.2, "F3": 1.2}
SETUP_ESTIMATE_S = {
    "B0a": 8.0, "B0b": 4.0, "F1": 4.0, "F2": 8.0, "F3": 8.0,  # model rows: case setup, first run, warm-up
    "COPY": 1.0, "MM": 2.0, "K0": 1.0, "K1": 3.0, "K2": 2.0, "KD": 2.0,  # kernel rows (K1: Triton JIT)
    "KS": 3.0, "KSD": 2.0, "FS": 8.0, "BS": 8.0, "E2E": 10.0,  # solver rows (E2E: two probe calls)
}  # fmt: skip


def expected_setup_s(row: Row, cfg: BenchConfig) -> float:
    """Expected seconds of ``row``'s untimed part on ``cfg.device`` (see :data:`SETUP_ESTIMATE_S`)."""
    if row.compiles:
        return cfg.compile_reserve_s * COMPILE_FACTOR.get(row.kind, 1.5)
    cuda = torch.device(cfg.device).type == "cuda"
    return SETUP_ESTIMATE_S[row.kind] * (1.0 if cuda else 3.0)


def measure_task(task: Task, ctx: CaseContext, cfg: BenchConfig, left_s: float | None = None) -> dict[str, Any]:
    """Prepare, warm up and time one row; never raises (errors become ``status="error"``).

    ``left_s``: seconds of the run's budget left when the row starts; the timed repeats are cut to
    what is left of it after setup and warm-up (at least one timed run).
    """
    t_row = time.perf_counter()
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
            left_timed = None if left_s is None else max(0.0, left_s - (time.perf_counter() - t_row))
            times = repeat_times(clock, prepared.run, cfg, left_timed)
            peak, note = mem.read()
            images = prepared.output()
            out["output_finite"] = None if images is None else bool(torch.isfinite(images).all())
        steps = prepared.steps or ctx.steps
        units = prepared.inner if kernel else steps
        med, p20, p80 = percentiles([1e3 * s / units for s in times])
        out.update(status="ok", reason="", backend=prepared.backend, ms_per_step_median=med, ms_per_step_p20=p20,
                   ms_per_step_p80=p80, repeats=len(times), peak_mem_mb=peak, mem_note=note,
                   first_run_s=first, capture_s=prepared.capture_s, note=prepared.note or None)  # fmt: skip
        if prepared.steps is not None:
            out["steps"] = prepared.steps
        if prepared.e2e_steps is not None:
            out["e2e_s"] = med * prepared.e2e_steps / 1e3
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
            out.update(images_per_s=ctx.batch / (sec_step * steps), proj_1000_steps_s=1000 * sec_step,
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
        if r["row"] in SOLVER_ROWS:
            _solver_ratios(r, [b for b in rows if ok(b) and (b["model"], b["batch"]) == (r["model"], r["batch"])])
            if copy_gbps and r.get("gbps"):
                r["frac_of_copy_bw"] = r["gbps"] / copy_gbps
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


def _solver_ratios(r: dict[str, Any], same_case: list[dict[str, Any]]) -> None:
    """``speedup_vs_diffusers``: KSD's (for KS) or BS's (for FS) ms/step over the row's, same sampler and steps;
    ``speedup_vs_ddpm1000``: the (first) ``E2E ddpm S=1000`` row's ``e2e_s`` over an E2E row's."""
    partner = {"KS": "KSD", "FS": "BS"}.get(r["row"])
    for b in same_case:
        if partner and b["row"] == partner and (b["sampler"], b["steps"]) == (r["sampler"], r["steps"]):
            r["speedup_vs_diffusers"] = b["ms_per_step_median"] / r["ms_per_step_median"]
            break
    if r["row"] == "E2E" and r.get("e2e_s"):
        for b in same_case:
            if b["name"].split()[:3] == ["E2E", "ddpm", "S=1000"] and b.get("e2e_s"):  # any variant label
                r["speedup_vs_ddpm1000"] = b["e2e_s"] / r["e2e_s"]
                break


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
        elif left is not None and left < expected_setup_s(task.row, cfg):
            need = expected_setup_s(task.row, cfg)
            reason = f"not started: a {task.row.kind} row needs ~{need:.0f} s before timing and {left:.0f} s are left"
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


def _log_line(r: dict[str, Any], elapsed: float) -> str:
    head = f"[{elapsed:6.1f}s] {r['model']:>12s} b={r['batch']:<5d} {r['name']:<34s}"
    if r["status"] != "ok":
        return f"{head} {r['status'].upper()}: {r['reason']}"
    if r["row"] == "E2E":
        return f"{head} {r['e2e_s']:9.3f} s end to end ({r['ms_per_step_median']:.3f} ms/step)  [{r['note']}]"
    if r["row"] in KERNEL_ROWS:
        return (
            f"{head} {r['ms_per_step_median'] * 1e3:9.1f} us/call  {fmt_value(r['gbps'], '.4g')} GB/s  [{r['backend']}]"
        )
    return (
        f"{head} {r['ms_per_step_median']:9.3f} ms/step [{r['ms_per_step_p20']:.3f}-{r['ms_per_step_p80']:.3f}]"
        f"  {fmt_value(r['tflops'], '.3g')} TFLOP/s  [{r['backend']}]"
    )
