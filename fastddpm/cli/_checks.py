"""Checks the commands run before any work: the device, the ``--out`` path, the model directory's JSON files.

Each failure is a ``ValueError`` whose message names the argument; ``fastddpm.cli.main`` prints it as one line
and exits with status 2. Nothing here samples or trains, so a bad argument costs no work.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..images import OUTPUT_SUFFIXES


# ---------------------------------------------------------------------------------------- device
def check_device(text: str | None) -> Any:
    """``--device`` as a ``torch.device`` (default: cuda if available, else cpu); a CUDA device must exist."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {text}: CUDA is not available here (this torch {torch.__version__} sees no GPU); "
                "use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# -------------------------------------------------------------------------------------- --out paths
def _check_writable(folder: Path, flag: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastddpm-write-check.", dir=folder)
    except OSError as e:
        raise ValueError(f"{flag}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def make_folder(folder: Path, flag: str) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the folders made, outermost first.

    Raises ``ValueError`` naming ``flag`` when a part of the path is a file or a folder cannot be created
    or written; folders this call made are removed again before it raises.
    """
    folder = folder.expanduser()
    missing: list[Path] = []
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            raise ValueError(f"{flag}: {probe} is a dangling link")
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag}: {probe} is a file, not a folder")
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:  # another process (a torchrun rank) made it first: not ours to remove
                continue
            except OSError as e:
                raise ValueError(f"{flag}: cannot create folder {d} ({e.strerror or e})") from None
            created.append(d)
        _check_writable(folder, flag)
    except BaseException:
        remove_empty(created)
        raise
    return created


def remove_empty(created: list[Path]) -> None:
    """Remove the folders of :func:`make_folder` that are still empty, innermost first."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:  # not empty (a resumable shard folder, a checkpoint): keep it and its parents
            return


def prepare_output_file(out: str, flag: str = "--out") -> tuple[Path, list[Path]]:
    """Check a ``.png``/``.npz`` output path before sampling; make its folder. Returns (path, folders made)."""
    path = Path(out).expanduser()
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"{flag} must end in .png (a grid) or .npz (uint8 NHWC images), got {out!r}")
    if path.is_dir():
        raise ValueError(f"{flag} {out!r} is a folder; give a file name ending in .png or .npz")
    return path, make_folder(path.parent, flag)  # the file is replaced by a rename: the folder must be writable


def prepare_output_folder(out: str, flag: str = "--out") -> tuple[Path, list[Path]]:
    """Check (and make) an output folder before training. Returns (path, folders made)."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag}: {path} is a file, not a folder")
    return path, make_folder(path, flag)


# ---------------------------------------------------------------------------------- model files
# diffusers schedulers whose config fastddpm reads. The multistep solvers' own keys are known (so a typo
# next to them is still caught) but not applied: the sampler is what --sampler asks for.
DDPM_FAMILY = ("DDPMScheduler", "DDIMScheduler")
MULTISTEP_KEYS = {
    "DPMSolverMultistepScheduler": (
        "algorithm_type", "euler_at_final", "final_sigmas_type", "flow_shift", "lambda_min_clipped",
        "lower_order_final", "solver_order", "solver_type", "time_shift_type", "use_beta_sigmas",
        "use_dynamic_shifting", "use_exponential_sigmas", "use_flow_sigmas", "use_karras_sigmas", "use_lu_lambdas",
        "variance_type",
    ),
    "UniPCMultistepScheduler": (
        "disable_corrector", "final_sigmas_type", "flow_shift", "lower_order_final", "predict_x0", "shift_terminal",
        "sigma_max", "sigma_min", "solver_order", "solver_p", "solver_type", "time_shift_type", "use_beta_sigmas",
        "use_dynamic_shifting", "use_exponential_sigmas", "use_flow_sigmas", "use_karras_sigmas",
    ),
}  # fmt: skip
BOOKKEEPING_KEYS = ("_class_name", "_diffusers_version", "_use_default_values", "tensor_format", "predict_epsilon")


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """``path`` parsed as a JSON object; anything else raises ``ValueError`` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is corrupt: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} is corrupt: it holds a JSON {type(data).__name__}, expected an object {{...}}")
    return data


def check_scheduler_config(cfg: dict[str, Any], path: Path, sampler: str | None) -> list[str]:
    """Refuse a scheduler config fastddpm would misread; return warnings for what it reads but does not apply.

    Refused: a ``_class_name`` outside the DDPM family and the multistep solvers (Euler, LCM, PNDM, ...), a key
    no supported scheduler has (a typo would otherwise be ignored silently), and the old ``predict_epsilon:
    false`` without a ``prediction_type``.
    """
    from ..schedule import Schedule

    cls = cfg.get("_class_name")
    supported = DDPM_FAMILY + tuple(MULTISTEP_KEYS)
    if cls is not None and cls not in supported:
        raise ValueError(
            f"{path} is a {cls} config; fastddpm reads {', '.join(supported)} configs and samples with its own "
            f"samplers, so {cls}'s sampling would not be honoured. If the model was trained with the DDPM noise "
            f'schedule, save a copy with "_class_name": "DDPMScheduler" and without {cls}\'s own keys'
        )
    fields = {f.name for f in dataclasses.fields(Schedule)}
    known = fields | set(BOOKKEEPING_KEYS) | set(MULTISTEP_KEYS.get(cls, ()))
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{path}: unknown key {key!r}{hint}; fastddpm would ignore it. Fix or remove it")
    if cfg.get("predict_epsilon") is False and "prediction_type" not in cfg:
        raise ValueError(
            f"{path}: the old key predict_epsilon=false means prediction_type 'sample'; write "
            '"prediction_type": "sample" instead'
        )
    warnings = []
    if cls in MULTISTEP_KEYS:
        own = sorted(k for k in cfg if k in MULTISTEP_KEYS[cls] and k not in fields)
        warnings.append(
            f"{path} is a {cls} config: fastddpm takes its noise schedule and samples with "
            f"--sampler {sampler or '(default)'} as asked; the solver settings there ({', '.join(own) or 'none'}) "
            "are not applied"
        )
    return warnings


def check_model_files(name_or_path: str, sampler: str | None = None) -> list[str]:
    """Check a model directory's ``config.json`` and scheduler config before loading; returns warnings.

    A bundled name or directory that does not resolve is left to the loader (its error lists the models).
    """
    from ..registry import resolve_model_dir, scheduler_config_path

    d = resolve_model_dir(name_or_path)
    if not (d / "config.json").is_file() and (d / "unet" / "config.json").is_file():
        d = d / "unet"  # a diffusers pipeline directory
    if (d / "config.json").is_file():
        read_json_object(d / "config.json", "checkpoint config")
    sched = scheduler_config_path(d)
    if sched is None:
        return []
    return check_scheduler_config(read_json_object(sched, "scheduler config"), sched, sampler)
