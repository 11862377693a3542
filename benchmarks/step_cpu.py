"""The fused DDPM step on CPU next to diffusers' step and the plain eager formula, in one run.

Rows (fp32, ``[B, 3, 32, 32]``, DDPM epsilon prediction, fixed_small variance, clip_sample=True, one
mid-trajectory timestep; every row does the same math):

==================  ===========================================================================
fused               ``fastddpm.backends.cpu.step``: one pass, Philox noise made in the kernel,
                    writes x_{t-1} and x0 (what diffusers returns too)
diffusers           ``diffusers.DDPMScheduler.step(eps, t, x, generator=g)`` (generator noise)
eager               the same formula as plain torch ops + ``torch.randn(generator=g)``
noise: fastddpm     ``fastddpm.backends.cpu.randn`` into a preallocated tensor
noise: torch.randn  ``torch.randn(shape, generator=g)`` (what diffusers and eager draw)
torch.log/sin/exp   ``torch.log(x, out=y)`` etc. on the same number of elements: this machine's own
                    rate of a vectorised transcendental, for scale
==================  ===========================================================================

Rows are timed round-robin (one call of each row per round) with ``time.perf_counter`` after a
warm-up, so a load change on a shared machine hits every row alike; the table gives the median,
20th and 80th percentile, ns per element and each baseline's time over the fused row's. The
coefficient row is the step driver's (:func:`fastddpm.driver.step_row`, from the scheduler's config)
and is checked against diffusers: with the same noise tensor the fused step must give diffusers'
``prev_sample`` (printed as ``max |fused - diffusers|``).

Run::

    python benchmarks/step_cpu.py                       # B = 512, 25 rounds
    python benchmarks/step_cpu.py --batch 64 --rounds 50 --out benchmarks/results/step_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastddpm import _build
from fastddpm import _layout as L
from fastddpm.backends import cpu
from fastddpm.driver import step_row
from fastddpm.schedule import Schedule

SHAPE = (3, 32, 32)
TIMESTEP = 500
SEED = 1234


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def make_rows(batch: int) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """The timed callables of one run, and the extra results (the equivalence check)."""
    from diffusers import DDPMScheduler

    numel = math.prod(SHAPE)
    scheduler = DDPMScheduler(num_train_timesteps=1000)  # linear betas, fixed_small, clip_sample=True
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(batch, *SHAPE, generator=gen)
    eps = torch.randn(batch, *SHAPE, generator=gen)
    prev_t = TIMESTEP - 1
    coef, tval = step_row(Schedule.from_diffusers(scheduler), "ddpm", TIMESTEP, prev_t)  # [1, NCOEF], [1]
    rows = torch.zeros(1, dtype=torch.int64).expand(batch)
    rng = torch.tensor([SEED, 0], dtype=torch.int64)
    clip_range = float(scheduler.config.clip_sample_range)
    x2, eps2 = x.reshape(batch, numel), eps.reshape(batch, numel)
    prev = torch.empty(batch, numel)
    x0 = torch.empty(batch, numel)
    noise_out = torch.empty(batch, numel)
    t_all = tval.expand(batch)
    c = {k: float(coef[0, getattr(L, f"COEF_{k}")]) for k in ("CX", "CM", "P0", "PX", "STD")}

    def fused(noise_mode: int = L.NOISE_PHILOX, noise: torch.Tensor | None = None) -> None:
        cpu.step(x2, eps2, None, noise, prev, x0, coef, tval, rows, None, rng, clip_mode=L.CLIP_RANGE,
                 clip_range=clip_range, var_mode=L.VAR_FIXED, noise_mode=noise_mode, x0_only=False)  # fmt: skip

    def diffusers_step() -> Any:
        return scheduler.step(eps, TIMESTEP, x, generator=gen)

    def eager() -> torch.Tensor:
        pred_x0 = (c["CX"] * x + c["CM"] * eps).clamp(-clip_range, clip_range)
        mean = c["P0"] * pred_x0 + c["PX"] * x
        return mean + c["STD"] * torch.randn(x.shape, generator=gen)

    # Equivalence: with diffusers' own noise the fused step gives diffusers' prev_sample.
    gen_check = torch.Generator().manual_seed(7)
    ref = scheduler.step(eps, TIMESTEP, x, generator=gen_check).prev_sample
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))  # the draw diffusers made
    fused(L.NOISE_TENSOR, z.reshape(batch, numel))
    max_diff = (prev.reshape(ref.shape) - ref).abs().max().item()

    src = torch.rand(batch, numel) * 0.999 + 1e-3
    dst = torch.empty(batch, numel)
    timed: dict[str, Callable[[], Any]] = {
        "fused step (cpu backend, Philox in kernel)": fused,
        "diffusers DDPMScheduler.step": diffusers_step,
        "eager formula + torch.randn": eager,
        "noise: fastddpm cpu randn": lambda: cpu.randn(noise_out, t_all, rng, stream=L.STREAM_STEP),
        "noise: torch.randn": lambda: torch.randn((batch, *SHAPE), generator=gen),
        "torch.log (same numel)": lambda: torch.log(src, out=dst),
        "torch.sin (same numel)": lambda: torch.sin(src, out=dst),
        "torch.exp (same numel)": lambda: torch.exp(src, out=dst),
    }
    return timed, {"max_abs_diff_fused_vs_diffusers_same_noise": max_diff}


#: Which row each ratio is taken against: ratio = other row's median / this row's median.
RATIO_BASE = {
    "diffusers DDPMScheduler.step": "fused step (cpu backend, Philox in kernel)",
    "eager formula + torch.randn": "fused step (cpu backend, Philox in kernel)",
    "noise: torch.randn": "noise: fastddpm cpu randn",
    "torch.log (same numel)": "noise: fastddpm cpu randn",
    "torch.sin (same numel)": "noise: fastddpm cpu randn",
    "torch.exp (same numel)": "noise: fastddpm cpu randn",
}


def run(batch: int = 512, rounds: int = 25, warmup: int = 3) -> dict[str, Any]:
    """Time every row ``rounds`` times, round-robin; returns the result dict (also the JSON)."""
    numel = batch * math.prod(SHAPE)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    _build.load_cpu_extension()  # build outside the timing
    timed, extra = make_rows(batch)
    for _ in range(warmup):
        for fn in timed.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(rounds):
        for name, fn in timed.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    rows = []
    med = {name: statistics.median(v) for name, v in samples.items()}
    for name, v in samples.items():
        base = RATIO_BASE.get(name)
        rows.append(
            {
                "name": name,
                "median_ms": med[name] * 1e3,
                "p20_ms": _percentile(v, 0.2) * 1e3,
                "p80_ms": _percentile(v, 0.8) * 1e3,
                "ns_per_element": med[name] * 1e9 / numel,
                "ratio_vs": base,
                "ratio": med[name] / med[base] if base else None,
            }
        )
    import diffusers

    return {
        "schema": "fastddpm-step-cpu/1",
        "meta": {
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "cpu": _cpu_name(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_build_flags": list(_build.load_cpu_extension().build_flags),
            "loadavg_start": list(load_start) if load_start else None,
            "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "config": {"batch": batch, "shape": list(SHAPE), "numel": numel, "dtype": "float32", "timestep": TIMESTEP},
        "timing": {"rounds": rounds, "warmup": warmup, "clock": "time.perf_counter, rows round-robin"},
        "checks": extra,
        "rows": rows,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(result: dict[str, Any]) -> str:
    cfg, meta = result["config"], result["meta"]
    lines = [
        f"fp32 DDPM step, B={cfg['batch']} x {'x'.join(map(str, cfg['shape']))} ({cfg['numel']:,} elements), "
        f"{result['timing']['rounds']} rounds; {meta['cpu']}, {meta['torch_threads']} threads, torch {meta['torch']}, "
        f"diffusers {meta['diffusers']}; load avg {meta['loadavg_start']} -> {meta['loadavg_end']}",
        f"{'row':44s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'ns/elem':>8s}  ratio",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio']:.2f}x of '{r['ratio_vs']}'" if r["ratio"] is not None else ""
        lines.append(
            f"{r['name']:44s} {r['median_ms']:10.3f} {r['p20_ms']:8.3f} {r['p80_ms']:8.3f} "
            f"{r['ns_per_element']:8.3f}  {ratio}"
        )
    diff = result["checks"]["max_abs_diff_fused_vs_diffusers_same_noise"]
    lines.append(f"max |fused - diffusers| with the same noise: {diff:.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=512, help="samples of 3x32x32 (default 512)")
    p.add_argument("--rounds", type=int, default=25, help="timed calls per row (default 25)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.batch, args.rounds, args.warmup)
    print(format_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
