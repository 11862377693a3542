"""Triton backend: launchers of the kernels in :mod:`fastddpm.kernels`.

Inputs arrive from :mod:`fastddpm.ops` already viewed as ``[B, N]`` with unit stride inside a
sample (see :mod:`fastddpm.backends` for the argument contract); nothing here reshapes or copies.
Everything that changes from one step to the next (row index, coefficients, timestep values,
thresholds, seed, sample offset) is read by the kernels from device memory, so a launch can be
captured in a CUDA graph and replayed.

On CPU tensors the kernels run only in the Triton interpreter, which is chosen when the kernel
modules are first imported with ``TRITON_INTERPRET=1`` in the environment.

Every launch passes ``enable_fp_fusion=False`` (``philox.LAUNCH_OPTIONS``): the kernels follow the
float32 operation order of the "Bitwise rules" of :mod:`fastddpm._layout`, so their results are
bitwise those of the other backends. Row and timestep indices are bounds-checked on the device:
a bad one gives NaN outputs for that sample (as the CUDA kernels), never an out-of-bounds read.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

from .. import _layout as L

__all__ = ["available", "multistep", "q_sample", "randn", "step", "triton_compiles_for_cuda"]

_MAX_GRID_Y = 65535  # CUDA limit of gridDim.y; larger batches are split into several launches
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ANY_FLOAT = (*_FLOAT_DTYPES, torch.float64)
_CLIP_MODES = (L.CLIP_NONE, L.CLIP_RANGE, L.CLIP_THRESHOLD)
_VAR_MODES = (L.VAR_FIXED, L.VAR_LEARNED)
_NOISE_MODES = (L.NOISE_NONE, L.NOISE_TENSOR, L.NOISE_PHILOX)
_STREAMS = (L.STREAM_STEP, L.STREAM_QSAMPLE, L.STREAM_INIT)


@functools.cache
def _kernels() -> types.SimpleNamespace:
    """Import the kernel modules once (imports triton; raises ImportError when it is missing)."""
    import triton

    from fastddpm.kernels import ddpm_step, multistep, philox, q_sample, randn

    return types.SimpleNamespace(
        triton=triton,
        step=ddpm_step.ddpm_step_kernel,
        q_sample=q_sample.q_sample_kernel,
        randn=randn.randn_kernel,
        multistep=multistep.multistep_kernel,
        block_config=philox.block_config,
        launch_options=philox.LAUNCH_OPTIONS,
    )


def _interpreted(kernel: object) -> bool:
    """True when ``kernel`` was built by the Triton interpreter (runs on CPU tensors)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported triton has it
        return False
    return isinstance(kernel, InterpretedFunction)


def triton_compiles_for_cuda(kernel: object | None = None) -> bool:
    """Whether Triton kernels compile for the GPU here, i.e. were not built by the interpreter.

    ``TRITON_INTERPRET=1`` in the environment when triton is first imported makes every
    ``@triton.jit`` function an interpreted one; launched on CUDA tensors it still runs, slowly, in
    numpy on the host. Every Triton path that decides "CUDA tensor -> Triton kernel" (the step
    backend here, the fused GroupNorm) asks this first and treats ``False`` as "not available on
    CUDA". ``kernel``: the ``@triton.jit`` function to ask about (default: the step kernel); ``False``
    when triton is not importable.
    """
    try:
        if kernel is None:
            kernel = _kernels().step
    except Exception:  # ImportError, or a triton that fails to initialise
        return False
    return not _interpreted(kernel)


