"""CPU backend: the C++ kernels of ``csrc/cpu_kernels.cpp``, compiled on first use.

Inputs arrive from :mod:`fastddpm.ops` already viewed as ``[B, N]`` with unit stride inside a
sample (see :mod:`fastddpm.backends` for the argument contract); nothing here reshapes or copies.
The extension checks every argument (a bad one raises ``ValueError`` naming it; a row or timestep
index out of range raises ``IndexError``), runs on torch's intra-op threads
(``torch.set_num_threads``) and makes the Philox noise inside the fused pass, vectorised.
"""

from __future__ import annotations

import torch

from .. import _build
from ._extension import ExtensionLaunchers

__all__ = ["available", "multistep", "group_norm_silu", "q_sample", "randn", "step"]


def available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the CPU kernels can run here, and if not, why (builds the extension on first call).

    Args:
        device: the device of the tensors to be processed (``None``: any CPU tensor).
    Returns:
        ``(ok, reason)``; ``reason`` names the build flags, or what is missing / what failed.
    """
    if device is not None and torch.device(device).type != "cpu":
        return False, f"the cpu backend runs CPU tensors, not {torch.device(device).type}"
    try:
        ext = _build.load_cpu_extension()
    except _build.ExtensionUnavailableError as exc:
        return False, exc.reason
    return True, f"C++ extension ({' '.join(ext.build_flags)})"


_launchers = ExtensionLaunchers(_build.load_cpu_extension)
step = _launchers.step
q_sample = _launchers.q_sample
randn = _launchers.randn
multistep = _launchers.multistep


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    add: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """``silu(group_norm(x + add[:, :, None, None]))`` on float32 CPU tensors in two passes over x
    (``csrc/cpu_groupnorm.cpp``; inference only, no autograd).

    Args:
        x: float32 ``[B, C, *spatial]``, contiguous or channels_last.
        weight, bias: float32 ``[C]`` or None.
        num_groups: divides C.
        eps: added to the group variance.
        add: optional ``[B, C]`` (any float dtype; made float32 contiguous here).
        silu: apply SiLU after the affine transform.
    Returns:
        float32 tensor shaped and laid out like ``x``.
    """
    ext = _build.load_cpu_extension()
    w = weight.float().contiguous() if weight is not None else None
    b = bias.float().contiguous() if bias is not None else None
    a = add.float().contiguous() if add is not None else None
    return ext.group_norm_silu(x, w, b, int(num_groups), float(eps), a, bool(silu))
