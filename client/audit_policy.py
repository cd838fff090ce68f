"""The site policy's limits on the memorisation audit (``query`` tasks).

The server chooses the images of an audit query, so without limits it could use the audit
as a membership oracle (decoys plus one patient's scan and a threshold of 1e-6 tell it
whether that scan is at the site; near-copies of the scan, or a quantile at level 0, do the
same) or, padding with far-away images and asking for many quantile levels, turn the
quantiles into near per-image distances. These checks run before any local slice is read
and before the nearest-neighbour search, with the policy's values or, without a policy
file, the same defaults:

* ``allow_audit: false`` refuses every query;
* at most ``MAX_SYNTHETIC_IMAGES`` images of at most ``MAX_IMAGE_SIDE`` pixels a side (the
  near-duplicate check compares every pair, so the server must not choose its cost);
* at least ``audit_min_images`` *distinct* images, where images closer than
  ``audit_near_duplicate`` to one another count once (and the search then runs on one image
  per group, so copies weigh nothing in the counts or quantiles either);
* at most ``audit_max_thresholds`` thresholds, each in ``(0, audit_max_threshold]``;
* at most ``audit_max_quantile_levels`` levels, each leaving ``audit_min_count`` distinct
  images on either side of its quantile (no minimum, maximum or near-single-image quantile);
* at most ``audit_max_per_day`` queries let through in any 24 h, checked and recorded under
  one inter-process lock so that two queries at once cannot both take the last one.

The audit itself (``client/memorisation_audit.py``) then counts *patients*, and sends a count
below ``audit_min_count`` as 0. All this bounds the oracle, it does not close it: see
``docs/site-admin.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.audit_log import AUDIT_FILE, read_audit
from client.memorisation_audit import AuditRequest
from client.policy import SitePolicy, refuse
from common import audit_protocol as ap
from common.fileio import append_jsonl
from common.filelock import exclusive_lock
from common.similarity import near_duplicate_representatives

SECONDS_PER_DAY = 86400.0
QUERY = "query"
# One line per query let through (its time), next to the audit log; the lock file guards it.
QUOTA_FILE = "audit_quota.jsonl"
QUOTA_LOCK = "audit_quota.lock"


@dataclass(frozen=True)
class AuditLimits:
    """The policy's ``audit_*`` values; without a policy file, ``SitePolicy``'s defaults."""

    allow_audit: bool
    audit_min_images: int
    audit_near_duplicate: float
    audit_max_thresholds: int
    audit_max_threshold: float
    audit_max_quantile_levels: int
    audit_min_count: int
    audit_max_per_day: int

    @classmethod
    def of(cls, policy: SitePolicy | None) -> AuditLimits:
        defaults = {f.name: f.default for f in dataclasses.fields(SitePolicy)}
        return cls(**{f.name: getattr(policy, f.name) if policy is not None else defaults[f.name]
                      for f in dataclasses.fields(cls)})


def is_query(message_type: str) -> bool:
    """Flower message types are ``<category>`` or ``<category>.<action>``."""
    return message_type.split(".", 1)[0] == QUERY


def distinct_images(images: np.ndarray, near_duplicate: float = SitePolicy.audit_near_duplicate) -> int:
    """How many images ``(N, ...)`` remain when those closer than ``near_duplicate`` count once."""
    images = np.asarray(images)
    if images.ndim == 0 or len(images) == 0:
        return 0
    return len(near_duplicate_representatives(images, near_duplicate))


def _answered_times(state_dir: str | Path) -> list[float]:
    """When each query answered ``ok`` in the site's audit log arrived (refused and failed ones revealed nothing)."""
    times = []
    for row in read_audit(state_dir):
        if not is_query(str(row.get("message_type", ""))) or row.get("outcome") != "ok":
            continue
        try:
            times.append(float(row["time"]))
        except (KeyError, TypeError, ValueError):
            continue  # an unreadable line, listed by `fedsynth site audit`
    return times


def answered_audits(state_dir: str | Path, now: float, window_s: float = SECONDS_PER_DAY) -> int:
    """Queries answered ``ok`` within ``window_s`` before ``now``, from the site's audit log.

    A row dated after ``now`` counts: a clock set back must not reopen the window.
    """
    return sum(1 for when in _answered_times(state_dir) if now - when < window_s)


