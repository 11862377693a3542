"""Sample-quality metrics that need no download: Frechet distance, sliced Wasserstein, classifier scores.

Everything is computed in float64 on the CPU (the inputs are small: a few thousand feature vectors or
2-D points), so the numbers do not depend on the device the samples were drawn on.
"""

from __future__ import annotations

import math

import torch


def _as_f64_2d(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be [N, D] with N >= 1, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of ``features``.

    Args:
        features: ``[N, D]`` (any float dtype, any device), N >= 2.
    Returns:
        ``(mu, sigma)``: float64 ``[D]`` and ``[D, D]`` (unbiased covariance, divisor ``N - 1``, as
        ``numpy.cov`` and the FID reference code use).
    """
    f = _as_f64_2d("features", features)
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite float64 matrix (eigenvalues clamped at 0)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^1/2 sigma2 sigma1^1/2)^1/2)`` (Dowson & Landau
    1982; the quantity FID reports). The matrix square roots use symmetric eigendecompositions, which stay
    real and stable for singular covariances (FID code's ``scipy.linalg.sqrtm`` of the non-symmetric
    product can return complex values there).

    Args:
        mu1, mu2: means ``[D]``; sigma1, sigma2: covariances ``[D, D]`` (symmetric PSD), any float dtype.
    Returns:
        The distance as a Python float (>= 0 up to rounding).
    """
    mu1, mu2 = (m.detach().to("cpu", torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (s.detach().to("cpu", torch.float64) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape[0] != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, mu2 {tuple(mu2.shape)}, "
            f"sigma2 {tuple(s2.shape)}; expected [D], [D, D] for both"
        )
    r1 = _psd_sqrt(s1)
    cross = torch.linalg.eigvalsh((r1 @ s2 @ r1 + (r1 @ s2 @ r1).T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * cross)


def frechet_distance_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``a`` ``[N, D]`` and ``b`` ``[M, D]``."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def _w2_sq_1d(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared 2-Wasserstein distance between the empirical measures of sorted columns.

    ``x`` ``[N, P]`` and ``y`` ``[M, P]`` hold P one-dimensional sample sets, each column sorted ascending.
    Exact for N != M: the integral over u in (0, 1] of ``(F^-1(u) - G^-1(u))^2``, whose quantile
    functions are both constant between the merged breakpoints ``i/N`` and ``j/M``. Returns ``[P]``.
    """
    n, m = x.shape[0], y.shape[0]
    if n == m:
        return ((x - y) ** 2).mean(0)
    u = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n, torch.arange(1, m + 1, dtype=torch.float64) / m])
    u = torch.unique(u.clamp(max=1.0))  # sorted
    w = torch.diff(u, prepend=u.new_zeros(1))
    mid = u - w / 2
    ix = (mid * n).floor().long().clamp(max=n - 1)
    iy = (mid * m).floor().long().clamp(max=m - 1)
    return (w.unsqueeze(1) * (x[ix] - y[iy]) ** 2).sum(0)


def random_directions(dim: int, num: int, seed: int = 0) -> torch.Tensor:
    """``num`` unit vectors uniform on the sphere in R^dim, float64 ``[num, dim]``, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(num, dim, generator=g, dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_projections: int = 512,
    seed: int = 0,
    directions: torch.Tensor | None = None,
) -> float:
    """Sliced 2-Wasserstein distance ``sqrt(mean_theta W2^2(<theta, x>, <theta, y>))``.

    Args:
        x: ``[N, D]`` samples; y: ``[M, D]`` samples (N and M may differ; the 1-D distances are exact).
        num_projections: number of random directions (ignored when ``directions`` is given).
        seed: seed of the directions, so repeated calls compare on the same slices.
        directions: optional ``[P, D]`` unit vectors to project on.
    Returns:
        The distance as a Python float. For ``y = x + s`` it is ``sqrt(mean_theta <theta, s>^2)``, which
        tends to ``|s| / sqrt(D)`` over many directions (``|s| / sqrt(2)`` in 2-D).
    """
    xs, ys = _as_f64_2d("x", x), _as_f64_2d("y", y)
    if xs.shape[1] != ys.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {xs.shape[1]} and {ys.shape[1]}")
    if directions is None:
        if num_projections < 1:
            raise ValueError(f"num_projections must be >= 1, got {num_projections}")
        directions = random_directions(xs.shape[1], num_projections, seed)
    theta = directions.detach().to("cpu", torch.float64)
    if theta.dim() != 2 or theta.shape[1] != xs.shape[1]:
        raise ValueError(f"directions must be [P, {xs.shape[1]}], got {tuple(theta.shape)}")
    px = (xs @ theta.T).sort(0).values
    py = (ys @ theta.T).sort(0).values
    return math.sqrt(float(_w2_sq_1d(px, py).mean()))


def mean_confidence(logits: torch.Tensor) -> float:
    """Mean over samples of the classifier's top softmax probability; ``logits`` ``[N, K]``."""
    p = _as_f64_2d("logits", logits).softmax(1)
    return float(p.max(1).values.mean())


def class_coverage(logits: torch.Tensor) -> float:
    """Entropy (nats) of the histogram of predicted classes; ``logits`` ``[N, K]``.

    ``log K`` (log 10 = 2.303 for digits) when every class is predicted equally often, 0 when one class
    takes everything: a mode-collapse detector, in the spirit of the Inception Score's marginal term.
    """
    lg = _as_f64_2d("logits", logits)
    counts = torch.bincount(lg.argmax(1), minlength=lg.shape[1]).to(torch.float64)
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())
