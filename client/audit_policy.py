"""The site policy's limits on the memorisation audit (``query`` tasks).

The server chooses the images of an audit query, so without limits it could use the audit
as a membership oracle (a few decoys plus one patient's scan and a threshold of 1e-6 tell
it whether that scan is at the site) or, padding with far-away images and asking for many
quantile levels, turn the quantiles into near per-image distances. These checks run
before any local slice is read and before the nearest-neighbour search:

* ``allow_audit: false`` refuses every query;
* at least ``audit_min_images`` *distinct* images (exact copies count once);
* at most ``audit_max_thresholds`` thresholds and ``audit_max_quantile_levels`` levels;
* at most ``audit_max_per_day`` queries answered ``ok`` in the last 24 h, counted from the
  site's own audit log, which the server cannot reset.

They bound the oracle, they do not close it: see ``docs/site-admin.md``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from client.audit_log import read_audit
from client.memorisation_audit import AuditRequest
from client.policy import SitePolicy, refuse

SECONDS_PER_DAY = 86400.0
QUERY = "query"


def is_query(message_type: str) -> bool:
    """Flower message types are ``<category>`` or ``<category>.<action>``."""
    return message_type.split(".", 1)[0] == QUERY


def distinct_images(images: np.ndarray) -> int:
    """How many different images ``(N, ...)`` holds, by the bytes of each as float32.

    Only exact copies collapse: a copy with one pixel changed counts as another image.
    """
    images = np.asarray(images)
    if images.ndim == 0:
        return 0
    # float32, as the search sees them; + 0.0 turns -0.0 into 0.0 so the same pixels give the same bytes
    rows = np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1) + np.float32(0.0)
    return len({hashlib.sha256(row.tobytes()).digest() for row in rows})


def answered_audits(state_dir: str | Path, now: float, window_s: float = SECONDS_PER_DAY) -> int:
    """Queries answered ``ok`` within ``window_s`` before ``now``, from the site's audit log.

    Refused and failed queries do not count (they revealed nothing). A row dated after
    ``now`` counts: a clock set back must not reopen the window.
    """
    count = 0
    for row in read_audit(state_dir):
        if not is_query(str(row.get("message_type", ""))) or row.get("outcome") != "ok":
            continue
        try:
            when = float(row["time"])
        except (KeyError, TypeError, ValueError):
            continue  # an unreadable line, listed by `fedsynth site audit`
        if now - when < window_s:
            count += 1
    return count


def enforce_audit_policy(policy: SitePolicy | None, request: AuditRequest, state_dir: str | Path,
                         now: float | None = None) -> None:
    """Raise :class:`PolicyError` (a public reason) if the site's policy refuses this audit query.

    Without a policy file only the protocol's own minimum applies, checked by the audit itself.
    """
    if policy is None:
        return
    if not policy.allow_audit:
        raise refuse("memorisation audits are not allowed by the policy")
    distinct = distinct_images(request.images)
    if distinct < policy.audit_min_images:
        raise refuse(f"{distinct} distinct synthetic images, fewer than the policy's minimum {policy.audit_min_images}")
    if len(request.thresholds) > policy.audit_max_thresholds:
        raise refuse(f"{len(request.thresholds)} thresholds, more than the policy's maximum {policy.audit_max_thresholds}")
    if len(request.quantile_levels) > policy.audit_max_quantile_levels:
        raise refuse(f"{len(request.quantile_levels)} quantile levels, more than the policy's maximum "
                     f"{policy.audit_max_quantile_levels}")
    answered = answered_audits(state_dir, time.time() if now is None else now)
    if answered >= policy.audit_max_per_day:
        raise refuse(f"{answered} audit queries answered in the last 24 h, the policy's maximum is {policy.audit_max_per_day}")
