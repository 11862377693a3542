"""Load a model and its schedule by name: ``fastddpm.load("digits")``, a checkpoint dir, or a cached Hub id.

What a name means is decided in one place, :func:`fastddpm.unet.locate.locate_checkpoint` (an existing
directory, then a bundled name, then a Hugging Face Hub id in the local cache; never a download).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from .schedule import Schedule
from .unet.checkpoint import build, read_checkpoint, read_json
from .unet.locate import BUNDLED_DIR, bundled_models, locate_checkpoint
from .unet.model import UNet

__all__ = [
    "BUNDLED_DIR",
    "bundled_models",
    "load",
    "load_model",
    "recommended_steps",
    "resolve_model_dir",
    "sampling_defaults",
    "scheduler_config_path",
]

SCHEDULER_CONFIG = "scheduler_config.json"


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A bundled name, a directory or a cached Hub id -> the directory (see :func:`locate_checkpoint`)."""
    return locate_checkpoint(name_or_path)


def scheduler_config_path(model_dir: Path) -> Path | None:
    """The ``scheduler_config.json`` that goes with a model directory: in it, in its ``scheduler/`` subdir,
    or (a pipeline's ``unet/``) the sibling ``scheduler/``; None if there is none."""
    for cand in (
        model_dir / SCHEDULER_CONFIG,
        model_dir / "scheduler" / SCHEDULER_CONFIG,
        model_dir.parent / "scheduler" / SCHEDULER_CONFIG,
    ):
        if cand.is_file():
            return cand
    return None


def _schedule_for(model_dir: Path) -> Schedule:
    """The schedule saved next to a checkpoint (see :func:`scheduler_config_path`); else the default with a warning."""
    cand = scheduler_config_path(model_dir)
    if cand is not None:
        raw = read_json(cand)  # a JSON list or broken JSON: one ValueError naming the file
        try:
            return Schedule.from_diffusers(raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{cand}: {e}") from None
    warnings.warn(f"no {SCHEDULER_CONFIG} next to {model_dir}; using the default DDPM schedule", stacklevel=3)
    return Schedule()


def _load(
    name_or_path: str | os.PathLike,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    variant: str | None,
) -> tuple[UNet, Schedule, str]:
    where = locate_checkpoint(name_or_path)
    ckpt = read_checkpoint(where, variant=variant)
    model = build(UNet, ckpt.config, ckpt.state_dict, dtype=dtype, device=device, source=ckpt.source)
    schedule = _schedule_for(ckpt.model_dir)
    return model, schedule, f"{os.fspath(name_or_path)} ({ckpt.kind} checkpoint at {ckpt.model_dir})"


def load(
    name_or_path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
    variant: str | None = None,
) -> tuple[UNet, Schedule]:
    """The U-Net and the noise schedule it was trained with, by name or path.

    Args:
        name_or_path: A bundled model name (``"digits"``), a fastddpm checkpoint directory
            (``config.json`` + ``model.safetensors``), a diffusers ``UNet2DModel`` model directory or
            pipeline directory (``unet/`` + ``scheduler/``), or, with ``huggingface_hub`` installed, a Hub
            id (``"google/ddpm-cifar10-32"``) already in its local cache. Nothing is ever downloaded.
        device: Device of the model (``None``: CPU).
        dtype: Parameter dtype (``None``: as stored).
        variant: diffusers weight-file variant, e.g. ``"fp16"``.

    Returns:
        ``(model, schedule)``: the :class:`~fastddpm.UNet` in eval mode and the
        :class:`~fastddpm.Schedule` of the ``scheduler_config.json`` found next to it (the default DDPM
        schedule, with a warning, when there is none).

    Raises:
        FileNotFoundError: a path that does not exist, a directory with neither kind of checkpoint, a
            missing weights file, or a Hub id not in the local cache (naming the id and ``HF_HUB_OFFLINE``).
        ValueError: an unknown name (close bundled names suggested), a file given as the model, a
            ``config.json`` / ``scheduler_config.json`` that is not a JSON object, a config of another
            class, or weights that do not fit the config.
    """
    model, schedule, _ = _load(name_or_path, device=device, dtype=dtype, variant=variant)
    return model, schedule


def load_model(
    name_or_path: str | os.PathLike, device: torch.device | str | None = "cpu"
) -> tuple[UNet, Schedule, str]:
    """:func:`load` plus a one-line description of what was loaded, for the CLI's summary.

    Returns:
        ``(model, schedule, description)``; the description reads ``"<name> (<fastddpm|diffusers>
        checkpoint at <dir>)"``.
    """
    return _load(name_or_path, device=device, dtype=torch.float32, variant=None)


def sampling_defaults(name_or_path: str | os.PathLike) -> dict:
    """The sampling settings a model directory recommends in its ``sampling.json`` (bundled models and
    distilled students ship one): any of ``num_inference_steps`` (int > 0), ``sampler`` (str), ``eta``
    (number) and ``timestep_spacing`` (str), with only the keys present and of the right type; ``{}`` when
    there is no such file. The CLI uses them for the flags not given."""
    try:
        d = locate_checkpoint(name_or_path)
    except (ValueError, FileNotFoundError, TypeError):
        return {}
    f = d / "sampling.json"
    if not f.is_file():
        return {}
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(raw, dict):
        return {}
    out: dict = {}
    steps = raw.get("num_inference_steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
        out["num_inference_steps"] = steps
    for key in ("sampler", "timestep_spacing"):
        if isinstance(raw.get(key), str):
            out[key] = raw[key]
    eta = raw.get("eta")
    if isinstance(eta, (int, float)) and not isinstance(eta, bool):
        out["eta"] = float(eta)
    return out


def recommended_steps(name_or_path: str | os.PathLike) -> int | None:
    """The step count a model directory recommends in ``sampling.json`` (bundled models ship one), else None."""
    return sampling_defaults(name_or_path).get("num_inference_steps")
