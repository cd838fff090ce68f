"""Class-conditional DDIM sampling with classifier-free guidance.

Guidance follows ``eps = eps_u + w * (eps_c - eps_u)``: ``w = 0`` samples the
unconditional model, ``w = 1`` the plain conditional one, ``w > 1`` is guided. For
``w`` other than 0 and 1 the conditional and unconditional passes run as one batched
forward of twice the batch.

``eta`` sets how much fresh noise each DDIM step adds (Song et al. 2021, eq. 16): 0 is the
deterministic DDIM ODE, 1 the DDPM-like ancestral sampler. On the quality benchmark's models
``eta = 1`` gave both lower FID and higher TSTR at 50 steps (docs/benchmarks.md), so it is the
default. Each image draws its start and every step's noise from its own generator, seeded by
its own seed, so the same seeds give the same images whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler
from tqdm.auto import tqdm

from common.checkpoint import Checkpoint
from common.config import FedsynthConfig
from common.errors import ConfigError
from common.model import build_ddim_sampler, build_unet, load_trainable_state

# Stochasticity of the DDIM steps when the caller does not choose (see the module docstring).
DEFAULT_ETA = 1.0

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


class ImageNoise:
    """Standard normal noise for a batch of images, image ``i`` drawn from ``seeds[i]`` alone.

    The first draw is the image's starting noise; later draws are the noise of stochastic
    DDIM steps. One generator per image, not one per batch: an image must not depend on
    which images a batch put beside it.
    """

    def __init__(self, seeds: Sequence[int], size: int) -> None:
        self._generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self._size = size

    def draw(self) -> torch.Tensor:
        """``(N, 1, size, size)`` on the CPU: the same numbers on every device."""
        return torch.stack([torch.randn((1, self._size, self._size), generator=g) for g in self._generators])


def sampling_problem(steps: int, guidance: float, eta: float, num_train_timesteps: int) -> str | None:
    """What is wrong with these sampling settings, named as ``fedsynth sample``'s flags; None if nothing.

    One check for every caller: the CLI and the benchmark ask before any work, ``sample_images``
    once more for callers that did not.
    """
    if steps < 1:
        return f"--steps must be >= 1, got {steps}"
    if steps > num_train_timesteps:
        return f"--steps {steps} is more than the {num_train_timesteps} timesteps the model was trained with"
    if not guidance >= 0:
        return f"--guidance must be >= 0, got {guidance}"
    if not 0 <= eta <= 1:
        return f"--eta must be in [0, 1], got {eta}"
    return None


def initial_noise(seeds: Sequence[int], size: int) -> torch.Tensor:
    """``(N, 1, size, size)`` standard normal noise, image ``i`` drawn from ``seeds[i]`` alone."""
    return ImageNoise(seeds, size).draw()


def ddim_step(scheduler: DDIMScheduler, eps: torch.Tensor, t: int, x: torch.Tensor, eta: float,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step from ``x`` at ``t``: MONAI's ``DDIMScheduler.step`` with the noise passed in.

    MONAI draws a stochastic step's noise for the whole batch from one generator; taking it
    from the caller keeps each image's noise its own. With ``eta = 0`` the result is exactly
    MONAI's (tests/server/test_sampler.py checks both cases against it).
    """
    if eta == 0:
        return scheduler.step(eps, t, x)[0]
    if noise is None:
        raise ValueError("a stochastic DDIM step (eta > 0) needs its noise")
    prev = t - scheduler.num_train_timesteps // scheduler.num_inference_steps
    alpha = scheduler.alphas_cumprod[t]
    alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha ** 0.5
    if scheduler.clip_sample:
        x0 = x0.clamp(*scheduler.clip_sample_values)
    std = eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)) ** 0.5
    # Mathematically >= 0, but where alpha is ~1e-9 (the cosine schedule's last step) the square of
    # the rounded root can exceed it by float32 rounding, and a root of that negative was NaN for the whole image.
    direction = (1 - alpha_prev - std ** 2).clamp(min=0) ** 0.5
    return alpha_prev ** 0.5 * x0 + direction * eps + std * noise


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
    eta: float = DEFAULT_ETA,
) -> np.ndarray:
    """Generate one image per (label, seed).

    Args:
        eta: noise of each DDIM step, 0 (deterministic) to 1 (ancestral); see the module docstring.

    Returns:
        ``(N, H, W)`` float32 images in [-1, 1].
    """
    if len(labels) != len(seeds):
        raise ValueError(f"got {len(labels)} labels but {len(seeds)} seeds")
    problem = sampling_problem(steps, guidance, eta, cfg.diffusion.num_train_timesteps)
    if problem:
        raise ValueError(problem)
    device = next(model.parameters()).device
    size = cfg.data.image_size
    out = np.empty((len(labels), size, size), dtype=np.float32)
    batches = range(0, len(labels), batch_size)
    bar = tqdm(total=len(labels) * steps, desc="sampling", unit="step", disable=not progress)
    for start in batches:
        stop = min(start + batch_size, len(labels))
        scheduler = build_ddim_sampler(cfg.diffusion, steps)
        noise = ImageNoise(seeds[start:stop], size)
        x = noise.draw().to(device)
        y = torch.as_tensor(list(labels[start:stop]), dtype=torch.long, device=device)
        for t in scheduler.timesteps:
            eps = guided_eps(model, x, int(t), y, cfg.model.null_class, guidance)
            x = ddim_step(scheduler, eps, int(t), x, eta, noise.draw().to(device) if eta > 0 else None)
            bar.update(stop - start)
        out[start:stop] = x.clamp(-1, 1)[:, 0].float().cpu().numpy()
    bar.close()
    return out