def available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the Triton kernels can run here, and if not, why.

    Args:
        device: the device of the tensors to be processed. ``None`` asks whether the backend
            can run on any device of this machine (a CUDA GPU, or CPU through the interpreter).
    Returns:
        ``(ok, reason)``; ``reason`` says what was found or what is missing. Kernels built by the
        interpreter (``TRITON_INTERPRET=1``) run on CPU tensors only: CUDA is then reported
        unavailable (they would run interpreted, on the host, on CUDA tensors).
    """
    try:
        k = _kernels()
    except Exception as exc:  # ImportError, or a triton that fails to initialise
        return False, f"triton is not importable: {type(exc).__name__}: {exc}"
    interpreted = _interpreted(k.step)
    dev = None if device is None else torch.device(device)
    if interpreted and (dev is None or dev.type == "cpu"):
        return True, f"triton {k.triton.__version__} interpreter (TRITON_INTERPRET=1)"
    if dev is not None and dev.type == "cpu":
        return False, (
            "tensors are on CPU and the Triton kernels were not built by the interpreter "
            "(set TRITON_INTERPRET=1 before triton is first imported, or use the cpu backend)"
        )
    if dev is not None and dev.type != "cuda":
        return False, f"the triton backend runs on CUDA (or CPU via the interpreter), not on {dev.type}"
    if interpreted:
        return False, (
            "TRITON_INTERPRET=1: the Triton kernels were built by the interpreter and would run on the host, "
            "not compiled for the GPU (unset TRITON_INTERPRET before triton is first imported)"
        )
    if not torch.cuda.is_available():
        return False, "no CUDA device is available and TRITON_INTERPRET is not set"
    return True, f"triton {k.triton.__version__} on {torch.cuda.get_device_name(dev)}"


# --- argument checks (cheap: shapes, strides and dtypes only, never data) ------------------------


def _check_bn(
    name: str, t: torch.Tensor, shape: tuple[int, int], device: torch.device, dtypes: tuple = _FLOAT_DTYPES
) -> None:
    if t.dim() != 2 or tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape [B, N] = {list(shape)}, got {list(t.shape)}")
    if shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride inside a sample (stride(1) == 1), got strides {t.stride()}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of the sample)")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_vec(name: str, t: torch.Tensor, n: int | None, dtype: torch.dtype, device: torch.device) -> None:
    if t.dim() != 1 or (n is not None and t.shape[0] != n):
        want = "[B]" if n is None else f"[{n}]"
        raise ValueError(f"{name} must be a 1-D tensor {want}, got shape {list(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of the sample)")


def _check_rng(rng: torch.Tensor, device: torch.device) -> None:
    _check_vec("rng", rng, 2, torch.int64, device)
    if rng.stride(0) != 1:
        raise ValueError("rng must be contiguous [seed, sample_offset]")


def _check_mode(name: str, value: int, allowed: tuple[int, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _device_guard(device: torch.device):
    """Make ``device`` current while launching, so multi-GPU processes launch on the right one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _batch_chunks(batch: int):
    """``(b_base, count)`` of each launch: gridDim.y caps the samples per launch."""
    for b_base in range(0, batch, _MAX_GRID_Y):
        yield b_base, min(_MAX_GRID_Y, batch - b_base)


# --- launchers -----------------------------------------------------------------------------------


