"""The quality benchmark's jobs, run in worker processes: train + sample + score a model, or one sweep point.

The machine's cores are used by running independent jobs side by side, one torch thread
each (on 2 shared cores one process with 2 threads measured 3-4x *slower* per step than one
thread, while two one-thread processes each keep their speed). Every job is seeded end to
end (training, sampling, the classifiers), so a job gives the same numbers whichever worker
runs it and whatever runs beside it: ``--workers 1`` reproduces ``--workers 2`` exactly.

Workers report progress as text lines on a queue; the parent prints them (quality.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.site_data import SiteSlices
from common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from quality_data import sample_set
from quality_runs import BY_NAME, PUBLIC_ONLY, RunSpec
from quality_table import summarise
from quality_train import DpPlan, ModelPreset, Recipe, TrainOutcome, federation_config, train_central, train_federated
from server.init_weights import init_record
from server.sampler import DEFAULT_ETA
from server.evaluation.evaluate import EvaluationSettings, evaluate_sets, write_report
from server.evaluation.image_sets import ImageSet


@dataclass(frozen=True)
class BenchmarkInputs:
    """Everything a job needs; sent to each worker once, when it starts."""

    model: ModelPreset
    sites: dict[str, SiteSlices]
    central: SiteSlices
    public: SiteSlices
    plans: dict[str, DpPlan]  # "planner" and "fixed batch" (DP rows only; empty when none runs)
    real_test: ImageSet
    real_train: ImageSet
    evaluation: EvaluationSettings
    run_dir: Path
    epsilon: float
    delta: float
    seed: int
    threads: int
    eta: float = DEFAULT_ETA  # DDIM stochasticity of every model's sampling
    # Sets of ``samples`` images scored per model, from disjoint seeds: one set is one draw, and a
    # target met by one draw of 400 images may not be met by the next.
    sampling_sets: int = 1


_inputs: BenchmarkInputs | None = None
_messages: Any = None  # a multiprocessing queue of progress lines, or None


def init_worker(inputs: BenchmarkInputs, messages: Any) -> None:
    global _inputs, _messages
    _inputs, _messages = inputs, messages
    torch.set_num_threads(inputs.threads)


def _say(text: str) -> None:
    if _messages is not None:
        _messages.put(f"[pid {os.getpid()}] {text}")


def _round_reporter(label: str, total: int):
    started = time.time()

    def report(rnd: int, loss: float) -> None:
        _say(f"{label}: round {rnd}/{total}, loss {loss:.4f}, {time.time() - started:.0f} s")
    return report


def _score(name: str, synthetic: ImageSet, full_report: bool) -> dict:
    assert _inputs is not None
    report, figures = evaluate_sets(synthetic, _inputs.real_test, _inputs.real_train, _inputs.evaluation,
                                    _inputs.run_dir / "classifier-cache", progress=False)
    if full_report:
        write_report(_inputs.run_dir / name, report, figures)
    return report


def pretrained_path() -> Path:
    assert _inputs is not None
    return _inputs.run_dir / PUBLIC_ONLY / "model.pt"


def _recipe(spec: RunSpec) -> Recipe | None:
    assert _inputs is not None
    p = _inputs.model
    keep = p.keep_optimizer_state if spec.keep_optimizer_state is None else spec.keep_optimizer_state
    if not spec.dp:
        return Recipe(p.batch_size, 1.0, 1, keep, spec.trainable)
    plan = _inputs.plans["planner" if spec.planner else "fixed batch"]
    k = p.noise_multiplicity if spec.noise_multiplicity is None else spec.noise_multiplicity
    return Recipe(plan.batch_size, plan.noise_multiplier, k, keep, spec.trainable)


def _train(spec: RunSpec) -> tuple[TrainOutcome, Checkpoint]:
    """Train one row and build its checkpoint as the ServerApp (or ``fedsynth pretrain``) would write it."""
    assert _inputs is not None
    p, run, classes = _inputs.model, _inputs.run_dir, _inputs.central.classes
    report = _round_reporter(spec.name, p.rounds if spec.kind != "pretrain" else 20)
    if spec.kind == "pretrain":
        out = train_central(p, _inputs.public, len(_inputs.sites), run / spec.name, on_round=report,
                            steps=p.pretrain_steps, batch_size=p.pretrain_batch_size, ema_decay=p.pretrain_ema_decay,
                            label="pretrain")
        provenance = {"kind": "pretrained", "description": "quality benchmark public split (bench/quality_split.py)",
                      "num_images": len(_inputs.public), "steps": out.steps, "batch_size": out.batch_size,
                      "learning_rate": p.learning_rate, "ema_decay": p.pretrain_ema_decay,
                      "seed": _inputs.seed, "seconds": round(out.seconds, 3)}
        cfg = federation_config(p, classes, run / spec.name, 1, False)
        return out, Checkpoint(cfg, out.arrays, 0, provenance=provenance)
    initial, init_path, init = None, "", None
    if spec.pretrained:
        init_path = str(pretrained_path())
        init = load_checkpoint(init_path)
        initial = init.arrays
        p = p.for_finetuning()
    if spec.kind == "central":
        out = train_central(p, _inputs.central, len(_inputs.sites), run / spec.name, on_round=report, label=spec.name,
                            initial=initial)
        cfg = federation_config(p, classes, run / spec.name, 1, False, init_checkpoint=init_path)
        return out, Checkpoint(cfg, out.arrays, p.rounds, provenance={"init": init_record(cfg, init)})
    recipe = _recipe(spec)
    out = train_federated(p, _inputs.sites, run / spec.name, spec.dp, _inputs.epsilon, _inputs.delta, label=spec.name,
                          on_round=report, recipe=recipe, initial=initial, init_checkpoint=init_path)
    cfg = federation_config(p, classes, run / spec.name, p.local_steps, spec.dp, recipe=recipe, init_checkpoint=init_path)
    # as the ServerApp's round checkpoint: the global weights, the EMA beside them (the sampler's default)
    arrays = out.global_arrays if out.global_arrays is not None else out.arrays
    return out, Checkpoint(cfg, arrays, p.rounds, sites=out.sites, provenance={"init": init_record(cfg, init)},
                           optimizer=out.optimizer, ema=out.ema)


def _sample_and_score(name: str, arrays: dict[str, np.ndarray], samples: int, steps: int,
                      guidance: float) -> tuple[dict, float, dict | None]:
    """Sample ``sampling_sets`` x ``samples`` images and score them.

    The first set (seeds ``seed`` .. ``seed + samples - 1``) is the row's report, the same images
    whatever the number of sets. With more sets, each is scored alone and all are scored pooled.

    Returns:
        ``(the first set's report, sampling seconds, {"count", "samples", "summaries", "pooled"} or None)``.
    """
    assert _inputs is not None
    sets = _inputs.sampling_sets
    _say(f"{name}: sampling {sets} x {samples} images" if sets > 1 else f"{name}: sampling {samples} images")
    synthetic, sample_s = sample_set(_inputs.model, _inputs.central.classes, arrays, samples * sets, steps, guidance,
                                     _inputs.seed, progress=False, eta=_inputs.eta)
    report = _score(name, synthetic.subset(np.arange(samples)), full_report=True)
    _say(f"{name}: scored (FID {report['fidelity']['fid']:.2f}, "
         f"balanced TSTR {report['utility']['tstr_balanced_accuracy']:.3f})")
    if sets == 1:
        return report, sample_s, None
    summaries = [summarise(report)]
    for k in range(1, sets):
        one_set = synthetic.subset(np.arange(k * samples, (k + 1) * samples))
        summaries.append(summarise(_score(name, one_set, full_report=False)))
        _say(f"{name}: set {k + 1}/{sets} scored (balanced TSTR {summaries[-1]['tstr_balanced_accuracy']:.3f})")
    pooled = summarise(_score(name, synthetic, full_report=False))
    _say(f"{name}: all {len(synthetic)} images scored (FID {pooled['fid']:.2f}, "
         f"balanced TSTR {pooled['tstr_balanced_accuracy']:.3f})")
    return report, sample_s, {"count": sets, "samples": samples, "summaries": summaries, "pooled": pooled}


def train_and_score(name: str, samples: int, steps: int, guidance: float) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Train one row, save it as a fedsynth checkpoint, sample it and score the samples.

    Returns:
        ``(the run's entry of quality.json, the weights sampled, the raw global weights or None)``.
    """
    assert _inputs is not None
    spec = BY_NAME[name]
    _say(f"{name}: training started")
    outcome, ckpt = _train(spec)
    path = _inputs.run_dir / name / "model.pt"
    save_checkpoint(path, ckpt)
    _say(f"{name}: trained in {outcome.seconds:.0f} s")
    report, sample_s, sets = _sample_and_score(name, outcome.arrays, samples, steps, guidance)
    recipe = _recipe(spec) if spec.kind == "federated" else None
    entry = {"title": spec.title, "ablation": spec.ablation, "train_seconds": round(outcome.seconds, 1),
             "sample_seconds": round(sample_s, 1), "optimiser_steps": outcome.steps, "weights": outcome.weights,
             "checkpoint": str(path), "batch_size": outcome.batch_size, "epsilon": outcome.epsilon,
             "noise_multiplier": outcome.noise_multiplier,
             "noise_multiplicity": recipe.noise_multiplicity if recipe else 1,
             "keep_optimizer_state": recipe.keep_optimizer_state if recipe else True,
             "trainable": spec.trainable, "pretrained": spec.pretrained,
             "dp_plan": (_inputs.plans["planner" if spec.planner else "fixed batch"].method if spec.dp else None),
             "loss_per_round": outcome.losses, "summary": summarise(report), "report": report}
    if sets:
        entry["sets"] = sets
    return entry, outcome.arrays, outcome.global_arrays


def score_weights(name: str, arrays: dict[str, np.ndarray], source_entry: dict, samples: int, steps: int,
                  guidance: float) -> dict:
    """Score another run's weights (its raw global weights, for "minus EMA"): no training."""
    assert _inputs is not None
    spec = BY_NAME[name]
    report, sample_s, sets = _sample_and_score(name, arrays, samples, steps, guidance)
    keep = ("optimiser_steps", "checkpoint", "batch_size", "epsilon", "noise_multiplier", "noise_multiplicity",
            "keep_optimizer_state", "trainable", "pretrained", "dp_plan")
    return {**{k: source_entry.get(k) for k in keep}, "title": spec.title, "ablation": spec.ablation,
            "train_seconds": 0.0, "sample_seconds": round(sample_s, 1), "weights": "global", "source": spec.source,
            "loss_per_round": source_entry.get("loss_per_round", []), "summary": summarise(report), "report": report,
            **({"sets": sets} if sets else {})}


def score_sweep_point(arrays: dict[str, np.ndarray], samples: int, steps: int, guidance: float) -> dict:
    """Sample the swept model at one (guidance, DDIM steps) and score it; returns the sweep row."""
    assert _inputs is not None
    synthetic, sample_s = sample_set(_inputs.model, _inputs.central.classes, arrays, samples, steps, guidance,
                                     _inputs.seed, progress=False, eta=_inputs.eta)
    report = _score("sweep", synthetic, full_report=False)
    _say(f"sweep guidance {guidance:g}, {steps} steps: FID {report['fidelity']['fid']:.2f}")
    return {"guidance": guidance, "steps": steps, "sample_seconds": round(sample_s, 1), "summary": summarise(report)}
