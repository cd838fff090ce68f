"""Class-conditional DDIM sampling with classifier-free guidance.

Guidance follows ``eps = eps_u + w * (eps_c - eps_u)``: ``w = 0`` samples the
unconditional model, ``w = 1`` the plain conditional one, ``w > 1`` is guided. For
``w`` other than 0 and 1 the conditional and unconditional passes run as one batched
forward of twice the batch.

Each image starts from noise drawn with its own seed, and DDIM with ``eta = 0`` is
deterministic, so the same seeds give the same images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from common.checkpoint import Checkpoint
from common.config import FedsynthConfig
from common.errors import ConfigError
from common.model import build_ddim_sampler, build_unet, load_trainable_state

# Which weights of a checkpoint to sample: the EMA over rounds, or the last round's global weights.
WEIGHTS = ("ema", "global")


def sampling_weights(ckpt: Checkpoint, choice: str | None = None, source: str = "the checkpoint") -> tuple[dict[str, np.ndarray], str]:
    """The weights to sample and their name: ``choice``, or by default the EMA when ``ckpt`` has one."""
    if choice is None:
        choice = "ema" if ckpt.ema is not None else "global"
    if choice not in WEIGHTS:
        raise ConfigError(f"--weights must be one of {list(WEIGHTS)}, got {choice!r}")
    if choice == "global":
        return ckpt.arrays, choice
    if ckpt.ema is None:
        raise ConfigError(f"--weights ema: {source} holds no EMA weights (it was trained with federation.ema_decay 0); "
                          "use --weights global")
    return ckpt.ema.weights, choice


def build_sampling_model(cfg: FedsynthConfig, arrays: dict[str, np.ndarray], device: torch.device) -> torch.nn.Module:
    model = build_unet(cfg.model)
    load_trainable_state(model, arrays)
    return model.to(device).eval()


def initial_noise(seeds: Sequence[int], size: int) -> torch.Tensor:
    """``(N, 1, size, size)`` standard normal noise, image ``i`` drawn from ``seeds[i]`` alone."""
    return torch.stack([torch.randn((1, size, size), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def guided_eps(model: torch.nn.Module, x: torch.Tensor, t: int, labels: torch.Tensor, null_class: int, guidance: float) -> torch.Tensor:
    timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    if guidance == 1.0:
        return model(x=x, timesteps=timesteps, class_labels=labels)
    null = torch.full_like(labels, null_class)
    if guidance == 0.0:
        return model(x=x, timesteps=timesteps, class_labels=null)
    eps = model(x=torch.cat([x, x]), timesteps=torch.cat([timesteps, timesteps]), class_labels=torch.cat([labels, null]))
    eps_c, eps_u = eps.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def sample_images(
    cfg: FedsynthConfig,
    model: torch.nn.Module,
    labels: Sequence[int],
    seeds: Sequence[int],
    steps: int = 50,
    guidance: float = 1.0,
    batch_size: int = 32,
    progress: bool = True,
) -> np.ndarray:
    """Generate one image per (label, seed).

    Returns:
        ``(N, H, W)`` float32 images in [-1, 1].
    """
    if len(labels) != len(seeds):
        raise ValueError(f"got {len(labels)} labels but {len(seeds)} seeds")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    device = next(model.parameters()).device
    size = cfg.data.image_size
    out = np.empty((len(labels), size, size), dtype=np.float32)
    batches = range(0, len(labels), batch_size)
    bar = tqdm(total=len(labels) * steps, desc="sampling", unit="step", disable=not progress)
    for start in batches:
        stop = min(start + batch_size, len(labels))
        scheduler = build_ddim_sampler(cfg.diffusion, steps)
        x = initial_noise(seeds[start:stop], size).to(device)
        y = torch.as_tensor(list(labels[start:stop]), dtype=torch.long, device=device)
        for t in scheduler.timesteps:
            eps = guided_eps(model, x, int(t), y, cfg.model.null_class, guidance)
            x, _ = scheduler.step(eps, int(t), x)
            bar.update(stop - start)
        out[start:stop] = x.clamp(-1, 1)[:, 0].float().cpu().numpy()
    bar.close()
    return out
