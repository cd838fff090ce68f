"""A hostile coordinator probing the memorisation audit for the membership of one scan.

Each test is an attack issue 13 found against the audit: a quantile at level 0, one scan
hidden among decoys, near-copies of one scan passed off as distinct images, variants of a
scan spread just beyond the near-duplicate bound, a site without a policy file, and two
queries raced against the daily limit. The site is the real ClientApp, called with real
Flower messages.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Message, MessageType

from client.audit_policy import distinct_images, enforce_audit_policy
from client.client_app import app
from client.memorisation_audit import AuditRequest, audit_synthetic_set, unpack_request
from client.policy import load_site_policy, running_app_hash
from client.site_data import load_site_slices
from common import audit_protocol as ap
from common import keys
from common.config import FedsynthConfig, config_from_dict
from common.errors import ConfigError, PolicyError
from common.similarity import nearest_pearson, near_duplicate_representatives
from server.audit_app import quantile_levels_for
from tests.client.test_client_app_policy import _context, _fed_json, _message
from tests.conftest import tiny_federation, write_shapes_dataset, write_site

SIZE = 16  # tiny_federation's data.image_size


def _site_with_policy(tmp_path: Path, name: str, data: Path, **policy: object) -> Path:
    path = tmp_path / f"{name}-policy.yaml"
    path.write_text(yaml.safe_dump({"max_epsilon": 8.0, "max_delta": 1e-5, "approved_apps": [running_app_hash()], **policy}))
    return write_site(tmp_path / "sites", name, data, policy_file=str(path))


def _target(tmp_path: Path, data: Path) -> np.ndarray:
    """One of the site's own slices, exactly as the site loads it: the scan whose membership is probed."""
    cfg = config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server"), "test")
    return load_site_slices(data, cfg.model.classes, cfg.data).images[:1]


def _decoys(n: int, seed: int = 7) -> np.ndarray:
    """Noise: distinct from everything, at a distance of about 1 from any scan the server can predict."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, 1, SIZE, SIZE)).astype(np.float32)


def _noisy(target: np.ndarray, n: int, distance: float, seed: int = 3) -> np.ndarray:
    """``n`` copies of ``target`` plus independent noise, each at about ``distance`` (Pearson) from it."""
    rng = np.random.default_rng(seed)
    flat = target.reshape(-1).astype(np.float64)
    std = flat.std()
    sigma = std * np.sqrt(1.0 / (1.0 - distance) ** 2 - 1.0)  # r = std / sqrt(std^2 + sigma^2)
    return (flat + rng.normal(0.0, sigma, (n, flat.size))).reshape(n, *target.shape[1:]).astype(np.float32)


def _ask(site_yaml: Path, images: np.ndarray, thresholds: list[float], levels: list[float]) -> Message:
    msg = _message(MessageType.QUERY, _fed_json(site_yaml.parent), {ap.SYNTHETIC_IMAGES: images},
                   **{ap.THRESHOLDS: thresholds, ap.QUANTILE_LEVELS: levels})
    return app(msg, _context(site_yaml))


@pytest.mark.parametrize("level", [0.0, 1.0, 0.01, 0.2, 0.8, 0.99])
def test_a_quantile_that_rests_on_fewer_than_5_images_is_refused(tmp_path: Path, level: float) -> None:
    """Level 0 of one scan among 19 far-away decoys is that scan's own nearest distance."""
    data = write_shapes_dataset(tmp_path / "data", per_class=6)
    images = np.concatenate([_target(tmp_path, data), _decoys(19)])
    site = write_site(tmp_path / "sites", "site-a", data)  # no policy file: the defaults apply
    reply = _ask(site, images, [1e-6], [level, 0.5])
    assert reply.has_error() and reply.error.code == keys.ERROR_POLICY
    assert reply.error.reason == (f"site policy refuses the task: quantile level {level:g} rests on fewer than 5 of the "
                                  "query's 20 distinct images: levels must be in [0.211, 0.789]")
    with pytest.raises(ConfigError, match="quantile levels must be in"):  # and the audit itself refuses it too
        audit_synthetic_set(images, images, [1e-6], [level])


def test_quantiles_at_the_bounds_are_answered(tmp_path: Path) -> None:
    """4/19 and 15/19 of 20 distinct images: the 5th value from either end, still an answer."""
    data = write_shapes_dataset(tmp_path / "data", per_class=6)
    reply = _ask(write_site(tmp_path / "sites", "site-a", data), _decoys(20), [1e-6], [4 / 19, 0.5, 15 / 19])
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert len(reply.content.metric_records[keys.METRICS][ap.DISTANCE_QUANTILES]) == 3
    assert quantile_levels_for(_decoys(20)) == [0.25, 0.5]  # what the server sends for so small a set
    assert quantile_levels_for(_decoys(401)) == [0.01, 0.05, 0.25, 0.5]


