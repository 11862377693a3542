"""Loading and saving :class:`fastddpm.UNet` as functions (the methods of :class:`~fastddpm.UNet` do the same).

The file formats and every check live in :mod:`fastddpm.unet.checkpoint`; this module keeps the
function names this package has always exported. It sits above :mod:`fastddpm.unet` in the import
graph (nothing there imports it).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .unet.checkpoint import (
    CLASS_NAME,
    CONFIG_NAME,
    DIFFUSERS_DEFAULTS,
    DIFFUSERS_WEIGHTS,
    WEIGHTS_NAME,
    config_from_diffusers,
    config_to_diffusers,
    convert_diffusers_state_dict,
    load_state_dict_checked,
    save_pretrained,
    to_diffusers,
)
from .unet.model import UNet

__all__ = [
    "CLASS_NAME",
    "CONFIG_NAME",
    "DIFFUSERS_DEFAULTS",
    "DIFFUSERS_WEIGHTS",
    "WEIGHTS_NAME",
    "config_from_diffusers",
    "config_to_diffusers",
    "convert_diffusers_state_dict",
    "from_diffusers",
    "from_pretrained",
    "load_state_dict_checked",
    "save_pretrained",
    "to_diffusers",
]


def from_diffusers(
    path_or_model: str | os.PathLike | nn.Module,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str | None = None,
    variant: str | None = None,
) -> UNet:
    """:meth:`UNet.from_diffusers`: a diffusers ``UNet2DModel`` object, model directory or pipeline directory."""
    return UNet.from_diffusers(path_or_model, dtype=dtype, device=device, variant=variant)


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str | None = None,
    variant: str | None = None,
) -> UNet:
    """:meth:`UNet.from_pretrained`: a bundled name, a checkpoint directory of either kind, or a cached Hub id."""
    return UNet.from_pretrained(name_or_path, dtype=dtype, device=device, variant=variant)
