"""``silu(group_norm(x + add))`` as one registered op: the U-Net's every GroupNorm goes through here.

Three layers, as for the step ops (:mod:`fastddpm.ops`):

* kernels: the C++ one for float32 CPU tensors (``csrc/cpu_groupnorm.cpp``, through
  :func:`fastddpm.backends.cpu.group_norm_silu`) and the Triton one for CUDA tensors
  (``kernels/groupnorm.py``); both read x twice at most and write y once.
* the registered op ``torch.ops.fastddpm.group_norm_silu`` (``torch.library.custom_op`` with a fake
  implementation), so ``torch.compile(fullgraph=True)``, ``torch.jit.trace``, ``make_fx`` and
  ``FakeTensorMode`` see one node with the right output shape, dtype and strides.
* :func:`group_norm_silu`, the Python entry point: validates the arguments, picks the kernel with
  :func:`fastddpm.dispatch.resolve_groupnorm_backend` (device, dtype, memory format, the
  ``FASTDDPM_FUSED_NORM`` switch) and calls the op, or computes the plain PyTorch composition.

The kernels are inference-only. Whenever autograd would need to see through the call (grad mode on and
any tensor argument requiring grad, or a forward-mode AD tangent on any of them, including inside
``torch.func.jvp``), the plain differentiable composition runs instead.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from .dispatch import resolve_groupnorm_backend

__all__ = ["group_norm_silu", "memory_layout"]

# backend name -> (module, function) of the kernel launcher; each takes
# (x, weight, bias, num_groups, eps, add=..., silu=...) and returns y in x's layout.
_LAUNCHERS = {
    "cpu": ("fastddpm.backends.cpu", "group_norm_silu"),
    "triton": ("fastddpm.kernels.groupnorm", "group_norm_silu"),
}


def _launcher(backend: str):
    """The launcher function of ``backend`` (looked up per call, so a test may wrap it)."""
    if backend not in _LAUNCHERS:
        raise ValueError(f"no GroupNorm kernel for backend {backend!r}; allowed: {sorted(_LAUNCHERS)}")
    module, name = _LAUNCHERS[backend]
    return getattr(importlib.import_module(module), name)


@torch.library.custom_op("fastddpm::group_norm_silu", mutates_args=())
def _group_norm_silu_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    add: torch.Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool,
    backend: str,
) -> torch.Tensor:
    """The fused kernel of ``backend`` on ``x`` (contiguous or channels_last, see :func:`group_norm_silu`)."""
    return _launcher(backend)(x, weight, bias, num_groups, eps, add=add, silu=silu)


@_group_norm_silu_op.register_fake
def _(x, weight, bias, add, num_groups, eps, silu, backend):
    return torch.empty_like(x)  # both kernels return x's shape, dtype and (dense) layout


def memory_layout(x: torch.Tensor) -> str:
    """``"contiguous"``, ``"channels_last"`` (4-D, not also contiguous) or ``"strided"`` (anything else)."""
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def _needs_autograd(tensors: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether autograd (reverse or forward mode) must see through this call."""
    present = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return True
    return any(forward_ad.unpack_dual(t).tangent is not None for t in present)


def _composition(x, weight, bias, num_groups, eps, add, silu):
    """The definition in differentiable PyTorch ops: ``silu(group_norm(x + add[:, :, None, None]))``."""
    if add is not None:
        x = x + add.reshape(*add.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    add: torch.Tensor | None = None,
    silu: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``silu(group_norm(x + add[:, :, None, None], num_groups, weight, bias, eps))``, add and SiLU optional.

    Args:
        x: ``[B, C, *spatial]`` float tensor, any memory format (a layout other than contiguous or
            channels_last is copied to contiguous before a fused kernel).
        weight: ``[C]`` affine scale or None (1).
        bias: ``[C]`` affine shift or None (0).
        num_groups: Number of groups; must divide C.
        eps: Added to each group's (biased) variance.
        add: Optional ``[B, C]`` term added to every position of channel c of sample b before the
            statistics (the U-Net res block's time projection). The fused kernels keep ``x + add`` in
            float32; the plain path rounds it to the promoted dtype first, as PyTorch does.
        silu: Apply SiLU after the affine transform.
        backend: ``"auto"`` (see :func:`fastddpm.dispatch.resolve_groupnorm_backend`), ``"torch"``
            (plain PyTorch), ``"cpu"`` (C++ kernel) or ``"triton"``; a named kernel that cannot run
            these tensors raises ``RuntimeError``.

    Returns:
        ``[B, C, *spatial]`` tensor; fused kernels return x's dtype and layout, the plain path
        PyTorch's usual result. Statistics are computed in float32 (float64 for float64 inputs, which
        take the plain path).

    Raises:
        ValueError: naming the argument, for a shape, group count or device that does not fit.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be [B, C, *spatial], got shape {list(x.shape)}")
    batch, channels = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or channels % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing the {channels} channels, got {num_groups!r}")
    for name, p, shape in (
        ("weight", weight, (channels,)),
        ("bias", bias, (channels,)),
        ("add", add, (batch, channels)),
    ):
        if p is None:
            continue
        if tuple(p.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device}, expected {x.device} (the device of x)")
    if _needs_autograd((x, weight, bias, add)):
        if backend not in ("auto", "torch"):
            raise RuntimeError(
                f"backend={backend!r}: the fused GroupNorm kernels have no backward; gradients are wanted here, "
                "so use backend='auto' or 'torch'"
            )
        return _composition(x, weight, bias, num_groups, eps, add, silu)
    layout = memory_layout(x)
    name = resolve_groupnorm_backend(x.device, x.dtype, layout, backend)
    if name == "torch":
        return _composition(x, weight, bias, num_groups, eps, add, silu)
    if layout == "strided":
        x = x.contiguous()
    return _group_norm_silu_op(x, weight, bias, add, num_groups, float(eps), bool(silu), name)
