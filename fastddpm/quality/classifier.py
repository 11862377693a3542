"""A tiny CNN classifier of scikit-learn's 8x8 digits, the feature extractor behind FD-digits.

The shipped weights (``fastddpm/models/digits_classifier/``) were trained by
:func:`train_digits_classifier` on the training part of :func:`fastddpm.data.digits_split` (the split the
bundled digits U-Net trains on), so the held-out part is unseen by both and serves as the real reference
set. Rebuild them with ``python -m fastddpm.quality.classifier`` (about a minute on a laptop CPU).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import class_coverage, frechet_distance_features, mean_confidence

CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "models" / "digits_classifier"
WEIGHTS_NAME = "classifier.safetensors"
INFO_NAME = "classifier.json"
NUM_CLASSES = 10
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """CNN for ``[B, 1, 8, 8]`` float images in [-1, 1]: two 3x3 convs, 2x2 max-pool, a 64-wide hidden layer.

    :meth:`features` returns the hidden layer (float32 ``[B, 64]``, after ReLU): the embedding whose
    Frechet distance is FD-digits. ``forward`` returns the logits ``[B, 10]``. 38,282 parameters.
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, dropout: float = 0.25) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"the digits classifier takes [B, 1, 8, 8] images in [-1, 1], got {tuple(x.shape)}")
        h = F.relu(self.conv1(x.float()))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [N, 64], logits [N, 10])``, float32 on the CPU, for images ``[N, 1, 8, 8]`` in [-1, 1]."""
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        feats, logits = [], []
        try:
            for i in range(0, images.shape[0], batch_size):
                f = self.features(images[i : i + batch_size].to(dev))
                feats.append(f.cpu())
                logits.append(self.head(f).cpu())
        finally:
            self.train(was_training)
        return torch.cat(feats), torch.cat(logits)


def digits_train_heldout() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_images, train_labels, heldout_images, heldout_labels)`` of :func:`fastddpm.data.digits_split`.

    Images float32 ``[n, 1, 8, 8]`` in [-1, 1]; labels int64 ``[n]``. The default split: 1438 / 359.
    """
    from ..data import digits_split, load_digits

    images, _ = load_digits(with_labels=True)
    split = digits_split()
    return images[split.train], split.train_labels, images[split.test], split.test_labels


def _shift_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by -1, 0 or +1 pixel in each direction (background -1 fills the gap)."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (b,), generator=g)
    dx = torch.randint(0, 3, (b,), generator=g)
    rows = (dy.view(b, 1) + torch.arange(8)).view(b, 1, 8, 1).expand(b, 1, 8, 10)
    out = padded.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(8)).view(b, 1, 1, 8).expand(b, 1, 8, 8)
    return out.gather(3, cols)


def train_digits_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> DigitsClassifier:
    """Train a :class:`DigitsClassifier` (AdamW, cosine decay, +-1 pixel shifts) on float32 ``[N, 1, 8, 8]``
    images in [-1, 1] with int64 labels ``[N]``. Deterministic for a given ``seed`` on one machine (CPU).
    Returns the model in eval mode on the CPU."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
        n = images.shape[0]
        steps = epochs * ((n + batch_size - 1) // batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                loss = F.cross_entropy(model(_shift_augment(images[idx], g)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` ``[N, 1, 8, 8]`` whose predicted class equals ``labels`` ``[N]``."""
    _, logits = model.embed(images)
    return float((logits.argmax(1) == labels.cpu()).to(torch.float64).mean())


def save_digits_classifier(model: DigitsClassifier, out_dir: str | Path, info: dict[str, Any]) -> Path:
    """Write ``classifier.safetensors`` and ``classifier.json`` (``info`` plus the architecture) to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME))
    meta = {"architecture": "fastddpm.quality.classifier.DigitsClassifier", "feature_dim": FEATURE_DIM, **info}
    (out / INFO_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def load_digits_classifier(path: str | Path | None = None, device: torch.device | str = "cpu") -> DigitsClassifier:
    """The shipped classifier (or one saved with :func:`save_digits_classifier` in ``path``), in eval mode."""
    from safetensors.torch import load_file

    d = Path(path) if path is not None else CLASSIFIER_DIR
    f = d / WEIGHTS_NAME
    if not f.is_file():
        raise FileNotFoundError(
            f"no digits classifier weights at {f}; rebuild them with `python -m fastddpm.quality.classifier`"
        )
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(f)))
    return model.to(device).eval()


def classifier_info(path: str | Path | None = None) -> dict[str, Any]:
    """The ``classifier.json`` next to the weights (training settings, held-out accuracy)."""
    d = Path(path) if path is not None else CLASSIFIER_DIR
    return json.loads((d / INFO_NAME).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class DigitsScores:
    """Classifier-based scores of a set of generated digits (see :func:`score_digits`)."""

    fd: float  # FD-digits: Frechet distance of the 64-d features to the reference set's
    confidence: float  # mean max softmax probability
    coverage: float  # entropy (nats) of the predicted-class histogram; log 10 = 2.303 at most


class DigitsScorer:
    """Scores generated digits against a fixed real reference set (default: the held-out digits).

    The reference features are computed once; :meth:`score` then takes float ``[N, 1, 8, 8]`` images in
    [-1, 1] and returns :class:`DigitsScores`.
    """

    def __init__(self, classifier: DigitsClassifier | None = None, reference: torch.Tensor | None = None) -> None:
        self.classifier = classifier if classifier is not None else load_digits_classifier()
        if reference is None:
            reference = digits_train_heldout()[2]
        self.reference_features, _ = self.classifier.embed(reference)

    def score(self, images: torch.Tensor) -> DigitsScores:
        if images.shape[0] < 2:
            raise ValueError(f"need at least 2 images to score, got {images.shape[0]}")
        feats, logits = self.classifier.embed(images.detach().float().cpu())
        return DigitsScores(
            fd=frechet_distance_features(feats, self.reference_features),
            confidence=mean_confidence(logits),
            coverage=class_coverage(logits),
        )


def build_shipped_classifier(out_dir: str | Path = CLASSIFIER_DIR, seed: int = 0) -> dict[str, Any]:
    """Train the classifier on the training split, measure held-out accuracy, save it; returns the info."""
    import platform

    x_tr, y_tr, x_te, y_te = digits_train_heldout()
    t0 = time.perf_counter()
    model = train_digits_classifier(x_tr, y_tr, seed=seed)
    info = {
        "train_split": "fastddpm.data.digits_split() train part (seed 0, test_fraction 0.2)",
        "train_size": int(x_tr.shape[0]),
        "heldout_size": int(x_te.shape[0]),
        "train_accuracy": round(accuracy(model, x_tr, y_tr), 4),
        "heldout_accuracy": round(accuracy(model, x_te, y_te), 4),
        "seed": seed,
        "epochs": 60,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    save_digits_classifier(model, out_dir, info)
    return info


if __name__ == "__main__":
    print(json.dumps(build_shipped_classifier(), indent=2))
