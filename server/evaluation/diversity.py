"""Diversity: mean pairwise MS-SSIM within each class (lower = more varied).

A generator that collapses onto a few images scores close to 1; real data sets the
reference. MONAI's ``MultiScaleSSIMMetric`` needs the image at its coarsest scale to be
larger than the kernel: with the standard 5 scales and an 11-pixel kernel that means
images of 176 px and more. Smaller images use the largest odd kernel (at most 11, at
least 3) that fits, and drop coarse scales when even a 3-pixel kernel does not fit; the
remaining standard weights are renormalised to sum to 1. The settings used are recorded
in the report, because MS-SSIM values are only comparable at equal settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric
from tqdm.auto import tqdm

STANDARD_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# SSIM's luminance term assumes non-negative intensities: images in [-1, 1] are shifted to
# [0, 1] first, or a dark region against a bright one can score below zero.
DATA_RANGE = 1.0


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """``[-1, 1]`` images as a float32 tensor in ``[0, 1]``."""
    return (torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)) + 1.0) / 2.0


@dataclass(frozen=True)
class MsSsimSettings:
    kernel_size: int
    weights: tuple[float, ...]


def ms_ssim_settings(size: int) -> MsSsimSettings:
    """The most scales, then the largest odd kernel, that MONAI accepts at ``size`` pixels."""
    for scales in range(len(STANDARD_WEIGHTS), 0, -1):
        divisor = max(1, scales - 1) ** 2  # MONAI's own size check
        kernel = min(11, size // divisor)  # MONAI requires size // divisor > kernel - 1
        kernel -= 1 - kernel % 2  # odd, so the window is centred
        if kernel >= 3:
            w = np.asarray(STANDARD_WEIGHTS[:scales])
            return MsSsimSettings(kernel, tuple(float(x) for x in w / w.sum()))
    raise ValueError(f"images of {size} px are too small for MS-SSIM (need at least 3 px)")


def ms_ssim_pairs(a: np.ndarray, b: np.ndarray, settings: MsSsimSettings, batch: int = 256) -> np.ndarray:
    """MS-SSIM of ``a[i]`` with ``b[i]`` for every ``i``; both ``(P, 1, S, S)`` in [-1, 1]."""
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=DATA_RANGE, kernel_size=settings.kernel_size,
                                  weights=settings.weights, reduction="none")
    out = []
    for start in range(0, len(a), batch):
        x, y = to_unit_range(a[start:start + batch]), to_unit_range(b[start:start + batch])
        out.append(metric(y_pred=x, y=y).reshape(-1).double().numpy())
        metric.reset()
    return np.concatenate(out) if out else np.empty(0)


def sample_pairs(n: int, max_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """``(P, 2)`` index pairs ``i < j``: all of them when few enough, else a seeded sample without repeats."""
    total = n * (n - 1) // 2
    if total <= max_pairs:
        i, j = np.triu_indices(n, k=1)
        return np.stack([i, j], axis=1)
    chosen = rng.choice(total, size=max_pairs, replace=False)
    i, j = np.triu_indices(n, k=1)  # n is at most a few thousand per class here
    return np.stack([i[chosen], j[chosen]], axis=1)


def mean_pairwise_ms_ssim(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], max_pairs_per_class: int = 400,
                          seed: int = 0, progress: bool = False, desc: str = "MS-SSIM") -> dict:
    """Mean MS-SSIM over pairs of images of the same class.

    Returns:
        ``{"mean": pooled mean over all pairs (None without any pair), "per_class":
        {class: mean or None}, "pairs": number of pairs, "kernel_size", "weights"}``.
    """
    settings = ms_ssim_settings(int(images.shape[-1]))
    rng = np.random.default_rng(seed)
    per_class: dict[str, float | None] = {}
    pooled: list[np.ndarray] = []
    for label, name in enumerate(tqdm(classes, desc=desc, unit="class", disable=not progress, leave=False)):
        members = images[labels == label]
        pairs = sample_pairs(len(members), max_pairs_per_class, rng)
        if len(pairs) == 0:
            per_class[name] = None
            continue
        values = ms_ssim_pairs(members[pairs[:, 0]], members[pairs[:, 1]], settings)
        per_class[name] = float(values.mean())
        pooled.append(values)
    values = np.concatenate(pooled) if pooled else np.empty(0)
    return {"mean": float(values.mean()) if values.size else None, "per_class": per_class, "pairs": int(values.size),
            "kernel_size": settings.kernel_size, "weights": list(settings.weights)}
