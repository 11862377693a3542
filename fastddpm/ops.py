"""Public ops: ``q_sample``, ``ddpm_step``, ``ddim_step`` and ``randn`` on every backend.

Each op validates its inputs, computes the step coefficients once in float64 (device ops, no host
sync), picks a backend (:func:`fastddpm.dispatch.resolve_backend`) and runs either the reference
math or ONE fused pass through a ``torch.library`` custom op (so ``torch.compile(fullgraph=True)``
traces through it). Dynamic thresholding adds one reduction pass (x0 -> per-sample quantile) before
the fused pass.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence

import torch

from . import _layout as L
from . import driver, reference
from ._checks import int_arg, real_arg
from .coefficients import ddim_coefficients, ddpm_coefficients
from .dispatch import backend_module, resolve_backend
from .noise import check_sample_range, check_seed, seed_word
from .schedule import LEARNED_VARIANCES, Schedule

Timestep = int | torch.Tensor


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastddpm::fused_step", mutates_args=())
def _fused_step(
    x: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor | None,
    noise: torch.Tensor | None,
    coef: torch.Tensor,
    tval: torch.Tensor,
    rows: torch.Tensor,
    thresh: torch.Tensor | None,
    rng: torch.Tensor,
    clip_mode: int,
    clip_range: float,
    var_mode: int,
    noise_mode: int,
    write_x0: bool,
    x0_only: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused step on ``[B, N]`` views (see :mod:`fastddpm.backends`). Returns ``(prev, x0)``;
    ``prev`` is empty when ``x0_only``, ``x0`` is empty when neither ``write_x0`` nor ``x0_only``."""
    b, n = x.shape
    prev = x.new_empty((0,)) if x0_only else torch.empty((b, n), dtype=x.dtype, device=x.device)
    if x0_only:
        x0 = torch.empty((b, n), dtype=torch.float32, device=x.device)
    elif write_x0:
        x0 = torch.empty((b, n), dtype=x.dtype, device=x.device)
    else:
        x0 = x.new_empty((0,))
    backend_module(backend).step(
        x, m, v, noise, None if x0_only else prev, x0 if (write_x0 or x0_only) else None,
        coef, tval, rows, thresh, rng,
        clip_mode=clip_mode, clip_range=clip_range, var_mode=var_mode, noise_mode=noise_mode, x0_only=x0_only,
    )  # fmt: skip
    return prev, x0


@_fused_step.register_fake
def _(
    x,
    m,
    v,
    noise,
    coef,
    tval,
    rows,
    thresh,
    rng,
    clip_mode,
    clip_range,
    var_mode,
    noise_mode,
    write_x0,
    x0_only,
    backend,
):
    b, n = x.shape
    prev = x.new_empty((0,)) if x0_only else x.new_empty((b, n))
    if x0_only:
        x0 = x.new_empty((b, n), dtype=torch.float32)
    elif write_x0:
        x0 = x.new_empty((b, n))
    else:
        x0 = x.new_empty((0,))
    return prev, x0


@torch.library.custom_op("fastddpm::fused_q_sample", mutates_args=())
def _fused_q_sample(
    x0: torch.Tensor, noise: torch.Tensor | None, table: torch.Tensor, t: torch.Tensor, rng: torch.Tensor,
    noise_mode: int, backend: str,
) -> torch.Tensor:  # fmt: skip
    """Fused forward noising on a ``[B, N]`` view."""
    out = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    backend_module(backend).q_sample(x0, noise, out, table, t, rng, noise_mode=noise_mode)
    return out


@_fused_q_sample.register_fake
def _(x0, noise, table, t, rng, noise_mode, backend):
    return x0.new_empty(x0.shape)


@torch.library.custom_op("fastddpm::fused_randn", mutates_args=())
def _fused_randn(
    t: torch.Tensor, rng: torch.Tensor, b: int, n: int, stream: int, dtype: torch.dtype, backend: str
) -> torch.Tensor:
    """Counter-based normal ``[b, n]`` (see :mod:`fastddpm._layout`)."""
    out = torch.empty((b, n), dtype=dtype, device=t.device)
    backend_module(backend).randn(out, t, rng, stream=stream)
    return out


@_fused_randn.register_fake
def _(t, rng, b, n, stream, dtype, backend):
    return t.new_empty((b, n), dtype=dtype)


# ----------------------------------------------------------------------------- validation
def _validating() -> bool:
    """Value checks read tensors on the host; skip them while torch.compile traces."""
    return not torch.compiler.is_compiling()


