"""bf16 autocast of the U-Net on this CPU: speed per forward and the quality cost on the bundled model.

    python benchmarks/bf16_cpu.py --out benchmarks/results/bf16-cpu-<date>

Speed: forwards of the bundled digits U-Net (batch 64) and the ddpm-cifar10 architecture (random
weights, batch 4), channels_last, float32 against bf16 autocast, the two alternated in one process
(best of ``--reps`` after a warm-up), plus the choice ``dtype="auto"`` makes here.
Quality: ``--num-samples`` digits from the bundled model with the same seed in float32 and in bf16
autocast (the model's default sampler and steps), scored with the shipped digits classifier
(FD-digits, confidence, class coverage) beside the real-data band (FD of ``REAL_DRAWS`` random
subsets of real training digits of the same size against the held-out digits: mean +- std).
Writes ``bf16.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import fastddpm
from fastddpm.autodtype import cpu_bf16_features, resolve_dtype
from fastddpm.quality.classifier import DigitsScorer, digits_train_heldout
from fastddpm.registry import load_model
from fastddpm.sampling import model_call
from fastddpm.unet import PRESETS, UNet

REAL_DRAWS = 10


def time_forwards(model, x: torch.Tensor, reps: int) -> dict[str, float]:
    t = torch.full((x.shape[0],), 500, dtype=torch.int64)
    best = {"fp32": float("inf"), "bf16": float("inf")}

    def run(kind: str) -> None:
        with torch.no_grad():
            if kind == "fp32":
                model_call(model, x, t)
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model_call(model, x, t)

    for kind in best:  # warm-up
        run(kind)
    for _ in range(reps):
        for kind in best:  # alternated, so drift hits both alike
            start = time.perf_counter()
            run(kind)
            best[kind] = min(best[kind], (time.perf_counter() - start) * 1e3)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--sampler", default="dpmpp_2m_sde", help="sampler of the quality part (default: the model's)")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--spacing", default="trailing")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    feats = cpu_bf16_features()
    result: dict = {
        "cpu": feats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastddpm": fastddpm.__version__,
        "python": platform.python_version(),
        "speed": [],
    }
    print(f"CPU: {feats['cpu']} (avx512_bf16={feats['avx512_bf16']}, amx_bf16={feats['amx_bf16']})", file=sys.stderr)

    digits, schedule, _ = load_model("digits", "cpu")
    cifar = UNet(PRESETS["ddpm-cifar10"]).eval()
    for name, model, shape in (("digits", digits, (64, 1, 8, 8)), ("ddpm-cifar10", cifar, (4, 3, 32, 32))):
        model = model.to(memory_format=torch.channels_last)
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        ms = time_forwards(model, x, args.reps)
        choice = resolve_dtype("auto", model, x)
        row = {"model": name, "batch": shape[0], "fp32_ms": ms["fp32"], "bf16_ms": ms["bf16"], "auto": choice.reason}
        result["speed"].append(row)
        print(json.dumps(row), file=sys.stderr)

    if not args.no_quality:
        scorer = DigitsScorer()
        x_tr, _, _, _ = digits_train_heldout()
        g = torch.Generator().manual_seed(args.seed)
        n = min(args.num_samples, x_tr.shape[0])
        real = torch.tensor(
            [scorer.score(x_tr[torch.randperm(x_tr.shape[0], generator=g)[:n]]).fd for _ in range(REAL_DRAWS)],
            dtype=torch.float64,
        )
        result["real_band"] = {"fd_mean": float(real.mean()), "fd_std": float(real.std()), "num_samples": n}
        result["quality"] = []
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            start = time.perf_counter()
            images = fastddpm.sample(
                digits, schedule, args.num_samples, seed=args.seed, dtype=dtype, progress=False, batch_size=64,
                sampler=args.sampler, num_inference_steps=args.steps, timestep_spacing=args.spacing,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            s = scorer.score(images)
            row = {"dtype": name, "sampler": f"{args.sampler} {args.steps} steps", "fd_digits": s.fd, "confidence": s.confidence, "coverage": s.coverage,
                   "seconds": seconds}  # fmt: skip
            result["quality"].append(row)
            print(json.dumps(row), file=sys.stderr)
    (args.out / "bf16.json").write_text(json.dumps(result, indent=1))

    print(
        "| model | batch | fp32 ms/forward | bf16 ms/forward | bf16 speed-up | auto here |\n|---|---|---|---|---|---|"
    )
    for r in result["speed"]:
        print(f"| {r['model']} | {r['batch']} | {r['fp32_ms']:.1f} | {r['bf16_ms']:.1f} | "
              f"{r['fp32_ms'] / r['bf16_ms']:.2f}x | {r['auto']} |")  # fmt: skip
    if "quality" in result:
        band = result["real_band"]
        print(f"\nreal-data band (n={band['num_samples']}): FD {band['fd_mean']:.2f} +- {band['fd_std']:.2f}")
        print("| dtype | FD-digits | confidence | coverage | sampling s |\n|---|---|---|---|---|")
        for r in result["quality"]:
            print(f"| {r['dtype']} | {r['fd_digits']:.2f} | {r['confidence']:.3f} | {r['coverage']:.3f} | "
                  f"{r['seconds']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
