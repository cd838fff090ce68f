"""The site policy's limits on the memorisation audit: the server chooses the query's images, so it
must not be able to turn the audit into a membership oracle without limit."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from client.audit_log import TaskRecord, append_task_record
from client.audit_policy import admitted_audits, answered_audits, distinct_images, enforce_audit_policy
from client.memorisation_audit import AuditRequest
from client.policy import SitePolicy, load_site_policy, running_app_hash
from common.errors import ConfigError, PolicyError
from common.audit_protocol import DEFAULT_THRESHOLDS
from common.similarity import DEFAULT_QUANTILE_LEVELS

NOW = 1_800_000_000.0
DAY = 86400.0
MERGED = " (images closer than 0.05 to one another count once)"


def _policy(tmp_path: Path, **values: object) -> SitePolicy:
    """A policy as the hospital writes it: a real YAML file, loaded and validated."""
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"max_epsilon": 8.0, "max_delta": 1e-5, "approved_apps": [running_app_hash()], **values}))
    return load_site_policy(path)


def _images(distinct: int, copies: int = 0, seed: int = 0) -> np.ndarray:
    """``distinct`` different tiny images, then ``copies`` exact copies of the first one."""
    unique = np.random.default_rng(seed).uniform(-1, 1, (distinct, 1, 16, 16)).astype(np.float32)
    return np.concatenate([unique, np.repeat(unique[:1], copies, axis=0)])


def _request(distinct: int = 20, copies: int = 0, thresholds: int = 4, levels: int = 4) -> AuditRequest:
    # levels within [4/19, 15/19]: every quantile of 20 distinct images rests on 5 of them either side
    return AuditRequest(_images(distinct, copies), [1e-6 * (i + 1) for i in range(thresholds)],
                        list(np.linspace(0.25, 0.5, levels)))


def _log(state: Path, when: float, outcome: str = "ok", message_type: str = "query") -> None:
    append_task_record(state, TaskRecord(run_id="7", message_type=message_type, app_hash=running_app_hash(),
                                         config={}, time=when, outcome=outcome))


@pytest.mark.parametrize(
    ("policy", "request_", "reason"),
    [
        ({"allow_audit": False}, {}, "memorisation audits are not allowed by the policy"),
        ({}, {"distinct": 12}, f"12 distinct synthetic images, fewer than the policy's minimum 20{MERGED}"),
        # 4 decoys + 1 candidate padded with 20 copies of a decoy: 25 images, 5 distinct
        ({}, {"distinct": 5, "copies": 20}, f"5 distinct synthetic images, fewer than the policy's minimum 20{MERGED}"),
        ({"audit_min_images": 30}, {"distinct": 29, "copies": 5},
         f"29 distinct synthetic images, fewer than the policy's minimum 30{MERGED}"),
        ({}, {"thresholds": 9}, "9 thresholds, more than the policy's maximum 8"),
        ({"audit_max_thresholds": 1}, {"thresholds": 2}, "2 thresholds, more than the policy's maximum 1"),
        ({}, {"levels": 9}, "9 quantile levels, more than the policy's maximum 8"),
    ],
)
def test_audit_queries_beyond_the_policy_are_refused(tmp_path: Path, policy: dict, request_: dict, reason: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(reason)) as caught:
        enforce_audit_policy(_policy(tmp_path, **policy), _request(**request_), tmp_path / "state", now=NOW)
    assert caught.value.public == f"site policy refuses the task: {reason}"  # what the server is told, no path
    assert str(tmp_path) not in caught.value.public


@pytest.mark.parametrize(
    ("policy", "request_"),
    [
        ({}, {"distinct": 20, "thresholds": 8, "levels": 8}),  # every default limit exactly met
        ({}, {"distinct": 20, "copies": 30}),  # copies neither help nor hurt
        ({"audit_min_images": 5, "audit_max_thresholds": 1, "audit_max_quantile_levels": 1, "audit_min_count": 2},
         {"distinct": 5, "thresholds": 1, "levels": 1}),  # level 0.25 of 5: 2 images either side
    ],
)
def test_audit_queries_at_the_limits_are_answered(tmp_path: Path, policy: dict, request_: dict) -> None:
    enforce_audit_policy(_policy(tmp_path, **policy), _request(**request_), tmp_path / "state", now=NOW)


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        ({"distinct": 1, "copies": 4}, f"1 distinct synthetic images, fewer than the policy's minimum 20{MERGED}"),
        ({"thresholds": 50}, "50 thresholds, more than the policy's maximum 8"),
        ({"levels": 50}, "50 quantile levels, more than the policy's maximum 8"),
    ],
)
def test_without_a_policy_file_the_policy_defaults_apply(tmp_path: Path, request_: dict, reason: str) -> None:
    """A kit without a policy file (or an admin who removed it) must not answer any query at all."""
    with pytest.raises(PolicyError, match=re.escape(reason)):
        enforce_audit_policy(None, _request(**request_), tmp_path / "state", now=NOW)


def test_without_a_policy_file_the_daily_limit_applies(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for _ in range(10):
        enforce_audit_policy(None, _request(), state, now=NOW)
    with pytest.raises(PolicyError, match="10 audit queries admitted in the last 24 h, the policy's maximum is 10"):
        enforce_audit_policy(None, _request(), state, now=NOW)


def test_duplicates_count_once_whatever_their_dtype_or_sign_of_zero() -> None:
    images = _images(3, copies=4)
    assert distinct_images(images) == 3
    assert distinct_images(images.astype(np.float64)) == 3  # the server's dtype does not make a copy new
    zeros = np.zeros((2, 1, 16, 16), np.float32)
    zeros[1] = -0.0
    assert distinct_images(zeros) == 1
    nudged = images.copy()
    nudged[3, 0, 0, 0] += 0.5  # one of the copies: a changed pixel does not make it another image
    assert distinct_images(nudged) == 3


def test_rate_limit_counts_only_answered_queries_of_the_last_24_hours(tmp_path: Path) -> None:
    state = tmp_path / "state"
    policy = _policy(tmp_path, audit_max_per_day=3)
    _log(state, NOW - DAY - 1)  # answered, but more than 24 h ago
    _log(state, NOW - 3 * DAY)
    _log(state, NOW - 60, outcome="refused: site policy refuses the task: memorisation audits are not allowed")
    _log(state, NOW - 60, outcome="error: ValueError")
    _log(state, NOW - 60, message_type="train")  # other task types have their own limits
    _log(state, NOW - 60, message_type="evaluate")
    _log(state, NOW - DAY + 1)  # still inside the window
    _log(state, NOW - 60)
    assert answered_audits(state, NOW) == 2
    enforce_audit_policy(policy, _request(), state, now=NOW)  # 2 of 3 used: let through, and recorded

    assert admitted_audits(state, NOW) == 3
    with pytest.raises(PolicyError, match="3 audit queries admitted in the last 24 h, the policy's maximum is 3"):
        enforce_audit_policy(policy, _request(), state, now=NOW)
    # The window slides: once the oldest answered query is more than 24 h old, one more is allowed.
    enforce_audit_policy(policy, _request(), state, now=NOW + 2)


def test_a_query_counts_once_let_through_even_if_the_site_then_fails(tmp_path: Path) -> None:
    """The quota file, not the outcome, counts: a query that fails after the check still used its slot.
    The answered queries logged before the quota file existed are carried over into it, once."""
    state = tmp_path / "state"
    policy = _policy(tmp_path, audit_max_per_day=2)
    _log(state, NOW - 120)  # answered by a version that kept no quota file: counts
    enforce_audit_policy(policy, _request(), state, now=NOW - 60)
    _log(state, NOW - 59, outcome="error: SiteDataError")  # that query then failed at the site
    assert admitted_audits(state, NOW) == 2
    with pytest.raises(PolicyError, match="2 audit queries admitted"):
        enforce_audit_policy(policy, _request(), state, now=NOW)
    _log(state, NOW - 30)  # an "ok" line after the first quota line was recorded there already
    assert admitted_audits(state, NOW) == 2


def test_rate_limit_survives_a_clock_set_back_and_reads_the_real_log(tmp_path: Path) -> None:
    state = tmp_path / "state"
    policy = _policy(tmp_path, audit_max_per_day=1)
    _log(state, time.time() + 3600)  # written while the clock was an hour ahead
    with pytest.raises(PolicyError, match="1 audit queries admitted"):
        enforce_audit_policy(policy, _request(), state)  # now = the real clock
    with (state / "audit.jsonl").open("a") as log:
        log.write("{not json\n")  # a damaged line is skipped, not fatal
    assert answered_audits(state, time.time()) == 1
    (state / "audit_quota.jsonl").write_text("{damaged\n")
    assert admitted_audits(state, time.time()) == 1  # a damaged quota line counts, always: it reopens nothing


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"audit_min_images": 4}, "audit_min_images: must be >= 5, got 4"),
        ({"audit_max_thresholds": 0}, "audit_max_thresholds: must be >= 1, got 0"),
        ({"audit_max_quantile_levels": 0}, "audit_max_quantile_levels: must be >= 1, got 0"),
        ({"audit_max_per_day": 0}, "audit_max_per_day: must be >= 1"),
        ({"allow_audit": "no"}, "allow_audit: must be true or false"),
        ({"audit_min_images": 20.5}, "audit_min_images: must be an integer"),
        ({"audit_near_duplicate": 0}, "audit_near_duplicate: must be in (0, 0.5], got 0"),
        ({"audit_near_duplicate": 0.6}, "audit_near_duplicate: must be in (0, 0.5], got 0.6"),
        ({"audit_max_threshold": 0}, "audit_max_threshold: must be in (0, 2]"),
        ({"audit_min_count": 0}, "audit_min_count: must be >= 1"),
    ],
)
def test_audit_policy_fields_are_validated(tmp_path: Path, values: dict, reason: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(reason)):
        _policy(tmp_path, **values)


def test_defaults_allow_the_default_query_shape(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    assert (policy.allow_audit, policy.audit_min_images, policy.audit_max_thresholds,
            policy.audit_max_quantile_levels, policy.audit_max_per_day) == (True, 20, 8, 8, 10)
    assert (policy.audit_near_duplicate, policy.audit_max_threshold, policy.audit_min_count) == (0.05, 0.1, 5)
    assert len(DEFAULT_QUANTILE_LEVELS) <= policy.audit_max_quantile_levels
    assert all(0 < t <= policy.audit_max_threshold for t in DEFAULT_THRESHOLDS)
