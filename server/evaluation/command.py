"""The ``fedsynth evaluate`` sub-command: arguments here, work in ``evaluate.py`` (imported on use,
so the other commands do not pay for loading torch and MONAI)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _evaluate_command(args: argparse.Namespace) -> int:
    from server.evaluation.classifier import ClassifierSettings
    from server.evaluation.evaluate import REPORT_HTML, EvaluationSettings, run_evaluation

    classifier = ClassifierSettings(seed=args.seed, **({"steps": args.classifier_steps} if args.classifier_steps else {}))
    settings = EvaluationSettings(classifier=classifier, max_pairs_per_class=args.max_pairs, seed=args.seed,
                                  classifier_repeats=args.classifier_repeats)
    report = run_evaluation(Path(args.synthetic), Path(args.real_test), Path(args.out),
                            Path(args.real_train) if args.real_train else None, Path(args.run) if args.run else None,
                            args.image_size, settings, Path(args.cache_dir) if args.cache_dir else None)
    fid, div, util, mem = report["fidelity"], report["diversity"], report["utility"], report["memorisation"]
    def f(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    line = (f"FID {f(fid['fid'])} | MS-SSIM synthetic {f(div['ms_ssim_synthetic'])} real {f(div['ms_ssim_real'])} | "
            f"TSTR {f(util['tstr_accuracy'])}")
    if util["tstr_accuracy"] is not None:
        line += f" (balanced {f(util['tstr_balanced_accuracy'])}{_spread(util.get('tstr_balanced_accuracy_sd'))})"
    if "trtr_accuracy" in util:
        line += f" TRTR {f(util['trtr_accuracy'])}"
    if mem:
        line += f" | below baseline p1: {mem['count_below_p1']}/{mem['num_synthetic']}"
    print(line)
    print(f"Report: {Path(args.out).resolve() / REPORT_HTML}")
    return 0


def _spread(sd: float | None) -> str:
    return "" if sd is None else f" ± {sd:.3f} SD over classifier seeds"


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedsynth evaluate`` on the CLI's sub-command parser."""
    p = sub.add_parser("evaluate", help="score a synthetic set against real images; writes report.json and report.html")
    p.add_argument("--synthetic", required=True, help="sampler output folder (manifest.json) or <class>/ folders")
    p.add_argument("--real-test", required=True, help="held-out real images, <class>/ folders")
    p.add_argument("--real-train", help="the real images the model was trained on: enables TRTR and memorisation")
    p.add_argument("--run", help="a federation's output_dir (metrics.jsonl): adds training curves")
    p.add_argument("--out", required=True, help="folder for report.json and report.html")
    p.add_argument("--image-size", type=int, help="evaluation size (default: the sampler manifest's, else 32)")
    p.add_argument("--classifier-steps", type=int, help="training steps of each classifier (default 400)")
    p.add_argument("--classifier-repeats", type=int, default=3,
                   help="TSTR/TRTR classifiers per set, seeded --seed onwards: their mean and SD are reported (default 3)")
    p.add_argument("--max-pairs", type=int, default=400, help="MS-SSIM pairs per class (sampled with --seed beyond this)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", help="feature-network cache (default: $FEDSYNTH_CACHE or ~/.cache/fedsynth)")
    p.set_defaults(func=_evaluate_command)
