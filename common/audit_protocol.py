"""Names and defaults of the federated memorisation audit, defined once for both sides.

The server sends each site the synthetic images (an ArrayRecord) and the distance
thresholds (a ConfigRecord); the site answers with aggregate numbers only (a
MetricRecord): how many synthetic images lie closer than each threshold to one of its own
slices, and quantiles of those nearest distances. Never a per-image distance, an index or
an image.
"""

from __future__ import annotations

# ArrayRecord entry (inside keys.ARRAYS) holding the (N, 1, S, S) synthetic images
SYNTHETIC_IMAGES = "synthetic-images"

# ConfigRecord keys sent by the server (inside keys.CONFIG)
THRESHOLDS = "audit-thresholds"
QUANTILE_LEVELS = "audit-quantile-levels"

# MetricRecord keys of a site's reply (inside keys.METRICS)
NUM_SYNTHETIC = "num-synthetic"
NUM_LOCAL = "num-local"
COUNTS_BELOW = "counts-below"
DISTANCE_QUANTILES = "distance-quantiles"
# Images the site searched with after merging near-duplicates, and the site's smallest reported
# count (a count below it is sent as 0).
NUM_DISTINCT = "num-distinct"
COUNT_FLOOR = "count-floor"

# run_config keys ([tool.flwr.app.config]); mode "audit" runs the audit instead of training
RUN_MODE = "mode"
MODE_TRAIN = "train"
MODE_AUDIT = "audit"
RUN_AUDIT_SYNTHETIC = "audit-synthetic"
RUN_AUDIT_THRESHOLDS = "audit-thresholds"
RUN_AUDIT_OUT = "audit-out"

# Pearson distances (1 - r). 1e-6: an exact copy (up to float rounding); 0.02: r > 0.98,
# the near-duplicate level of the shipped data (a re-encoded or re-sized slice).
DEFAULT_THRESHOLDS: tuple[float, ...] = (1e-6, 0.01, 0.02, 0.05)
# A synthetic set this small would make the quantiles close to per-image values.
MIN_SYNTHETIC_IMAGES = 5
# The site compares every pair of a query's images (near-duplicate merging): bounds that work,
# about 4096^2 correlations, and the memory the server can make a site spend.
MAX_SYNTHETIC_IMAGES = 4096
# Images are compared at the federation's data.image_size; far larger ones could only be meant to
# exhaust the site's memory before that check.
MAX_IMAGE_SIDE = 512
# No number a site reports rests on fewer than this many (patients for a count, distinct images
# on either side of a quantile): 5 is the usual small-cell suppression level of published health
# statistics. A site policy's `audit_min_count` may raise it.
DEFAULT_MIN_COUNT = 5
# A quantile the site withholds (fewer than its minimum of patients on either side); distances
# are in [0, 2], so it cannot be mistaken for one. The server writes it to audit.json as null.
QUANTILE_WITHHELD = -1.0


def quantile_level_range(distinct: int, min_count: int) -> tuple[float, float]:
    """The levels ``[low, high]`` whose quantile rests on at least ``min_count`` images on either side.

    ``np.quantile`` (linear) at level ``q`` of ``n`` values reads the sorted values at 0-based
    position ``q * (n - 1)`` and the next one; position ``min_count - 1`` or more leaves
    ``min_count`` images at or below it, so level 0 (the minimum: one image's distance) is out.
    Empty (``low > high``) when ``n < 2 * min_count - 1``.
    """
    if distinct < 2:
        return 1.0, 0.0
    return (min_count - 1) / (distinct - 1), (distinct - min_count) / (distinct - 1)


def quantile_level_allowed(level: float, distinct: int, min_count: int) -> bool:
    low, high = quantile_level_range(distinct, min_count)
    # a hair of tolerance: a level exactly at the bound must not be lost to float rounding
    return low - 1e-12 <= level <= high + 1e-12


def answerable_levels(levels: tuple[float, ...] | list[float], distinct: int,
                      min_count: int = DEFAULT_MIN_COUNT) -> list[float]:
    """The ``levels`` a site with ``min_count`` answers for ``distinct`` images; the median at least."""
    kept = [q for q in levels if quantile_level_allowed(q, distinct, min_count)]
    return kept or [0.5]