def test_one_scan_among_decoys_gets_the_same_answer_whether_it_is_at_the_site_or_not(tmp_path: Path) -> None:
    member_data = write_shapes_dataset(tmp_path / "member", per_class=6, seed=1)
    other_data = write_shapes_dataset(tmp_path / "other", per_class=6, seed=2)
    scan = _target(tmp_path, member_data)
    images = np.concatenate([scan, _decoys(19)])
    thresholds = [1e-6, 0.05]
    member = _ask(write_site(tmp_path / "sites", "member", member_data), images, thresholds, [0.25, 0.5])
    other = _ask(write_site(tmp_path / "sites", "other", other_data), images, thresholds, [0.25, 0.5])
    for reply in (member, other):
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        metrics = reply.content.metric_records[keys.METRICS]
        assert list(metrics[ap.COUNTS_BELOW]) == [0, 0] and metrics[ap.COUNT_FLOOR] == 5
    # The attack is real: with the count floor switched off, the member site gives its scan away.
    exposed = _ask(_site_with_policy(tmp_path, "exposed", member_data, audit_min_count=1), images, thresholds, [0.5])
    assert list(exposed.content.metric_records[keys.METRICS][ap.COUNTS_BELOW]) == [1, 1]


def test_near_copies_of_one_scan_are_one_image(tmp_path: Path) -> None:
    """Noisy, brighter and lower-contrast copies of one scan: 20 images by their bytes, 1 by their pattern."""
    data = write_shapes_dataset(tmp_path / "data", per_class=6)
    scan = _target(tmp_path, data)
    shifted = np.concatenate([scan * a + b for a, b in zip(np.linspace(0.5, 1.5, 10), np.linspace(-0.3, 0.3, 10))])
    copies = np.concatenate([_noisy(scan, 10, 0.005), shifted]).astype(np.float32)
    assert len({c.tobytes() for c in copies}) == 20 and distinct_images(copies) == 1
    for site in (write_site(tmp_path / "sites", "no-policy", data), _site_with_policy(tmp_path, "policy", data)):
        reply = _ask(site, copies, [1e-6], [0.5])
        assert reply.has_error() and reply.error.reason == (
            "site policy refuses the task: 1 distinct synthetic images, fewer than the policy's minimum 20 "
            "(images closer than 0.05 to one another count once)")
    # Constant images have no pattern, so nothing to be distinct with: one group, whatever their values.
    constants = np.stack([np.full((1, SIZE, SIZE), v, np.float32) for v in np.linspace(-1, 1, 20)])
    assert distinct_images(constants) == 1
    assert distinct_images(np.concatenate([constants, _decoys(3)])) == 4


def test_variants_spread_beyond_the_near_duplicate_bound_count_as_one_patient(tmp_path: Path) -> None:
    """Six variants of one scan, each about 0.035 from it and about 0.07 from one another: distinct
    images, each below a threshold of 0.05 at the member site. Counted per patient, they are one."""
    data = write_shapes_dataset(tmp_path / "data", per_class=6, seed=1)
    scan = _target(tmp_path, data)
    variants = _noisy(scan, 6, 0.035)
    images = np.concatenate([variants, _decoys(14)])
    assert distinct_images(images) == 20
    assert (nearest_pearson(variants, scan)[1] < 0.05).all()
    reply = _ask(write_site(tmp_path / "sites", "member", data), images, [0.05], [0.5])
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert list(reply.content.metric_records[keys.METRICS][ap.COUNTS_BELOW]) == [0]


def test_variants_of_one_scan_do_not_fill_the_quantiles(tmp_path: Path) -> None:
    """Twenty distinct variants of one scan: quantiles over images would all be that scan's distance
    (about 0.035 at a member site, more elsewhere). Over matched patients, it is one value, withheld."""
    data = write_shapes_dataset(tmp_path / "data", per_class=6, seed=1)
    variants = _noisy(_target(tmp_path, data), 20, 0.035)
    assert distinct_images(variants) == 20
    reply = _ask(write_site(tmp_path / "sites", "member", data), variants, [0.05], [0.25, 0.5])
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content.metric_records[keys.METRICS]
    assert list(metrics[ap.DISTANCE_QUANTILES]) == [ap.QUANTILE_WITHHELD] * 2 and list(metrics[ap.COUNTS_BELOW]) == [0]


