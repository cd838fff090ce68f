"""Intensity normalisation and resizing shared by every site and the sampler.

All sites must turn their scans into the same value range and geometry, or the averaged
model learns each hospital's scanner instead of anatomy. The model's range is [-1, 1]
with background at -1, and slices keep their physical aspect ratio, padded with
background to a square.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Resize, SpatialPad

BACKGROUND = -1.0
# Percentiles rather than min/max: a handful of hot voxels (vessels, artefacts) must not
# squeeze the brain into a few grey levels.
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
# Voxels within 1% of the range above the minimum are air; they would drag the low
# percentile to the background level.
_BACKGROUND_FRACTION = 0.01
# After normalisation, air sits at -1; 0.05 of the range above it is still noise.
_FOREGROUND_LEVEL = -0.9


def normalise_intensity(array: np.ndarray) -> np.ndarray:
    """Scale a volume or image robustly into [-1, 1], background at -1.

    The percentiles are taken over voxels above a small background threshold (all voxels
    when too few pass it), so the result does not depend on how much air surrounds the
    head. Normalise a whole volume before slicing so its slices share one scale.

    Args:
        array: finite intensities of any shape, e.g. (X, Y, Z) or (H, W).

    Returns:
        float32 array of the same shape in [-1, 1]; a constant input gives all -1.
    """
    data = np.asarray(array, dtype=np.float32)
    if data.size == 0:
        return data.copy()
    low_all = float(data.min())
    # The threshold only needs a rough bright level: a strided sample keeps it cheap.
    stride = max(1, data.size // 65536)
    reference = float(np.percentile(data.ravel()[::stride], 99.0))
    foreground = data[data > low_all + _BACKGROUND_FRACTION * (reference - low_all)]
    if foreground.size < max(16, data.size // 1000):
        foreground = data.ravel()
    low, high = (float(v) for v in np.percentile(foreground, [LOW_PERCENTILE, HIGH_PERCENTILE]))
    if high <= low:
        low, high = low_all, float(data.max())
    if high <= low:
        return np.full(data.shape, BACKGROUND, dtype=np.float32)
    out = np.clip(data, low, high)
    out -= low
    out *= 2.0 / (high - low)
    out -= 1.0
    return out.astype(np.float32, copy=False)


def foreground_fraction(slice2d: np.ndarray) -> float:
    """Fraction of pixels meaningfully above background.

    Args:
        slice2d: normalised slice of shape (H, W), values in [-1, 1].

    Returns:
        Fraction in [0, 1] of pixels above -0.9 (0 for an empty array).
    """
    if slice2d.size == 0:
        return 0.0
    return float(np.count_nonzero(slice2d > _FOREGROUND_LEVEL)) / slice2d.size


def _target_shape(shape: tuple[int, int], size: int, spacing: tuple[float, float]) -> tuple[int, int]:
    """Rows and columns that fit the physical extent's longest side to ``size``."""
    extent = (shape[0] * spacing[0], shape[1] * spacing[1])
    scale = size / max(extent)
    return tuple(min(size, max(1, round(e * scale))) for e in extent)  # type: ignore[return-value]


def resize_to_model(
    slice2d: np.ndarray, size: int, spacing: tuple[float, float] = (1.0, 1.0)
) -> np.ndarray:
    """Fit a normalised slice into the model's square input, keeping its aspect ratio.

    The longest physical side becomes ``size`` pixels; the other side is padded evenly
    with background (-1). The target shape is computed here rather than with MONAI's
    ``size_mode="longest"``, which fails (OverflowError) when a side would round to 0 and
    knows nothing about anisotropic pixels.

    Args:
        slice2d: normalised slice of shape (H, W), values in [-1, 1].
        size: output side length S.
        spacing: pixel size (row, column) in mm; only the ratio matters.

    Returns:
        float32 array of shape (S, S) in [-1, 1].
    """
    if slice2d.ndim != 2 or slice2d.size == 0:
        raise ValueError(f"resize_to_model: expected a non-empty 2D slice, got shape {slice2d.shape}")
    if size < 1:
        raise ValueError(f"resize_to_model: size must be >= 1, got {size}")
    target = _target_shape(slice2d.shape, size, spacing)
    image = torch.as_tensor(np.ascontiguousarray(slice2d, dtype=np.float32))[None]  # (1, H, W)
    if target != tuple(slice2d.shape):
        if all(t <= s for t, s in zip(target, slice2d.shape)):
            # Area averaging is an exact box filter when shrinking, and ~20x cheaper than
            # bilinear with Gaussian anti-aliasing on 512-pixel slices.
            resize = Resize(spatial_size=target, mode="area")
        else:
            resize = Resize(spatial_size=target, mode="bilinear", anti_aliasing=True)
        image = resize(image)
    padded = SpatialPad(spatial_size=(size, size), mode="constant", value=BACKGROUND)(image)
    out = np.asarray(torch.as_tensor(padded)[0], dtype=np.float32)
    return np.clip(out, BACKGROUND, 1.0)
