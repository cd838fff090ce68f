"""Sampling speed: DDIM-50 vs DDPM-1000 with the same model and batch, and the cost of classifier-free guidance.

DDIM and CFG use server/sampler.py's ``sample_images`` as ``fedsynth sample`` does; DDPM
runs the same loop with MONAI's ``DDPMScheduler`` over all 1000 training steps. The DDIM
variants run before and after the (long) DDPM run; medians; 1 torch thread.
"""

from __future__ import annotations

import time

import torch

from bench.perf_common import interleaved, ratio, timed
from common.config import DataConfig, FedsynthConfig, FederationConfig, ModelConfig
from common.model import build_ddpm_sampler, build_unet, count_parameters
from server.sampler import guided_eps, initial_noise, sample_images


@torch.no_grad()
def sample_ddpm(cfg: FedsynthConfig, model: torch.nn.Module, labels: list[int], seeds: list[int]) -> torch.Tensor:
    """Ancestral DDPM sampling over every training timestep (the baseline DDIM replaces)."""
    scheduler = build_ddpm_sampler(cfg.diffusion)
    x = initial_noise(seeds, cfg.data.image_size)
    y = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(int(seeds[0]))
    for t in scheduler.timesteps:
        eps = guided_eps(model, x, int(t), y, cfg.model.null_class, 1.0)
        x, _ = scheduler.step(eps, int(t), x, generator=generator)
    return x.clamp(-1, 1)


def measure(channels: tuple[int, ...], size: int, batch: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    cfg = FedsynthConfig(federation=FederationConfig(output_dir="unused"), data=DataConfig(image_size=size),
                         model=ModelConfig(channels=channels))
    torch.manual_seed(0)
    model = build_unet(cfg.model).eval()
    labels = [i % len(cfg.model.classes) for i in range(batch)]
    seeds = list(range(batch))

    def ddim(guidance: float) -> None:
        sample_images(cfg, model, labels, seeds, steps=50, guidance=guidance, batch_size=batch, progress=False)

    variants = {"ddim50": lambda: ddim(1.0), "ddim50_cfg": lambda: ddim(2.0)}
    first = interleaved(variants, repeats=repeats)
    ddpm_wall, ddpm_cpu = timed(lambda: sample_ddpm(cfg, model, labels, seeds))
    second = interleaved(variants, repeats=repeats, warmup=0)
    # before and after DDPM: the mean of the two medians follows the machine's load over the run
    med = {k: {m: (first[k][m] + second[k][m]) / 2 for m in ("wall_s", "cpu_s")} for k in variants}
    per_image = {k: v["wall_s"] / batch for k, v in med.items()}
    per_image["ddpm1000"] = ddpm_wall / batch
    return {
        "channels": list(channels), "image_size": size, "batch": batch, "params": count_parameters(model),
        "seconds_per_image": per_image,
        "images_per_s": {k: 1 / v for k, v in per_image.items()},
        "ddim_speedup": ratio(ddpm_wall, med["ddim50"]["wall_s"]),
        "ddim_speedup_cpu": ratio(ddpm_cpu, med["ddim50"]["cpu_s"]),
        "cfg_cost": ratio(med["ddim50_cfg"]["wall_s"], med["ddim50"]["wall_s"]),
        "cfg_cost_cpu": ratio(med["ddim50_cfg"]["cpu_s"], med["ddim50"]["cpu_s"]),
    }


def run(quick: bool) -> dict:
    rows = [measure((16, 32, 32), 32, 8 if quick else 16, repeats=1 if quick else 3)]
    if not quick:
        start = time.perf_counter()
        rows.append(measure((32, 64, 64), 64, 8, repeats=2))
        rows[-1]["bench_seconds"] = time.perf_counter() - start
    return {"rows": rows, "ddim_speedup": min(r["ddim_speedup"] for r in rows),
            "cfg_cost": max(r["cfg_cost"] for r in rows)}