def test_counts_are_of_patients_and_sent_only_from_the_floor_up() -> None:
    rng = np.random.default_rng(0)
    local = rng.uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32)
    patients = [f"p{i // 2}" for i in range(12)]  # 6 patients, 2 slices each
    decoys = rng.uniform(-1, 1, (20, 1, 8, 8)).astype(np.float32)
    both_slices_of_3 = np.concatenate([local[:6], decoys])  # 6 copied slices, 3 patients
    one_slice_of_5 = np.concatenate([local[0:10:2], decoys])  # 5 copied slices, 5 patients
    assert audit_synthetic_set(both_slices_of_3, local, [1e-4], [0.5], local_patients=patients).counts_below == [0]
    assert audit_synthetic_set(both_slices_of_3, local, [1e-4], [0.5], local_patients=patients, min_count=3).counts_below == [3]
    summary = audit_synthetic_set(one_slice_of_5, local, [1e-4], [0.5], local_patients=patients, num_received=40)
    assert summary.counts_below == [5] and summary.count_floor == 5
    assert (summary.num_synthetic, summary.num_distinct) == (40, 25)
    assert summary.distance_quantiles == [ap.QUANTILE_WITHHELD]  # 6 patients: no median with 5 either side
    many = rng.uniform(-1, 1, (30, 1, 8, 8)).astype(np.float32)  # 30 patients, one slice each
    answered = audit_synthetic_set(np.concatenate([many[:20], decoys]), many, [1e-4], [0.25, 0.5])
    assert answered.num_matched >= 20 and answered.distance_quantiles[1] >= 0.0
    assert answered.distance_quantiles[0] == pytest.approx(0.0, abs=1e-5)  # over 20 copied patients of 30


@pytest.mark.parametrize(("thresholds", "reason"), [
    ([0.5], "threshold 0.5 is outside the policy's range (0, 0.1]"),
    ([0.02, 2.0], "threshold 2 is outside the policy's range (0, 0.1]"),
    ([0.0], "threshold 0 is outside the policy's range (0, 0.1]"),
    ([float("nan")], "threshold nan is outside the policy's range (0, 0.1]"),
])
def test_thresholds_beyond_near_copies_are_refused(tmp_path: Path, thresholds: list[float], reason: str) -> None:
    request = AuditRequest(_decoys(20), thresholds, [0.5])
    for policy in (None, load_site_policy(_write_policy(tmp_path))):
        with pytest.raises(PolicyError) as caught:
            enforce_audit_policy(policy, request, tmp_path / "state")
        assert caught.value.public == f"site policy refuses the task: {reason}"


def _write_policy(tmp_path: Path, **values: object) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"max_epsilon": 8.0, "max_delta": 1e-5, **values}))
    return path


def test_too_many_or_malformed_images_are_refused(tmp_path: Path) -> None:
    big = np.zeros((ap.MAX_SYNTHETIC_IMAGES + 1, 1, 2, 2), np.float32)
    with pytest.raises(PolicyError, match="4097 synthetic images, more than the protocol's maximum 4096"):
        enforce_audit_policy(None, AuditRequest(big, [0.01], [0.5]), tmp_path / "state")
    huge = np.zeros((20, 1, ap.MAX_IMAGE_SIDE + 1, 8), np.float32)
    with pytest.raises(PolicyError, match="more than the protocol's maximum 512 a side"):
        enforce_audit_policy(None, AuditRequest(huge, [0.01], [0.5]), tmp_path / "state")
    nan = _decoys(20)
    nan[3] = np.nan  # correlates with nothing, not even itself: it would pass for a distinct image
    for images in (nan, _decoys(20)[:, 0], np.zeros((0, 1, 8, 8), np.float32), np.zeros((20, 1, 0, 8), np.float32)):
        with pytest.raises(ConfigError) as caught:
            unpack_request({ap.SYNTHETIC_IMAGES: images}, {ap.THRESHOLDS: [0.01]})
        assert caught.value.public == "malformed audit query"


def test_near_duplicate_representatives_are_pairwise_apart() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(5, 1, 8, 8))
    images = np.concatenate([base, base + 0.01 * rng.normal(size=base.shape), base * 3 + 1])
    keep = near_duplicate_representatives(images, 0.05)
    assert keep.tolist() == [0, 1, 2, 3, 4]  # the first of each group, in order


def _race_one(site_yaml: str, barrier: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue) -> None:
    """One SuperNode task in its own process: both wait at the barrier, then ask at the same moment."""
    site = Path(site_yaml)
    images = _decoys(20, seed=11)
    msg = _message(MessageType.QUERY, _fed_json(site.parent), {ap.SYNTHETIC_IMAGES: images},
                   **{ap.THRESHOLDS: [0.01], ap.QUANTILE_LEVELS: [0.5]})
    running_app_hash()  # the per-process start-up cost, before the start line
    barrier.wait()
    reply = app(msg, _context(site))
    results.put(reply.error.reason if reply.has_error() else "ok")


def test_two_queries_at_once_cannot_both_take_the_last_slot(tmp_path: Path) -> None:
    data = write_shapes_dataset(tmp_path / "data", per_class=6)
    site = _site_with_policy(tmp_path, "site-a", data, audit_max_per_day=1)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_race_one, args=(str(site), barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = sorted(results.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert outcomes == ["ok", "site policy refuses the task: 1 audit queries admitted in the last 24 h, the policy's "
                              "maximum is 1"]
