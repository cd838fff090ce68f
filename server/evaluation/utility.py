"""Utility: can a classifier trained on the synthetic set diagnose real scans?

* TSTR (train on synthetic, test on real): the classifier of ``classifier.py`` trained on
  the synthetic set, accuracy on the held-out real set.
* TRTR (train on real, test on real): the same classifier and settings trained on the real
  training set; ``ratio = tstr / trtr`` says how much of the real data's usefulness the
  synthetic set keeps (1 = all of it).

Both use the on-disk cache, so the TRTR network is the FID feature network whenever that
one was trained on the same real training set with the same settings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.evaluation.classifier import ClassifierSettings, load_or_train, predict
from server.evaluation.image_sets import ImageSet


def accuracies(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> dict[str, float | None]:
    """Plain accuracy and balanced accuracy (mean recall over the classes present in ``truth``)."""
    if len(truth) == 0:
        return {"accuracy": None, "balanced_accuracy": None}
    recalls = [float(np.mean(predicted[truth == c] == c)) for c in range(num_classes) if np.any(truth == c)]
    return {"accuracy": float(np.mean(predicted == truth)), "balanced_accuracy": float(np.mean(recalls))}


def train_and_test(train: ImageSet, test: ImageSet, settings: ClassifierSettings, cache_dir: Path | None,
                   progress: bool = False, desc: str = "classifier") -> tuple[dict, str]:
    """Accuracies on ``test`` of the classifier trained on ``train``, and that classifier's cache key."""
    model, key, _ = load_or_train(train.images, train.labels, train.classes, settings, cache_dir, progress, desc)
    return accuracies(predict(model, test.images), test.labels, len(test.classes)), key


def utility_report(synthetic: ImageSet, real_test: ImageSet, real_train: ImageSet | None, settings: ClassifierSettings,
                   cache_dir: Path | None = None, progress: bool = False) -> dict:
    """``tstr_accuracy`` always; ``trtr_accuracy`` and ``ratio`` when a real training set is given."""
    tstr, tstr_key = train_and_test(synthetic, real_test, settings, cache_dir, progress, "TSTR classifier")
    report: dict = {"tstr_accuracy": tstr["accuracy"], "tstr_balanced_accuracy": tstr["balanced_accuracy"],
                    "tstr_classifier": tstr_key, "chance_accuracy": _majority_rate(real_test)}
    if real_train is not None:
        trtr, trtr_key = train_and_test(real_train, real_test, settings, cache_dir, progress, "TRTR classifier")
        report.update(trtr_accuracy=trtr["accuracy"], trtr_balanced_accuracy=trtr["balanced_accuracy"], trtr_classifier=trtr_key,
                      ratio=(tstr["accuracy"] / trtr["accuracy"]) if trtr["accuracy"] else None)
    return report


def _majority_rate(test: ImageSet) -> float | None:
    """Accuracy of always answering the most frequent class: the floor a useful classifier must beat."""
    if len(test) == 0:
        return None
    return float(np.bincount(test.labels, minlength=len(test.classes)).max() / len(test))
