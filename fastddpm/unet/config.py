"""Architecture of the DDPM U-Net: :class:`UNetConfig` (diffusers ``UNet2DModel`` field names) and :data:`PRESETS`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DOWN_BLOCK_TYPES", "MID_BLOCK_TYPES", "PRESETS", "UP_BLOCK_TYPES", "UNetConfig"]

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D", None)


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
        :func:`fastddpm.unet.checkpoint.config_from_diffusers`, which applies diffusers' own defaults.
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
