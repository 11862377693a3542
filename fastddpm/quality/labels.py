"""Names of the quality study's samplers, shared by :mod:`.run` (tables) and :mod:`.figures` (plots)."""

from __future__ import annotations

from typing import Any

__all__ = ["SAMPLER_ORDER", "sampler_label"]

#: ``ddim-noclip`` is DDIM on the same schedule with ``clip_sample=False``, as in the DDIM paper's code.
SAMPLER_ORDER = ("x0", "ddpm", "ddim", "ddim-noclip")


def sampler_label(sampler: str, eta: Any = 0.0) -> str:
    """Display name of a sampler: ``"x0 one shot"``, ``"DDPM"``, ``"DDIM (eta=0)"``, ``"DDIM (eta=0), no x0 clip"``."""
    if sampler == "ddim":
        return f"DDIM (eta={float(eta):g})"
    if sampler == "ddim-noclip":
        return f"DDIM (eta={float(eta):g}), no x0 clip"
    return {"x0": "x0 one shot", "ddpm": "DDPM"}[sampler]
