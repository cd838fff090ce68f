"""Nearest-neighbour search by Pearson distance, shared by the central evaluation and the site audit.

The distance between two images is ``1 - r``, with ``r`` the Pearson correlation of their
pixels: 0 for an exact copy (and for a copy with changed brightness or contrast, which a
memorisation check must catch too), about 1 for unrelated images, 2 for a negative. Rows
are standardised once, so the whole search is a chunked matrix product: every query is
compared with *every* reference, there is no approximate index that could miss a copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

# The quantiles a site reports by default: low ones matter for memorisation, the median
# gives the scale. No per-image distance is ever sent.
DEFAULT_QUANTILE_LEVELS: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5)


def standardise_rows(images: np.ndarray) -> np.ndarray:
    """Flatten each image and scale it to zero mean and unit L2 norm.

    Args:
        images: ``(N, ...)`` any per-image shape, e.g. ``(N, 1, H, W)``.

    Returns:
        ``(N, D)`` float32. A constant image becomes all zeros, so its correlation with
        anything is 0 (distance 1) instead of NaN.
    """
    flat = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    centred = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return np.divide(centred, norms, out=np.zeros_like(centred), where=norms > 1e-12)


def nearest_pearson(
    queries: np.ndarray,
    references: np.ndarray,
    chunk: int = 512,
    progress: bool = False,
    desc: str = "nearest neighbours",
) -> tuple[np.ndarray, np.ndarray]:
    """For every query, its nearest reference by Pearson distance, searched over all references.

    Args:
        queries: ``(Q, ...)`` images.
        references: ``(R, ...)`` images of the same per-image shape, ``R >= 1``.
        chunk: queries per matrix product; bounds memory at ``chunk * R`` floats.
        progress: show a progress bar over chunks.

    Returns:
        ``(index, distance)``: ``(Q,)`` int64 index into ``references`` and ``(Q,)``
        float64 distances in [0, 2].

    Raises:
        ValueError: no reference, or the per-image shapes differ.
    """
    if len(references) == 0:
        raise ValueError("nearest_pearson: no reference image to compare with")
    if np.shape(queries)[1:] != np.shape(references)[1:]:
        raise ValueError(f"nearest_pearson: image shapes differ, {np.shape(queries)[1:]} vs {np.shape(references)[1:]}")
    ref = standardise_rows(references)
    index = np.empty(len(queries), dtype=np.int64)
    distance = np.empty(len(queries), dtype=np.float64)
    starts = range(0, len(queries), chunk)
    for start in tqdm(starts, desc=desc, unit="chunk", disable=not progress or len(starts) < 2):
        q = standardise_rows(queries[start:start + chunk])
        r = q @ ref.T  # (chunk, R) correlations
        best = np.argmax(r, axis=1)
        index[start:start + len(q)] = best
        distance[start:start + len(q)] = 1.0 - r[np.arange(len(q)), best].astype(np.float64)
    # float32 rounding can put an exact copy a hair below 0
    return index, np.clip(distance, 0.0, 2.0)


def near_duplicate_representatives(images: np.ndarray, bound: float) -> np.ndarray:
    """Indices of one image per group of near-duplicates, in order, pairwise at least ``bound`` apart.

    Greedy: an image closer than ``bound`` (Pearson distance) to an earlier representative joins
    it, otherwise it becomes one. Brightness and contrast changes are distance 0, so they merge
    too. Constant images have no pattern to correlate (distance 1 to everything, also to each
    other) and form one group of their own. Compares every pair: ``O(N^2)``, for bounded ``N``.
    """
    rows = standardise_rows(images)
    flat = np.asarray(images, dtype=np.float32).reshape(len(rows), -1)
    # Flat to float32 precision: subtracting the mean leaves rounding noise, which would standardise
    # into a random pattern, another "distinct" image for each constant value.
    spread = flat.max(axis=1) - flat.min(axis=1)
    constant = spread <= 1e-5 * np.maximum(np.abs(flat).max(axis=1), 1e-30)
    similar = (rows @ rows.T) > (1.0 - bound)  # (N, N): r > 1 - bound, i.e. distance < bound
    covered = np.zeros(len(rows), dtype=bool)
    representatives = []
    for i in range(len(rows)):
        if covered[i]:
            continue
        representatives.append(i)
        covered |= constant if constant[i] else similar[i]
    return np.asarray(representatives, dtype=np.int64)


def count_below(distances: np.ndarray, thresholds: Sequence[float]) -> list[int]:
    """How many distances are strictly below each threshold."""
    d = np.asarray(distances, dtype=np.float64)
    return [int(np.count_nonzero(d < float(t))) for t in thresholds]


def distance_quantiles(distances: np.ndarray, levels: Sequence[float] = DEFAULT_QUANTILE_LEVELS) -> list[float]:
    """Quantiles of a set of distances (``nan`` for each level when the set is empty)."""
    d = np.asarray(distances, dtype=np.float64)
    if d.size == 0:
        return [float("nan")] * len(levels)
    return [float(v) for v in np.quantile(d, list(levels))]