def step(
    x: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor | None,
    noise: torch.Tensor | None,
    prev_out: torch.Tensor | None,
    x0_out: torch.Tensor | None,
    coef: torch.Tensor,
    tval: torch.Tensor,
    rows: torch.Tensor,
    thresh: torch.Tensor | None,
    rng: torch.Tensor,
    *,
    clip_mode: int,
    clip_range: float,
    var_mode: int,
    noise_mode: int,
    x0_only: bool,
) -> None:
    """One fused reverse step on ``[B, N]`` views; writes ``prev_out`` and/or ``x0_out`` in place.

    See :mod:`fastddpm.backends` for the arguments and :mod:`fastddpm._layout` for the math.
    """
    k = _kernels()
    _check_mode("clip_mode", clip_mode, _CLIP_MODES)
    _check_mode("var_mode", var_mode, _VAR_MODES)
    _check_mode("noise_mode", noise_mode, _NOISE_MODES)
    if x.dim() != 2:
        raise ValueError(f"x must be a [B, N] view, got shape {list(x.shape)}")
    shape, dev = (x.shape[0], x.shape[1]), x.device
    batch, numel = shape
    _check_bn("x", x, shape, dev)
    _check_bn("m", m, shape, dev)
    if x0_only:
        if x0_out is None:
            raise ValueError("x0_only needs x0_out (float32)")
        if x0_out.dtype != torch.float32:
            raise ValueError(f"x0_only writes a float32 x0, got x0_out of {x0_out.dtype}")
    elif prev_out is None:
        raise ValueError("prev_out is required unless x0_only")
    uses_v = var_mode == L.VAR_LEARNED and noise_mode != L.NOISE_NONE and not x0_only
    uses_noise = noise_mode == L.NOISE_TENSOR and not x0_only
    uses_thresh = clip_mode == L.CLIP_THRESHOLD and not x0_only
    if var_mode == L.VAR_LEARNED and v is None:
        raise ValueError("var_mode VAR_LEARNED needs v (the model's variance channels)")
    if noise_mode == L.NOISE_TENSOR and noise is None:
        raise ValueError("noise_mode NOISE_TENSOR needs a noise tensor")
    if uses_thresh and thresh is None:
        raise ValueError("clip_mode CLIP_THRESHOLD needs thresh (the per-sample threshold s)")
    for name, t in (("v", v), ("prev_out", prev_out), ("x0_out", x0_out)):
        if t is not None:
            _check_bn(name, t, shape, dev)
    if noise is not None:
        _check_bn("noise", noise, shape, dev, _ANY_FLOAT)
    if coef.dim() != 2 or coef.shape[1] != L.NCOEF or coef.dtype != torch.float32 or not coef.is_contiguous():
        raise ValueError(f"coef must be a contiguous float32 [R, {L.NCOEF}] table, got {coef.dtype} {list(coef.shape)}")
    if coef.device != dev:
        raise ValueError(f"coef is on {coef.device}, expected {dev} (the device of the sample)")
    _check_vec("tval", tval, coef.shape[0], torch.int64, dev)
    _check_vec("rows", rows, batch, torch.int64, dev)
    if uses_thresh:
        _check_vec("thresh", thresh, batch, torch.float32, dev)
    _check_rng(rng, dev)
    if batch == 0 or numel == 0:
        return

    write_x0 = x0_out is not None
    block_g, num_warps = k.block_config(numel)
    grid_x = k.triton.cdiv(k.triton.cdiv(numel, 4), block_g)
    # Pointers a mode does not read are replaced by x (never dereferenced; constexpr-pruned).
    v_arg = v if uses_v else x
    noise_arg = noise if uses_noise else x
    thresh_arg = thresh if uses_thresh else coef
    prev_arg = x0_out if x0_only else prev_out
    x0_arg = x0_out if write_x0 else x
    with _device_guard(dev):
        for b_base, count in _batch_chunks(batch):
            k.step[(grid_x, count)](
                x,
                m,
                v_arg,
                noise_arg,
                prev_arg,
                x0_arg,
                coef,
                tval,
                rows,
                thresh_arg,
                rng,
                numel,
                coef.shape[0],
                b_base,
                x.stride(0),
                m.stride(0),
                v_arg.stride(0),
                noise_arg.stride(0),
                prev_arg.stride(0),
                x0_arg.stride(0),
                rows.stride(0),
                tval.stride(0),
                thresh_arg.stride(0),
                float(clip_range),
                CLIP_MODE=clip_mode,
                VAR_MODE=var_mode,
                NOISE_MODE=noise_mode,
                X0_ONLY=bool(x0_only),
                WRITE_X0=write_x0,
                BLOCK_G=block_g,
                num_warps=num_warps,
                **k.launch_options,
            )


