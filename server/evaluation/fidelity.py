"""Fidelity: how close the synthetic distribution is to the real one.

* FID with MONAI's ``FIDMetric`` on the embeddings of fedsynth's own slice classifier
  (see ``classifier.py``), overall and per class. Values are comparable only between
  reports that used the same feature network (the report records its cache key).
* The distance between the pixel-intensity distributions: Wasserstein-1 between the two
  histograms (in model units, [-1, 1], so at most 2) and the L1 distance between the
  normalised histograms (at most 2).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import FIDMetric
from monai.metrics.fid import _cov, compute_frechet_distance

# Per-class FID needs a covariance from each side; fewer than this many images gives noise.
MIN_IMAGES_FOR_FID = 2
HISTOGRAM_BINS = 64


def frechet_distance(synthetic: np.ndarray, real: np.ndarray) -> float:
    """FID between two ``(N, F)`` feature matrices.

    With fewer images than features the covariances are singular and the matrix square
    root can come back with a large imaginary part; MONAI then raises. In that case the
    distance is recomputed with a small ridge (1e-6 of the mean variance) on both
    covariances, which changes a well-posed FID by far less than its sampling noise.
    """
    s = torch.as_tensor(synthetic, dtype=torch.float64)
    r = torch.as_tensor(real, dtype=torch.float64)
    try:
        value = float(FIDMetric()(s, r))
        if math.isfinite(value):
            return max(value, 0.0)
    except ValueError:
        pass
    sigma_s, sigma_r = _cov(s, rowvar=False), _cov(r, rowvar=False)
    ridge = 1e-6 * float(torch.diagonal(sigma_s).mean() + torch.diagonal(sigma_r).mean()) / 2 + 1e-12
    eye = torch.eye(s.shape[1], dtype=torch.float64)
    value = float(compute_frechet_distance(s.mean(0), sigma_s + ridge * eye, r.mean(0), sigma_r + ridge * eye))
    return max(value, 0.0)


def fid_per_class(synthetic: np.ndarray, synthetic_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray,
                  classes: tuple[str, ...]) -> dict[str, float | None]:
    """FID within each class; None where either side has fewer than 2 images of it."""
    out: dict[str, float | None] = {}
    for label, name in enumerate(classes):
        s, r = synthetic[synthetic_labels == label], real[real_labels == label]
        out[name] = frechet_distance(s, r) if min(len(s), len(r)) >= MIN_IMAGES_FOR_FID else None
    return out


def intensity_histogram(images: np.ndarray, bins: int = HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Normalised histogram of all pixel values in [-1, 1].

    Background pixels (-1) are counted: how much of the field of view is head is part of
    what the generator must get right.

    Returns:
        ``(density, edges)``: ``(bins,)`` summing to 1 and ``(bins + 1,)`` bin edges.
    """
    counts, edges = np.histogram(np.clip(np.asarray(images, dtype=np.float64), -1, 1), bins=bins, range=(-1.0, 1.0))
    total = counts.sum()
    return (counts / total if total else counts.astype(np.float64)), edges


def histogram_distances(synthetic: np.ndarray, real: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, float]:
    """``wasserstein1`` (earth mover's distance in intensity units) and ``l1`` between histograms."""
    hs, edges = intensity_histogram(synthetic, bins)
    hr, _ = intensity_histogram(real, bins)
    width = float(edges[1] - edges[0])
    return {
        "wasserstein1": float(np.abs(np.cumsum(hs) - np.cumsum(hr)).sum() * width),
        "l1": float(np.abs(hs - hr).sum()),
    }
