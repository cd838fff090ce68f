"""Cost of DP: one local step, DP-SGD vs non-DP, same UNet, batch and data.

Variants: ``nondp`` (plain AdamW step), ``fedsynth`` (client/dp_sgd.py, the training path's
default) and ``opacus`` (Opacus ``GradSampleModule`` hooks + ``DPOptimizer``, the previous
path). Time: interleaved in one process, 1 torch thread, medians. Peak memory: a fresh
process per variant (``python -m bench.perf_dp '{json}'``), peak RSS (VmHWM) after three steps;
reported as the peak and as the increase of the peak over the process's current RSS just
before the first step (model, optimiser and data built, torch loaded).
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable

import torch

from bench.perf_common import current_rss_mb, interleaved, peak_rss_mb, ratio, run_child
import client.privacy  # noqa: F401  (the training path imports Opacus whatever the mode: same baseline RSS)
from client.dp_sgd import DPSGDStep, PlainStep
from common.config import DiffusionConfig, ModelConfig
from common.model import build_train_scheduler, build_unet, count_parameters, diffusion_loss

VARIANTS = ("nondp", "fedsynth", "opacus")


def _step_fn(variant: str, channels: tuple[int, ...], size: int, batch: int) -> tuple[Callable[[], object], int]:
    torch.manual_seed(0)
    model = build_unet(ModelConfig(channels=channels))
    params = count_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    images = torch.rand((batch, 1, size, size), generator=g) * 2 - 1
    labels = torch.randint(0, 5, (batch,), generator=g)
    scheduler = build_train_scheduler(DiffusionConfig())
    if variant == "nondp":
        step = PlainStep(optimizer)
    elif variant == "fedsynth":
        step = DPSGDStep(model, optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch)
    elif variant == "opacus":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = GradSampleModule(model)
            step = PlainStep(DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch))
    else:
        raise ValueError(variant)
    return (lambda: step.step(lambda: diffusion_loss(model, scheduler, images, labels, g))), params


def time_steps(channels: tuple[int, ...], size: int, batch: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    fns = {}
    params = 0
    for variant in VARIANTS:
        fns[variant], params = _step_fn(variant, channels, size, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus: "Full backward hook is firing ..."
        times = interleaved(fns, repeats=repeats)
    return {"params": params, "times": times}


def peak_memory(variant: str, channels: tuple[int, ...], size: int, batch: int) -> dict:
    # 3 steps: the first allocates the optimiser state, later ones show any growth from heap fragmentation
    return run_child("perf_dp", {"variant": variant, "channels": list(channels), "size": size, "batch": batch, "steps": 3})


def measure(name: str, channels: tuple[int, ...], size: int, batch: int, repeats: int) -> dict:
    timing = time_steps(channels, size, batch, repeats)
    memory = {v: peak_memory(v, channels, size, batch) for v in VARIANTS}
    t, m = timing["times"], memory
    return {
        "name": name, "channels": list(channels), "image_size": size, "batch": batch, "params": timing["params"],
        "times": t, "memory_mb": m,
        "time_ratio": ratio(t["fedsynth"]["wall_s"], t["nondp"]["wall_s"]),
        "time_ratio_cpu": ratio(t["fedsynth"]["cpu_s"], t["nondp"]["cpu_s"]),
        "opacus_time_ratio": ratio(t["opacus"]["wall_s"], t["nondp"]["wall_s"]),
        "opacus_time_ratio_cpu": ratio(t["opacus"]["cpu_s"], t["nondp"]["cpu_s"]),
        "memory_ratio": ratio(m["fedsynth"]["peak_mb"], m["nondp"]["peak_mb"]),
        "memory_increase_ratio": ratio(m["fedsynth"]["increase_mb"], m["nondp"]["increase_mb"]),
        "opacus_memory_ratio": ratio(m["opacus"]["peak_mb"], m["nondp"]["peak_mb"]),
        "opacus_memory_increase_ratio": ratio(m["opacus"]["increase_mb"], m["nondp"]["increase_mb"]),
    }


def run(quick: bool) -> dict:
    if quick:
        configs = [("small 32px B16", (32, 64, 64), 32, 16, 5), ("medium 32px B16", (64, 128, 128), 32, 16, 4)]
    else:
        configs = [("small 64px B16", (32, 64, 64), 64, 16, 5), ("small 64px B32", (32, 64, 64), 64, 32, 3),
                   ("medium 64px B16", (64, 128, 128), 64, 16, 3)]
    rows = [measure(*c) for c in configs]
    # Headline: CPU time (with 1 thread, the step's own work; wall time also counts the time other
    # people's jobs hold the core, which varies 2x between two repeats here). Worst configuration.
    return {"rows": rows,
            "dp_time_ratio": max(r["time_ratio_cpu"] for r in rows),
            "dp_time_ratio_wall": max(r["time_ratio"] for r in rows),
            "dp_memory_ratio": max(r["memory_ratio"] for r in rows),
            "dp_memory_increase_ratio": max(r["memory_increase_ratio"] for r in rows),
            "opacus_time_ratio": max(r["opacus_time_ratio_cpu"] for r in rows),
            "opacus_memory_ratio": max(r["opacus_memory_ratio"] for r in rows)}


def _child(args: dict) -> dict:
    torch.set_num_threads(1)
    fn, _ = _step_fn(args["variant"], tuple(args["channels"]), args["size"], args["batch"])
    before = current_rss_mb()  # not the peak so far: importing torch and friends peaks above the steady state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(args["steps"]):
            fn()
    peak = peak_rss_mb()
    return {"before_mb": before, "peak_mb": peak, "increase_mb": peak - before}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
