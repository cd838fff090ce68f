"""The site's half of the federated memorisation audit: compare a synthetic set with local slices.

Runs next to the scans; the result holds aggregate numbers only, so a site can answer
"does this synthetic set contain copies of my patients?" without revealing which patient,
which image or how close any single one came. Counts are of *patients* (however many
synthetic images or slices match one patient, it counts once) and a count below the site's
minimum is sent as 0: a server that hides one scan among decoys learns nothing from a count
of one. The site's own log still says how many there were.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common import audit_protocol as ap
from common.errors import ConfigError
from common.similarity import DEFAULT_QUANTILE_LEVELS, distance_quantiles, nearest_pearson

log = logging.getLogger("fedsynth.client")


@dataclass(frozen=True)
class AuditSummary:
    """What a site sends back: counts and quantiles over the synthetic images, nothing per image."""

    num_synthetic: int
    num_local: int
    counts_below: list[int]
    distance_quantiles: list[float]
    num_distinct: int = 0
    """Images searched: one per group of near-duplicates of the query."""
    num_matched: int = 0
    """Patients that are the nearest of at least one synthetic image: the quantiles' population."""
    count_floor: int = 1
    """Counts below this were sent as 0."""

    def metrics(self) -> dict[str, int | float | list[int] | list[float]]:
        """The reply's MetricRecord entries."""
        return {ap.NUM_SYNTHETIC: self.num_synthetic, ap.NUM_DISTINCT: self.num_distinct, ap.NUM_LOCAL: self.num_local,
                ap.COUNTS_BELOW: self.counts_below, ap.DISTANCE_QUANTILES: self.distance_quantiles,
                ap.COUNT_FLOOR: self.count_floor}


def audit_synthetic_set(synthetic: np.ndarray, local: np.ndarray, thresholds: Sequence[float],
                        quantile_levels: Sequence[float] = DEFAULT_QUANTILE_LEVELS,
                        local_patients: Sequence[str] | None = None, min_count: int = ap.DEFAULT_MIN_COUNT,
                        num_received: int | None = None) -> AuditSummary:
    """Nearest local slice of every synthetic image (Pearson distance, all slices searched).

    Args:
        synthetic: ``(N, 1, S, S)`` distinct images (one per group of near-duplicates).
        local: ``(M, 1, S, S)`` the site's own slices, loaded at the same size.
        thresholds: distances; each count is of the site's patients with a slice that is the
            nearest of some synthetic image and strictly closer than the threshold.
        quantile_levels: levels of the nearest-distance quantiles to report; each must leave
            ``min_count`` images on either side (:func:`common.audit_protocol.quantile_level_range`).
            The quantiles are over the matched patients, each at its closest synthetic image, so
            many images near one patient weigh as one; a level without ``min_count`` patients on
            either side is sent as ``QUANTILE_WITHHELD``.
        local_patients: patient id of each local slice; without them every slice is a patient.
        min_count: a count below this is reported as 0.
        num_received: images the server sent, before near-duplicates were merged (default ``N``).

    Raises:
        ConfigError: sizes differ, too few or too many synthetic images, or levels out of range.
    """
    if synthetic.ndim != 4 or synthetic.shape[1:] != local.shape[1:]:
        raise ConfigError(f"synthetic images of shape {tuple(synthetic.shape[1:])} do not match this site's slices "
                          f"{tuple(local.shape[1:])}: sample at the federation's data.image_size")
    if len(synthetic) < ap.MIN_SYNTHETIC_IMAGES:
        raise ConfigError(f"a memorisation audit needs at least {ap.MIN_SYNTHETIC_IMAGES} synthetic images, got {len(synthetic)}: "
                          "fewer would make the quantiles per-image values")
    if len(synthetic) > ap.MAX_SYNTHETIC_IMAGES:
        raise ConfigError(f"a memorisation audit takes at most {ap.MAX_SYNTHETIC_IMAGES} synthetic images, got {len(synthetic)}")
    if not all(ap.quantile_level_allowed(q, len(synthetic), min_count) for q in quantile_levels):
        low, high = ap.quantile_level_range(len(synthetic), min_count)
        raise ConfigError(f"quantile levels must be in [{low:.3f}, {high:.3f}] for {len(synthetic)} images "
                          f"(at least {min_count} on either side), got {list(quantile_levels)}")
    patients = np.asarray(local_patients if local_patients is not None else np.arange(len(local)))
    if len(patients) != len(local):
        raise ValueError(f"{len(patients)} patient ids for {len(local)} local slices")
    nearest, distances = nearest_pearson(synthetic, local)
    counts = []
    for t in thresholds:
        matched = len(np.unique(patients[nearest[distances < float(t)]]))
        if 0 < matched < min_count:
            # The site learns it, the server does not: only here may one patient be singled out.
            log.warning("memorisation audit: %d patient(s) with a slice closer than %g to a synthetic image, fewer "
                        "than the count floor %d: sent to the server as 0", matched, float(t), min_count)
        counts.append(matched if matched >= min_count else 0)
    # Each matched patient once, at its closest synthetic image: variants of one scan, distinct
    # images all near one patient, must not fill the quantiles with that patient's distance.
    matched, which = np.unique(patients[nearest], return_inverse=True)
    closest = np.full(len(matched), np.inf)
    np.minimum.at(closest, which, distances)
    quantiles = [distance_quantiles(closest, [q])[0] if ap.quantile_level_allowed(q, len(matched), min_count)
                 else ap.QUANTILE_WITHHELD for q in quantile_levels]
    return AuditSummary(num_received if num_received is not None else len(synthetic), len(local), counts, quantiles,
                        num_distinct=len(synthetic), num_matched=len(matched), count_floor=min_count)


