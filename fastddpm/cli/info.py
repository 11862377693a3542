"""``fastddpm info``: versions, devices, compilers, which fused backends can run here, and which one sampling uses."""

from __future__ import annotations

import argparse
import os
import sys


def add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="backends available here and why not, compilers, device, versions")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    """Print the report; exit status 1 when ``fastddpm sample`` could not run here (a bad ``FASTDDPM_BACKEND``)."""
    import platform

    import torch

    from .. import __version__
    from ..dispatch import availability, resolve_backend
    from ..registry import bundled_models

    print(f"fastddpm {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}  (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})")
    except ImportError:
        print("triton: not installed (pip install triton)")
    try:
        import diffusers

        print(f"diffusers {diffusers.__version__}")
    except ImportError:
        print("diffusers: not installed (optional; needed for the DDPMPipeline comparison)")
    from ..autodtype import MIN_PARAMS, MIN_SPEEDUP, cpu_bf16_features

    feats = cpu_bf16_features()
    print(f"cpu: {feats['cpu']}, {os.cpu_count()} cores, capability {feats['capability']}, "
          f"avx512_bf16 {'yes' if feats['avx512_bf16'] else 'no'}, amx_bf16 {'yes' if feats['amx_bf16'] else 'no'}")  # fmt: skip
    if feats["native_bf16"]:
        print(f"dtype auto on cpu: bf16 autocast for models >= {MIN_PARAMS / 1e6:.0f} M parameters where a timed "
              f"forward is >= {MIN_SPEEDUP}x faster than fp32 (decided per model and batch, cached), else fp32")  # fmt: skip
    else:
        print("dtype auto on cpu: fp32 (no native bf16 on this CPU; bf16 would be emulated and slow)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("cuda: no GPU visible")
    try:
        from .._build import compiler_info

        for k, v in compiler_info().items():
            print(f"{k}: {v}")
    except ImportError:
        pass
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"backends for {dev.type} tensors:")
    for name in ("reference", "cpu", "triton", "cuda"):
        ok, why = availability(name, dev)
        print(f"  {name:9s} {'available' if ok else 'unavailable'}: {why}")
    print(f"bundled models: {', '.join(bundled_models()) or '(none)'}")
    env = os.environ.get("FASTDDPM_BACKEND")
    source = f"FASTDDPM_BACKEND={env!r}" if env is not None else "FASTDDPM_BACKEND unset"
    try:
        chosen = resolve_backend("auto", dev, torch.float32)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"sampling backend: {source}")
        print(f"fastddpm info: error: {e}; `fastddpm sample` would fail here (unset it or pick an available backend)",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"sampling backend: {chosen} for {dev.type} tensors ({source}); `fastddpm sample` can run")
    return 0
