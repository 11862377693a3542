"""Names of the quality study's samplers, shared by :mod:`.run` (tables) and :mod:`.figures` (plots)."""

from __future__ import annotations

from typing import Any

__all__ = ["MULTISTEP_SAMPLERS", "SAMPLER_ORDER", "sampler_label"]

#: The few-step multistep solvers of :func:`fastddpm.sample`; they follow diffusers' multistep schedulers,
#: which ignore ``clip_sample``.
MULTISTEP_SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")

#: ``ddim-noclip`` is DDIM on the same schedule with ``clip_sample=False``, as in the DDIM paper's code.
SAMPLER_ORDER = ("x0", "ddpm", "ddim", "ddim-noclip", *MULTISTEP_SAMPLERS)

_NAMES = {
    "x0": "x0 one shot",
    "ddpm": "DDPM",
    "dpmpp_2m": "DPM-Solver++(2M)",
    "dpmpp_3m": "DPM-Solver++(3M)",
    "dpmpp_2m_sde": "DPM-Solver++(2M) SDE",
    "unipc": "UniPC (bh2, order 2)",
}


def sampler_label(sampler: str, eta: Any = 0.0) -> str:
    """Display name of a sampler: ``"x0 one shot"``, ``"DDPM"``, ``"DDIM (eta=0)"``, ``"DDIM (eta=0), no x0 clip"``,
    ``"DPM-Solver++(2M)"``, ...; ``eta`` matters only for the DDIM ones."""
    if sampler == "ddim":
        return f"DDIM (eta={float(eta):g})"
    if sampler == "ddim-noclip":
        return f"DDIM (eta={float(eta):g}), no x0 clip"
    return _NAMES[sampler]
