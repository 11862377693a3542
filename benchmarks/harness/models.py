"""The models rows run: the bundled/preset U-Nets with their schedules, the tiny smoke-test U-Net,
and the U-Net's FLOPs per image."""

from __future__ import annotations

from typing import Any

import torch


def tiny_unet_config() -> Any:
    """A 2-level, 8x8x1 U-Net with attention, about 0.17M parameters: the smoke-test model."""
    from fastddpm.unet import UNetConfig

    return UNetConfig(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, time_embedding_dim=32,
    )  # fmt: skip


def load_bench_model(name: str, device: torch.device, seed: int = 0) -> tuple[torch.nn.Module, Any, str]:
    """``(UNet in eval mode on device, Schedule, description)``.

    ``"ddpm-cifar10"`` / ``"ddpm-256"``: the preset with random weights (speed does not depend on
    them) and the default DDPM schedule. ``"digits"``: the bundled model, or the preset with random
    weights when it is not installed. ``"tiny"``: :func:`tiny_unet_config`. Anything else goes to
    :func:`fastddpm.registry.load_model` (bundled name or checkpoint directory).
    """
    from fastddpm import Schedule
    from fastddpm.unet import PRESETS, UNet

    torch.manual_seed(seed)
    if name == "tiny":
        model, schedule, desc = UNet(tiny_unet_config()), Schedule(), "tiny U-Net, random weights"
    elif name == "digits":
        try:
            from fastddpm.registry import load_model

            model, schedule, desc = load_model("digits", device)
        except Exception as e:  # not trained yet, half-written, or unreadable: speed does not need the weights
            model, schedule = UNet.from_preset("digits"), Schedule()
            desc = f"digits preset, random weights (bundled model not loadable: {str(e).splitlines()[0][:120]})"
    elif name in PRESETS:
        model, schedule, desc = UNet.from_preset(name), Schedule(), f"{name} preset, random weights"
    else:
        from fastddpm.registry import load_model

        model, schedule, desc = load_model(name, device)
    model = model.to(device).eval().requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    return model, schedule, f"{desc}; {n:,} parameters"


def sample_shape(model: Any) -> tuple[int, int, int]:
    from fastddpm.sampling import infer_shape

    return infer_shape(model, None)


def unet_flops_per_image(model: torch.nn.Module, chw: tuple[int, int, int], device: torch.device) -> int:
    """FLOPs of one U-Net forward on one image, counted once with ``torch.utils.flop_counter``.

    Counted at batch 1 (every layer is per-sample, so FLOPs scale linearly with the batch); a
    multiply-add counts as 2 FLOPs (FlopCounterMode's convention).
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *chw, device=device)
    t = torch.full((1,), 500, dtype=torch.int64, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return int(counter.get_total_flops())