def _quota_times(state_dir: str | Path) -> list[float] | None:
    """The times in the quota file, or ``None`` if the site has none yet."""
    path = Path(state_dir) / QUOTA_FILE
    if not path.exists():
        return None
    times = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            times.append(float(json.loads(line)["time"]))
        except (ValueError, KeyError, TypeError):
            times.append(math.inf)  # a damaged line still counts: it must never reopen the quota
    return times


def admitted_audits(state_dir: str | Path, now: float, window_s: float = SECONDS_PER_DAY) -> int:
    """Queries let through within ``window_s`` before ``now``, from the quota file; a site that has
    none yet (a new site, or one upgraded from a version without it) counts its answered queries."""
    times = _quota_times(state_dir)
    if times is None:
        return answered_audits(state_dir, now, window_s)
    return sum(1 for when in times if now - when < window_s)


def _record_admission(state_dir: str | Path, now: float) -> None:
    """Append ``now`` to the quota file; the file's first lines carry over the audit log's answered queries."""
    path = Path(state_dir) / QUOTA_FILE
    if not path.exists():
        for when in sorted(_answered_times(state_dir)):
            append_jsonl(path, {"time": when, "from": AUDIT_FILE})
    append_jsonl(path, {"time": now})


def _check_request(limits: AuditLimits, request: AuditRequest) -> AuditRequest:
    """The request narrowed to one image per group of near-duplicates, or a refusal."""
    if not limits.allow_audit:
        raise refuse("memorisation audits are not allowed by the policy")
    if len(request.images) > ap.MAX_SYNTHETIC_IMAGES:
        raise refuse(f"{len(request.images)} synthetic images, more than the protocol's maximum {ap.MAX_SYNTHETIC_IMAGES}")
    if max(request.images.shape[2:], default=0) > ap.MAX_IMAGE_SIDE:
        raise refuse(f"synthetic images of {request.images.shape[2:]} pixels, more than the protocol's maximum "
                     f"{ap.MAX_IMAGE_SIDE} a side")
    if len(request.thresholds) > limits.audit_max_thresholds:
        raise refuse(f"{len(request.thresholds)} thresholds, more than the policy's maximum {limits.audit_max_thresholds}")
    outside = [t for t in request.thresholds if not 0 < t <= limits.audit_max_threshold]
    if outside:
        raise refuse(f"threshold {outside[0]:g} is outside the policy's range (0, {limits.audit_max_threshold:g}]")
    if len(request.quantile_levels) > limits.audit_max_quantile_levels:
        raise refuse(f"{len(request.quantile_levels)} quantile levels, more than the policy's maximum "
                     f"{limits.audit_max_quantile_levels}")
    keep = near_duplicate_representatives(request.images, limits.audit_near_duplicate)
    if len(keep) < limits.audit_min_images:
        raise refuse(f"{len(keep)} distinct synthetic images, fewer than the policy's minimum {limits.audit_min_images} "
                     f"(images closer than {limits.audit_near_duplicate:g} to one another count once)")
    for level in request.quantile_levels:
        if not ap.quantile_level_allowed(level, len(keep), limits.audit_min_count):
            low, high = ap.quantile_level_range(len(keep), limits.audit_min_count)
            raise refuse(f"quantile level {level:g} rests on fewer than {limits.audit_min_count} of the query's "
                         f"{len(keep)} distinct images: levels must be in [{low:.3f}, {high:.3f}]")
    return dataclasses.replace(request, images=request.images[keep], num_received=len(request.images),
                               min_count=limits.audit_min_count)


def enforce_audit_policy(policy: SitePolicy | None, request: AuditRequest, state_dir: str | Path,
                         now: float | None = None) -> AuditRequest:
    """The query as the site will answer it, or :class:`PolicyError` (a public reason) if refused.

    Without a policy file the policy's defaults apply. A query that passes is recorded in the
    quota file before this returns, so it counts even if it then fails at the site.
    """
    limits = AuditLimits.of(policy)
    checked = _check_request(limits, request)
    now = time.time() if now is None else now
    # Check and record under one lock: two queries at once must not both see the last free slot.
    with exclusive_lock(Path(state_dir) / QUOTA_LOCK):
        admitted = admitted_audits(state_dir, now)
        if admitted >= limits.audit_max_per_day:
            raise refuse(f"{admitted} audit queries admitted in the last 24 h, the policy's maximum is "
                         f"{limits.audit_max_per_day}")
        _record_admission(state_dir, now)
    return checked