@dataclass(frozen=True)
class AuditRequest:
    """The server's query as plain values, so the site policy can check it before any slice is read."""

    images: np.ndarray
    thresholds: list[float]
    quantile_levels: list[float]
    num_received: int = 0
    """Images the server sent; once the policy checked the query, ``images`` holds one per near-duplicate group."""
    min_count: int = ap.DEFAULT_MIN_COUNT
    """The smallest count the site reports (the policy's ``audit_min_count``)."""


def unpack_request(arrays: dict[str, np.ndarray], config: dict) -> AuditRequest:
    """The query's images, thresholds and quantile levels (arrays and config as plain dicts)."""
    images = arrays.get(ap.SYNTHETIC_IMAGES)
    if images is None or ap.THRESHOLDS not in config:
        raise ConfigError(f"audit query needs '{ap.SYNTHETIC_IMAGES}' images and '{ap.THRESHOLDS}'",
                          public="malformed audit query")
    images = np.asarray(images)
    # NaN images would correlate with nothing, not even each other: free "distinct" decoys.
    if (images.ndim != 4 or 0 in images.shape or not np.issubdtype(images.dtype, np.number)
            or not np.all(np.isfinite(images))):
        raise ConfigError(f"audit query images must be finite numbers of shape (N, 1, S, S), got {images.dtype} "
                          f"{images.shape}", public="malformed audit query")
    levels = config.get(ap.QUANTILE_LEVELS) or DEFAULT_QUANTILE_LEVELS
    try:
        thresholds, levels = [float(t) for t in config[ap.THRESHOLDS]], [float(q) for q in levels]
    except (TypeError, ValueError):
        raise ConfigError("audit query thresholds and quantile levels must be numbers", public="malformed audit query") from None
    return AuditRequest(images, thresholds, levels, num_received=len(images))


def answer_audit(request: AuditRequest, local: np.ndarray, local_patients: Sequence[str]) -> AuditSummary:
    """The site's answer to a query the policy checked (``client.audit_policy.enforce_audit_policy``)."""
    return audit_synthetic_set(request.images, local, request.thresholds, request.quantile_levels,
                               local_patients=local_patients, min_count=request.min_count,
                               num_received=request.num_received or len(request.images))
