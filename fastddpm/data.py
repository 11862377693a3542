"""Training data as one in-memory float32 tensor ``[N, C, H, W]`` in ``[-1, 1]``.

Sources:

* ``"digits"``: scikit-learn's bundled ``load_digits()`` (1797 grey 8x8 images, values 0..16, shipped
  with scikit-learn, no download), mapped with ``x / 8 - 1``. ``"digits-train"`` / ``"digits-test"`` are
  the two parts of :func:`digits_split` with its default seed.
* a folder: every ``.png`` / ``.jpg`` / ``.jpeg`` file under it (sub-folders included, sorted by path),
  read with Pillow, converted to RGB or greyscale, center-cropped to a square and resized.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "IMAGE_SUFFIXES",
    "DigitsSplit",
    "digits_split",
    "load_dataset",
    "load_digits",
    "load_image_folder",
]

#: Names :func:`load_dataset` knows besides folders.
DATASETS = ("digits", "digits-train", "digits-test")
#: File suffixes read from a folder (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


class DigitsSplit(NamedTuple):
    """A train/held-out split of scikit-learn's digits (indices into ``load_digits()``, int64 ``[n]``)."""

    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    test_labels: torch.Tensor


def _sklearn_digits():
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ImportError(
            "the 'digits' dataset needs scikit-learn (pip install scikit-learn); it ships the images, nothing is downloaded"
        ) from None
    return sk_load_digits()


def load_digits(with_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as float32 ``[1797, 1, 8, 8]`` in ``[-1, 1]`` (pixel ``v`` in 0..16 -> ``v/8 - 1``).

    With ``with_labels=True`` also returns the int64 labels ``[1797]`` (0..9).
    """
    d = _sklearn_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    if with_labels:
        return images.contiguous(), torch.as_tensor(d.target, dtype=torch.int64)
    return images.contiguous()


def _hash_key(seed: int, index: int) -> bytes:
    return hashlib.blake2b(f"fastddpm-digits-split:{seed}:{index}".encode(), digest_size=8).digest()


def digits_split(seed: int = DIGITS_SPLIT_SEED, test_fraction: float = DIGITS_TEST_FRACTION) -> DigitsSplit:
    """Deterministic, stratified train/held-out split of scikit-learn's digits.

    For each class ``c``, its indices are ordered by the BLAKE2b hash of ``"fastddpm-digits-split:{seed}:{index}"``
    and the first ``round(n_c * test_fraction)`` go to the held-out part. This depends only on ``seed``,
    ``test_fraction`` and the dataset, never on torch / numpy random-number algorithms, so it is the same on
    every machine and version. The default (seed 0, 0.2) holds out 359 of the 1797 images (35 or 36 per class).

    Returns:
        :class:`DigitsSplit` of sorted int64 index tensors into ``load_digits()`` and their labels.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = torch.as_tensor(_sklearn_digits().target, dtype=torch.int64)
    train, test = [], []
    for c in sorted(set(labels.tolist())):
        idx = [i for i in range(len(labels)) if int(labels[i]) == c]
        idx.sort(key=lambda i: _hash_key(seed, i))
        n_test = round(len(idx) * test_fraction)
        test += idx[:n_test]
        train += idx[n_test:]
    train_t = torch.tensor(sorted(train), dtype=torch.int64)
    test_t = torch.tensor(sorted(test), dtype=torch.int64)
    return DigitsSplit(train_t, test_t, labels[train_t], labels[test_t])


def _adapt(images: torch.Tensor, image_size: int | None, channels: int | None) -> torch.Tensor:
    """Resize (bilinear, antialiased) and repeat channels of a grey ``[N, 1, H, W]`` tensor in [-1, 1]."""
    if channels is not None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
    if image_size is not None and image_size != images.shape[-1]:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )
        images = images.clamp(-1.0, 1.0).contiguous()
    return images


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def load_image_folder(
    path: str | os.PathLike, image_size: int | None = None, channels: int | None = None
) -> torch.Tensor:
    """Every PNG/JPEG under ``path`` as float32 ``[N, C, S, S]`` in ``[-1, 1]``, in sorted path order.

    Each image is converted to RGB (``channels=3``) or greyscale ``L`` (``channels=1``), center-cropped to a
    square of its shorter side and resized (bicubic) to ``image_size`` x ``image_size``. ``channels=None``
    picks 1 when every image is greyscale, else 3. ``image_size=None`` keeps the cropped size, which must
    then be the same for every image.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a directory")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    files = _image_files(folder)
    if not files:
        raise ValueError(f"no images in {folder}: expected files ending in {', '.join(IMAGE_SUFFIXES)} (any case)")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image {f}: {e}") from None
    if channels is None:
        grey = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in images)
        channels = 1 if grey else 3
    mode = "L" if channels == 1 else "RGB"
    out = []
    size = image_size
    for f, im in zip(files, images):
        im = im.convert(mode)
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
        if size is None:
            size = s
        if s != size:
            if image_size is None:
                raise ValueError(
                    f"images in {folder} have different sizes ({files[0].name}: {size}x{size} after cropping, "
                    f"{f.name}: {s}x{s}); pass image_size to resize them all"
                )
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size, size, channels)
        out.append(t.permute(2, 0, 1))
    return torch.stack(out).to(torch.float32).div_(127.5).sub_(1.0).contiguous()


def load_dataset(
    name_or_path: str | os.PathLike, image_size: int | None = None, channels: int | None = None
) -> torch.Tensor:
    """Load a training set as float32 ``[N, C, H, W]`` in ``[-1, 1]`` (CPU).

    Args:
        name_or_path: ``"digits"``, ``"digits-train"``, ``"digits-test"`` (see the module docstring), or a
            folder of PNG/JPEG images.
        image_size: output height and width (``None``: 8 for digits, the images' own size for a folder).
        channels: 1 (greyscale) or 3 (RGB); ``None``: 1 for digits, auto-detected for a folder.

    Raises:
        ValueError: unknown name (the message lists the options), a folder with no images, an unreadable
            image (the message names it), or images of different sizes without ``image_size``.
    """
    name = os.fspath(name_or_path)
    if name in DATASETS:
        images = load_digits()
        if name != "digits":
            split = digits_split()
            images = images[split.train if name == "digits-train" else split.test]
        return _adapt(images, image_size, channels)
    path = Path(name).expanduser()
    if path.is_dir():
        return load_image_folder(path, image_size=image_size, channels=channels)
    if path.exists():
        raise ValueError(f"dataset {name!r} is a file; give a folder of images or one of: {', '.join(DATASETS)}")
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}, or a folder of PNG/JPEG images")