def q_sample(
    x0: torch.Tensor,
    noise: torch.Tensor | None,
    out: torch.Tensor,
    table: torch.Tensor,
    t: torch.Tensor,
    rng: torch.Tensor,
    *,
    noise_mode: int,
) -> None:
    """``out = table[t, 0] * x0 + table[t, 1] * z`` on ``[B, N]`` views, in place.

    ``z`` is ``noise`` (NOISE_TENSOR) or the counter-based normal of stream ``STREAM_QSAMPLE``
    with counter timestep ``t[b]`` (NOISE_PHILOX). See :mod:`fastddpm.backends`.
    """
    k = _kernels()
    _check_mode("noise_mode", noise_mode, (L.NOISE_TENSOR, L.NOISE_PHILOX))
    if x0.dim() != 2:
        raise ValueError(f"x0 must be a [B, N] view, got shape {list(x0.shape)}")
    shape, dev = (x0.shape[0], x0.shape[1]), x0.device
    batch, numel = shape
    _check_bn("x0", x0, shape, dev)
    _check_bn("out", out, shape, dev)
    if noise_mode == L.NOISE_TENSOR:
        if noise is None:
            raise ValueError("noise_mode NOISE_TENSOR needs a noise tensor")
        _check_bn("noise", noise, shape, dev, _ANY_FLOAT)
    if table.dim() != 2 or table.shape[1] != 2 or table.dtype != torch.float32 or not table.is_contiguous():
        raise ValueError(f"table must be a contiguous float32 [T, 2] table, got {table.dtype} {list(table.shape)}")
    if table.device != dev:
        raise ValueError(f"table is on {table.device}, expected {dev} (the device of x0)")
    _check_vec("t", t, batch, torch.int64, dev)
    _check_rng(rng, dev)
    if batch == 0 or numel == 0:
        return

    noise_arg = noise if noise_mode == L.NOISE_TENSOR else x0
    block_g, num_warps = k.block_config(numel)
    grid_x = k.triton.cdiv(k.triton.cdiv(numel, 4), block_g)
    with _device_guard(dev):
        for b_base, count in _batch_chunks(batch):
            k.q_sample[(grid_x, count)](
                x0,
                noise_arg,
                out,
                table,
                t,
                rng,
                numel,
                table.shape[0],
                b_base,
                x0.stride(0),
                noise_arg.stride(0),
                out.stride(0),
                t.stride(0),
                NOISE_MODE=noise_mode,
                BLOCK_G=block_g,
                num_warps=num_warps,
                **k.launch_options,
            )


def randn(out: torch.Tensor, t: torch.Tensor, rng: torch.Tensor, *, stream: int) -> None:
    """Fill ``out[b, e]`` with the counter-based normal of ``(seed, sample_offset + b, t[b], e, stream)``.

    ``out`` is ``[B, N]`` (any float dtype, unit stride inside a sample), ``t`` int64 ``[B]``
    (stride 0 allowed), ``rng`` int64 ``[seed, sample_offset]``. See :mod:`fastddpm.backends`.
    """
    k = _kernels()
    _check_mode("stream", stream, _STREAMS)
    if out.dim() != 2:
        raise ValueError(f"out must be a [B, N] view, got shape {list(out.shape)}")
    shape, dev = (out.shape[0], out.shape[1]), out.device
    batch, numel = shape
    _check_bn("out", out, shape, dev, _ANY_FLOAT)
    _check_vec("t", t, batch, torch.int64, dev)
    _check_rng(rng, dev)
    if batch == 0 or numel == 0:
        return

    block_g, num_warps = k.block_config(numel)
    grid_x = k.triton.cdiv(k.triton.cdiv(numel, 4), block_g)
    with _device_guard(dev):
        for b_base, count in _batch_chunks(batch):
            k.randn[(grid_x, count)](
                out,
                t,
                rng,
                numel,
                b_base,
                out.stride(0),
                t.stride(0),
                STREAM=stream,
                BLOCK_G=block_g,
                num_warps=num_warps,
                **k.launch_options,
            )


