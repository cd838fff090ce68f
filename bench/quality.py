"""Quality benchmark: central vs federated vs federated+DP (from scratch and from public pretraining) on real brain MRI.

    python bench/quality.py --preset cpu --out runs/quality-cpu
    python bench/quality.py --preset gpu --out runs/quality-gpu

Splits ``../shared/data/brain-tumor-mri/train`` into a public set, 4 non-IID hospitals and a
validation set (bench/quality_split.py), pretrains once on the public set, then trains every row
of bench/quality_runs.py (central, federated, federated + DP from scratch and from pretraining,
and the ablations of the DP recipe), each with the same number of optimiser steps
(bench/quality_train.py), samples each, scores each with ``fedsynth evaluate``'s code against
the validation set, and optionally sweeps guidance and DDIM steps on one model. Prints the tables
and writes ``quality.json`` and ``quality.md`` (and a full report per model) to --out.
Measurements only: nothing here asserts a speed or a score.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import platform
import queue
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress, TimeElapsedColumn

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT.parent / "shared" / "data"
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # runs from a clone without `pip install -e .` too

from quality_data import load_slices  # noqa: E402
from quality_jobs import BenchmarkInputs, init_worker, score_sweep_point, score_weights, train_and_score  # noqa: E402
from quality_runs import BY_NAME, RUNS, with_dependencies  # noqa: E402
from quality_split import describe, site_slices, split_hospitals  # noqa: E402
from quality_table import markdown_table, print_table  # noqa: E402
from quality_train import ModelPreset, federation_config, plan_dp  # noqa: E402
from client.site_data import SiteSlices  # noqa: E402
from server.evaluation.classifier import ClassifierSettings, load_or_train  # noqa: E402
from server.evaluation.evaluate import EvaluationSettings  # noqa: E402
from server.evaluation.image_sets import ImageSet  # noqa: E402
from server.evaluation.utility import seeded  # noqa: E402
from common.config import SCHEDULES, SERVER_OPTIMIZERS  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from common.fileio import write_bytes_atomic, write_json_atomic  # noqa: E402
from server.sampler import DEFAULT_ETA, sampling_problem  # noqa: E402

# The recipe every preset shares (issue 11): EMA of the global weights over rounds (per step for central
# rows and pretraining), AdamW kept across rounds at each site, a short warm-up, K = 2 noise draws per
# DP patient, the DP planner's batch (from 16, 32, 64) and noise multiplier, and the cosine noise schedule
# (at 32 px it lifted balanced TSTR of every model from the public checkpoint, docs/benchmarks.md).
RECIPE = dict(warmup_steps=20, keep_optimizer_state=True, noise_multiplicity=2, ema_decay=0.8, schedule="cosine")
PRESETS = {
    # 2 shared CPU cores, 2 workers, about 45 minutes for pretraining, 10 more trained rows and the scoring of
    # 12 models (sized from measured step times, docs/benchmarks.md): the README's "tiny" UNet at 32 px. Each
    # model is scored on 3 disjoint sets of 400 images and on their pool: one set's balanced TSTR moves by a few
    # hundredths from draw to draw, and the TRTR it is read against learns from 3,692 real images, not 400.
    "cpu": dict(model=ModelPreset(image_size=32, channels=(16, 32, 32), rounds=10, local_steps=10, batch_size=32,
                                  learning_rate=1e-3, central_ema_decay=0.99, pretrain_steps=1000, **RECIPE),
                samples=400, sweep_samples=200, classifier_steps=400, classifier_repeats=3, sampling_sets=3),
    # the same with 4x the steps (well over an hour on 2 CPU cores)
    "cpu-long": dict(model=ModelPreset(image_size=32, channels=(16, 32, 32), rounds=60, local_steps=10, batch_size=32,
                                       learning_rate=1e-3, central_ema_decay=0.995, pretrain_steps=6000,
                                       **{**RECIPE, "ema_decay": 0.9}),
                     samples=400, sweep_samples=200, classifier_steps=400, classifier_repeats=3, sampling_sets=1),
    # The independent DDPM's budget for one model (UNet (32, 64, 64), 1.1M parameters, batch 64,
    # about 2,100 steps, EMA 0.999): meant for `--runs central`, to tell the recipe from the compute.
    "cpu-reference": dict(model=ModelPreset(image_size=32, channels=(32, 64, 64), rounds=54, local_steps=10,
                                            batch_size=64, learning_rate=1e-3, central_ema_decay=0.999,
                                            pretrain_steps=2160, **RECIPE),
                          samples=400, sweep_samples=200, classifier_steps=400, classifier_repeats=3, sampling_sets=1),
    # one GPU: 64 px, a 4.6M-parameter UNet, 16x the cpu preset's optimiser steps
    "gpu": dict(model=ModelPreset(image_size=64, channels=(64, 128, 128), rounds=40, local_steps=60, batch_size=64,
                                  learning_rate=5e-4, head_channels=16, central_ema_decay=0.999, pretrain_steps=8000,
                                  dp_batch_sizes=(32, 64, 128, 256), **{**RECIPE, "ema_decay": 0.9}),
                samples=1000, sweep_samples=400, classifier_steps=800, classifier_repeats=3, sampling_sets=1),
}
GUIDANCE_SWEEP = (0.0, 1.0, 3.0, 5.0)
STEPS_SWEEP = (10, 25, 50)


def machine() -> dict:
    def cpu_model() -> str:
        try:
            return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name"))
        except (OSError, StopIteration):
            return platform.processor()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(), "nproc": os.cpu_count(),
            "cpu": cpu_model(), "gpu": gpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_average_at_start": list(os.getloadavg())}


def image_set(slices: SiteSlices, index: np.ndarray, source: str) -> ImageSet:
    return ImageSet(slices.images[index], slices.labels[index], slices.classes, [slices.patients[i] for i in index], source)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DATA_ROOT / "brain-tumor-mri" / "train")
    p.add_argument("--rounds", type=int, help="override the preset (a reduced run); say so when reporting")
    p.add_argument("--local-steps", type=int, help="override the preset (a reduced run)")
    p.add_argument("--pretrain-steps", type=int, help="override the preset's public pretraining steps (a reduced run)")
    p.add_argument("--samples", type=int, help="override the number of images sampled per model")
    p.add_argument("--sweep-samples", type=int, help="override the number of images per sweep point")
    p.add_argument("--classifier-repeats", type=int,
                   help="override the TSTR/TRTR classifiers per image set (mean and SD reported; fewer = a reduced run)")
    p.add_argument("--sampling-sets", type=int,
                   help="score each model on this many sets of --samples images from disjoint seeds, each alone "
                        "(mean and SD over sets) and all pooled; the first set is the main table's")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps for the main comparison")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance for the main comparison")
    p.add_argument("--eta", type=float, default=DEFAULT_ETA,
                   help="DDIM stochasticity for every model (0 deterministic, 1 ancestral; the sampler's default)")
    p.add_argument("--epsilon", type=float, default=8.0, help="per-site DP budget of run (c)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS),
                   help="which rows to run (the runs they need, e.g. public_only for pretrained rows, are added)")
    p.add_argument("--sweep-model", choices=RUNS, default=None,
                   help="sweep guidance x DDIM steps on this row's model (off by default: it does not fit the cpu preset's time)")
    p.add_argument("--no-sweep", action="store_true", help="no sweep even with --sweep-model")
    # 1 by default: on a shared 2-core machine 2 threads measured 3-4x SLOWER per step than 1
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="jobs (a model's training, or a sweep point) run side by side; results do not depend on it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS, default="fedavg",
                   help="federated runs: the ServerApp's server optimiser (federation.server_optimizer)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="federated runs: EMA of the global weights over rounds, sampled instead of them "
                        "(0 = off; default: the preset's)")
    p.add_argument("--finetune-learning-rate", type=float, default=None,
                   help="rows from public pretraining: their learning rate (default: the preset's, "
                        "which is the scratch rows' unless the preset says otherwise)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="the DDPM noise schedule of every row and of pretraining (diffusion.schedule; "
                        "default: the preset's)")
    p.add_argument("--server-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a federation option of the server optimiser, e.g. eta=0.01 (repeatable)")
    return p.parse_args(argv)


def _priority(name: str) -> int:
    """Pretraining first (the pretrained rows wait for it), then DP rows (the longest), then the rest."""
    spec = BY_NAME[name]
    return 0 if spec.kind == "pretrain" else 1 if spec.kind == "federated" and spec.dp else 2 if spec.kind == "raw" else 3


def run_jobs(inputs: BenchmarkInputs, args: argparse.Namespace, samples: int, sweep_samples: int, result: dict) -> None:
    """Train, sample and score every row, then the sweep points, ``args.workers`` jobs at a time.

    A row starts once the rows it needs are done (pretrained rows after pretraining, "minus EMA"
    after the run whose raw weights it scores). ``quality.json`` is rewritten after every job.
    """
    runs = args.runs
    points = [] if args.no_sweep or not args.sweep_model else [(g, s) for g in GUIDANCE_SWEEP for s in STEPS_SWEEP]
    if points:
        result["sweep"] = {"model": args.sweep_model, "samples": sweep_samples, "rows": []}
    context = multiprocessing.get_context("spawn")  # fork would copy the parent's torch threads and state
    waiting = list(runs)
    ready: list[tuple[int, str, object, tuple]] = []  # (priority, kind, key, call)
    raw_weights: dict[str, dict] = {}
    with context.Manager() as manager, Progress(*Progress.get_default_columns(), TimeElapsedColumn()) as progress:
        messages = manager.Queue()
        pool = ProcessPoolExecutor(args.workers, mp_context=context, initializer=init_worker, initargs=(inputs, messages))
        bar = progress.add_task(f"quality benchmark ({args.workers} workers)", total=len(runs) + len(points))
        pending: dict[Future, tuple[str, object]] = {}
        rows: dict[tuple[float, int], dict] = {}

        def release() -> None:
            for name in list(waiting):
                spec = BY_NAME[name]
                if all(n in result["runs"] for n in spec.needs):
                    waiting.remove(name)
                    if spec.kind == "raw":
                        call = (score_weights, name, raw_weights[spec.source], result["runs"][spec.source], samples,
                                args.steps, args.guidance)
                    else:
                        call = (train_and_score, name, samples, args.steps, args.guidance)
                    ready.append((_priority(name), "run", name, call))
            ready.sort(key=lambda r: r[0])
            while ready and len(pending) < args.workers:
                _, kind, key, call = ready.pop(0)
                pending[pool.submit(*call)] = (kind, key)

        try:
            release()
            while pending:
                done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                _print_messages(messages, progress.console)
                for future in done:
                    kind, key = pending.pop(future)
                    if kind == "run":
                        value = future.result()
                        if BY_NAME[key].kind == "raw":
                            result["runs"][key] = value
                        else:
                            result["runs"][key], arrays, global_arrays = value
                            if global_arrays is not None:
                                raw_weights[key] = global_arrays
                            if points and key == args.sweep_model:
                                ready.extend((9, "sweep", (g, s), (score_sweep_point, arrays, sweep_samples, s, g))
                                             for g, s in points)
                    else:
                        rows[key] = future.result()
                        result["sweep"]["rows"] = [rows[p] for p in points if p in rows]
                    result["runs"] = {name: result["runs"][name] for name in RUNS if name in result["runs"]}
                    write_json_atomic(args.out / "quality.json", result)
                    progress.advance(bar)
                release()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            _print_messages(messages, progress.console)


def _print_messages(messages: queue.Queue, console: Console) -> None:
    while True:
        try:
            console.print(messages.get_nowait(), markup=False, highlight=False)
        except queue.Empty:
            return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"quality benchmark: {args.data} not found (the real data lives in ../shared/data)", file=sys.stderr)
        return 2
    requested = list(args.runs)
    args.runs = with_dependencies(args.runs)
    if args.sweep_model and not args.no_sweep and args.sweep_model not in args.runs:
        print(f"quality benchmark: --sweep-model {args.sweep_model} is not among --runs {args.runs}", file=sys.stderr)
        return 2
    if args.workers < 1 or args.threads < 1:
        print("quality benchmark: --workers and --threads must be at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    model: ModelPreset = dataclasses.replace(preset["model"], **{k: v for k, v in (("rounds", args.rounds),
                                                                                    ("local_steps", args.local_steps),
                                                                                    ("pretrain_steps", args.pretrain_steps)) if v})
    samples = args.samples or preset["samples"]
    sweep_samples = args.sweep_samples or preset["sweep_samples"]
    repeats = preset["classifier_repeats"] if args.classifier_repeats is None else args.classifier_repeats
    sets = preset["sampling_sets"] if args.sampling_sets is None else args.sampling_sets
    if sets < 1:
        print(f"quality benchmark: --sampling-sets must be at least 1, got {sets}", file=sys.stderr)
        return 2
    try:
        eval_settings = EvaluationSettings(classifier=ClassifierSettings(steps=preset["classifier_steps"], seed=args.seed),
                                           seed=args.seed, classifier_repeats=repeats)
    except ConfigError as err:
        print(f"quality benchmark: {err}", file=sys.stderr)
        return 2
    reduced = (model != preset["model"] or samples != preset["samples"] or sweep_samples != preset["sweep_samples"]
               or repeats < preset["classifier_repeats"] or sets < preset["sampling_sets"]
               or set(requested) != set(RUNS))
    try:  # the server's recipe is a choice of the run, not a reduction of the preset
        bad = [o for o in args.server_option if "=" not in o]
        if bad:
            raise ValueError(f"expected KEY=VALUE, got {bad[0]!r}")
        options = tuple((k, float(v)) for k, v in (o.split("=", 1) for o in args.server_option))
        if args.finetune_learning_rate is not None and not args.finetune_learning_rate > 0:
            raise ValueError(f"--finetune-learning-rate must be positive, got {args.finetune_learning_rate}")
        model = dataclasses.replace(model, server_optimizer=args.server_optimizer, server_options=options,
                                    ema_decay=model.ema_decay if args.ema_decay is None else args.ema_decay,
                                    finetune_learning_rate=(model.finetune_learning_rate if args.finetune_learning_rate
                                                            is None else args.finetune_learning_rate),
                                    schedule=args.schedule or model.schedule)
        cfg = federation_config(model, ("a",), args.out, 1, dp=False)  # the federation config's own checks, now
    except (ValueError, ConfigError) as err:
        print(f"quality benchmark: --server-optimizer/--ema-decay/--server-option/--finetune-learning-rate: {err}",
              file=sys.stderr)
        return 2
    problem = sampling_problem(args.steps, args.guidance, args.eta, cfg.diffusion.num_train_timesteps)
    if problem:  # now, not after the training it would follow
        print(f"quality benchmark: {problem}", file=sys.stderr)
        return 2
    run_dir = args.out / time.strftime("run-%Y%m%d-%H%M%S")  # fresh privacy ledgers every time
    started = time.time()
    result: dict = {"preset": args.preset, "reduced": reduced, "requested_runs": requested, "model": dataclasses.asdict(model), "samples": samples,
                    "classifier_repeats": repeats,
                    "sampling": {"steps": args.steps, "guidance": args.guidance, "eta": args.eta, "sets": sets},
                    "machine": {**machine(), "workers": args.workers}, "runs": {}}

    slices = load_slices(args.data, model.image_size, args.out / "cache")
    split = split_hospitals(slices, args.data, seed=args.seed)
    result["split"] = describe(split, slices)
    result["split"]["near_duplicate_images"] = split.near_duplicate_images
    train_index = np.concatenate(list(split.hospitals.values()))
    sites = {h: site_slices(slices, idx, split.groups) for h, idx in split.hospitals.items()}
    plans = {}
    if any(BY_NAME[n].dp for n in args.runs):  # one plan per method for every DP row, made once here
        plans = {"planner": plan_dp(sites, model, args.epsilon, args.delta, planner=True),
                 "fixed batch": plan_dp(sites, model, args.epsilon, args.delta, planner=False)}
        result["dp_plans"] = {k: dataclasses.asdict(v) for k, v in plans.items()}
        for v in plans.values():
            print(f"DP {v.method}: expected batch {v.batch_size}, noise multiplier {v.noise_multiplier:.3f}, "
                  f"max epsilon {max(s['epsilon'] for s in v.per_site.values()):.2f}")
    inputs = BenchmarkInputs(
        model=model, sites=sites, central=site_slices(slices, train_index, split.groups),
        public=site_slices(slices, split.public, split.groups), plans=plans, real_test=image_set(slices, split.validation, "validation split"),
        real_train=image_set(slices, train_index, "all hospitals"), evaluation=eval_settings, run_dir=run_dir,
        epsilon=args.epsilon, delta=args.delta, seed=args.seed, threads=args.threads, eta=args.eta,
        sampling_sets=sets)
    # The feature network (the first TRTR classifier) and the other TRTR classifiers are the same for
    # every job: trained once here, not once per worker.
    for i, settings in enumerate(seeded(eval_settings.classifier, repeats)):
        load_or_train(inputs.real_train.images, inputs.real_train.labels, slices.classes, settings,
                      run_dir / "classifier-cache", progress=True,
                      desc="feature network" if i == 0 else f"TRTR classifier {i + 1}/{repeats}")
    run_jobs(inputs, args, samples, sweep_samples, result)
    result["total_seconds"] = round(time.time() - started, 1)
    write_json_atomic(args.out / "quality.json", result)
    write_bytes_atomic(args.out / "quality.md", markdown_table(result).encode("utf-8"))
    print_table(result)
    print(f"\nwritten: {args.out / 'quality.json'}, {args.out / 'quality.md'}, reports in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
