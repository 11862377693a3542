"""``dtype="auto"``: the U-Net's compute dtype for sampling, chosen per CPU and model.

On CPUs with native bf16 arithmetic (AVX512-BF16 or AMX-BF16) oneDNN runs bf16 convolutions and
matmuls far faster than fp32 on large enough layers (``ddpm-cifar10`` at batch 4, channels_last, on an
AVX512-BF16 EPYC: 195.6 -> 114.8 ms per forward), while small models get slower (the digits U-Net at
batch 64: 17.8 -> 21.0 ms). Without native bf16, bf16 is emulated and many times slower. So ``"auto"``:

* on CUDA (and any device but the CPU): float32, the model's own arithmetic;
* on a CPU without native bf16: float32;
* on a CPU with it, for models of at least ``MIN_PARAMS`` parameters (smaller ones never gained in our
  measurements, and their timings are too short to be trusted on a busy machine): a quick timing of the
  model's forward on the sampling shapes, float32 and bf16 autocast alternated, median of ``REPS`` each;
  bf16 only if it is at least ``MIN_SPEEDUP`` times faster, and only for forwards long enough to matter
  (``MIN_FP32_MS``). The choice is cached per (CPU, torch version, model, shape) in
  memory and in ``~/.cache/fastddpm/dtype_choices.json`` (``FASTDDPM_CACHE_DIR`` overrides the folder),
  so a machine keeps making the same choice, and so the same images, run after run.

The step math is float32 whatever the U-Net's dtype. The quality cost of bf16 on the bundled model is
measured in ``benchmarks/bf16_cpu.py`` (README, "bf16 on the CPU").
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["DtypeChoice", "cpu_bf16_features", "parse_dtype", "resolve_dtype"]

#: bf16 is chosen only when its forward is at least this many times faster than fp32's.
MIN_SPEEDUP = 1.2
#: Models with fewer parameters stay float32 without timing (the 0.95 M-parameter digits U-Net got slower in
#: bf16 on an AVX512-BF16 EPYC; the 35.7 M-parameter CIFAR-10 U-Net 1.7x faster).
MIN_PARAMS = 5_000_000
#: Timed forwards per dtype (after one warm-up each), alternated; the median is compared.
REPS = 3
#: Forwards faster than this in fp32 are not timed further: too small to gain from bf16.
MIN_FP32_MS = 30.0

_NAMES = {
    "auto": "auto",
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(dtype: Any) -> torch.dtype | str:
    """``"auto"``, or the model dtype asked for: ``None``/``"fp32"``/``torch.float32`` -> float32,
    ``"bf16"``/``torch.bfloat16``, ``"fp16"``/``torch.float16``. Anything else raises ValueError."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
        raise ValueError(f"dtype={dtype} is not supported; allowed: 'auto', float32, bfloat16, float16")
    if isinstance(dtype, str) and dtype.lower() in _NAMES:
        return _NAMES[dtype.lower()]
    raise ValueError(f"dtype={dtype!r} is not supported; allowed: 'auto', 'fp32', 'bf16', 'fp16' (or torch dtypes)")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def cpu_bf16_features() -> dict[str, Any]:
    """What this CPU offers for bf16: ``{"cpu": name, "avx512_bf16": bool, "amx_bf16": bool,
    "native_bf16": bool, "capability": torch's CPU kernel level}`` (Linux ``/proc/cpuinfo`` flags;
    elsewhere the flags read as absent, so ``"auto"`` stays float32)."""
    flags = _cpu_flags()
    avx512_bf16 = "avx512_bf16" in flags
    amx_bf16 = "amx_bf16" in flags
    return {
        "cpu": _cpu_name(),
        "avx512_bf16": avx512_bf16,
        "amx_bf16": amx_bf16,
        "native_bf16": avx512_bf16 or amx_bf16,
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


@dataclass(frozen=True)
class DtypeChoice:
    """The U-Net dtype chosen by :func:`resolve_dtype`: ``dtype`` (float32 means no autocast), a one-line
    ``reason``, and the timings behind it (ms per forward; None where not measured)."""

    dtype: torch.dtype
    reason: str
    fp32_ms: float | None = None
    bf16_ms: float | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.dtype == torch.float32 else self.dtype


_MEMORY: dict[str, DtypeChoice] = {}


def _cache_file() -> Path:
    root = os.environ.get("FASTDDPM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastddpm")
    return Path(root) / "dtype_choices.json"


def _model_key(model: Any) -> str:
    """A stable description of the model: its class, config and parameter shapes/dtypes/layouts."""
    parts = [type(model).__qualname__]
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg) if isinstance(cfg, dict) else None
        parts.append(json.dumps(cfg_dict, sort_keys=True, default=str) if cfg_dict is not None else repr(cfg))
    if isinstance(model, torch.nn.Module):
        for name, p in model.named_parameters():
            cl = p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            parts.append(f"{name}:{tuple(p.shape)}:{p.dtype}:{'cl' if cl else ''}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _load_disk() -> dict[str, Any]:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_disk(key: str, choice: DtypeChoice) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_disk()
        data[key] = {
            "dtype": str(choice.dtype).replace("torch.", ""),
            "reason": choice.reason,
            "fp32_ms": choice.fp32_ms,
            "bf16_ms": choice.bf16_ms,
        }
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only home: the in-memory cache still holds it
        pass


def _median_ms(forward: Callable[[], Any], reps: int) -> float:
    """Median of ``reps`` timed calls, in ms (the caller warms up)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        forward()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def resolve_dtype(
    dtype: Any,
    model: Callable[..., Any],
    example: torch.Tensor,
    timestep: int = 500,
    *,
    measure: Callable[[torch.dtype], float] | None = None,
) -> DtypeChoice:
    """The U-Net compute dtype for ``dtype`` (``"auto"`` or an explicit one, see :func:`parse_dtype`).

    Args:
        model: the denoiser, called as ``model(x, t)`` (diffusers-style outputs are fine).
        example: one input batch as the sampler will feed it (shape ``[B, C, H, W]``, float32, its device
            and memory format); used only for the timing of ``"auto"`` on a native-bf16 CPU.
        timestep: the timestep passed while timing.
        measure: for tests, a function ``dtype -> ms per forward`` replacing the real timing.
    Returns:
        a :class:`DtypeChoice`; ``.autocast_dtype`` is what the sampler's autocast takes (None: fp32).
    """
    asked = parse_dtype(dtype)
    if asked != "auto":
        return DtypeChoice(asked, "asked for")
    if example.device.type != "cpu":
        return DtypeChoice(torch.float32, f"auto on {example.device.type}: float32")
    feats = cpu_bf16_features()
    if not feats["native_bf16"]:
        return DtypeChoice(torch.float32, "auto: this CPU has no native bf16 (AVX512-BF16/AMX), float32")
    n_params = sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else 0
    if measure is None and n_params < MIN_PARAMS:
        return DtypeChoice(
            torch.float32, f"auto: {n_params / 1e6:.2f} M parameters < {MIN_PARAMS / 1e6:.0f} M, too small to gain"
        )
    key = "|".join(
        (
            feats["cpu"],
            str(torch.__version__),
            str(torch.get_num_threads()),
            _model_key(model),
            str(tuple(example.shape)),
        )
    )
    if measure is None and key in _MEMORY:
        return _MEMORY[key]
    if measure is None:
        saved = _load_disk().get(key)
        if isinstance(saved, dict) and saved.get("dtype") in ("float32", "bfloat16"):
            choice = DtypeChoice(
                getattr(torch, saved["dtype"]),
                str(saved.get("reason", "cached")) + " (cached)",
                saved.get("fp32_ms"),
                saved.get("bf16_ms"),
            )
            _MEMORY[key] = choice
            return choice
        measure = _real_measure(model, example, timestep)
    fp32_ms = measure(torch.float32)
    if fp32_ms < MIN_FP32_MS:
        choice = DtypeChoice(
            torch.float32, f"auto: fp32 forward {fp32_ms:.1f} ms < {MIN_FP32_MS:.0f} ms, too small to gain", fp32_ms
        )
    else:
        bf16_ms = measure(torch.bfloat16)
        faster = bf16_ms * MIN_SPEEDUP <= fp32_ms
        choice = DtypeChoice(
            torch.bfloat16 if faster else torch.float32,
            f"auto: native bf16, forward {fp32_ms:.1f} ms fp32 vs {bf16_ms:.1f} ms bf16 -> "
            + ("bf16 autocast" if faster else "float32"),
            fp32_ms,
            bf16_ms,
        )
    _MEMORY[key] = choice
    _save_disk(key, choice)
    return choice


def _real_measure(model: Callable[..., Any], example: torch.Tensor, timestep: int) -> Callable[[torch.dtype], float]:
    """``dtype -> median ms per forward``; the first call times both dtypes alternated (so a machine's
    drift hits both alike) and the second returns the stored bf16 figure."""
    from .sampling import model_call

    t = torch.full((example.shape[0],), int(timestep), dtype=torch.int64, device=example.device)
    x = torch.randn(example.shape, generator=torch.Generator().manual_seed(0)).to(example.device)
    if example.dim() == 4 and example.is_contiguous(memory_format=torch.channels_last) and not example.is_contiguous():
        x = x.contiguous(memory_format=torch.channels_last)

    def forward(dtype: torch.dtype) -> Callable[[], Any]:
        def run():
            with torch.no_grad():
                if dtype == torch.float32:
                    return model_call(model, x, t)
                with torch.autocast("cpu", dtype=dtype):
                    return model_call(model, x, t)

        return run

    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}

    def measure(dtype: torch.dtype) -> float:
        if not times[torch.float32]:
            for d in times:  # warm-up
                forward(d)()
            for _ in range(REPS):
                for d in times:
                    times[d].append(_median_ms(forward(d), 1))
        vals = sorted(times[dtype])
        return vals[len(vals) // 2]

    return measure