def _check_not_capturing(op: str) -> None:
    """Raise while the current CUDA stream is capturing a graph.

    A public op is not capture-safe: it reads its checks and its seed on the host and builds its
    ``rng`` and coefficient tensors with host-to-device copies, and a captured seed would replay the
    same noise every time. ``fastddpm.sample`` has its own graph runner that keeps the seed, the
    sample offset and the step counter in device memory.
    """
    if torch.compiler.is_compiling():
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"fastddpm.{op} cannot run inside a CUDA graph capture (its seed and checks are read on the "
            f"host, and a captured seed would replay the same noise); capture whole sampling runs with "
            f"fastddpm.sample(..., cuda_graph='on'), whose graph runner keeps the seed and the step on the "
            f"device, or call fastddpm.{op} outside the capture"
        )


def concrete_device(device: torch.device | str) -> torch.device:
    """``device`` with its index filled in (``"cuda"`` -> ``cuda:<current>``): tensors always carry an
    index, and ``torch.device("cuda") != torch.device("cuda:0")``, so device checks compare concrete ones."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_tensor(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16, float64), got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have a batch dimension and at least one more ([B, C, ...]); got shape {tuple(x.shape)}"
        )


_PREV_NOT_SMALLER = "prev_t must be smaller than t (use prev_t=-1 for the final step)"


def _timestep_arg(name: str, t: object) -> int | torch.Tensor | None:
    """``t`` as a Python int (Python or numpy integer) or the tensor itself; ``None`` passes (a
    missing ``prev_t``). Bools and floats raise here, so the int and the tensor paths see the same
    values and give the same errors."""
    if t is None or isinstance(t, torch.Tensor):
        return t
    if isinstance(t, float):
        raise TypeError(f"{name} must be an int or an integer tensor, got the float {t}")
    return int_arg(name, t, allowed="an int or an integer tensor")


def _check_int_range(name: str, t: int, low: int, high: int) -> None:
    int_arg(name, t, low, high)  # the one wording: "t=1000 is out of range [0, 1000)"


def _timesteps(name: str, t: Timestep, batch: int, device: torch.device, low: int, high: int) -> torch.Tensor:
    """Validate ``t`` (an int, or an integer tensor of shape [] / [1] / [B]) -> int64 ``[B]`` on ``device``."""
    t = _timestep_arg(name, t)
    if t is None:
        raise TypeError(f"{name} must be an int or an integer tensor, got None")
    if isinstance(t, int):
        _check_int_range(name, t, low, high)
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must have shape [] or [{batch}] (one timestep per sample), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the sample is on {device}; move it to the same device")
    t = t.to(torch.int64).reshape(-1).expand(batch)
    if _validating() and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < low or hi >= high:
            raise ValueError(f"{name} has values in [{lo}, {hi}], out of range [{low}, {high})")
    return t


def _prev_after(t: torch.Tensor, prev_t: torch.Tensor) -> None:
    if _validating() and bool(((prev_t >= t) & (prev_t >= 0)).any()):
        raise ValueError(_PREV_NOT_SMALLER)


def _int_pair(t: Timestep, prev_t: Timestep | None, T: int, *, default_prev: bool = True) -> tuple[int, int] | None:
    """``(t, prev_t)`` validated as Python ints when both came as ints (the diffusers-style call
    ``step(eps, 500, x)``), else None. Takes the values :func:`_timestep_arg` returns (numpy
    integers already made ints). ``prev_t=None`` means ``t - 1`` only where ``default_prev``
    (DDPM); otherwise the tensor path raises for it. Same errors as the tensor path."""
    if type(t) is not int or not _validating():
        return None
    if not ((prev_t is None and default_prev) or type(prev_t) is int):
        return None
    _check_int_range("t", t, 0, T)
    p = t - 1 if prev_t is None else prev_t
    _check_int_range("prev_t", p, -1, T)
    if p >= t and p >= 0:
        raise ValueError(_PREV_NOT_SMALLER)
    return t, p


def _full_pair(pair: tuple[int, int], batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """An int ``(t, prev_t)`` already validated by :func:`_int_pair` as int64 ``[B]`` tensors (no device read)."""
    return tuple(torch.full((batch,), v, dtype=torch.int64, device=device) for v in pair)


@functools.lru_cache(maxsize=4096)
def _cached_step_row(
    sampler: str, schedule: Schedule, t: int, prev_t: int, eta: float, clipped: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One coefficient row for an int step ``t -> prev_t``: ``(coef [1, NCOEF] float32, tval [1] int64,
    rows [B]-expandable zeros [1])`` on ``device``, computed once in float64 on the CPU and kept.

    This is what makes a call with int timesteps cheap: the float64 step terms, the packing and the
    finiteness check run once per (schedule, t, prev_t), not once per call. A non-finite row raises
    (and is not cached)."""
    tt, pt = torch.tensor([t]), torch.tensor([prev_t])
    if sampler == "ddpm":
        coef = ddpm_coefficients(schedule, tt, pt, check=True)
    else:
        coef = ddim_coefficients(schedule, tt, pt, eta=eta, use_clipped_model_output=clipped, check=True)
    rows = torch.zeros(1, dtype=torch.int64)
    return coef.to(device), tt.to(device), rows.to(device)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` -> ``[B, N]`` with unit inner stride (a view when possible, else a copy)."""
    x2 = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # not -1: a batch or sample of 0 elements
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def _key(seed: int | None, makes_noise: bool) -> int:
    """The generator key of one op call (``seed`` already checked by :func:`check_seed`).

    The one rule for ``seed=None``, the same on every backend: a seed is drawn from torch's global
    CPU generator (``torch.randint``, so ``torch.manual_seed`` makes it repeatable) only when the
    call makes noise in the kernel (``makes_noise``, decided by each op from host-known facts, see
    :func:`ddpm_step`). Otherwise the global generator is left untouched and the key is 0 (unused).
    """
    if seed is not None:
        return seed
    if makes_noise:
        return int(torch.randint(0, 2**62, (1,)).item())
    return 0


def _rng(seed: int, sample_offset: int, device: torch.device) -> torch.Tensor:
    """The device-resident ``rng = [seed, sample_offset]`` int64 ``[2]`` every kernel reads."""
    return torch.tensor([seed_word(seed), sample_offset], dtype=torch.int64, device=device)


def _wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record this call: the fused custom ops have no backward, so such a call
    runs the (differentiable) reference math instead."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """The result of an op on an empty batch (or empty samples): no backend is called."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _check_noise(noise: torch.Tensor | None, sample: torch.Tensor) -> None:
    if noise is None:
        return
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError("noise must be a floating-point tensor")
    if noise.shape != sample.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but the sample has shape {tuple(sample.shape)}")
    if noise.device != sample.device:
        raise ValueError(f"noise is on {noise.device} but the sample is on {sample.device}")


def _split_model_output(model_output: torch.Tensor, sample: torch.Tensor, schedule: Schedule, *, learned_needed: bool):
    """Check shapes and split a 2C-channel output into (eps-like part, variance part)."""
    _check_tensor("model_output", model_output)
    if model_output.device != sample.device:
        raise ValueError(f"model_output is on {model_output.device} but sample is on {sample.device}")
    learned = schedule.variance_type in LEARNED_VARIANCES
    want = list(sample.shape)
    if learned:
        want[1] = 2 * sample.shape[1]
    if list(model_output.shape) != want:
        why = f" (variance_type={schedule.variance_type!r} needs 2C = {want[1]} channels)" if learned else ""
        raise ValueError(
            f"model_output has shape {tuple(model_output.shape)} but the schedule expects {tuple(want)} for a sample of "
            f"shape {tuple(sample.shape)}{why}"
        )
    if model_output.dtype != sample.dtype:
        model_output = model_output.to(sample.dtype)
    if not learned:
        return model_output, None
    b = sample.shape[0]
    m2 = model_output.contiguous().reshape(b, 2, math.prod(model_output.shape[1:]) // 2)
    m, v = m2[:, 0], m2[:, 1]
    return m, (v if learned_needed else None)


def _op_launch(backend: str) -> driver.Launch:
    """A :data:`fastddpm.driver.Launch` through the registered custom op (new output tensors; traceable)."""

    def launch(x, m, v, noise, prev_out, x0_out, coef, tval, rows, thresh, rng, clip_mode, clip_range, var_mode,
               noise_mode, write_x0, x0_only):  # fmt: skip
        return _fused_step(x, m, v, noise, coef, tval, rows, thresh, rng, clip_mode, clip_range, var_mode, noise_mode,
                           write_x0, x0_only, backend)  # fmt: skip

    return launch


def _fused_update(
    sample: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor | None,
    noise: torch.Tensor | None,
    coef: torch.Tensor,
    t: torch.Tensor,
    schedule: Schedule,
    rng: torch.Tensor,
    backend: str,
    *,
    noise_mode: int,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused step (:func:`fastddpm.driver.fused_step`) on ``[B, N]`` views; sample ``b`` uses coefficient
    row ``rows[b]`` (default ``b``) and timestep value ``t[rows[b]]``."""
    b = sample.shape[0]
    x2, m2 = _as_rows(sample), _as_rows(m)
    v2 = _as_rows(v) if v is not None else None
    n2 = _as_rows(noise.to(sample.dtype)) if noise is not None else None
    if rows is None:
        rows = torch.arange(b, dtype=torch.int64, device=sample.device)
    else:
        rows = rows.expand(b)
    prev, x0 = driver.fused_step(_op_launch(backend), x2, m2, v2, n2, coef, t, rows, rng, schedule=schedule,
                                 clip=driver.clip_mode(schedule), noise_mode=noise_mode)  # fmt: skip
    return prev.reshape(sample.shape), x0.reshape(sample.shape)


# ----------------------------------------------------------------------------- public ops
_COMMON_DOC = """
    Seeds, grad and CUDA graphs (every op, every backend):
        * ``seed`` is an int in ``[0, 2**64)`` (Python or numpy integer); ``sample_offset`` an int
          ``>= 0`` with ``sample_offset + B <= 2**56``. Anything else raises, naming the argument.
        * ``seed=None`` draws ONE seed from torch's global CPU generator, and only when the call makes
          noise in the kernel; a call that makes none leaves ``torch.get_rng_state()`` untouched.
        * With grad enabled and an input that requires grad, the op runs the differentiable reference
          math whatever ``backend`` says (the fused kernels have no backward).
        * An empty batch (``B = 0``) returns an empty result of the right shape and dtype.
        * Calling an op while the current CUDA stream is capturing a graph raises ``RuntimeError``:
          the op reads its seed and checks on the host, so capture ``fastddpm.sample(...,
          cuda_graph='on')`` instead (its graph runner keeps seed and step in device memory).
"""


def ddpm_step(
    model_output: torch.Tensor,
    t: Timestep,
    sample: torch.Tensor,
    schedule: Schedule,
    *,
    prev_t: Timestep | None = None,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    sample_offset: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse DDPM step, equal to diffusers' ``DDPMScheduler.step`` given the same noise.

    Args:
        model_output: ``[B, C, ...]`` (``[B, 2C, ...]`` for learned variances), float32/16/bf16/64.
        t: current timestep, an int (Python or numpy) or an integer tensor ``[]``/``[1]``/``[B]``.
        sample: ``x_t``, ``[B, C, ...]``, same dtype and device as ``model_output``.
        schedule: the :class:`Schedule`.
        prev_t: timestep after the step (``None``: ``t - 1``; ``-1``: the final step).
        noise: optional ``[B, C, ...]`` standard normal noise; ``None`` draws it from the counter-based
            generator keyed by ``(seed, sample_offset + b, t, element)``.
        seed: generator key in ``[0, 2**64)`` (``None``: drawn from torch's global generator when
            noise is made, see below).
        sample_offset: global index of sample 0 of the batch.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
    Returns:
        ``(prev_sample, pred_original_sample)``, both shaped and typed like ``sample``. Noise is added
        only where ``t > 0`` (diffusers' rule).

    Noise is made in the kernel when ``noise`` is None, the sample is not empty and ``t`` is not the
    int 0. A tensor ``t`` counts as making noise even if all its values are 0 (deciding would need a
    device read); pass ``seed=`` or an int ``t`` to keep the global generator untouched there.
    """
    _check_not_capturing("ddpm_step")
    _check_tensor("sample", sample)
    b, device = sample.shape[0], sample.device
    T = schedule.num_train_timesteps
    t, prev_t = _timestep_arg("t", t), _timestep_arg("prev_t", prev_t)
    seed = None if seed is None else check_seed(seed)
    sample_offset = check_sample_range(sample_offset, b)
    pair = _int_pair(t, prev_t, T)
    _check_noise(noise, sample)
    makes_noise = noise is None and sample.numel() > 0 and not (isinstance(t, int) and t == 0)
    name = resolve_backend(backend, device, sample.dtype)
    if _wants_grad(model_output, sample, noise):
        name = "reference"
    if pair is None:
        tt = _timesteps("t", t, b, device, 0, T)
        pt = tt - 1 if prev_t is None else _timesteps("prev_t", prev_t, b, device, -1, T)
        _prev_after(tt, pt)
    elif name == "reference":
        tt, pt = _full_pair(pair, b, device)
    if name == "reference":
        _split_model_output(model_output, sample, schedule, learned_needed=True)
        seed = _key(seed, makes_noise)
        return reference.ddpm_step(model_output, tt, sample, schedule, pt, noise, seed, sample_offset)
    m, v = _split_model_output(model_output, sample, schedule, learned_needed=True)
    if sample.numel() == 0:
        return _empty_like(sample), _empty_like(sample)
    if pair is not None:  # int timesteps: one cached coefficient row
        coef, tval, rows = _cached_step_row("ddpm", schedule, *pair, 0.0, False, device)
    else:
        coef, tval, rows = ddpm_coefficients(schedule, tt, pt, check=_validating()), tt, None
    rng = _rng(_key(seed, makes_noise), sample_offset, device)
    if noise is not None:
        mode = L.NOISE_TENSOR
    else:  # an int t == 0 has gate 0: nothing to add, so nothing is made
        mode = L.NOISE_PHILOX if makes_noise else L.NOISE_NONE
    return _fused_update(sample, m, v, noise, coef, tval, schedule, rng, name, noise_mode=mode, rows=rows)


def ddim_step(
    model_output: torch.Tensor,
    t: Timestep,
    sample: torch.Tensor,
    schedule: Schedule,
    *,
    prev_t: Timestep,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    sample_offset: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step, equal to diffusers' ``DDIMScheduler.step`` with ``variance_noise=noise``.

    Arguments as :func:`ddpm_step`; ``prev_t`` is required (``-1``: the final step, where
    ``abar_prev`` is 1, or abar_0 when ``schedule.set_alpha_to_one`` is False), ``eta`` scales the
    noise (0: deterministic DDIM, 1: DDPM-like). A learned-variance half of the output is ignored.
    Noise is made in the kernel when ``eta > 0``, ``noise`` is None and the sample is not empty.
    """
    _check_not_capturing("ddim_step")
    _check_tensor("sample", sample)
    eta = real_arg("eta", eta)  # finite; Python or numpy number
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    b, device = sample.shape[0], sample.device
    T = schedule.num_train_timesteps
    t, prev_t = _timestep_arg("t", t), _timestep_arg("prev_t", prev_t)
    seed = None if seed is None else check_seed(seed)
    sample_offset = check_sample_range(sample_offset, b)
    pair = _int_pair(t, prev_t, T, default_prev=False)
    _check_noise(noise, sample)
    makes_noise = eta > 0 and noise is None and sample.numel() > 0
    name = resolve_backend(backend, device, sample.dtype)
    if _wants_grad(model_output, sample, noise if eta > 0 else None):
        name = "reference"
    if pair is None:
        tt = _timesteps("t", t, b, device, 0, T)
        pt = _timesteps("prev_t", prev_t, b, device, -1, T)
        _prev_after(tt, pt)
    elif name == "reference":
        tt, pt = _full_pair(pair, b, device)
    if name == "reference":
        _split_model_output(model_output, sample, schedule, learned_needed=False)
        seed = _key(seed, makes_noise)
        return reference.ddim_step(model_output, tt, sample, schedule, pt, float(eta), use_clipped_model_output,
                                   noise, seed, sample_offset)  # fmt: skip
    m, _ = _split_model_output(model_output, sample, schedule, learned_needed=False)
    if sample.numel() == 0:
        return _empty_like(sample), _empty_like(sample)
    if pair is not None:  # int timesteps: one cached coefficient row
        coef, tval, rows = _cached_step_row("ddim", schedule, *pair, float(eta), bool(use_clipped_model_output), device)
    else:
        coef = ddim_coefficients(
            schedule, tt, pt, eta=float(eta), use_clipped_model_output=use_clipped_model_output, check=_validating()
        )
        tval, rows = tt, None
    if eta == 0:  # deterministic: no noise is read or made
        mode, noise = L.NOISE_NONE, None
    else:
        mode = L.NOISE_TENSOR if noise is not None else L.NOISE_PHILOX
    rng = _rng(_key(seed, makes_noise), sample_offset, device)
    return _fused_update(sample, m, None, noise, coef, tval, schedule, rng, name, noise_mode=mode, rows=rows)


def q_sample(
    x0: torch.Tensor,
    t: Timestep,
    schedule: Schedule,
    noise: torch.Tensor | None = None,
    *,
    seed: int | None = None,
    sample_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Forward noising ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``, equal to diffusers' ``add_noise``.

    Args:
        x0: clean data ``[B, ...]``.
        t: int (Python or numpy) or integer tensor ``[]``/``[1]``/``[B]``.
        noise: optional ``[B, ...]``; ``None`` makes it in the kernel (stream ``STREAM_QSAMPLE``).
        seed, sample_offset, backend: as :func:`ddpm_step`.
    Returns:
        ``x_t`` shaped and typed like ``x0``. Differentiable with respect to ``x0`` (and ``noise``):
        such calls run the reference math; for training, the noise target comes from :func:`randn`
        with the same key. Noise is made in the kernel when ``noise`` is None and ``x0`` is not empty.
    """
    _check_not_capturing("q_sample")
    _check_tensor("x0", x0)
    b, device = x0.shape[0], x0.device
    seed = None if seed is None else check_seed(seed)
    sample_offset = check_sample_range(sample_offset, b)
    tt = _timesteps("t", t, b, device, 0, schedule.num_train_timesteps)
    _check_noise(noise, x0)
    makes_noise = noise is None and x0.numel() > 0
    name = resolve_backend(backend, device, x0.dtype)
    if name == "reference" or _wants_grad(x0, noise):
        return reference.q_sample(x0, tt, schedule, noise, _key(seed, makes_noise), sample_offset)
    if x0.numel() == 0:
        return _empty_like(x0)
    rng = _rng(_key(seed, makes_noise), sample_offset, device)
    n2 = _as_rows(noise.to(x0.dtype)) if noise is not None else None
    table = schedule.table("q_sample", device)
    mode = L.NOISE_TENSOR if noise is not None else L.NOISE_PHILOX
    return _fused_q_sample(_as_rows(x0), n2, table, tt, rng, mode, name).reshape(x0.shape)


def randn(
    shape: Sequence[int],
    *,
    seed: int | None,
    sample_offset: int = 0,
    t: Timestep = 0,
    stream: int = L.STREAM_INIT,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """Counter-based standard normal tensor ``shape = [B, ...]``.

    Element ``e`` of sample ``b`` is a pure function of ``(seed, sample_offset + b, t[b], e, stream)``
    (:mod:`fastddpm._layout`), identical on every backend. ``stream`` picks the use:
    ``STREAM_INIT`` (x_T), ``STREAM_STEP`` (the reverse-step noise), ``STREAM_QSAMPLE`` (training noise).
    ``t`` is an int or integer tensor in ``[0, 2**31)``. ``seed`` is required; ``None`` draws one
    from the global generator (when the tensor is not empty), as for the other ops.
    """
    _check_not_capturing("randn")
    if isinstance(shape, (int, str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"shape must be a sequence of ints [B, ...], got {type(shape).__name__}")
    shape = tuple(int_arg("shape", s, 0, allowed="a sequence of ints >= 0") for s in shape)
    if len(shape) < 1:
        raise ValueError("shape must have a batch dimension [B, ...], got ()")
    if isinstance(stream, bool) or stream not in (L.STREAM_STEP, L.STREAM_QSAMPLE, L.STREAM_INIT):
        raise ValueError(f"unknown stream {stream!r}; allowed: STREAM_STEP=0, STREAM_QSAMPLE=1, STREAM_INIT=2")
    device = concrete_device(device if device is not None else "cpu")
    b = shape[0]
    n = math.prod(shape[1:])
    seed = None if seed is None else check_seed(seed)
    sample_offset = check_sample_range(sample_offset, b)
    tt = _timesteps("t", t, b, device, 0, 2**31)
    name = resolve_backend(backend, device, dtype)
    makes_noise = b * n > 0
    if name == "reference":
        return reference.step_noise(torch.Size(shape), tt, _key(seed, makes_noise), sample_offset, stream, dtype)
    if not makes_noise:
        return torch.empty(shape, dtype=dtype, device=device)
    rng = _rng(_key(seed, makes_noise), sample_offset, device)
    return _fused_randn(tt, rng, b, n, stream, dtype, name).reshape(shape)


for _op in (ddpm_step, ddim_step, q_sample, randn):
    _op.__doc__ = inspect.cleandoc(_op.__doc__) + "\n\n" + inspect.cleandoc(_COMMON_DOC)
