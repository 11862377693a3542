"""The DDPM U-Net (Ho et al. 2020), laid out so its state dict is a diffusers ``UNet2DModel``'s.

Every parameter has the same name and shape as in a diffusers ``UNet2DModel`` of the DDPM family
(``DownBlock2D`` / ``AttnDownBlock2D`` / ``UpBlock2D`` / ``AttnUpBlock2D`` blocks, ``UNetMidBlock2D``,
positional time embedding, ``resnet_time_scale_shift="default"``), so loading a diffusers checkpoint is
a key rename at most (see :mod:`fastddpm.unet_io`). The forward pass is the same computation, written
for speed: one ``silu(group_norm(h + add))`` helper (:func:`_norm_act`) that the GPU path routes to a
fused Triton kernel, ``F.scaled_dot_product_attention`` for self-attention, and no per-call Python
objects beyond the tensors.

Architecture (Ho et al. 2020, appendix B; diffusers ``models/unets/unet_2d.py``)::

    emb  = linear_2(silu(linear_1(sinusoidal(t))))                   # [B, 4 * ch0]
    h    = conv_in(x);  skips = [h]
    for each level i:  layers_per_block x (ResBlock [+ Attention]); skips += each output
                       downsample (all but the last level);         skips += output
    mid:  ResBlock, Attention, ResBlock
    for each level i (reversed): (layers_per_block + 1) x (cat(h, skips.pop()) -> ResBlock [+ Attention])
                       upsample (all but the last)
    out  = conv_out(silu(group_norm(h)))

    ResBlock(x): h = conv1(silu(norm1(x)))
                 h = conv2(dropout(silu(norm2(h + time_emb_proj(silu(emb))[:, :, None, None]))))
                 return (shortcut(x) + h) / output_scale_factor
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["PRESETS", "UNet", "UNetConfig"]

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D", None)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def _as_tuple(value: Any, name: str) -> tuple:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"UNetConfig.{name} must be a sequence, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet`; field names and meanings are those of diffusers ``UNet2DModel``.

    The defaults describe the DDPM CIFAR-10 model (``google/ddpm-cifar10-32``, 35,746,307 parameters).
    Fixed parts, not fields: ``act_fn="silu"``, ``time_embedding_type="positional"``,
    ``resnet_time_scale_shift="default"``, ``downsample_type="conv"``, ``upsample_type="conv"``, no class
    embedding.

    Attributes:
        sample_size: Nominal image height/width (int or ``(H, W)``); informational, as in diffusers.
        in_channels: Channels of the input image.
        out_channels: Channels of the output (for example ``2 * in_channels`` for learned variance).
        block_out_channels: Channels of each resolution level, highest resolution first.
        layers_per_block: Residual blocks per level on the way down (the way up has one more).
        down_block_types: Per level, ``"DownBlock2D"`` or ``"AttnDownBlock2D"`` (self-attention after
            each residual block).
        up_block_types: Per level in up order (lowest resolution first), ``"UpBlock2D"`` or
            ``"AttnUpBlock2D"``.
        mid_block_type: ``"UNetMidBlock2D"`` or ``None`` (no middle block).
        add_attention: Whether the middle block has its self-attention layer.
        dropout: Dropout probability inside the residual blocks (active in training mode only).
        norm_num_groups: Groups of every GroupNorm.
        norm_eps: Epsilon of every GroupNorm.
        attn_norm_num_groups: Groups of the middle attention's GroupNorm (``None``: ``norm_num_groups``).
        attention_head_dim: Channels per attention head; ``None`` means one head spanning all channels.
        flip_sin_to_cos: Timestep embedding order ``[cos, sin]`` instead of ``[sin, cos]``.
        freq_shift: ``downscale_freq_shift`` of the sinusoidal embedding (DDPM uses 1).
        downsample_padding: Padding of the stride-2 downsampling conv; 0 pads ``(0, 1, 0, 1)`` first
            (the TF DDPM ``SAME`` padding), as diffusers does.
        mid_block_scale_factor: Output scale of the middle block's residual and attention layers.
        time_embedding_dim: Width of the time embedding MLP (``None``: ``4 * block_out_channels[0]``).
        center_input_sample: Map the input with ``2 * x - 1`` first.
    """

    sample_size: int | tuple[int, int] | None = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    add_attention: bool = True
    dropout: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    attn_norm_num_groups: int | None = None
    attention_head_dim: int | None = None
    flip_sin_to_cos: bool = False
    freq_shift: int = 1
    downsample_padding: int = 0
    mid_block_scale_factor: float = 1.0
    time_embedding_dim: int | None = None
    center_input_sample: bool = False

    def __post_init__(self) -> None:
        # Normalise sequences (JSON gives lists) so the frozen config is hashable and comparable.
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name), name))
        if isinstance(self.sample_size, Sequence):
            size = tuple(int(s) for s in self.sample_size)
            if len(size) != 2:
                raise ValueError(f"UNetConfig.sample_size must be an int or (H, W), got {self.sample_size!r}")
            object.__setattr__(self, "sample_size", size)
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"invalid UNetConfig: {msg}")

        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(f"{name} must be a positive int, got {value!r}")

        for name in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
            positive_int(name, getattr(self, name))
        for name in ("attention_head_dim", "attn_norm_num_groups", "time_embedding_dim"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if self.sample_size is not None:
            for s in self.sample_size if isinstance(self.sample_size, tuple) else (self.sample_size,):
                positive_int("sample_size", s)
        if not self.block_out_channels:
            fail("block_out_channels must not be empty")
        for c in self.block_out_channels:
            positive_int("block_out_channels[*]", c)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            fail(
                f"block_out_channels {self.block_out_channels}, down_block_types {self.down_block_types} and "
                f"up_block_types {self.up_block_types} must have the same length"
            )
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                fail(f"down_block_types entry {t!r} is not supported; allowed: {list(DOWN_BLOCK_TYPES)}")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                fail(f"up_block_types entry {t!r} is not supported; allowed: {list(UP_BLOCK_TYPES)}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            fail(f"mid_block_type {self.mid_block_type!r} is not supported; allowed: {list(MID_BLOCK_TYPES)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not float(self.norm_eps) > 0.0:
            fail(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if self.downsample_padding not in (0, 1):
            fail(f"downsample_padding must be 0 or 1, got {self.downsample_padding!r}")
        if not float(self.mid_block_scale_factor) > 0.0:
            fail(f"mid_block_scale_factor must be > 0, got {self.mid_block_scale_factor!r}")
        # Every GroupNorm and every attention layer must divide its channels.
        groups = self.norm_num_groups
        for c in self.block_out_channels:
            if c % groups:
                fail(f"block_out_channels entry {c} is not divisible by norm_num_groups={groups}")
        if self.has_mid_attention and self.block_out_channels[-1] % self.mid_attn_groups:
            fail(
                f"block_out_channels[-1]={self.block_out_channels[-1]} is not divisible by "
                f"attn_norm_num_groups={self.mid_attn_groups}"
            )
        head_dim = self.attention_head_dim
        if head_dim is not None:
            attn_channels = [c for c, t in zip(self.block_out_channels, self.down_block_types) if t.startswith("Attn")]
            attn_channels += [
                c for c, t in zip(self.block_out_channels[::-1], self.up_block_types) if t.startswith("Attn")
            ]
            if self.has_mid_attention:
                attn_channels.append(self.block_out_channels[-1])
            for c in attn_channels:
                if c % head_dim:
                    fail(f"attention_head_dim={head_dim} does not divide the {c} channels of an attention layer")

    # ---- derived quantities ----------------------------------------------------------------------

    @property
    def num_levels(self) -> int:
        """Number of resolution levels (``len(block_out_channels)``)."""
        return len(self.block_out_channels)

    @property
    def temb_dim(self) -> int:
        """Width of the time embedding fed to every residual block."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def has_mid_attention(self) -> bool:
        """Whether the middle block holds a self-attention layer."""
        return self.mid_block_type is not None and self.add_attention

    @property
    def mid_attn_groups(self) -> int:
        """GroupNorm groups of the middle attention layer."""
        return self.attn_norm_num_groups or self.norm_num_groups

    @property
    def downsample_factor(self) -> int:
        """Input height and width must be multiples of this (``2 ** (num_levels - 1)``)."""
        return 2 ** (self.num_levels - 1)

    # ---- (de)serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UNetConfig:
        """Build a config from :meth:`to_dict` output.

        Keys starting with ``_`` (metadata such as ``_class_name``) are ignored; any other unknown key
        raises ``ValueError`` naming it, since it may describe an architecture this class cannot build.
        Missing keys take the dataclass defaults. For diffusers ``config.json`` files use
        :func:`fastddpm.unet_io.config_from_diffusers`, which applies diffusers' own defaults.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown UNetConfig key(s) {unknown}; allowed keys: {sorted(names)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self, **changes: Any) -> UNetConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def ddpm(
        cls,
        *,
        resolution: int,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        in_channels: int = 3,
        out_channels: int | None = None,
        **overrides: Any,
    ) -> UNetConfig:
        """Config from the original DDPM hyper-parameters (``diffusion_tf/models/unet.py`` names).

        ``attn_resolutions`` lists the feature-map sizes (for a ``resolution`` x ``resolution`` input)
        that get self-attention, on the way down and on the way up. Remaining keyword arguments
        override config fields. ``UNetConfig.ddpm(resolution=32, dropout=0.1)`` is the CIFAR-10 model.
        """
        levels = len(ch_mult)
        if resolution % 2 ** (levels - 1):
            raise ValueError(f"resolution {resolution} is not divisible by 2**(len(ch_mult)-1)={2 ** (levels - 1)}")
        sizes = [resolution // 2**i for i in range(levels)]
        unknown = sorted(set(attn_resolutions) - set(sizes))
        if unknown:
            raise ValueError(f"attn_resolutions {unknown} are not among the feature-map sizes {sizes}")
        attn = [s in set(attn_resolutions) for s in sizes]
        fields: dict[str, Any] = dict(
            sample_size=resolution,
            in_channels=in_channels,
            out_channels=in_channels if out_channels is None else out_channels,
            block_out_channels=tuple(ch * m for m in ch_mult),
            layers_per_block=num_res_blocks,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            dropout=dropout,
        )
        fields.update(overrides)
        return cls(**fields)


#: Named configs for :meth:`UNet.from_preset`.
PRESETS: dict[str, UNetConfig] = {
    # Ho et al. 2020 CIFAR-10 model = google/ddpm-cifar10-32 (REFERENCE.md section 3). Dropout 0.1 is the
    # paper's CIFAR-10 training setting; it is inactive in eval mode, so sampling is unaffected.
    "ddpm-cifar10": UNetConfig.ddpm(resolution=32, ch=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), dropout=0.1),
    # Ho et al. 2020 256x256 model (LSUN / CelebA-HQ; google/ddpm-church-256 layout), 113,673,219 parameters.
    "ddpm-256": UNetConfig.ddpm(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,)),
    # Small model for scikit-learn's 8x8 digits (single channel, values mapped to [-1, 1]): 948,353
    # parameters (3.8 MB in float32). A 64-wide time embedding (instead of 4 * 32) keeps it under 1M.
    "digits": UNetConfig.ddpm(
        resolution=8,
        ch=32,
        ch_mult=(1, 2),
        attn_resolutions=(4,),
        in_channels=1,
        norm_num_groups=8,
        time_embedding_dim=64,
    ),
}


# --------------------------------------------------------------------------------------------------
# The one GroupNorm (+ add) (+ SiLU) entry point
# --------------------------------------------------------------------------------------------------

_FUSED_GROUP_NORM: Any = None  # None: import not tried yet; False: unavailable; else the function


def _fused_group_norm_silu() -> Any:
    """``fastddpm.kernels.groupnorm.group_norm_silu`` or ``False`` when it cannot be imported."""
    global _FUSED_GROUP_NORM
    if _FUSED_GROUP_NORM is None:
        try:
            from fastddpm.kernels.groupnorm import group_norm_silu
        except Exception:  # triton missing or broken, or the kernel module absent: plain PyTorch
            _FUSED_GROUP_NORM = False
        else:
            _FUSED_GROUP_NORM = group_norm_silu
    return _FUSED_GROUP_NORM


_FUSED_NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _cpu_fused_norm_available() -> bool:
    """Whether the CPU extension (with ``group_norm_silu``) builds here; asked once per process."""
    from fastddpm.backends import cpu

    return cpu.available("cpu")[0]


def _fused_norm_allowed(norm: nn.GroupNorm, h: torch.Tensor, add: torch.Tensor | None) -> bool:
    """Whether a fused (opaque to PyTorch) GroupNorm kernel may replace the plain ops for this call.

    Only for plain tensors in plain eager inference: no gradient wanted for ``h``, ``add`` or any of the
    norm's parameters; not while ``torch.compile``, ``torch.jit.trace``/``script``, ``make_fx`` or any other
    dispatch mode traces (they would record an empty output), not under forward-mode AD or on a tensor
    subclass (FakeTensor, functorch wrappers); and not with ``FASTDDPM_FUSED_NORM=0``.
    """
    if os.environ.get("FASTDDPM_FUSED_NORM", "1") == "0":
        return False
    if type(h) is not torch.Tensor or (add is not None and type(add) is not torch.Tensor):
        return False
    if torch.is_grad_enabled() and (
        h.requires_grad or (add is not None and add.requires_grad) or any(p.requires_grad for p in norm.parameters())
    ):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if _get_current_dispatch_mode() is not None or _forward_ad_level() >= 0:
        return False
    return True


def _forward_ad_level() -> int:
    """The innermost active forward-mode AD level (``-1`` when none)."""
    from torch.autograd import forward_ad

    return int(getattr(forward_ad, "_current_level", -1))


def _norm_act(norm: nn.GroupNorm, h: torch.Tensor, add: torch.Tensor | None = None, silu: bool = True) -> torch.Tensor:
    """``silu(group_norm(h + add[:, :, None, None]))`` (add and SiLU optional); every U-Net GroupNorm goes here.

    Args:
        norm: The affine ``nn.GroupNorm`` whose ``weight``, ``bias``, ``num_groups`` and ``eps`` are used.
        h: ``[B, C, H, W]`` activations, any float dtype and memory format.
        add: Optional ``[B, C]`` per-sample, per-channel term (the res block's time projection) added
            to every position before the statistics.
        silu: Apply SiLU after the normalisation.

    Returns:
        ``[B, C, H, W]`` tensor in ``h``'s dtype.

    On CUDA tensors of float32/float16/bfloat16, when no gradient is needed, outside ``torch.compile``
    tracing (Inductor fuses these ops itself), with ``fastddpm.kernels.groupnorm`` importable and the
    environment variable ``FASTDDPM_FUSED_NORM`` not ``"0"``, this calls the fused Triton kernel
    ``group_norm_silu`` (one read and one write of ``h``; ``h + add`` kept in float32). On CPU, under the
    same conditions, float32 channels_last ``h`` goes to the C++ kernel ``fastddpm.backends.cpu.group_norm_silu``
    (PyTorch's CPU group_norm is slow on channels_last; on NCHW it is as fast as the fused kernel, so
    NCHW stays on PyTorch). Otherwise plain PyTorch.
    """
    if _fused_norm_allowed(norm, h, add):
        if h.is_cuda and h.dtype in _FUSED_NORM_DTYPES:
            fused = _fused_group_norm_silu()
            if fused:
                return fused(h, norm.weight, norm.bias, norm.num_groups, norm.eps, add=add, silu=silu)
        elif (
            h.device.type == "cpu"
            and h.dtype == torch.float32
            and h.dim() == 4
            and not h.is_contiguous()
            and h.is_contiguous(memory_format=torch.channels_last)
            and _cpu_fused_norm_available()
        ):
            from fastddpm.backends import cpu

            return cpu.group_norm_silu(h, norm.weight, norm.bias, norm.num_groups, norm.eps, add=add, silu=silu)
    if add is not None:
        h = h + add[:, :, None, None]
    h = F.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(h) if silu else h


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

    # ---- I/O (implemented in fastddpm.unet_io) ---------------------------------------------------

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

        See :func:`fastddpm.unet_io.from_diffusers`. Loading from a directory does not import diffusers.
        """
        from fastddpm.unet_io import from_diffusers

        return from_diffusers(path_or_model, dtype=dtype, device=device, variant=variant)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
    ) -> UNet:
        """Load a directory written by :meth:`save_pretrained` (or a diffusers model/pipeline directory)."""
        from fastddpm.unet_io import from_pretrained

        return from_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into directory ``path`` (created); returns it."""
        from fastddpm.unet_io import save_pretrained

        return save_pretrained(self, path)

    def diffusers_config(self) -> dict[str, Any]:
        """The equivalent diffusers ``UNet2DModel`` config (``UNet2DModel(**model.diffusers_config())``)."""
        from fastddpm.unet_io import config_to_diffusers

        return config_to_diffusers(self.config)

    def to_diffusers(self) -> nn.Module:
        """A diffusers ``UNet2DModel`` with this model's weights (requires diffusers)."""
        from fastddpm.unet_io import to_diffusers

        return to_diffusers(self)
