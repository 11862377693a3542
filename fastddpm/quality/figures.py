"""Figures of a quality run (matplotlib's object API with the Agg canvas: no pyplot, no global state).

Each function takes what :mod:`fastddpm.quality.run` measured and writes one PNG; :func:`write_figures`
writes all that apply.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .labels import SAMPLER_ORDER, sampler_label

COLORS = {
    "x0": "#d62728", "ddpm": "#1f77b4", "ddim": "#ff7f0e", "ddim-noclip": "#2ca02c", "dpmpp_2m": "#9467bd",
    "dpmpp_3m": "#8c564b", "dpmpp_2m_sde": "#e377c2", "unipc": "#17becf",
}  # fmt: skip
DPI = 90


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _series(rows: list[dict[str, Any]], dataset: str, model: str | None, sampler: str, key: str):
    pts = [(r["steps"], r[key]) for r in rows
           if r["dataset"] == dataset and r["sampler"] == sampler and (model is None or r["model"] == model)]  # fmt: skip
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts]


def metrics_vs_steps(result: Any, path: Path) -> Path:
    """Panels of every metric (and the time per image) against the number of steps, one line per sampler."""
    base = result.config["model"]
    rows = [r for r in result.rows if r["dataset"] != "digits" or r["model"] == base]  # no extra models here
    panels = []
    if any(r["dataset"] == "digits" for r in rows):
        ref = result.references["digits"]
        fd_ref, fd_std = ref["fd_train_vs_heldout"], ref.get("fd_train_vs_heldout_std")
        panels += [
            ("digits", None, "fd_digits", "FD-digits (lower is better)", fd_ref, "log", fd_std),
            ("digits", None, "confidence", "classifier confidence", ref["heldout_confidence"], "linear", None),
            ("digits", None, "coverage", "class coverage, nats (max log 10)", ref["heldout_coverage"], "linear", None),
        ]
    if any(r["dataset"] == "toy" for r in rows):
        ref = result.references["toy"]
        panels += [
            ("toy", "mlp", "swd", "2-D toy: sliced Wasserstein (lower is better)", ref["swd_true_vs_true"], "log", None),
            ("toy", "mlp", "log_density", "2-D toy: mean log-density (higher is better)", ref["log_density_true"], "symlog", None),
        ]  # fmt: skip
    timed = "digits" if any(r["dataset"] == "digits" for r in rows) else "toy"
    title = f"{timed}: wall time per sample (ms)"
    panels.append((timed, "mlp" if timed == "toy" else None, "ms_per_image", title, None, "log", None))
    ncol = 3
    nrow = math.ceil(len(panels) / ncol)
    fig = _figure(4.2 * ncol, 3.2 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    steps = sorted({r["steps"] for r in rows})
    for ax, (dataset, model, key, title, ref_value, yscale, ref_std) in zip(axes, panels):
        for sampler in (*SAMPLER_ORDER[1:], "x0"):
            eta = next((r["eta"] for r in rows if r["sampler"] == sampler), "")
            x, y = _series(rows, dataset, model, sampler, key)
            if not x:
                continue
            if sampler == "x0":
                ax.axhline(y[0], color=COLORS["x0"], lw=1, ls="--")
                ax.plot(x, y, "*", ms=12, color=COLORS["x0"], label=sampler_label(sampler, eta))
            else:
                ax.plot(x, y, "o-", ms=4, color=COLORS[sampler], label=sampler_label(sampler, eta))
            if dataset == "toy" and key != "ms_per_image":
                xe, ye = _series(rows, dataset, "exact", sampler, key)
                if xe:
                    style = "*" if sampler == "x0" else "s:"
                    ax.plot(xe, ye, style, ms=5 if sampler != "x0" else 9, color=COLORS[sampler], alpha=0.6,
                            mfc="none", label=f"{sampler_label(sampler, eta)}, exact denoiser")  # fmt: skip
        if ref_value is not None:
            ax.axhline(ref_value, color="k", lw=1, ls=":", label="real data")
        if ref_std:
            ax.axhspan(
                ref_value - ref_std, ref_value + ref_std, color="k", alpha=0.08, lw=0, label="real data +- 1 std"
            )
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(s) for s in steps], fontsize=7)
        ax.minorticks_off()
        if yscale == "symlog":
            ax.set_yscale("symlog", linthresh=1.0)
        else:
            ax.set_yscale(yscale)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("steps (model evaluations)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    handles, labels = {}, {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    labels = list(handles)
    fig.legend([handles[k] for k in labels], labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
    return _save(fig, path)


def quality_vs_time(result: Any, path: Path) -> Path:
    """FD-digits against wall time per image (left) and against model evaluations (right): one curve per
    sampler of the main model, the extra models (students) as labelled points, the real-data band in grey."""
    base = result.config["model"]
    rows = [r for r in result.rows if r["dataset"] == "digits"]
    ref = result.references["digits"]
    fd_ref, fd_std = ref["fd_train_vs_heldout"], ref["fd_train_vs_heldout_std"]
    fig = _figure(11.0, 4.6)
    axes = fig.subplots(1, 2)
    for ax, xkey, xlabel in zip(axes, ("ms_per_image", "steps"), ("wall time per image (ms)", "model evaluations")):
        for sampler in (*SAMPLER_ORDER[1:], "x0"):
            pts = sorted((r["steps"], r[xkey], r["fd_digits"], r["eta"]) for r in rows
                         if r["model"] == base and r["sampler"] == sampler)  # fmt: skip
            if not pts:
                continue
            label = sampler_label(sampler, pts[0][3])
            if sampler == "x0":
                ax.plot([p[1] for p in pts], [p[2] for p in pts], "*", ms=13, color=COLORS["x0"], label=label)
                continue
            ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", ms=3.5, lw=1.2, color=COLORS[sampler], label=label)
        for k, r in enumerate(r for r in rows if r["model"] != base):
            ax.plot([r[xkey]], [r["fd_digits"]], "D", ms=8, color="k", mfc="gold",
                    label="distilled students" if k == 0 else None)  # fmt: skip
            # Labels alternate above and below their points: students sit close together at 1, 2, 4 steps.
            ax.annotate(f"{r['model']}", (r[xkey], r["fd_digits"]), textcoords="offset points",
                        xytext=(4, 7 if k % 2 == 0 else -13), fontsize=7)  # fmt: skip
        ax.axhspan(fd_ref - fd_std, fd_ref + fd_std, color="k", alpha=0.1, lw=0, label="real digits, mean +- 1 std")
        ax.axhline(fd_ref, color="k", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("FD-digits (lower is better)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelsize=8)
    axes[0].set_title(f"FD-digits against wall time ({rows[0]['num_samples']} images per setting)", fontsize=9)
    axes[1].set_title("FD-digits against the number of model evaluations", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    return _save(fig, path)


def student_grid(columns: list[tuple[str, torch.Tensor]], path: Path, n: int = 36) -> Path:
    """Side-by-side tiles of the first ``n`` images of each (title, images ``[N, 1, H, W]``) column; the
    columns come from the same seed, so tile ``i`` starts from the same ``x_T`` in every column."""
    fig = _figure(2.3 * len(columns) + 0.2, 2.6)
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    nrow = math.isqrt(n)
    for ax, (title, images) in zip(axes, columns):
        _show(ax, _tile(images[:n], nrow), title)
    return _save(fig, path)


def _tile(images: torch.Tensor, nrow: int) -> np.ndarray:
    """float ``[N, 1, H, W]`` in [-1, 1] -> one float HxW array in [0, 1] (NaN gaps between images)."""
    x = ((images[:, 0].float().clamp(-1, 1) + 1) / 2).numpy()
    n, h, w = x.shape
    ncol = math.ceil(n / nrow)
    out = np.full((ncol * (h + 1) - 1, nrow * (w + 1) - 1), np.nan)
    for i in range(n):
        r, c = divmod(i, nrow)
        out[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = x[i]
    return out


def _show(ax, arr: np.ndarray, title: str | None = None) -> None:
    import matplotlib

    cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
    ax.imshow(arr, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _row_label(sampler: str, eta: float) -> str:
    return sampler_label(sampler, eta).replace(", ", "\n")


def _steps_title(n: int) -> str:
    return f"{n} step{'s' if n > 1 else ''}"


def digit_grids(samples: dict[tuple[str, int], torch.Tensor], real: torch.Tensor, eta: float, path: Path) -> Path:
    """One 4x4 tile of generated digits per (sampler, steps): samplers in rows, steps in columns.

    The ``x0`` row holds its single one-shot tile and, in the last column, real held-out digits.
    """
    steps = sorted({s for (smp, s) in samples if smp != "x0"}) or [1]
    samplers = [s for s in SAMPLER_ORDER if any(k[0] == s for k in samples)]
    ncol = max(len(steps), 2)
    fig = _figure(1.2 * ncol + 0.6, 1.3 * len(samplers))
    axes = fig.subplots(len(samplers), ncol, squeeze=False)
    for i, sampler in enumerate(samplers):
        for j in range(ncol):
            ax = axes[i, j]
            if sampler == "x0" and j == 0:
                _show(ax, _tile(samples[("x0", 1)][:16], 4), _steps_title(1))
            elif sampler == "x0" and j == ncol - 1:
                _show(ax, _tile(real[:16], 4), "real (held-out)")
            elif sampler != "x0" and j < len(steps) and (sampler, steps[j]) in samples:
                _show(ax, _tile(samples[(sampler, steps[j])][:16], 4), _steps_title(steps[j]))
            else:
                ax.axis("off")
                continue
            if j == 0:
                ax.set_ylabel(_row_label(sampler, eta), fontsize=8)
    return _save(fig, path)


def x0_strip(ts: list[int], xts: torch.Tensor, x0s: torch.Tensor, path: Path) -> Path:
    """For each image of one DDPM trajectory: ``x_t`` (top) and the predicted ``x0`` (bottom) at each recorded t."""
    k = xts.shape[1]
    fig = _figure(1.0 * len(ts) + 0.8, 1.05 * 2 * k)
    axes = fig.subplots(2 * k, len(ts), squeeze=False)
    for i in range(k):
        for j, t in enumerate(ts):
            _show(axes[2 * i, j], _tile(xts[j, i : i + 1], 1), f"t = {t}" if i == 0 else None)
            _show(axes[2 * i + 1, j], _tile(x0s[j, i : i + 1], 1))
        axes[2 * i, 0].set_ylabel("x_t", fontsize=8)
        axes[2 * i + 1, 0].set_ylabel("pred. x0", fontsize=8)
    return _save(fig, path)


def toy_scatter(
    points: dict[tuple[str, str, int], torch.Tensor], truth: torch.Tensor, mixture: Any, eta: float, path: Path
) -> Path:
    """Scatter of the toy samples (MLP denoiser): samplers in rows, steps in columns.

    The ``x0`` row shows the MLP's and the exact denoiser's one-shot samples and, last, true samples;
    grey circles mark the mode centres.
    """
    steps = sorted({s for (m, smp, s) in points if smp != "x0"}) or [1]
    samplers = [s for s in SAMPLER_ORDER if any(k[1] == s for k in points)]
    ncol = max(len(steps), 3)
    fig = _figure(1.3 * ncol + 0.6, 1.45 * len(samplers))
    axes = fig.subplots(len(samplers), ncol, squeeze=False)
    centres = mixture.means().numpy()
    panels: dict[tuple[int, int], tuple[np.ndarray, str]] = {}
    for i, sampler in enumerate(samplers):
        if sampler == "x0":
            panels[(i, 0)] = (points[("mlp", "x0", 1)].numpy(), "1 step (MLP)")
            if ("exact", "x0", 1) in points:
                panels[(i, 1)] = (points[("exact", "x0", 1)].numpy(), "1 step (exact denoiser)")
            panels[(i, ncol - 1)] = (truth.numpy(), "true samples")
        else:
            for j, n in enumerate(steps):
                if ("mlp", sampler, n) in points:
                    panels[(i, j)] = (points[("mlp", sampler, n)].numpy(), _steps_title(n))
    for i in range(axes.shape[0]):
        for j in range(axes.shape[1]):
            ax = axes[i, j]
            if (i, j) not in panels:
                ax.axis("off")
                continue
            p, title = panels[(i, j)]
            ax.scatter(centres[:, 0], centres[:, 1], s=30, facecolors="none", edgecolors="0.7", lw=0.8)
            ax.scatter(p[:, 0], p[:, 1], s=1.5, alpha=0.35, color="k", lw=0, rasterized=True)
            ax.set_xlim(-1.05, 1.05)
            ax.set_ylim(-1.05, 1.05)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=7)
            if j == 0:
                ax.set_ylabel(_row_label(samplers[i], eta), fontsize=8)
    return _save(fig, path)


def write_figures(result: Any, digits: dict[str, Any] | None, toy: dict[str, Any] | None, folder: Path) -> list[Path]:
    """All figures that the run's parts allow, as PNGs under ``folder``; returns their paths."""
    eta = float(result.config["eta"])
    paths = [metrics_vs_steps(result, folder / "quality_vs_steps.png")]
    if digits is not None:
        from .classifier import digits_train_heldout

        real = digits_train_heldout()[2]
        paths.append(digit_grids(digits["samples"], real, eta, folder / "digits_grids.png"))
        paths.append(x0_strip(*digits["trajectory"], folder / "x0_trajectory.png"))
        paths.append(quality_vs_time(result, folder / "quality_vs_time.png"))
        samples, ddpm = digits["samples"], [k for k in digits["samples"] if k[0] == "ddpm"]
        if digits["students"] and ("x0", 1) in samples and ddpm:
            last = max(ddpm, key=lambda k: k[1])
            cols = [("teacher, x0 one shot", samples[("x0", 1)])]
            cols += [(f"{name}", images) for name, images in digits["students"].items()]
            cols.append((f"teacher, DDPM {last[1]} steps", samples[last]))
            paths.append(student_grid(cols, folder / "students_vs_teacher.png"))
    if toy is not None:
        paths.append(toy_scatter(toy["points"], toy["truth"], toy["mixture"], eta, folder / "toy_scatter.png"))
    return paths
