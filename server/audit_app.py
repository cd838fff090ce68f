"""The coordinator's half of the federated memorisation audit, run by the ServerApp in ``mode="audit"``.

The server sends the synthetic set to every connected site as a query message; each site
compares it with its own slices (``client/memorisation_audit.py``) and returns counts and
quantiles only. The result, ``audit.json``, says per site how many of its patients have a
slice closer than each threshold to a synthetic image (a site sends a count below its
``count_floor``, 5 by default, as 0, so a single copied patient is seen at the site, not
here); a site with a count above 0 at the *first* threshold is flagged.

Start it like a training run, with ``mode="audit"`` and the synthetic set's folder::

    flwr run . --run-config 'config="/abs/federation.yaml" mode="audit" audit-synthetic="/abs/samples"'
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import audit_protocol as ap
from common import keys
from common.config import FedsynthConfig, config_to_json
from common.errors import ConfigError
from common.fileio import write_json_atomic
from common.similarity import DEFAULT_QUANTILE_LEVELS
from server.evaluation.image_sets import load_image_set

log = logging.getLogger("fedsynth.server")
AUDIT_FILE = "audit.json"


def parse_thresholds(text: str) -> list[float]:
    """``"1e-6,0.02"`` -> ``[1e-6, 0.02]``; empty means the defaults."""
    if not text.strip():
        return list(ap.DEFAULT_THRESHOLDS)
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"run config '{ap.RUN_AUDIT_THRESHOLDS}': expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v <= 2 for v in values):
        raise ConfigError(f"run config '{ap.RUN_AUDIT_THRESHOLDS}': Pearson distances must be in [0, 2], got {text!r}")
    return values


def _wait_for_nodes(grid: Grid, wanted: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def quantile_levels_for(images: np.ndarray) -> list[float]:
    """The default levels a site with the default policy answers for this set.

    A site refuses a level whose quantile rests on fewer than its ``audit_min_count`` images
    on either side, so the 1% and 5% quantiles need sets of 401 and 81 distinct images.
    """
    return ap.answerable_levels(DEFAULT_QUANTILE_LEVELS, len(images))


def _query(cfg: FedsynthConfig, images: np.ndarray, thresholds: list[float], levels: list[float]) -> RecordDict:
    return RecordDict({
        keys.ARRAYS: ArrayRecord(array_dict={ap.SYNTHETIC_IMAGES: Array(np.ascontiguousarray(images, dtype=np.float32))}),
        keys.CONFIG: ConfigRecord({keys.FEDERATION_CONFIG: config_to_json(cfg), ap.THRESHOLDS: thresholds,
                                   ap.QUANTILE_LEVELS: levels}),
    })


def _site_result(msg: Message) -> dict:
    site = msg.content.config_records.get(keys.SITE)
    m = msg.content.metric_records[keys.METRICS]
    return {"site_id": str(site[keys.SITE_ID]) if site is not None else f"node-{msg.metadata.src_node_id}",
            "num_local": int(m[ap.NUM_LOCAL]), "num_synthetic": int(m[ap.NUM_SYNTHETIC]),
            "num_distinct": int(m[ap.NUM_DISTINCT]), "count_floor": int(m[ap.COUNT_FLOOR]),
            "counts_below": [int(v) for v in m[ap.COUNTS_BELOW]],
            "distance_quantiles": [float(v) if v != ap.QUANTILE_WITHHELD else None for v in m[ap.DISTANCE_QUANTILES]]}


def run_memorisation_audit(grid: Grid, cfg: FedsynthConfig, images: np.ndarray, thresholds: list[float]) -> dict:
    """Query every connected site with ``images`` (``(N, 1, S, S)``); returns the audit.json content."""
    if not ap.MIN_SYNTHETIC_IMAGES <= len(images) <= ap.MAX_SYNTHETIC_IMAGES:
        raise ConfigError(f"the memorisation audit takes {ap.MIN_SYNTHETIC_IMAGES} to {ap.MAX_SYNTHETIC_IMAGES} "
                          f"synthetic images, the set has {len(images)}")
    levels = quantile_levels_for(images)
    nodes = _wait_for_nodes(grid, cfg.federation.min_available_nodes, cfg.federation.round_timeout_s)
    content = _query(cfg, images, thresholds, levels)
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n, group_id="audit") for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout_s))
    sites, failures = [], []
    for msg in replies:
        if msg.has_error():
            failures.append({"node_id": msg.metadata.src_node_id, "reason": msg.error.reason})
            continue
        result = _site_result(msg)
        result["flagged"] = result["counts_below"][0] > 0
        sites.append(result)
    sites.sort(key=lambda s: s["site_id"])
    return {"num_synthetic": int(len(images)), "image_size": int(images.shape[-1]), "thresholds": thresholds,
            "flag_threshold": thresholds[0], "quantile_levels": levels,
            "distance": "pearson (1 - r), nearest over all of each site's slices",
            "sites_queried": len(nodes), "sites": sites, "failures": failures,
            "flagged_sites": [s["site_id"] for s in sites if s["flagged"]], "time": time.time()}


def run_audit_app(grid: Grid, context: Context, cfg: FedsynthConfig) -> Path:
    """The ServerApp's audit mode: load the synthetic set named in the run config, audit, write audit.json."""
    folder = str(context.run_config.get(ap.RUN_AUDIT_SYNTHETIC, "") or "")
    if not folder:
        raise ConfigError(f"mode \"audit\" needs run config '{ap.RUN_AUDIT_SYNTHETIC}': the synthetic set's folder (absolute path)")
    thresholds = parse_thresholds(str(context.run_config.get(ap.RUN_AUDIT_THRESHOLDS, "") or ""))
    synthetic = load_image_set(folder, cfg.model.classes, cfg.data.image_size)
    result = run_memorisation_audit(grid, cfg, synthetic.images, thresholds)
    result["synthetic"] = synthetic.source
    out = Path(str(context.run_config.get(ap.RUN_AUDIT_OUT, "") or Path(cfg.federation.output_dir) / AUDIT_FILE))
    write_json_atomic(out, result)
    log.info("memorisation audit: %d site(s) answered, flagged: %s; written to %s", len(result["sites"]),
             result["flagged_sites"] or "none", out)
    return out
