"""Compile every Triton kernel of fastddpm for real GPUs, on a machine without one.

The Triton interpreter (what the test suite runs on CPU) checks the arithmetic but not that a
kernel compiles: it accepts programs that the GPU compiler rejects (a wrong constexpr type, an
unsupported cast, a shape the layout pass cannot handle). This script compiles the kernels the way
a launch on a GPU does, through the real launchers (``fastddpm.backends.triton`` and
``fastddpm.kernels.groupnorm``) with their real grids, block sizes and argument specialisation,
but with a stand-in driver that names a GPU target and never launches: ``JITFunction.run`` is
called with ``warmup=True``, which compiles and returns the kernel.

For each compiled kernel it then reads registers, stack and local memory (spills) from the cubin
(``cuobjdump -res-usage``, shipped with Triton) and counts 16-byte global loads and stores in the
PTX, so a regression to scalar memory access shows up here too.

Usage (TRITON_INTERPRET must be unset; the test runs it in a child process)::

    python tests/triton_aot.py [--arch 90 --arch 80] [--json report.json]

Prints one line per kernel variant and exits non-zero when any variant fails to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class _StandInDriver:
    """Enough of a Triton driver for ``JITFunction.run(warmup=True)``: a target, device 0, stream 0."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> str:
        return f"aot-sm_{self.target.arch}"  # the key of Triton's per-device kernel cache: one per arch

    def get_current_stream(self, device: str | None = None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


class CompileOnly:
    """Context: every ``kernel[grid](...)`` launch compiles for ``arch`` and records the kernel."""

    def __init__(self, arch: int):
        self.arch = arch
        self.compiled: list = []

    def __enter__(self) -> CompileOnly:
        import triton
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        self._driver, self._jit = driver, JITFunction
        self._saved_run = JITFunction.run
        self._saved_active = driver._active if hasattr(driver, "_active") else None
        driver.set_active(_StandInDriver(self.arch))
        compiled = self.compiled

        def run(fn, *args, grid, warmup, **kwargs):
            kernel = self._saved_run(fn, *args, grid=grid, warmup=True, **kwargs)
            compiled.append((fn, kernel))
            return kernel

        JITFunction.run = run
        self.version = triton.__version__
        return self

    def __exit__(self, *exc) -> None:
        self._jit.run = self._saved_run
        if hasattr(self._driver, "_active"):
            self._driver._active = self._saved_active


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local memory (spills) per thread, from ``cuobjdump -res-usage``."""
    import shutil

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    exe = str(tool) if tool.is_file() else shutil.which("cuobjdump")
    if exe is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([exe, "-res-usage", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"cuobjdump_error": (proc.stdout + proc.stderr)[-1000:]}

    def grab(key: str) -> int:
        m = re.search(rf"\b{key}:(\d+)", proc.stdout)
        return int(m.group(1)) if m else -1

    return dict(registers=grab("REG"), stack=grab("STACK"), local=grab("LOCAL"))


def _access_bytes(op: str) -> int:
    """Bytes one thread moves with a PTX ``ld``/``st`` op such as ``ld.global.nc.v4.b32``."""
    m = re.search(r"\.(?:v(\d+)\.)?[bfsu](\d+)$", op)
    if not m:
        return 0
    return int(m.group(1) or 1) * int(m.group(2)) // 8


def ptx_memory_ops(ptx: str) -> dict:
    """Global loads and stores in the PTX: counts, and how many move 16 and 8 bytes per thread."""
    loads = [_access_bytes(op) for op in re.findall(r"ld\.global[\w.]*", ptx)]
    stores = [_access_bytes(op) for op in re.findall(r"st\.global[\w.]*", ptx)]
    return dict(
        loads=len(loads),
        stores=len(stores),
        loads_16B=loads.count(16),
        loads_8B=loads.count(8),
        stores_16B=stores.count(16),
        stores_8B=stores.count(8),
    )


# --------------------------------------------------------------------------------------------
# The variants: what the package launches (sampler, q_sample, randn, the U-Net's GroupNorm)
# --------------------------------------------------------------------------------------------


def _variants() -> list[tuple[str, Callable[[], None], dict]]:
    """``(name, launch, facts)`` per variant; ``facts`` are recorded in the report (e.g. which GroupNorm
    path the shape takes: ``two_sweep`` when channels-per-group x next_pow2(H*W) exceeds one tile)."""
    import torch
    from fastddpm.kernels import groupnorm

    from fastddpm import _layout as L
    from fastddpm.backends import triton as tb

    B, N = 4, 3 * 32 * 32  # a CIFAR-sized sample: N % 16 == 0 and 16-byte aligned rows

    def step(dtype, clip, var, noise, x0_only=False, write_x0=True):
        def go():
            x = torch.randn(B, N).to(dtype)
            mo = torch.randn(B, 2 * N).to(dtype)
            m, v = mo[:, :N], (mo[:, N:] if var == L.VAR_LEARNED else None)
            z = torch.randn(B, N) if noise == L.NOISE_TENSOR else None
            prev = torch.empty(B, N, dtype=dtype)
            x0 = torch.empty(B, N, dtype=torch.float32 if x0_only else dtype) if (write_x0 or x0_only) else None
            coef = torch.rand(8, L.NCOEF)
            tval = torch.arange(8, dtype=torch.int64)
            rows = torch.arange(B, dtype=torch.int64)
            thresh = torch.ones(B) if clip == L.CLIP_THRESHOLD else None
            rng = torch.tensor([1, 0], dtype=torch.int64)
            tb.step(x, m, v, z, prev, x0, coef, tval, rows, thresh, rng, clip_mode=clip, clip_range=1.0,
                    var_mode=var, noise_mode=noise, x0_only=x0_only)  # fmt: skip

        return go

    def q_sample(dtype, noise):
        def go():
            x0 = torch.randn(B, N).to(dtype)
            z = torch.randn(B, N).to(dtype) if noise == L.NOISE_TENSOR else None
            out = torch.empty(B, N, dtype=dtype)
            table = torch.rand(1000, 2)
            t = torch.arange(B, dtype=torch.int64)
            rng = torch.tensor([1, 0], dtype=torch.int64)
            tb.q_sample(x0, z, out, table, t, rng, noise_mode=noise)

        return go

    def randn(dtype, stream):
        def go():
            out = torch.empty(B, N, dtype=dtype)
            tb.randn(out, torch.arange(B, dtype=torch.int64), torch.tensor([1, 0], dtype=torch.int64), stream=stream)

        return go

    def group_norm(dtype, c, hw, add, silu, channels_last=False):
        block_c, block_s, _ = groupnorm._launch_config(c // 32, hw * hw)
        facts = dict(two_sweep=hw * hw > block_s, block_c=block_c, block_s=block_s)

        def go():
            x = torch.randn(2, c, hw, hw).to(dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            w, b = torch.randn(c), torch.randn(c)
            e = torch.randn(2, c) if add else None
            groupnorm.group_norm_silu(x, w, b, 32, 1e-6, add=e, silu=silu)

        return go, facts

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    out: list[tuple[str, Callable[[], None], dict]] = []
    for dt, name in ((f32, "fp32"), (bf16, "bf16"), (f16, "fp16")):
        out.append((f"step/{name}/range/fixed/philox", step(dt, L.CLIP_RANGE, L.VAR_FIXED, L.NOISE_PHILOX), {}))
    out += [
        (name, go, {})
        for name, go in [
            ("step/fp32/none/learned/tensor", step(f32, L.CLIP_NONE, L.VAR_LEARNED, L.NOISE_TENSOR)),
            ("step/bf16/threshold/learned/philox", step(bf16, L.CLIP_THRESHOLD, L.VAR_LEARNED, L.NOISE_PHILOX)),
            ("step/fp32/range/fixed/none", step(f32, L.CLIP_RANGE, L.VAR_FIXED, L.NOISE_NONE, write_x0=False)),
            ("step/fp32/x0_only", step(f32, L.CLIP_RANGE, L.VAR_FIXED, L.NOISE_NONE, x0_only=True, write_x0=False)),
            ("q_sample/fp32/philox", q_sample(f32, L.NOISE_PHILOX)),
            ("q_sample/bf16/tensor", q_sample(bf16, L.NOISE_TENSOR)),
            ("randn/fp32/step", randn(f32, L.STREAM_STEP)),
            ("randn/bf16/init", randn(bf16, L.STREAM_INIT)),
        ]
    ]

    def multistep(dtype, clip, noise, x0_only=False):
        def go():
            x = torch.randn(B, N)
            m = torch.randn(B, N).to(dtype)
            xp, hist = torch.randn(B, N), torch.randn(L.MS_HIST, B, N)
            z = torch.randn(B, N) if noise == L.NOISE_TENSOR else None
            x0 = torch.empty(B, N) if x0_only else None
            coef = torch.rand(8, L.NMS)
            tval = torch.arange(8, dtype=torch.int64)
            step = torch.tensor([3], dtype=torch.int64)
            thresh = torch.ones(B) if clip == L.CLIP_THRESHOLD else None
            rng = torch.tensor([1, 0], dtype=torch.int64)
            tb.multistep(x, m, None if x0_only else xp, None if x0_only else hist, z, x0, coef, tval, step, thresh,
                         rng, clip_mode=clip, clip_range=1.0, noise_mode=noise, x0_only=x0_only)  # fmt: skip

        return go

    # The few-step solvers' fused step (DPM-Solver++ / UniPC): SDE noise in the kernel, thresholding, x0 pass.
    out += [
        ("multistep/fp32/none/philox", multistep(f32, L.CLIP_NONE, L.NOISE_PHILOX), {}),
        ("multistep/bf16/threshold/none", multistep(bf16, L.CLIP_THRESHOLD, L.NOISE_NONE), {}),
        ("multistep/fp16/range/tensor", multistep(f16, L.CLIP_RANGE, L.NOISE_TENSOR), {}),
        ("multistep/fp32/x0_only", multistep(f32, L.CLIP_RANGE, L.NOISE_NONE, x0_only=True), {}),
    ]
    # The U-Net's GroupNorms: one-tile shapes (32x32 and smaller) and, from 64x64 up (any 64x64 or larger
    # model), the two-sweep path; both layouts and every dtype.
    for name, args in [
        ("group_norm/fp32/c128/32x32/add+silu", (f32, 128, 32, True, True)),
        ("group_norm/bf16/c256/8x8/silu", (bf16, 256, 8, False, True)),
        ("group_norm/fp16/c512/4x4/plain", (f16, 512, 4, False, False)),
        ("group_norm/bf16/c128/32x32/add+silu/channels_last", (bf16, 128, 32, True, True, True)),
        ("group_norm/fp32/c128/64x64/add+silu", (f32, 128, 64, True, True)),
        ("group_norm/bf16/c128/64x64/add+silu/channels_last", (bf16, 128, 64, True, True, True)),
        ("group_norm/fp16/c256/64x64/silu", (f16, 256, 64, False, True)),
    ]:
        go, facts = group_norm(*args)
        out.append((name, go, facts))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", help="SM version(s) to compile for (default 90 and 80)")
    p.add_argument("--only", default=None, help="only variants whose name contains this")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: kernels would be interpreted, not compiled", file=sys.stderr)
        return 2
    try:
        import fastddpm.kernels  # noqa: F401  (installed: setup.py maps kernels/ into the package)
    except ImportError:  # a plain checkout: alias kernels/ and csrc/ as benchmarks/gpu_check.py does
        sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
        import gpu_check

        gpu_check.ensure_package_aliases()
    import triton
    from fastddpm.kernels import groupnorm

    groupnorm._kernel_can_run = lambda x: True  # CPU tensors: compile instead of the torch fallback
    report = dict(triton=triton.__version__, variants=[])
    failed = 0
    for arch in args.arch or [90, 80]:
        for name, go, facts in _variants():
            if args.only and args.only not in name:
                continue
            t0 = time.perf_counter()
            entry = dict(name=name, arch=arch, **facts)
            try:
                with CompileOnly(arch) as ctx:
                    go()
                if not ctx.compiled:
                    raise RuntimeError("no kernel was launched")
                for _, kernel in ctx.compiled:
                    ptx = kernel.asm["ptx"]
                    entry.update(ptx_memory_ops(ptx), **resource_usage(kernel.asm["cubin"]), shared=kernel.metadata.shared,
                                 num_warps=kernel.metadata.num_warps, cubin_bytes=len(kernel.asm["cubin"]))  # fmt: skip
                entry["ok"] = True
            except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
                entry.update(ok=False, error=f"{type(e).__name__}: {str(e)[:3000]}")
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            failed += not entry["ok"]
            report["variants"].append(entry)
            shown = {k: entry.get(k) for k in ("registers", "stack", "local", "loads", "loads_16B", "loads_8B",
                                               "stores", "stores_16B", "stores_8B", "shared", "num_warps")}  # fmt: skip
            print(f"sm_{arch} {name:52s} {'ok  ' if entry['ok'] else 'FAIL'} {entry['seconds']:5.1f}s {shown}"
                  + ("" if entry["ok"] else f"\n    {entry.get('error')}"), flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"triton {triton.__version__}: {len(report['variants']) - failed} compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
