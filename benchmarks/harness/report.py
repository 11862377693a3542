"""Reading a result: the speed targets of the benchmark issue checked against the rows of one run,
the plain-text table, and the PNG chart."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .rows import KERNEL_ROWS, MODEL_ROWS, SOLVER_ROWS


def fmt_value(v: Any, spec: str) -> str:
    """``format(v, spec)``, or ``"-"`` for a missing value."""
    return "-" if v is None else format(v, spec)


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


def format_table(result: Any) -> str:
    """A plain-text table of the rows with their ratios (``result``: a ``BenchResult`` or its JSON dict)."""
    rows = result["rows"] if isinstance(result, dict) else result.rows
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
            f"{fmt_value(r.get('speedup_vs_B0b'), '7.2f')} {fmt_value(r.get('speedup_vs_B0a'), '7.2f')} "
            f"{fmt_value(r.get('proj_1000_steps_s'), '11.2f')} {fmt_value(r.get('proj_images_per_s_1000_steps'), '10.3g')} "
            f"{fmt_value(r.get('tflops'), '7.3g')} {fmt_value(r.get('gbps'), '7.4g')} {fmt_value(pct, '6.1f')} "
            f"{fmt_value(r.get('speedup_vs_KD'), '6.2f')} {fmt_value(r.get('peak_mem_mb'), '8.0f')}"
        )
    solver = [r for r in rows if r["row"] in SOLVER_ROWS and r["status"] == "ok"]
    if solver:
        lines += ["", f"{'model':>12s} {'batch':>5s} {'solver row':<34s} {'steps':>5s} {'ms/step':>9s} {'vs diffusers':>12s} "
                      f"{'e2e s':>9s} {'vs DDPM-1000':>12s}  note"]  # fmt: skip
        for r in solver:
            lines.append(
                f"{r['model']:>12s} {r['batch']:>5d} {r['name']:<34s} {r['steps'] or '':>5} "
                f"{r['ms_per_step_median']:9.3f} {fmt_value(r.get('speedup_vs_diffusers'), '.2f'):>12s} "
                f"{fmt_value(r.get('e2e_s'), '.2f'):>9s} {fmt_value(r.get('speedup_vs_ddpm1000'), '.1f'):>12s}  "
                f"{r.get('note') or ''}"
            )
    meta = result.get("meta", {}) if isinstance(result, dict) else result.meta
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
        colors = ["tab:blue" if r["row"].startswith("F") or r["row"] in ("K1", "KS") else "tab:gray" for r in prs]
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
