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
from common.checkpoint import Checkpoint, save_checkpoint
from quality_data import sample_set
from quality_table import summarise
from quality_train import ModelPreset, TrainOutcome, federation_config, train_central, train_federated
from server.evaluation.evaluate import EvaluationSettings, evaluate_sets, write_report
from server.evaluation.image_sets import ImageSet


@dataclass(frozen=True)
class BenchmarkInputs:
    """Everything a job needs; sent to each worker once, when it starts."""

    model: ModelPreset
    sites: dict[str, SiteSlices]
    central: SiteSlices
    real_test: ImageSet
    real_train: ImageSet
    evaluation: EvaluationSettings
    run_dir: Path
    epsilon: float
    delta: float
    seed: int
    threads: int


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


def _train(name: str) -> TrainOutcome:
    assert _inputs is not None
    p, run = _inputs.model, _inputs.run_dir
    report = _round_reporter(name, p.rounds)
    if name == "central":
        return train_central(p, _inputs.central, len(_inputs.sites), run / name, on_round=report)
    label = "federated+DP" if name == "federated_dp" else "federated"
    return train_federated(p, _inputs.sites, run / name, name == "federated_dp", _inputs.epsilon, _inputs.delta,
                           label=label, on_round=report)


def train_and_score(name: str, samples: int, steps: int, guidance: float) -> tuple[dict, dict[str, np.ndarray]]:
    """Train one of the three models, save it as a fedsynth checkpoint, sample it and score the samples.

    Returns:
        ``(the run's entry of quality.json, the trained weights)``.
    """
    assert _inputs is not None
    _say(f"{name}: training started")
    outcome = _train(name)
    classes = _inputs.central.classes
    save_checkpoint(_inputs.run_dir / name / "model.pt",
                    Checkpoint(federation_config(_inputs.model, classes, _inputs.run_dir / name, 1, False),
                               outcome.arrays, _inputs.model.rounds))
    _say(f"{name}: trained in {outcome.seconds:.0f} s; sampling {samples} images")
    synthetic, sample_s = sample_set(_inputs.model, classes, outcome.arrays, samples, steps, guidance, _inputs.seed,
                                     progress=False)
    report = _score(name, synthetic, full_report=True)
    _say(f"{name}: scored (FID {report['fidelity']['fid']:.2f})")
    entry = {"train_seconds": round(outcome.seconds, 1), "sample_seconds": round(sample_s, 1),
             "optimiser_steps": outcome.steps, "weights": outcome.weights, "epsilon": outcome.epsilon, "noise_multiplier": outcome.noise_multiplier,
             "loss_per_round": outcome.losses, "summary": summarise(report), "report": report}
    return entry, outcome.arrays


def score_sweep_point(arrays: dict[str, np.ndarray], samples: int, steps: int, guidance: float) -> dict:
    """Sample the swept model at one (guidance, DDIM steps) and score it; returns the sweep row."""
    assert _inputs is not None
    synthetic, sample_s = sample_set(_inputs.model, _inputs.central.classes, arrays, samples, steps, guidance,
                                     _inputs.seed, progress=False)
    report = _score("sweep", synthetic, full_report=False)
    _say(f"sweep guidance {guidance:g}, {steps} steps: FID {report['fidelity']['fid']:.2f}")
    return {"guidance": guidance, "steps": steps, "sample_seconds": round(sample_s, 1), "summary": summarise(report)}
