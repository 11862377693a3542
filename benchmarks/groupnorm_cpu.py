"""The fused CPU GroupNorm+SiLU (csrc/cpu_groupnorm.cpp) against PyTorch's add + group_norm + silu.

Two measurements, each alternating the two versions in the same process (median, p20-p80):

* the op alone on channels_last float32 activations of the digits and CIFAR-10 U-Nets' sizes;
* a whole U-Net forward, channels_last, with the fused op on and off (``FASTDDPM_FUSED_NORM``): the
  bundled digits model at batch 64 and the ``ddpm-cifar10`` preset (random weights) at batch 1.

Usage::

    python benchmarks/groupnorm_cpu.py [--out benchmarks/results/groupnorm_cpu-DATE.json] [--reps 15]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [
    (64, 64, 8, 8, 32),
    (64, 128, 4, 4, 32),
    (1, 128, 32, 32, 32),
    (1, 256, 16, 16, 32),
    (8, 128, 32, 32, 32),
    (8, 256, 16, 16, 32),
]


def _summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=5)
    return dict(median=statistics.median(values), p20=q[0], p80=q[3])


def _alternate(fns: dict[str, object], reps: int, inner: int) -> dict[str, dict[str, float]]:
    for f in fns.values():
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - t0) / inner * 1e3)
    return {k: _summary(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--reps", type=int, default=15, help="alternating rounds per measurement (default 15)")
    args = p.parse_args()

    from fastddpm.backends import cpu
    from fastddpm.registry import load_model

    ok, why = cpu.available("cpu")
    if not ok:
        raise SystemExit(f"the cpu backend is unavailable: {why}")
    result: dict = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        cpu=platform.processor() or platform.machine(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        loadavg=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        op_ms={},
    )
    with torch.inference_mode():
        for b, c, h, w, g in SHAPES:
            x = torch.randn(b, c, h, w).to(memory_format=torch.channels_last)
            weight, bias, add = torch.randn(c), torch.randn(c), torch.randn(b, c)

            def plain(x=x, w=weight, b_=bias, a=add, g=g):
                return F.silu(F.group_norm(x + a[:, :, None, None], g, w, b_, 1e-6))

            def fused(x=x, w=weight, b_=bias, a=add, g=g):
                return cpu.group_norm_silu(x, w, b_, g, 1e-6, add=a)

            res = _alternate({"torch": plain, "fused": fused}, args.reps, 10)
            key = f"{b}x{c}x{h}x{w}/{g} groups"
            result["op_ms"][key] = res
            print(f"{key:24s} torch {res['torch']['median']:.3f} ms, fused {res['fused']['median']:.3f} ms, "
                  f"{res['torch']['median'] / res['fused']['median']:.2f}x")  # fmt: skip

        from fastddpm.unet import UNet

        torch.manual_seed(0)
        nets = {
            "digits_unet_b64_forward_ms": (load_model("digits", "cpu")[0], (64, 1, 8, 8)),
            "cifar10_unet_b1_forward_ms": (UNet.from_preset("ddpm-cifar10").eval(), (1, 3, 32, 32)),
        }
        saved = os.environ.get("FASTDDPM_FUSED_NORM")
        try:
            for key, (model, shape) in nets.items():
                net = copy.deepcopy(model).to(memory_format=torch.channels_last)
                xin = torch.randn(shape).contiguous(memory_format=torch.channels_last)
                t = torch.full((shape[0],), 500)

                def forward(flag: str, net=net, xin=xin, t=t):
                    def run() -> None:
                        os.environ["FASTDDPM_FUSED_NORM"] = flag
                        net(xin, t)

                    return run

                res = _alternate({"plain": forward("0"), "fused": forward("1")}, 2 * args.reps, 3)
                result[key] = res
                print(f"{key}, channels_last: plain {res['plain']['median']:.1f} ms, "
                      f"fused {res['fused']['median']:.1f} ms, {res['plain']['median'] / res['fused']['median']:.2f}x")  # fmt: skip
        finally:
            if saved is None:
                os.environ.pop("FASTDDPM_FUSED_NORM", None)
            else:
                os.environ["FASTDDPM_FUSED_NORM"] = saved
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
