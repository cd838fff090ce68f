"""The site's half of the federated memorisation audit: compare a synthetic set with local slices.

Runs next to the scans; the result holds aggregate numbers only, so a site can answer
"does this synthetic set contain a copy of one of my patients?" without revealing which
patient, which image or how close any single one came.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common import audit_protocol as ap
from common.errors import ConfigError
from common.similarity import DEFAULT_QUANTILE_LEVELS, count_below, distance_quantiles, nearest_pearson


@dataclass(frozen=True)
class AuditSummary:
    """What a site sends back: counts and quantiles over the synthetic images, nothing per image."""

    num_synthetic: int
    num_local: int
    counts_below: list[int]
    distance_quantiles: list[float]


def audit_synthetic_set(synthetic: np.ndarray, local: np.ndarray, thresholds: Sequence[float],
                        quantile_levels: Sequence[float] = DEFAULT_QUANTILE_LEVELS) -> AuditSummary:
    """Nearest local slice of every synthetic image (Pearson distance, all slices searched).

    Args:
        synthetic: ``(N, 1, S, S)`` images sent by the server.
        local: ``(M, 1, S, S)`` the site's own slices, loaded at the same size.
        thresholds: distances; each count is of synthetic images strictly closer.
        quantile_levels: levels in [0, 1] of the nearest-distance quantiles to report.

    Raises:
        ConfigError: sizes differ, too few synthetic images, or levels out of range.
    """
    if synthetic.ndim != 4 or synthetic.shape[1:] != local.shape[1:]:
        raise ConfigError(f"synthetic images of shape {tuple(synthetic.shape[1:])} do not match this site's slices "
                          f"{tuple(local.shape[1:])}: sample at the federation's data.image_size")
    if len(synthetic) < ap.MIN_SYNTHETIC_IMAGES:
        raise ConfigError(f"a memorisation audit needs at least {ap.MIN_SYNTHETIC_IMAGES} synthetic images, got {len(synthetic)}: "
                          "fewer would make the quantiles per-image values")
    if not all(0.0 <= q <= 1.0 for q in quantile_levels):
        raise ConfigError(f"quantile levels must be in [0, 1], got {list(quantile_levels)}")
    _, distances = nearest_pearson(synthetic, local)
    return AuditSummary(len(synthetic), len(local), count_below(distances, thresholds),
                        distance_quantiles(distances, quantile_levels))


@dataclass(frozen=True)
class AuditRequest:
    """The server's query as plain values, so the site policy can check it before any slice is read."""

    images: np.ndarray
    thresholds: list[float]
    quantile_levels: list[float]


def unpack_request(arrays: dict[str, np.ndarray], config: dict) -> AuditRequest:
    """The query's images, thresholds and quantile levels (arrays and config as plain dicts)."""
    images = arrays.get(ap.SYNTHETIC_IMAGES)
    if images is None or ap.THRESHOLDS not in config:
        raise ConfigError(f"audit query needs '{ap.SYNTHETIC_IMAGES}' images and '{ap.THRESHOLDS}'",
                          public="malformed audit query")
    levels = config.get(ap.QUANTILE_LEVELS) or DEFAULT_QUANTILE_LEVELS
    return AuditRequest(np.asarray(images), [float(t) for t in config[ap.THRESHOLDS]], [float(q) for q in levels])
