"""Name or path -> the local checkpoint directory: bundled models, directories, Hub ids in the local cache.

:func:`locate_checkpoint` is the one place a model name is interpreted, in this order:

1. an existing directory (a fastddpm checkpoint, a diffusers model dir or a diffusers pipeline dir);
2. a bundled model name (``fastddpm/models/<name>/config.json``, e.g. ``"digits"``);
3. a Hugging Face Hub id (``"owner/name"``), when ``huggingface_hub`` is installed, looked up in its
   local cache only (``snapshot_download(..., local_files_only=True)``): nothing is ever downloaded.

Anything else raises one error that says which of these it tried: a path that does not exist, a file,
a mistyped bundled name (close names suggested), a Hub id not in the cache (naming the id and
``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from pathlib import Path

__all__ = ["BUNDLED_DIR", "bundled_models", "is_hub_id", "locate_checkpoint"]

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "models"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package (``fastddpm/models/<name>/config.json``)."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.parent.name for p in BUNDLED_DIR.glob("*/config.json"))


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face Hub model id, ``"owner/name"``."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not name.endswith((".", "-"))


def _looks_like_path(name: str) -> bool:
    return os.sep in name or (os.altsep or os.sep) in name or name.startswith((".", "~")) or Path(name).is_absolute()


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot directory of Hub model ``repo_id``, from the cache only."""
    offline = os.environ.get("HF_HUB_OFFLINE", "")
    how = (
        f"fastddpm reads Hub models from the local cache only and never downloads (HF_HUB_OFFLINE={offline} here)"
        if offline
        else "fastddpm reads Hub models from the local cache only and never downloads (as if HF_HUB_OFFLINE=1)"
    )
    try:
        hub = importlib.import_module("huggingface_hub")
    except ImportError:
        raise FileNotFoundError(
            f"model {repo_id!r} is not a directory or a bundled model ({', '.join(bundled_models()) or 'none'}), "
            "and huggingface_hub is not installed to look it up as a Hugging Face Hub id in the local cache; "
            f"{how}: `pip install huggingface_hub`, then `hf download {repo_id}` where the network is allowed"
        ) from None
    try:
        folder = hub.snapshot_download(repo_id, local_files_only=True)
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError (an OSError), HFValidationError (a ValueError)
        cache = getattr(getattr(hub, "constants", None), "HF_HUB_CACHE", "the Hugging Face cache")
        raise FileNotFoundError(
            f"model {repo_id!r} is not a directory or a bundled model, and as a Hugging Face Hub id it is not in "
            f"the local cache ({cache}): {type(e).__name__}. {how}: fetch it once with `hf download {repo_id}` "
            "(HF_HUB_OFFLINE unset or 0 there), then load it again"
        ) from None
    return Path(folder)


def locate_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """The local directory a model name or path refers to (see the module docstring for the order).

    Args:
        name_or_path: A directory, a bundled model name or a Hub id ``"owner/name"``. A ``Path``
            object is always a path.

    Returns:
        The directory; it is not checked to hold a checkpoint
        (:func:`fastddpm.unet.checkpoint.read_checkpoint` does that).

    Raises:
        TypeError: ``name_or_path`` is not a string or path.
        FileNotFoundError: a path that does not exist, or a Hub id not in the local cache.
        ValueError: a file instead of a directory, or an unknown model name (close bundled names
            suggested).
    """
    if not isinstance(name_or_path, str | os.PathLike):
        raise TypeError(f"model must be a name or a path, got {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(
            f"model {str(name_or_path)!r} is a file; give a checkpoint directory, a bundled name or a Hub id"
        )
    name = os.fspath(name_or_path)
    if isinstance(name_or_path, str):
        if name in bundled_models():
            return BUNDLED_DIR / name
        if is_hub_id(name):
            return _hub_snapshot(name)
    if not isinstance(name_or_path, str) or _looks_like_path(name):
        raise FileNotFoundError(
            f"model path {name!r} does not exist; expected a fastddpm checkpoint directory (config.json + "
            "model.safetensors), a diffusers model or pipeline directory, a bundled model name or a Hub id"
        )
    bundled = bundled_models()
    close = difflib.get_close_matches(name, bundled, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"unknown model {name!r}: not a bundled model, not a directory and not a Hub id (owner/name).{hint} "
        f"Bundled models: {', '.join(bundled) or '(none installed)'}. A path may be a fastddpm checkpoint dir "
        "(config.json + model.safetensors) or a diffusers model/pipeline dir."
    )
