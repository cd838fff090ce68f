"""``fedsynth evaluate``: fidelity, diversity, utility and memorisation of a synthetic set.

Writes ``OUT/report.json`` and a self-contained ``OUT/report.html``. See docs/evaluation.md
for what each number means and how far it can be trusted.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from common.errors import ConfigError
from common.fileio import write_bytes_atomic, write_json_atomic
from server.evaluation.classifier import ClassifierSettings, extract_features, load_or_train
from server.evaluation.diversity import mean_pairwise_ms_ssim
from server.evaluation.fidelity import MIN_IMAGES_FOR_FID, fid_per_class, frechet_distance, histogram_distances
from server.evaluation.image_sets import ImageSet, evaluation_size, folder_classes, load_image_set
from server.evaluation.memorisation import memorisation_report
from server.evaluation.report_html import ReportFigures, render_html
from server.evaluation.training_curves import read_training_curves
from server.evaluation.utility import utility_report

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


@dataclass(frozen=True)
class EvaluationSettings:
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    max_pairs_per_class: int = 400
    top_pairs: int = 8
    seed: int = 0
    classifier_repeats: int = 1  # TSTR/TRTR classifiers per set (seeds seed, seed + 1, ...): their mean and SD

    def __post_init__(self) -> None:
        if self.classifier_repeats < 1:
            raise ConfigError(f"--classifier-repeats must be at least 1, got {self.classifier_repeats}")


def evaluate_sets(synthetic: ImageSet, real_test: ImageSet, real_train: ImageSet | None = None,
                  settings: EvaluationSettings = EvaluationSettings(), cache_dir: Path | None = None,
                  run_dir: Path | None = None, progress: bool = True) -> tuple[dict, ReportFigures]:
    """All metrics on sets already in memory (the CLI and the benchmark both end up here).

    Returns:
        ``(report, figures)``: the JSON-ready report and what the HTML needs besides it.
    """
    for name, images in (("real test", real_test), ("real train", real_train)):
        if images is not None and (images.classes != synthetic.classes or images.image_size != synthetic.image_size):
            raise ConfigError(f"{name} set {images.source}: classes/size {images.classes}/{images.image_size} differ from "
                              f"the synthetic set's {synthetic.classes}/{synthetic.image_size}")
    started = time.time()
    stages = tqdm(total=5, desc="evaluation", unit="stage", disable=not progress)
    feature_set = real_train if real_train is not None else real_test
    stages.set_postfix_str("feature network")
    net, key, cached = load_or_train(feature_set.images, feature_set.labels, feature_set.classes, settings.classifier,
                                     cache_dir, progress, "feature network")
    feat_s, feat_r = extract_features(net, synthetic.images), extract_features(net, real_test.images)
    stages.update()
    stages.set_postfix_str("fidelity")
    hist = histogram_distances(synthetic.images, real_test.images)
    enough = min(len(feat_s), len(feat_r)) >= MIN_IMAGES_FOR_FID
    fidelity = {"fid": frechet_distance(feat_s, feat_r) if enough else None,
                "fid_per_class": fid_per_class(feat_s, synthetic.labels, feat_r, real_test.labels, synthetic.classes),
                "histogram_distance": hist["wasserstein1"], "histogram_l1": hist["l1"],
                "histogram_distance_kind": "wasserstein-1 over pixel intensities in [-1, 1]"}
    stages.update()
    stages.set_postfix_str("diversity")
    div_s = mean_pairwise_ms_ssim(synthetic.images, synthetic.labels, synthetic.classes, settings.max_pairs_per_class,
                                  settings.seed, progress, "MS-SSIM synthetic")
    div_r = mean_pairwise_ms_ssim(real_test.images, real_test.labels, real_test.classes, settings.max_pairs_per_class,
                                  settings.seed, progress, "MS-SSIM real")
    diversity = {"ms_ssim_synthetic": div_s["mean"], "ms_ssim_real": div_r["mean"],
                 "per_class_synthetic": div_s["per_class"], "per_class_real": div_r["per_class"],
                 "pairs_synthetic": div_s["pairs"], "pairs_real": div_r["pairs"],
                 "kernel_size": div_s["kernel_size"], "weights": div_s["weights"]}
    stages.update()
    stages.set_postfix_str("utility")
    utility = utility_report(synthetic, real_test, real_train, settings.classifier, cache_dir, progress,
                             settings.classifier_repeats)
    stages.update()
    figures = ReportFigures(synthetic, real_test, real_train)
    memorisation = None
    if real_train is not None:
        stages.set_postfix_str("memorisation")
        memorisation, figures.closest_pairs, figures.distances = memorisation_report(
            synthetic, real_test, real_train, settings.top_pairs, progress)
    stages.update()
    stages.close()
    report = {
        "inputs": {"synthetic": synthetic.source, "real_test": real_test.source,
                   "real_train": real_train.source if real_train is not None else None,
                   "image_size": synthetic.image_size, "classes": list(synthetic.classes),
                   "synthetic_counts": synthetic.counts(), "real_test_counts": real_test.counts(),
                   "real_train_counts": real_train.counts() if real_train is not None else None,
                   "skipped_files": {"synthetic": synthetic.skipped, "real_test": real_test.skipped,
                                     "real_train": real_train.skipped if real_train is not None else None}},
        "feature_network": {"cache_key": key, "from_cache": cached, "features": int(feat_s.shape[1]),
                            "trained_on": "real_train" if real_train is not None else "real_test",
                            "settings": asdict(settings.classifier)},
        "fidelity": fidelity, "diversity": diversity, "utility": utility, "memorisation": memorisation,
        "training": read_training_curves(run_dir) if run_dir is not None else None,
        "settings": {"max_pairs_per_class": settings.max_pairs_per_class, "top_pairs": settings.top_pairs, "seed": settings.seed,
                     "classifier_repeats": settings.classifier_repeats},
        "seconds": round(time.time() - started, 2),
    }
    return report, figures


def write_report(out: Path, report: dict, figures: ReportFigures) -> tuple[Path, Path]:
    """``out/report.json`` and ``out/report.html``, each written atomically."""
    json_path = write_json_atomic(Path(out) / REPORT_JSON, report)
    html_path = write_bytes_atomic(Path(out) / REPORT_HTML, render_html(report, figures).encode("utf-8"))
    return json_path, html_path


def run_evaluation(synthetic: Path, real_test: Path, out: Path, real_train: Path | None = None, run_dir: Path | None = None,
                   image_size: int | None = None, settings: EvaluationSettings = EvaluationSettings(),
                   cache_dir: Path | None = None, progress: bool = True) -> dict:
    """Load the folders at one size, evaluate, write the report; returns report.json's content."""
    size = evaluation_size(synthetic, image_size)
    classes = folder_classes(synthetic)
    if not classes:
        raise ConfigError(f"{synthetic}: no class sub-folders and no sampler manifest; expected <class>/ folders of images")
    sets = [load_image_set(p, classes, size, progress) if p is not None else None for p in (synthetic, real_test, real_train)]
    report, figures = evaluate_sets(sets[0], sets[1], sets[2], settings, cache_dir, run_dir, progress)
    write_report(out, report, figures)
    return report