def check_multistep_args(x, m, xp, hist, noise, x0_out, coef, tval, step, thresh, rng, clip_mode, noise_mode, x0_only):
    """Metadata checks of a multistep launch (shared by the triton and compiled launchers; never reads data)."""
    _check_mode("clip_mode", clip_mode, _CLIP_MODES)
    _check_mode("noise_mode", noise_mode, _NOISE_MODES)
    if x.dim() != 2:
        raise ValueError(f"x must be a [B, N] view, got shape {list(x.shape)}")
    shape, dev = (x.shape[0], x.shape[1]), x.device
    _check_bn("x", x, shape, dev, (torch.float32,))
    _check_bn("m", m, shape, dev)
    if x0_only:
        if x0_out is None:
            raise ValueError("x0_only needs x0_out (float32)")
        _check_bn("x0_out", x0_out, shape, dev, (torch.float32,))
    else:
        _check_bn("xp", xp, shape, dev, (torch.float32,))
        if hist.dim() != 3 or tuple(hist.shape) != (L.MS_HIST, *shape) or hist.dtype != torch.float32:
            raise ValueError(f"hist must be a float32 [{L.MS_HIST}, B, N] = {[L.MS_HIST, *shape]} ring, got "
                             f"{hist.dtype} {list(hist.shape)}")  # fmt: skip
        if shape[1] > 1 and hist.stride(2) != 1:
            raise ValueError(f"hist must have unit stride inside a sample, got strides {hist.stride()}")
        if hist.device != dev:
            raise ValueError(f"hist is on {hist.device}, expected {dev} (the device of the sample)")
        if noise_mode == L.NOISE_TENSOR:
            if noise is None:
                raise ValueError("noise_mode NOISE_TENSOR needs a noise tensor")
            _check_bn("noise", noise, shape, dev, _ANY_FLOAT)
        if clip_mode == L.CLIP_THRESHOLD:
            if thresh is None:
                raise ValueError("clip_mode CLIP_THRESHOLD needs thresh (the per-sample threshold s)")
            _check_vec("thresh", thresh, shape[0], torch.float32, dev)
    if coef.dim() != 2 or coef.shape[1] != L.NMS or coef.dtype != torch.float32 or not coef.is_contiguous():
        raise ValueError(f"coef must be a contiguous float32 [S, {L.NMS}] table, got {coef.dtype} {list(coef.shape)}")
    if coef.device != dev:
        raise ValueError(f"coef is on {coef.device}, expected {dev} (the device of the sample)")
    _check_vec("tval", tval, coef.shape[0], torch.int64, dev)
    _check_vec("step", step, 1, torch.int64, dev)
    _check_rng(rng, dev)


def multistep(
    x: torch.Tensor,
    m: torch.Tensor,
    xp: torch.Tensor | None,
    hist: torch.Tensor | None,
    noise: torch.Tensor | None,
    x0_out: torch.Tensor | None,
    coef: torch.Tensor,
    tval: torch.Tensor,
    step: torch.Tensor,
    thresh: torch.Tensor | None,
    rng: torch.Tensor,
    *,
    clip_mode: int,
    clip_range: float,
    noise_mode: int,
    x0_only: bool,
) -> None:
    """One fused multistep-solver step on ``[B, N]`` views; updates ``x``, ``xp`` and ``hist`` in place
    (``x0_only``: writes only ``x0_out``). See :mod:`fastddpm.backends` and ``MS_*`` in :mod:`fastddpm._layout`."""
    k = _kernels()
    check_multistep_args(x, m, xp, hist, noise, x0_out, coef, tval, step, thresh, rng, clip_mode, noise_mode, x0_only)
    batch, numel = x.shape
    if batch == 0 or numel == 0:
        return
    block_g, num_warps = k.block_config(numel)
    grid_x = k.triton.cdiv(k.triton.cdiv(numel, 4), block_g)
    # Pointers a mode does not read are replaced by x (never dereferenced; constexpr-pruned).
    xp_arg = x if x0_only else xp
    hist_arg = x.unsqueeze(0) if x0_only else hist
    noise_arg = noise if (noise_mode == L.NOISE_TENSOR and not x0_only) else x
    x0_arg = x0_out if x0_only else x
    thresh_arg = thresh if (clip_mode == L.CLIP_THRESHOLD and not x0_only) else coef
    with _device_guard(x.device):
        for b_base, count in _batch_chunks(batch):
            k.multistep[(grid_x, count)](
                x, m, xp_arg, hist_arg, noise_arg, x0_arg, coef, tval, step, thresh_arg, rng,
                numel, b_base, x.stride(0), m.stride(0), xp_arg.stride(0), hist_arg.stride(0), hist_arg.stride(1),
                noise_arg.stride(0), x0_arg.stride(0), tval.stride(0), thresh_arg.stride(0), float(clip_range),
                CLIP_MODE=clip_mode, NOISE_MODE=noise_mode, X0_ONLY=bool(x0_only), BLOCK_G=block_g,
                num_warps=num_warps, enable_fp_fusion=False,
            )  # fmt: skip
