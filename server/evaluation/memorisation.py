"""Memorisation: is any synthetic image a near-copy of a training image?

Every synthetic image is compared with *every* training image (Pearson distance,
``common.similarity``). How close is "too close" is set by the data itself: the baseline
is the distance from each held-out real image to its nearest training image, i.e. how
close two *different* real scans of this kind usually are. A synthetic image nearer to
the training set than 99% of held-out real images (below the baseline's 1st percentile)
is suspicious. The held-out set must not contain near-copies of training images, or the
baseline collapses to 0 (see the benchmark's grouped split).

The closest pairs are also scored with SSIM (MONAI ``SSIMMetric``) as a second,
structure-based opinion for the person reading the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from monai.metrics import SSIMMetric

from common.similarity import count_below, distance_quantiles, nearest_pearson
from server.evaluation.diversity import DATA_RANGE, to_unit_range
from server.evaluation.image_sets import ImageSet

QUANTILE_LEVELS = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75)
DISTANCE_BINS = 40


@dataclass(frozen=True)
class ClosestPair:
    """One synthetic image and its nearest training image, for the report's side-by-side view."""

    synthetic_index: int
    train_index: int
    distance: float
    ssim: float


def pair_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of ``a[i]`` with ``b[i]`` (both ``(P, 1, S, S)`` in [-1, 1]), kernel sized to the image."""
    if len(a) == 0:
        return np.empty(0)
    size = int(a.shape[-1])
    kernel = max(3, min(11, size // 4) | 1)
    metric = SSIMMetric(spatial_dims=2, data_range=DATA_RANGE, win_size=kernel, reduction="none")
    return metric(y_pred=to_unit_range(a), y=to_unit_range(b)).reshape(-1).double().numpy()


def memorisation_report(synthetic: ImageSet, real_test: ImageSet, real_train: ImageSet, top_pairs: int = 8,
                        progress: bool = False) -> tuple[dict, list[ClosestPair], dict]:
    """Nearest training image of every synthetic image, against the held-out baseline.

    Returns:
        ``(report, closest pairs, distances)``: the JSON-ready summary, the ``top_pairs``
        closest synthetic/training pairs, and the raw ``{"synthetic", "baseline"}``
        distance arrays (for plots; never written to JSON).
    """
    s_index, s_dist = nearest_pearson(synthetic.images, real_train.images, progress=progress, desc="synthetic -> train")
    _, baseline = nearest_pearson(real_test.images, real_train.images, progress=progress, desc="held-out -> train")
    p1 = float(np.percentile(baseline, 1))
    order = np.argsort(s_dist, kind="stable")[:top_pairs]
    ssim = pair_ssim(synthetic.images[order], real_train.images[s_index[order]])
    pairs = [ClosestPair(int(i), int(s_index[i]), float(s_dist[i]), float(v)) for i, v in zip(order, ssim)]
    report = {
        "distance": "pearson (1 - r), nearest over all training images",
        "baseline_p1": p1,
        "fraction_below_p1": float(np.mean(s_dist < p1)) if len(s_dist) else None,
        "count_below_p1": count_below(s_dist, [p1])[0],
        "exact_copies": count_below(s_dist, [1e-6])[0],
        "quantile_levels": list(QUANTILE_LEVELS),
        "synthetic_quantiles": distance_quantiles(s_dist, QUANTILE_LEVELS),
        "baseline_quantiles": distance_quantiles(baseline, QUANTILE_LEVELS),
        "num_synthetic": len(synthetic),
        "num_train": len(real_train),
        "num_baseline": len(real_test),
        "closest_pairs": [
            {"synthetic": synthetic.names[p.synthetic_index], "synthetic_class": synthetic.classes[synthetic.labels[p.synthetic_index]],
             "train": real_train.names[p.train_index], "train_class": real_train.classes[real_train.labels[p.train_index]],
             "distance": p.distance, "ssim": p.ssim}
            for p in pairs
        ],
    }
    return report, pairs, {"synthetic": s_dist, "baseline": baseline}
