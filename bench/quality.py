"""Quality benchmark: central vs federated vs federated+DP diffusion models on real brain MRI.

    python bench/quality.py --preset cpu --out runs/quality-cpu
    python bench/quality.py --preset gpu --out runs/quality-gpu

Splits ``../shared/data/brain-tumor-mri/train`` into 4 non-IID hospitals and a validation
set (bench/quality_split.py), trains (a) centrally without DP, (b) federated without DP and
(c) federated with DP at epsilon 8 per site, each with the same number of optimiser steps
(bench/quality_train.py), samples each, scores each with ``fedsynth evaluate``'s code
against the validation set, then sweeps guidance and DDIM steps on one model. Prints one
table and writes ``quality.json`` and ``quality.md`` (and a full report per model) to --out.
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
from quality_jobs import BenchmarkInputs, init_worker, score_sweep_point, train_and_score  # noqa: E402
from quality_split import describe, site_slices, split_hospitals  # noqa: E402
from quality_table import markdown_table, print_table  # noqa: E402
from quality_train import ModelPreset, federation_config  # noqa: E402
from client.site_data import SiteSlices  # noqa: E402
from server.evaluation.classifier import ClassifierSettings, load_or_train  # noqa: E402
from server.evaluation.evaluate import EvaluationSettings  # noqa: E402
from server.evaluation.image_sets import ImageSet  # noqa: E402
from common.config import SERVER_OPTIMIZERS  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from common.fileio import write_bytes_atomic, write_json_atomic  # noqa: E402

PRESETS = {
    # 2 shared CPU cores, under 45 minutes: the README's "tiny" UNet at 32 px
    "cpu": dict(model=ModelPreset(image_size=32, channels=(16, 32, 32), rounds=15, local_steps=20, batch_size=32,
                                  learning_rate=1e-3), samples=400, sweep_samples=200, classifier_steps=400),
    # the same on 2 CPU cores with 4x the steps (about 40 minutes): where central TSTR first leaves chance
    "cpu-long": dict(model=ModelPreset(image_size=32, channels=(16, 32, 32), rounds=60, local_steps=20, batch_size=32,
                                       learning_rate=1e-3), samples=400, sweep_samples=200, classifier_steps=400),
    # one GPU: 64 px, a 4.6M-parameter UNet, 8x the optimiser steps
    "gpu": dict(model=ModelPreset(image_size=64, channels=(64, 128, 128), rounds=40, local_steps=60, batch_size=64,
                                  learning_rate=5e-4, head_channels=16), samples=1000, sweep_samples=400, classifier_steps=800),
}
RUNS = ("central", "federated", "federated_dp")
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
    p.add_argument("--samples", type=int, help="override the number of images sampled per model")
    p.add_argument("--sweep-samples", type=int, help="override the number of images per sweep point")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps for the main comparison")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance for the main comparison")
    p.add_argument("--epsilon", type=float, default=8.0, help="per-site DP budget of run (c)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="which of the three models to train")
    p.add_argument("--sweep-model", choices=RUNS, default="federated_dp")
    p.add_argument("--no-sweep", action="store_true")
    # 1 by default: on a shared 2-core machine 2 threads measured 3-4x SLOWER per step than 1
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="jobs (a model's training, or a sweep point) run side by side; results do not depend on it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS, default="fedavg",
                   help="federated runs: the ServerApp's server optimiser (federation.server_optimizer)")
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="federated runs: EMA of the global weights over rounds, sampled instead of them (0 = off)")
    p.add_argument("--server-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a federation option of the server optimiser, e.g. eta=0.01 (repeatable)")
    return p.parse_args(argv)


def run_jobs(inputs: BenchmarkInputs, args: argparse.Namespace, samples: int, sweep_samples: int, result: dict) -> None:
    """Train, sample and score every model, then the sweep points, ``args.workers`` jobs at a time.

    ``quality.json`` is rewritten after every job, so partial results survive a crash.
    """
    order = [name for name in ("federated_dp", "central", "federated") if name in args.runs]  # longest first
    points = [] if args.no_sweep else [(g, s) for g in GUIDANCE_SWEEP for s in STEPS_SWEEP]
    if points:
        result["sweep"] = {"model": args.sweep_model, "samples": sweep_samples, "rows": []}
    context = multiprocessing.get_context("spawn")  # fork would copy the parent's torch threads and state
    with context.Manager() as manager, Progress(*Progress.get_default_columns(), TimeElapsedColumn()) as progress:
        messages = manager.Queue()
        pool = ProcessPoolExecutor(args.workers, mp_context=context, initializer=init_worker, initargs=(inputs, messages))
        bar = progress.add_task(f"quality benchmark ({args.workers} workers)", total=len(order) + len(points))
        pending: dict[Future, tuple[str, object]] = {
            pool.submit(train_and_score, name, samples, args.steps, args.guidance): ("run", name) for name in order}
        rows: dict[tuple[float, int], dict] = {}
        try:
            while pending:
                done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                _print_messages(messages, progress.console)
                for future in done:
                    kind, key = pending.pop(future)
                    if kind == "run":
                        result["runs"][key], arrays = future.result()
                        if points and key == args.sweep_model:
                            pending.update({pool.submit(score_sweep_point, arrays, sweep_samples, s, g): ("sweep", (g, s))
                                            for g, s in points})
                    else:
                        rows[key] = future.result()
                        result["sweep"]["rows"] = [rows[p] for p in points if p in rows]
                    result["runs"] = {name: result["runs"][name] for name in RUNS if name in result["runs"]}
                    write_json_atomic(args.out / "quality.json", result)
                    progress.advance(bar)
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
    if not args.no_sweep and args.sweep_model not in args.runs:
        print(f"quality benchmark: --sweep-model {args.sweep_model} is not among --runs {args.runs}", file=sys.stderr)
        return 2
    if args.workers < 1 or args.threads < 1:
        print("quality benchmark: --workers and --threads must be at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    model: ModelPreset = dataclasses.replace(preset["model"], **{k: v for k, v in (("rounds", args.rounds),
                                                                                    ("local_steps", args.local_steps)) if v})
    samples = args.samples or preset["samples"]
    sweep_samples = args.sweep_samples or preset["sweep_samples"]
    reduced = (model != preset["model"] or samples != preset["samples"] or sweep_samples != preset["sweep_samples"]
               or set(args.runs) != set(RUNS))
    try:  # the server's recipe is a choice of the run, not a reduction of the preset
        bad = [o for o in args.server_option if "=" not in o]
        if bad:
            raise ValueError(f"expected KEY=VALUE, got {bad[0]!r}")
        options = tuple((k, float(v)) for k, v in (o.split("=", 1) for o in args.server_option))
        model = dataclasses.replace(model, server_optimizer=args.server_optimizer, ema_decay=args.ema_decay,
                                    server_options=options)
        federation_config(model, ("a",), args.out, 1, dp=False)  # the federation config's own checks, now
    except (ValueError, ConfigError) as err:
        print(f"quality benchmark: --server-optimizer/--ema-decay/--server-option: {err}", file=sys.stderr)
        return 2
    run_dir = args.out / time.strftime("run-%Y%m%d-%H%M%S")  # fresh privacy ledgers every time
    started = time.time()
    result: dict = {"preset": args.preset, "reduced": reduced, "model": dataclasses.asdict(model), "samples": samples,
                    "sampling": {"steps": args.steps, "guidance": args.guidance},
                    "machine": {**machine(), "workers": args.workers}, "runs": {}}

    slices = load_slices(args.data, model.image_size, args.out / "cache")
    split = split_hospitals(slices, args.data, seed=args.seed)
    result["split"] = describe(split, slices)
    result["split"]["near_duplicate_images"] = split.near_duplicate_images
    train_index = np.concatenate(list(split.hospitals.values()))
    eval_settings = EvaluationSettings(classifier=ClassifierSettings(steps=preset["classifier_steps"], seed=args.seed),
                                       seed=args.seed)
    inputs = BenchmarkInputs(
        model=model, sites={h: site_slices(slices, idx, split.groups) for h, idx in split.hospitals.items()},
        central=site_slices(slices, train_index, split.groups), real_test=image_set(slices, split.validation, "validation split"),
        real_train=image_set(slices, train_index, "all hospitals"), evaluation=eval_settings, run_dir=run_dir,
        epsilon=args.epsilon, delta=args.delta, seed=args.seed, threads=args.threads)
    # The feature network is the same for every job: trained once here, not once per worker.
    load_or_train(inputs.real_train.images, inputs.real_train.labels, slices.classes, eval_settings.classifier,
                  run_dir / "classifier-cache", progress=True, desc="feature network")
    run_jobs(inputs, args, samples, sweep_samples, result)
    result["total_seconds"] = round(time.time() - started, 1)
    write_json_atomic(args.out / "quality.json", result)
    write_bytes_atomic(args.out / "quality.md", markdown_table(result).encode("utf-8"))
    print_table(result)
    print(f"\nwritten: {args.out / 'quality.json'}, {args.out / 'quality.md'}, reports in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
