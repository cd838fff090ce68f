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
