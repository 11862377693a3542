"""Sample quality without downloads: how the number of steps and the sampler change what comes out.

* :mod:`.metrics`: Frechet distance, sliced Wasserstein distance, classifier confidence and coverage.
* :mod:`.classifier`: the shipped digits CNN whose features define FD-digits (:class:`DigitsScorer`).
* :mod:`.toy`: a 2-D ring of Gaussians with a known density, an MLP denoiser and the exact denoiser.
* :mod:`.run`: the ``fastddpm quality`` pipeline (:func:`run_quality`: CSV/JSON tables and figures).
"""

import importlib

from .metrics import (
    class_coverage,
    feature_statistics,
    frechet_distance,
    frechet_distance_features,
    mean_confidence,
    sliced_wasserstein,
)

# Loaded on first use, so `python -m fastddpm.quality.toy` / `.classifier` run their module cleanly.
_LAZY = {
    "DigitsClassifier": "classifier",
    "DigitsScorer": "classifier",
    "DigitsScores": "classifier",
    "load_digits_classifier": "classifier",
    "QualityConfig": "run",
    "QualityResult": "run",
    "predicted_x0_trajectory": "run",
    "run_quality": "run",
    "ExactMixtureDenoiser": "toy",
    "RingMixture": "toy",
    "ToyDenoiser": "toy",
    "load_toy_denoiser": "toy",
    "train_toy_denoiser": "toy",
}

__all__ = [
    "DigitsClassifier",
    "DigitsScorer",
    "DigitsScores",
    "ExactMixtureDenoiser",
    "QualityConfig",
    "QualityResult",
    "RingMixture",
    "ToyDenoiser",
    "class_coverage",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_features",
    "load_digits_classifier",
    "load_toy_denoiser",
    "mean_confidence",
    "predicted_x0_trajectory",
    "run_quality",
    "sliced_wasserstein",
    "train_toy_denoiser",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
