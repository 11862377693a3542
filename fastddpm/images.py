"""Writing samples: PNG grids and improved-diffusion style ``.npz`` files, atomically."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

OUTPUT_SUFFIXES = (".png", ".npz")


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """float ``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]`` (as improved-diffusion saves samples)."""
    x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1, min_cell: int = 32) -> np.ndarray:
    """uint8 NHWC -> one uint8 HWC grid image; small images are upscaled (nearest) to ``min_cell`` px."""
    n, h, w, c = images.shape
    scale = max(1, math.ceil(min_cell / max(h, w)))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: an interrupted run leaves no partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output_path(out: str | os.PathLike, *, create_dirs: bool = True) -> tuple[Path, bool]:
    """Validate ``--out`` before sampling. Returns (path, created_folder)."""
    path = Path(out).expanduser()
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out must end in .png (a grid) or .npz (uint8 NHWC images), got {str(out)!r}")
    if path.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give a file name ending in .png or .npz")
    created = False
    if not path.parent.exists():
        if not create_dirs:
            raise FileNotFoundError(f"folder {path.parent} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        created = True
    return path, created


def save_samples(images: torch.Tensor, out: str | os.PathLike) -> Path:
    """Save float ``[N, C, H, W]`` images in [-1, 1] as a ``.png`` grid or a ``.npz`` (key ``arr_0``)."""
    path, _ = check_output_path(out)
    arr = to_uint8_nhwc(images)
    if path.suffix.lower() == ".npz":
        _atomic_write(path, lambda tmp: _savez(tmp, arr))
    else:
        from PIL import Image

        grid = make_grid(arr)
        img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        _atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path


def _savez(tmp: str, arr: np.ndarray) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare name
        np.savez(f, arr)
