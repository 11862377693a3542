"""Layers of the DDPM U-Net; attribute names are the diffusers state-dict names.

Every GroupNorm goes through :func:`_norm_act`, i.e. the registered op
:func:`fastddpm.groupnorm.group_norm_silu` (fused kernels on CUDA and on channels_last CPU tensors,
plain PyTorch whenever autograd needs to see through it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..groupnorm import group_norm_silu
from .config import UNetConfig

__all__ = [
    "DownBlock",
    "Downsample",
    "MidBlock",
    "ResBlock",
    "SelfAttention",
    "TimestepEmbedding",
    "UpBlock",
    "Upsample",
    "timestep_embedding",
]


def _norm_act(norm: nn.GroupNorm, h: torch.Tensor, add: torch.Tensor | None = None, silu: bool = True) -> torch.Tensor:
    """``silu(group_norm(h + add[:, :, None, None]))`` (add and SiLU optional); every U-Net GroupNorm goes here.

    Args:
        norm: The ``nn.GroupNorm`` whose ``weight``, ``bias``, ``num_groups`` and ``eps`` are used.
        h: ``[B, C, H, W]`` activations, any float dtype and memory format.
        add: Optional ``[B, C]`` per-sample, per-channel term (the res block's time projection) added
            to every position before the statistics.
        silu: Apply SiLU after the normalisation.

    Returns:
        ``[B, C, H, W]`` tensor in ``h``'s dtype. Which kernel runs is decided by
        :func:`fastddpm.dispatch.resolve_groupnorm_backend` (see :func:`fastddpm.groupnorm.group_norm_silu`).
    """
    return group_norm_silu(h, norm.weight, norm.bias, norm.num_groups, norm.eps, add=add, silu=silu)


def timestep_embedding(
    t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal timestep embedding, bit-identical to diffusers ``get_timestep_embedding``.

    Args:
        t: ``[B]`` timesteps (any numeric dtype; fractional values allowed).
        dim: Embedding width.
        flip_sin_to_cos: Order ``[cos, sin]`` instead of ``[sin, cos]``.
        freq_shift: ``downscale_freq_shift``: frequencies are ``max_period ** (-i / (dim // 2 - freq_shift))``.

    Returns:
        ``[B, dim]`` float32 tensor (computed in float32 like diffusers and the TF original).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# --------------------------------------------------------------------------------------------------
# Layers (attribute names are the diffusers state-dict names)
# --------------------------------------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
    """``linear_2(silu(linear_1(e)))``: ``[B, in_dim]`` -> ``[B, dim]``."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(e)))


class ResBlock(nn.Module):
    """DDPM residual block (diffusers ``ResnetBlock2D``, ``time_embedding_norm="default"``).

    ``[B, in_ch, H, W]`` -> ``[B, out_ch, H, W]``; see the module docstring for the formula.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb_dim: int,
        *,
        groups: int,
        eps: float,
        dropout: float,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.output_scale_factor = float(output_scale_factor)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, in_ch, H, W]``; ``temb_act``: ``silu(emb)``, ``[B, temb_dim]``."""
        h = self.conv1(_norm_act(self.norm1, x))
        h = _norm_act(self.norm2, h, add=self.time_emb_proj(temb_act))
        h = self.conv2(self.dropout(h))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class SelfAttention(nn.Module):
    """Spatial self-attention with a residual (diffusers ``Attention``, ``_from_deprecated_attn_block``).

    ``[B, C, H, W]`` -> ``[B, C, H, W]``: ``x + to_out(softmax(q k^T / sqrt(d)) v)`` over the ``H*W``
    positions, ``q, k, v`` linear maps of ``group_norm(x)``, ``C // head_dim`` heads.
    """

    def __init__(
        self, channels: int, *, head_dim: int | None, groups: int, eps: float, rescale_output_factor: float = 1.0
    ) -> None:
        super().__init__()
        self.heads = 1 if head_dim is None else channels // head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])
        self.rescale_output_factor = float(rescale_output_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        n, heads = hgt * wid, self.heads
        # [B, C, H, W] -> [B, HW, C]; free when x is channels_last.
        h = _norm_act(self.group_norm, x, silu=False).permute(0, 2, 3, 1).reshape(b, n, c)
        q = self.to_q(h).view(b, n, heads, c // heads).transpose(1, 2)
        k = self.to_k(h).view(b, n, heads, c // heads).transpose(1, 2)
        v = self.to_v(h).view(b, n, heads, c // heads).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, d], scale 1/sqrt(d)
        o = self.to_out[0](o.transpose(1, 2).reshape(b, n, c))
        out = x + o.view(b, hgt, wid, c).permute(0, 3, 1, 2)
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor


class Downsample(nn.Module):
    """Stride-2 3x3 conv, ``[B, C, H, W]`` -> ``[B, C, H/2, W/2]``; padding 0 pads ``(0, 1, 0, 1)`` first."""

    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv, ``[B, C, H, W]`` -> ``[B, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """One level on the way down (diffusers ``DownBlock2D`` / ``AttnDownBlock2D``)."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, *, attention: bool, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(
                in_ch if j == 0 else out_ch,
                out_ch,
                cfg.temb_dim,
                groups=cfg.norm_num_groups,
                eps=cfg.norm_eps,
                dropout=cfg.dropout,
            )
            for j in range(cfg.layers_per_block)
        )
        if attention:
            self.attentions = nn.ModuleList(
                SelfAttention(out_ch, head_dim=cfg.attention_head_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps)
                for _ in range(cfg.layers_per_block)
            )
        else:
            self.attentions = None
        self.downsamplers = nn.ModuleList([Downsample(out_ch, cfg.downsample_padding)]) if downsample else None

    def forward(self, h: torch.Tensor, temb_act: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb_act)
            if self.attentions is not None:
                h = self.attentions[j](h)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h


class MidBlock(nn.Module):
    """ResBlock, self-attention (optional), ResBlock (diffusers ``UNetMidBlock2D``, one layer)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        ch = cfg.block_out_channels[-1]
        scale = cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList(
            ResBlock(
                ch,
                ch,
                cfg.temb_dim,
                groups=cfg.norm_num_groups,
                eps=cfg.norm_eps,
                dropout=cfg.dropout,
                output_scale_factor=scale,
            )
            for _ in range(2)
        )
        if cfg.add_attention:
            self.attentions = nn.ModuleList(
                [
                    SelfAttention(
                        ch,
                        head_dim=cfg.attention_head_dim,
                        groups=cfg.mid_attn_groups,
                        eps=cfg.norm_eps,
                        rescale_output_factor=scale,
                    )
                ]
            )
        else:
            self.attentions = None

    def forward(self, h: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, temb_act)
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self.resnets[1](h, temb_act)


class UpBlock(nn.Module):
    """One level on the way up (diffusers ``UpBlock2D`` / ``AttnUpBlock2D``): each layer takes one skip."""

    def __init__(
        self,
        cfg: UNetConfig,
        prev_out_ch: int,
        out_ch: int,
        skip_in_ch: int,
        *,
        attention: bool,
        upsample: bool,
    ) -> None:
        super().__init__()
        n = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList(
            ResBlock(
                (prev_out_ch if j == 0 else out_ch) + (skip_in_ch if j == n - 1 else out_ch),
                out_ch,
                cfg.temb_dim,
                groups=cfg.norm_num_groups,
                eps=cfg.norm_eps,
                dropout=cfg.dropout,
            )
            for j in range(n)
        )
        if attention:
            self.attentions = nn.ModuleList(
                SelfAttention(out_ch, head_dim=cfg.attention_head_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps)
                for _ in range(n)
            )
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, h: torch.Tensor, temb_act: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb_act)
            if self.attentions is not None:
                h = self.attentions[j](h)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h
