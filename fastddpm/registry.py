"""Finding a model and its schedule by name or path: bundled models, our checkpoints, diffusers dirs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from .schedule import Schedule

BUNDLED_DIR = Path(__file__).resolve().parent / "models"


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package (``fastddpm/models/<name>/config.json``)."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.parent.name for p in BUNDLED_DIR.glob("*/config.json"))


def resolve_model_dir(name_or_path: str) -> Path:
    """A bundled name or a directory -> the checkpoint directory. Unknown names list the available ones."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if name_or_path in bundled_models():
        return BUNDLED_DIR / name_or_path
    if p.exists():
        raise ValueError(f"--model {name_or_path!r} is a file; give a checkpoint directory or a bundled name")
    avail = ", ".join(bundled_models()) or "(none installed)"
    raise ValueError(
        f"unknown model {name_or_path!r}: not a bundled model and not a directory. Bundled models: {avail}. "
        "A path may be a fastddpm checkpoint dir (config.json + model.safetensors) or a diffusers model/pipeline dir."
    )


def scheduler_config_path(model_dir: Path) -> Path | None:
    """The ``scheduler_config.json`` that goes with a model directory (next to it or a pipeline's), or None."""
    for cand in (model_dir / "scheduler_config.json", model_dir / "scheduler" / "scheduler_config.json",
                 model_dir.parent / "scheduler" / "scheduler_config.json"):  # fmt: skip
        if cand.is_file():
            return cand
    return None


def _schedule_for(model_dir: Path) -> Schedule:
    path = scheduler_config_path(model_dir)
    if path is not None:
        return Schedule.from_diffusers(path)
    warnings.warn(f"no scheduler_config.json next to {model_dir}; using the default DDPM schedule", stacklevel=3)
    return Schedule()


def recommended_steps(name_or_path: str) -> int | None:
    """The step count a model directory recommends in ``sampling.json`` (bundled models ship one), else None."""
    try:
        d = resolve_model_dir(name_or_path)
    except ValueError:
        return None
    f = d / "sampling.json"
    if not f.is_file():
        return None
    try:
        steps = json.loads(f.read_text(encoding="utf-8")).get("num_inference_steps")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return int(steps) if isinstance(steps, int) and steps > 0 else None


def load_model(name_or_path: str, device: Any = "cpu") -> tuple[Any, Schedule, str]:
    """Load ``(UNet, Schedule, description)`` from a bundled name, our checkpoint dir or a diffusers dir."""
    from .unet import UNet

    d = resolve_model_dir(name_or_path)
    if not (d / "config.json").is_file() and (d / "unet" / "config.json").is_file():
        d = d / "unet"  # a diffusers pipeline directory
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{d} has no config.json; expected a fastddpm checkpoint or a diffusers model directory"
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {cfg_path} is corrupt: config.json is not valid JSON ({e})") from None
    if cfg.get("_class_name") == "UNet2DModel":
        model = UNet.from_diffusers(d)
        kind = "diffusers"
    else:
        model = UNet.from_pretrained(d)
        kind = "fastddpm"
    schedule = _schedule_for(d)
    return model.to(device).eval(), schedule, f"{name_or_path} ({kind} checkpoint at {d})"
