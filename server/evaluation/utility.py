"""Utility: can a classifier trained on the synthetic set diagnose real scans?

* TSTR (train on synthetic, test on real): the classifier of ``classifier.py`` trained on
  the synthetic set, accuracy on the held-out real set.
* TRTR (train on real, test on real): the same classifier and settings trained on the real
  training set; ``ratio = tstr / trtr`` says how much of the real data's usefulness the
  synthetic set keeps (1 = all of it).

A classifier trained on synthetic images is tested on images unlike any it saw, so where it
draws its boundaries depends on its seed: on the quality benchmark's 400-image sets, classifier
seeds alone moved a balanced TSTR score by an SD of up to 0.04. ``repeats``
trains that many classifiers (seeds ``seed``, ``seed + 1``, ...) on each set and reports
their mean, SD and every score, so a reader sees how far one number can be trusted.

Both use the on-disk cache, so the first TRTR network is the FID feature network whenever that
one was trained on the same real training set with the same settings.
"""

from __future__ import annotations

import dataclasses
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


def seeded(settings: ClassifierSettings, repeats: int) -> list[ClassifierSettings]:
    """The settings of each of ``repeats`` classifiers: seeds ``settings.seed``, ``settings.seed + 1``, ..."""
    return [dataclasses.replace(settings, seed=settings.seed + i) for i in range(repeats)]


def repeated(train: ImageSet, test: ImageSet, settings: ClassifierSettings, repeats: int, cache_dir: Path | None,
             progress: bool = False, desc: str = "classifier") -> dict:
    """Mean and SD of the accuracies of ``repeats`` (>= 1, as ``EvaluationSettings`` checks) classifiers
    seeded ``settings.seed`` onwards.

    Returns:
        ``accuracy``, ``balanced_accuracy`` (means), ``balanced_accuracy_sd`` (None for one
        classifier) and ``runs``: seed, accuracies and cache key of each classifier.
    """
    runs = []
    for i, one in enumerate(seeded(settings, repeats)):
        scores, key = train_and_test(train, test, one, cache_dir, progress, f"{desc} {i + 1}/{repeats}")
        runs.append({"seed": one.seed, **scores, "classifier": key})
    if runs[0]["accuracy"] is None:
        return {"accuracy": None, "balanced_accuracy": None, "balanced_accuracy_sd": None, "runs": runs}
    balanced = [r["balanced_accuracy"] for r in runs]
    return {"accuracy": float(np.mean([r["accuracy"] for r in runs])), "balanced_accuracy": float(np.mean(balanced)),
            "balanced_accuracy_sd": float(np.std(balanced, ddof=1)) if repeats > 1 else None, "runs": runs}


def utility_report(synthetic: ImageSet, real_test: ImageSet, real_train: ImageSet | None, settings: ClassifierSettings,
                   cache_dir: Path | None = None, progress: bool = False, repeats: int = 1) -> dict:
    """``tstr_*`` always; ``trtr_*`` and ``ratio`` when a real training set is given.

    Accuracies are means over ``repeats`` classifier seeds; ``*_runs`` hold each one.
    """
    tstr = repeated(synthetic, real_test, settings, repeats, cache_dir, progress, "TSTR classifier")
    report: dict = {"tstr_accuracy": tstr["accuracy"], "tstr_balanced_accuracy": tstr["balanced_accuracy"],
                    "tstr_balanced_accuracy_sd": tstr["balanced_accuracy_sd"], "tstr_runs": tstr["runs"],
                    "tstr_classifier": tstr["runs"][0]["classifier"], "classifier_repeats": repeats,
                    "chance_accuracy": _majority_rate(real_test)}
    if real_train is not None:
        trtr = repeated(real_train, real_test, settings, repeats, cache_dir, progress, "TRTR classifier")
        report.update(trtr_accuracy=trtr["accuracy"], trtr_balanced_accuracy=trtr["balanced_accuracy"],
                      trtr_balanced_accuracy_sd=trtr["balanced_accuracy_sd"], trtr_runs=trtr["runs"],
                      trtr_classifier=trtr["runs"][0]["classifier"],
                      ratio=(tstr["accuracy"] / trtr["accuracy"]) if trtr["accuracy"] else None)
    return report


def _majority_rate(test: ImageSet) -> float | None:
    """Accuracy of always answering the most frequent class: the floor a useful classifier must beat."""
    if len(test) == 0:
        return None
    return float(np.bincount(test.labels, minlength=len(test.classes)).max() / len(test))
