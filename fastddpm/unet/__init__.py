"""The DDPM U-Net (Ho et al. 2020), laid out so its state dict is a diffusers ``UNet2DModel``'s.

Every parameter has the same name and shape as in a diffusers ``UNet2DModel`` of the DDPM family
(``DownBlock2D`` / ``AttnDownBlock2D`` / ``UpBlock2D`` / ``AttnUpBlock2D`` blocks, ``UNetMidBlock2D``,
positional time embedding, ``resnet_time_scale_shift="default"``), so loading a diffusers checkpoint is
a key rename at most (see :mod:`fastddpm.unet.checkpoint`). The forward pass is the same computation, written
for speed: one ``silu(group_norm(h + add))`` registered op (:mod:`fastddpm.groupnorm`) with fused CPU and
Triton kernels, ``F.scaled_dot_product_attention`` for self-attention, and no per-call Python
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

Modules: :mod:`.config` (:class:`UNetConfig`, :data:`PRESETS`), :mod:`.blocks` (the layers),
:mod:`.model` (:class:`UNet`), :mod:`.checkpoint` (reading and writing fastddpm and diffusers
checkpoints) and :mod:`.locate` (a bundled name, a directory or a Hub id -> a local directory).
"""

from __future__ import annotations

from .blocks import (
    DownBlock,
    Downsample,
    MidBlock,
    ResBlock,
    SelfAttention,
    TimestepEmbedding,
    UpBlock,
    Upsample,
    _norm_act,
    timestep_embedding,
)
from .config import DOWN_BLOCK_TYPES, MID_BLOCK_TYPES, PRESETS, UP_BLOCK_TYPES, UNetConfig
from .model import UNet

__all__ = [
    "DOWN_BLOCK_TYPES",
    "MID_BLOCK_TYPES",
    "PRESETS",
    "UP_BLOCK_TYPES",
    "DownBlock",
    "Downsample",
    "MidBlock",
    "ResBlock",
    "SelfAttention",
    "TimestepEmbedding",
    "UNet",
    "UNetConfig",
    "UpBlock",
    "Upsample",
    "_norm_act",
    "timestep_embedding",
]
