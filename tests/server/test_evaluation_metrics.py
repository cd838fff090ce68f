"""Each evaluation metric on small inputs whose answer is known."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client.memorisation_audit import audit_synthetic_set
from common.errors import ConfigError
from common.similarity import count_below, nearest_pearson
from server.evaluation.classifier import ClassifierSettings, SliceClassifier, extract_features, load_or_train, train_classifier
from server.evaluation.diversity import mean_pairwise_ms_ssim, ms_ssim_pairs, ms_ssim_settings
from server.evaluation.evaluate import EvaluationSettings
from server.evaluation.fidelity import frechet_distance, histogram_distances
from server.evaluation.image_sets import ImageSet, load_image_set
from server.evaluation.memorisation import memorisation_report
from server.evaluation.training_curves import read_training_curves
from server.evaluation.utility import utility_report
from tests.conftest import TINY_CLASSES, write_shapes_dataset

CLASSES = tuple(TINY_CLASSES)
FAST = ClassifierSettings(steps=120, batch_size=32)


def _shapes(root: Path, per_class: int, seed: int) -> ImageSet:
    return load_image_set(write_shapes_dataset(root, per_class=per_class, seed=seed), CLASSES, 16)


def _noise(n: int, seed: int, size: int = 16) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (n, 1, size, size)).astype(np.float32)
    return ImageSet(images, np.arange(n) % 2, CLASSES, [f"noise-{i}" for i in range(n)], "noise")


@pytest.fixture(scope="module")
def real_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageSet, ImageSet]:
    """(train, test): two independent draws of the discs-and-rings toy data."""
    root = tmp_path_factory.mktemp("sets")
    return _shapes(root / "train", 24, seed=1), _shapes(root / "test", 16, seed=2)


def test_pearson_finds_exact_and_rescaled_copies_over_all_references() -> None:
    refs = _noise(50, seed=0).images
    queries = np.concatenate([refs[37:38], 0.5 * refs[3:4] + 0.2, _noise(1, seed=9).images])
    index, distance = nearest_pearson(queries, refs, chunk=1)
    assert index[:2].tolist() == [37, 3]
    assert distance[:2] == pytest.approx([0.0, 0.0], abs=1e-5)
    assert distance[2] > 0.5  # independent noise is uncorrelated
    assert count_below(distance, [1e-4, 2.0]) == [2, 3]


@pytest.mark.parametrize(("size", "kernel", "scales"), [(16, 3, 3), (32, 3, 4), (64, 3, 5), (128, 7, 5), (256, 11, 5)])
def test_ms_ssim_settings_fit_monai_and_identical_pairs_score_one(size: int, kernel: int, scales: int) -> None:
    settings = ms_ssim_settings(size)
    assert (settings.kernel_size, len(settings.weights)) == (kernel, scales)
    assert sum(settings.weights) == pytest.approx(1.0)
    images = _noise(3, seed=size, size=size).images
    assert ms_ssim_pairs(images, images, settings) == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    assert ms_ssim_pairs(images[:1], images[1:2], settings)[0] < 0.5


def test_mean_pairwise_ms_ssim_detects_collapse(real_sets: tuple[ImageSet, ImageSet]) -> None:
    _, test = real_sets
    collapsed = test.subset(np.array([0, 0, 0, 16, 16, 16]))  # three copies of one image per class
    assert mean_pairwise_ms_ssim(collapsed.images, collapsed.labels, CLASSES)["mean"] == pytest.approx(1.0, abs=1e-5)
    varied = mean_pairwise_ms_ssim(test.images, test.labels, CLASSES, max_pairs_per_class=30)
    assert varied["mean"] < 0.95 and varied["pairs"] == 60


def test_fid_zero_for_identical_features_and_large_for_shifted() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a + 3.0, a) == pytest.approx(8 * 9.0, rel=1e-6)  # |mu shift|^2, same covariance
    few = rng.normal(size=(5, 8))  # fewer images than features: singular covariances must not crash
    assert np.isfinite(frechet_distance(few, a))


def test_histogram_distance_of_two_constant_images_is_their_gap() -> None:
    zeros, halves = np.zeros((2, 1, 8, 8)), np.full((2, 1, 8, 8), 0.5)
    assert histogram_distances(zeros, zeros) == {"wasserstein1": 0.0, "l1": 0.0}
    d = histogram_distances(zeros, halves)
    assert d["wasserstein1"] == pytest.approx(0.5, abs=2 / 64)
    assert d["l1"] == pytest.approx(2.0)


def test_classifier_is_deterministic_and_cached(real_sets: tuple[ImageSet, ImageSet], tmp_path: Path) -> None:
    train, test = real_sets
    a = train_classifier(train.images, train.labels, 2, ClassifierSettings(steps=20))
    b = train_classifier(train.images, train.labels, 2, ClassifierSettings(steps=20))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    first, key, cached = load_or_train(train.images, train.labels, CLASSES, ClassifierSettings(steps=20), tmp_path)
    again, key2, cached2 = load_or_train(train.images, train.labels, CLASSES, ClassifierSettings(steps=20), tmp_path)
    assert (cached, cached2, key) == (False, True, key2)
    assert np.array_equal(extract_features(first, test.images), extract_features(again, test.images))
    other = load_or_train(train.images, train.labels, CLASSES, ClassifierSettings(steps=20, seed=1), tmp_path)
    assert other[1] != key  # settings are part of the key
    (tmp_path / f"{key}.pt").write_bytes(b"damaged")
    assert isinstance(load_or_train(train.images, train.labels, CLASSES, ClassifierSettings(steps=20), tmp_path)[0], SliceClassifier)


def test_tstr_on_separable_classes_beats_chance(real_sets: tuple[ImageSet, ImageSet], tmp_path: Path) -> None:
    train, test = real_sets
    report = utility_report(train, test, train, FAST, tmp_path)
    assert report["chance_accuracy"] == pytest.approx(0.5)
    assert report["tstr_accuracy"] >= 0.8
    assert report["ratio"] == pytest.approx(1.0)  # same training set, same cached classifier
    noise = utility_report(_noise(32, seed=3), test, None, FAST, tmp_path)
    assert "trtr_accuracy" not in noise and noise["tstr_accuracy"] < report["tstr_accuracy"]


def test_repeated_classifiers_report_each_seed_their_mean_and_sd(real_sets: tuple[ImageSet, ImageSet], tmp_path: Path) -> None:
    train, test = real_sets
    noisy = ImageSet(train.images + np.random.default_rng(5).normal(0, 2.5, train.images.shape).astype(np.float32),
                     train.labels, train.classes, train.names, "noisy")  # hard enough that the seeds disagree
    report = utility_report(noisy, test, train, FAST, tmp_path, repeats=3)
    runs = report["tstr_runs"]
    assert [r["seed"] for r in runs] == [FAST.seed, FAST.seed + 1, FAST.seed + 2]
    assert len({r["classifier"] for r in runs}) == 3 and report["classifier_repeats"] == 3
    alone = [utility_report(noisy, test, None, dataclasses.replace(FAST, seed=r["seed"]), tmp_path)["tstr_balanced_accuracy"]
             for r in runs]
    assert [r["balanced_accuracy"] for r in runs] == alone  # each repeat is that seed's own classifier
    assert report["tstr_balanced_accuracy"] == pytest.approx(np.mean(alone))
    assert report["tstr_balanced_accuracy_sd"] == pytest.approx(np.std(alone, ddof=1)) and len(set(alone)) > 1
    assert report["trtr_balanced_accuracy_sd"] is not None and len(report["trtr_runs"]) == 3
    single = utility_report(noisy, test, None, FAST, tmp_path)
    assert single["tstr_balanced_accuracy_sd"] is None and single["tstr_balanced_accuracy"] == alone[0]
    with pytest.raises(ConfigError, match="--classifier-repeats must be at least 1, got 0"):
        EvaluationSettings(classifier=FAST, classifier_repeats=0)


def test_memorisation_flags_copies_and_not_fresh_images(real_sets: tuple[ImageSet, ImageSet]) -> None:
    train, test = real_sets
    copies, _, distances = memorisation_report(train.subset(np.arange(10)), test, train)
    assert copies["fraction_below_p1"] == 1.0 and copies["exact_copies"] == 10
    assert distances["synthetic"] == pytest.approx(np.zeros(10), abs=1e-5)
    planted = ImageSet(np.concatenate([_noise(9, seed=4).images, train.images[5:6]]), np.r_[np.arange(9) % 2, train.labels[5]],
                       CLASSES, [f"s{i}" for i in range(10)], "planted")
    report, pairs, _ = memorisation_report(planted, test, train, top_pairs=3)
    assert report["count_below_p1"] == 1 and report["exact_copies"] == 1
    assert pairs[0].synthetic_index == 9 and pairs[0].train_index == 5 and pairs[0].ssim == pytest.approx(1.0, abs=1e-5)
    assert report["closest_pairs"][0]["train"] == train.names[5]
    assert report["baseline_p1"] > 0  # held-out toy images are not copies of training ones


def test_site_audit_counts_only_the_planted_copy(real_sets: tuple[ImageSet, ImageSet]) -> None:
    train, _ = real_sets
    synthetic = np.concatenate([_noise(7, seed=5).images, train.images[11:12]])
    summary = audit_synthetic_set(synthetic, train.images, [1e-4, 0.5], [0.0, 0.5], min_count=1)
    assert summary.counts_below == [1, 1]
    assert audit_synthetic_set(synthetic, train.images, [1e-4], [], min_count=2).counts_below == [0]  # below the floor
    assert summary.distance_quantiles[0] == pytest.approx(0.0, abs=1e-5)
    assert (summary.num_synthetic, summary.num_local) == (8, len(train))
    with pytest.raises(ConfigError, match="at least 5 synthetic images"):
        audit_synthetic_set(synthetic[:2], train.images, [0.1])
    with pytest.raises(ConfigError, match="do not match this site's slices"):
        audit_synthetic_set(_noise(6, seed=0, size=8).images, train.images, [0.1])


def test_training_curves_from_metrics_jsonl(tmp_path: Path) -> None:
    rows = [{"round": 1, "phase": "train", "kind": "site", "site_id": "a", "train-loss": 0.9, "epsilon": 1.0},
            {"round": 1, "phase": "train", "kind": "aggregate", "train-loss": 0.8, "val-loss": 0.75},
            {"round": 1, "phase": "evaluate", "kind": "aggregate", "val-loss": 0.7},
            {"round": 2, "phase": "train", "kind": "site", "site_id": "a", "train-loss": 0.5, "epsilon": 1.5},
            {"round": 2, "phase": "train", "kind": "aggregate", "val-loss": 0.6},  # no evaluate phase, no train loss (DP)
            {"round": 2, "phase": "train", "kind": "failure", "reason": "x"}]
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"round\": 3, \"pha")
    curves = read_training_curves(tmp_path)
    assert curves["train_loss"] == [[1, 0.8]] and curves["val_loss"] == [[1, 0.7], [2, 0.6]]
    assert curves["epsilon"] == {"a": [[1, 1.0], [2, 1.5]]} and curves["failures"] == 1
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        read_training_curves(tmp_path / "server" / "nothing")
