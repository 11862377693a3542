"""The DDPM U-Net model: :class:`UNet` (forward pass, construction, checkpoint methods)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .blocks import DownBlock, MidBlock, TimestepEmbedding, UpBlock, _norm_act, timestep_embedding
from .config import PRESETS, UNetConfig
from .locate import locate_checkpoint

__all__ = ["UNet"]


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """The DDPM U-Net; its ``state_dict`` keys and shapes are those of a diffusers ``UNet2DModel``.

    Build it from a :class:`UNetConfig` (or keyword overrides of the default CIFAR-10 config), a preset
    (:meth:`from_preset`), a diffusers checkpoint (:meth:`from_diffusers`) or a fastddpm checkpoint
    (:meth:`from_pretrained`).

    Call as ``model(x, t)``: ``x`` is ``[B, in_channels, H, W]`` (H and W multiples of
    ``2 ** (len(block_out_channels) - 1)``), ``t`` the timesteps, and the result is a plain tensor
    ``[B, out_channels, H, W]`` (not a diffusers output object). Works in any float dtype and with
    ``channels_last`` weights and inputs (:meth:`to_channels_last`).
    """

    def __init__(self, config: UNetConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = UNetConfig(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
        self.config = config
        cfg, chs, n = config, config.block_out_channels, config.num_levels

        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], cfg.temb_dim)

        self.down_blocks = nn.ModuleList()
        prev = chs[0]
        for i, block_type in enumerate(cfg.down_block_types):
            self.down_blocks.append(
                DownBlock(cfg, prev, chs[i], attention=block_type == "AttnDownBlock2D", downsample=i < n - 1)
            )
            prev = chs[i]

        self.mid_block = MidBlock(cfg) if cfg.mid_block_type is not None else None

        self.up_blocks = nn.ModuleList()
        rev = chs[::-1]
        prev = rev[0]
        for i, block_type in enumerate(cfg.up_block_types):
            self.up_blocks.append(
                UpBlock(
                    cfg,
                    prev,
                    rev[i],
                    rev[min(i + 1, n - 1)],
                    attention=block_type == "AttnUpBlock2D",
                    upsample=i < n - 1,
                )
            )
            prev = rev[i]

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        """Predict the model output (epsilon for DDPM checkpoints) for noisy images ``x`` at timesteps ``t``.

        Args:
            x: ``[B, in_channels, H, W]`` float tensor in the parameters' dtype; H, W multiples of
                ``config.downsample_factor``.
            t: Timesteps: a Python int/float, a 0-d tensor or a ``[B]`` (or ``[1]``) tensor of any
                numeric dtype. The embedding is computed in float32. Unlike diffusers, a Python float
                is not truncated to an integer.

        Returns:
            ``[B, out_channels, H, W]`` tensor in ``x``'s dtype.
        """
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, H, W], got shape {tuple(x.shape)}")
        b, _, hgt, wid = x.shape
        f = cfg.downsample_factor
        if hgt % f or wid % f:
            raise ValueError(f"x height and width must be multiples of {f} for this config, got {hgt}x{wid}")
        t = self._timesteps(t, b, x.device)

        if cfg.center_input_sample:
            x = 2 * x - 1.0
        emb = self.time_embedding(
            timestep_embedding(
                t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
            ).to(self.conv_in.weight.dtype)
        )
        temb_act = F.silu(emb)  # every ResBlock applies silu before its time_emb_proj: do it once

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb_act, skips)
        if self.mid_block is not None:
            h = self.mid_block(h, temb_act)
        for block in self.up_blocks:
            h = block(h, temb_act, skips)
        return self.conv_out(_norm_act(self.conv_norm_out, h))

    @staticmethod
    def _timesteps(t: torch.Tensor | int | float, batch: int, device: torch.device) -> torch.Tensor:
        """Timesteps as a ``[batch]`` tensor on ``device`` (no host sync)."""
        if not isinstance(t, torch.Tensor):
            if isinstance(t, bool) or not isinstance(t, int | float):
                raise TypeError(f"t must be a tensor, int or float, got {type(t).__name__}")
            return torch.full((batch,), t, dtype=torch.float32, device=device)
        if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1):
            t = t.reshape(1).expand(batch)
        elif t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"t must be a scalar or a [{batch}] tensor, got shape {tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must be a real numeric tensor, got dtype {t.dtype}")
        return t.to(device)

    # ---- construction helpers --------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: UNetConfig | Mapping[str, Any], **overrides: Any) -> UNet:
        """Randomly initialised model from a :class:`UNetConfig` or its :meth:`UNetConfig.to_dict`."""
        if not isinstance(config, UNetConfig):
            config = UNetConfig.from_dict(config)
        return cls(config, **overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> UNet:
        """Randomly initialised model from ``PRESETS[name]`` with some fields overridden.

        Presets: ``"ddpm-cifar10"`` (35.7M parameters), ``"ddpm-256"`` (113.7M), ``"digits"`` (8x8x1).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; available: {sorted(PRESETS)}")
        return cls(PRESETS[name], **overrides)

    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def to_channels_last(self) -> UNet:
        """Convert the conv weights to ``torch.channels_last`` (in place) and return ``self``.

        Feed ``x.to(memory_format=torch.channels_last)`` as well for the NHWC convolution kernels.
        """
        return self.to(memory_format=torch.channels_last)

    def extra_repr(self) -> str:
        return f"parameters={self.num_parameters():,}"

    # ---- checkpoints (files: fastddpm.unet.checkpoint; names and Hub ids: fastddpm.unet.locate) ----

    @classmethod
    def from_diffusers(
        cls,
        path_or_model: str | os.PathLike | nn.Module,
        *,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        variant: str | None = None,
    ) -> UNet:
        """Load a diffusers ``UNet2DModel`` (object, model directory or pipeline directory with ``unet/``).

        Args:
            path_or_model: A ``UNet2DModel`` object (or a pipeline object with a ``.unet``), a model
                directory (``config.json`` + ``diffusion_pytorch_model.safetensors`` / ``.bin``) or a
                pipeline directory with a ``unet/`` subdirectory.
            dtype: Parameter dtype of the result; ``None`` keeps the stored dtype.
            device: Device of the result; ``None`` keeps CPU (for a directory) or the object's device.
            variant: Weight-file variant, e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``.

        Returns:
            The model in eval mode, numerically the same network as the diffusers one. Loading from a
            directory does not import diffusers.
        """
        ckpt = checkpoint.read_diffusers(path_or_model, variant=variant)
        return checkpoint.build(cls, ckpt.config, ckpt.state_dict, dtype=dtype, device=device, source=ckpt.source)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        variant: str | None = None,
    ) -> UNet:
        """Load a model by name or path: a bundled name (``"digits"``), a directory written by
        :meth:`save_pretrained`, a diffusers model or pipeline directory, or a Hugging Face Hub id
        (``"google/ddpm-cifar10-32"``) already in the local Hub cache; nothing is ever downloaded.

        Args:
            name_or_path: What to load (see :func:`fastddpm.unet.locate.locate_checkpoint`).
            dtype: Parameter dtype of the result; ``None`` keeps the stored dtype.
            device: Device of the result (default CPU).
            variant: diffusers weight-file variant (``"fp16"``); fastddpm checkpoints have none.

        Returns:
            The model in eval mode. :func:`fastddpm.load` returns its :class:`~fastddpm.Schedule` too.
        """
        ckpt = checkpoint.read_checkpoint(locate_checkpoint(name_or_path), variant=variant)
        return checkpoint.build(cls, ckpt.config, ckpt.state_dict, dtype=dtype, device=device, source=ckpt.source)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into directory ``path`` (created); returns it."""
        return checkpoint.save_pretrained(self, path)

    def diffusers_config(self) -> dict[str, Any]:
        """The equivalent diffusers ``UNet2DModel`` config (``UNet2DModel(**model.diffusers_config())``)."""
        return checkpoint.config_to_diffusers(self.config)

    def to_diffusers(self) -> nn.Module:
        """A diffusers ``UNet2DModel`` with this model's weights (requires diffusers)."""
        return checkpoint.to_diffusers(self)
