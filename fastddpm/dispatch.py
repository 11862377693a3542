"""The one place a backend is chosen.

``backend="auto"`` (or the ``FASTDDPM_BACKEND`` environment variable when the argument is "auto"):
CUDA tensors -> ``triton`` (``cuda`` if triton is missing), CPU tensors -> ``cpu``; float64 always
-> ``reference`` (the fused kernels compute in float32). A backend that cannot run falls back to
``reference`` with ONE warning naming why. A backend asked for by name that cannot run raises.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import warnings

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[tuple[str, str]] = set()


def backend_module(name: str):
    """The launcher module of a fused backend (``fastddpm.backends.<name>``)."""
    return importlib.import_module(f"fastddpm.backends.{name}")


def availability(name: str, device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether backend ``name`` can run tensors on ``device`` here, and if not, why."""
    device = torch.device(device)
    if name == "reference":
        return True, "plain PyTorch"
    if name == "cpu" and device.type != "cpu":
        return False, f"the cpu backend runs CPU tensors, not {device.type}"
    if name == "cuda" and device.type != "cuda":
        return False, f"the cuda backend runs CUDA tensors, not {device.type}"
    try:
        mod = backend_module(name)
    except ImportError as e:  # pragma: no cover - a broken install
        return False, f"cannot import fastddpm.backends.{name}: {e}"
    return mod.available(device) if _takes_device(name) else mod.available()


@functools.cache
def _takes_device(name: str) -> bool:
    """Whether ``fastddpm.backends.<name>.available`` takes the device (asked once: inspect is slow)."""
    return len(inspect.signature(backend_module(name).available).parameters) > 0


# The choice depends only on its arguments and the environment, so torch.compile may evaluate it once
# while tracing and keep the answer (no graph break on the imports and checks inside).
@torch.compiler.assume_constant_result
def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Name of the backend that will run a call on ``device``/``dtype``.

    Raises ``ValueError`` for an unknown name, ``TypeError`` for an unsupported dtype and
    ``RuntimeError`` when a backend asked for by name cannot run here.
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; allowed: {', '.join(repr(b) for b in BACKENDS)}")
    if dtype not in FUSED_DTYPES and dtype != torch.float64:
        raise TypeError(f"unsupported dtype {dtype}; fastddpm ops take float32, float16, bfloat16 or float64 tensors")
    name = requested
    source = "backend="
    if name == "auto":
        env = os.environ.get("FASTDDPM_BACKEND", "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"FASTDDPM_BACKEND={env!r} is not a backend; allowed: {', '.join(BACKENDS)}")
            name, source = env, "FASTDDPM_BACKEND="
    if name != "auto":
        if name != "reference" and dtype == torch.float64:
            raise TypeError(f"the {name} backend computes in float32; use backend='reference' for float64 inputs")
        ok, why = availability(name, device)
        if not ok:
            raise RuntimeError(f"{source}{name!r} cannot run here: {why}")
        return name
    if dtype == torch.float64:
        return "reference"
    candidates = ("triton", "cuda") if device.type == "cuda" else ("cpu",) if device.type == "cpu" else ()
    reasons = []
    for cand in candidates:
        ok, why = availability(cand, device)
        if ok:
            return cand
        reasons.append(f"{cand}: {why}")
    why = "; ".join(reasons) or f"no fused backend for {device.type} tensors"
    key = (device.type, why)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fastddpm: using the slow reference backend for {device.type} tensors ({why})", stacklevel=3)
    return "reference"


GROUPNORM_BACKENDS = ("auto", "torch", "cpu", "triton")
GROUPNORM_LAYOUTS = ("contiguous", "channels_last", "strided")


@functools.cache
def _groupnorm_kernel_availability(name: str, device: torch.device) -> tuple[bool, str]:
    """:func:`availability`, asked once per process and device (every U-Net GroupNorm call asks)."""
    return availability(name, device)


# Same reasoning as resolve_backend: a pure function of its arguments and the environment.
@torch.compiler.assume_constant_result
def resolve_groupnorm_backend(device: torch.device, dtype: torch.dtype, layout: str, requested: str = "auto") -> str:
    """Which kernel runs ``silu(group_norm(x + add))`` (:func:`fastddpm.groupnorm.group_norm_silu`).

    Args:
        device: Device of x.
        dtype: dtype of x.
        layout: ``"contiguous"``, ``"channels_last"`` or ``"strided"`` (:func:`fastddpm.groupnorm.memory_layout`).
        requested: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"triton"``.

    Returns:
        ``"triton"``, ``"cpu"`` or ``"torch"`` (plain PyTorch). ``"auto"`` picks Triton for float32/16/bf16
        CUDA tensors; the C++ kernel for float32 channels_last CPU tensors (PyTorch's CPU group_norm is slow
        on channels_last; on NCHW it is as fast as the fused kernel, so NCHW stays on PyTorch); PyTorch
        otherwise, and always when ``FASTDDPM_FUSED_NORM=0``. A kernel that cannot run falls back to
        PyTorch with ONE warning naming why.

    Raises:
        ValueError: an unknown ``requested`` or ``layout``.
        RuntimeError: a kernel asked for by name cannot run these tensors here (the reason is named).
    """
    if requested not in GROUPNORM_BACKENDS:
        raise ValueError(f"unknown GroupNorm backend {requested!r}; allowed: {', '.join(GROUPNORM_BACKENDS)}")
    if layout not in GROUPNORM_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; allowed: {', '.join(GROUPNORM_LAYOUTS)}")
    device = torch.device(device)
    if requested == "torch":
        return "torch"
    if requested != "auto":
        if requested == "cpu" and dtype != torch.float32:
            raise RuntimeError(f"GroupNorm backend 'cpu' cannot run these tensors: it takes float32, not {dtype}")
        if requested == "triton" and dtype not in FUSED_DTYPES:
            raise RuntimeError(
                f"GroupNorm backend 'triton' cannot run these tensors: it takes {FUSED_DTYPES}, not {dtype}"
            )
        ok, why = _groupnorm_kernel_availability(requested, device)
        if not ok:
            raise RuntimeError(f"GroupNorm backend {requested!r} cannot run here: {why}")
        return requested
    if os.environ.get("FASTDDPM_FUSED_NORM", "1").strip() == "0":
        return "torch"
    if device.type == "cuda" and dtype in FUSED_DTYPES:
        candidate = "triton"
    elif device.type == "cpu" and dtype == torch.float32 and layout == "channels_last":
        candidate = "cpu"
    else:
        return "torch"
    ok, why = _groupnorm_kernel_availability(candidate, device)
    if ok:
        return candidate
    key = ("group_norm", why)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fastddpm: plain PyTorch GroupNorm for {device.type} tensors ({candidate}: {why})", stacklevel=3)
    return "torch"
