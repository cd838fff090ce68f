"""The shared diffusion model: MONAI's UNet, its noise schedules and the training loss.

Both sides build the model from the same :class:`~common.config.FedsynthConfig`, so the
weights a site trains always fit the server's model.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from common.config import DiffusionConfig, ModelConfig


def build_unet(cfg: ModelConfig) -> DiffusionModelUNet:
    """A 2D, one-channel class-conditional UNet.

    One class embedding more than there are classes: index ``cfg.null_class`` is the
    "no label" token used for classifier-free guidance.
    """
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=cfg.channels,
        attention_levels=cfg.attention_levels,
        num_res_blocks=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=cfg.num_head_channels,
        num_class_embeds=len(cfg.classes) + 1,
    )


# What a checkpoint's embedded config may ask the server to build. The parameter cap (4 GB of
# float32) is far above any model fedsynth trains; the structural caps keep counting cheap,
# since the count builds the module tree (without memory) and that is linear in levels and blocks.
MAX_PARAMETERS = 1_000_000_000
MAX_LEVELS = 16
MAX_RES_BLOCKS = 16
MAX_CHANNELS = 65536
MAX_CLASSES = 100_000


def trainable_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the trainable parameters of ``build_unet(cfg)``, without allocating them.

    The model is built on PyTorch's ``meta`` device, so a config asking for billions of
    parameters is measured, and refused, before any memory is spent on it.

    Raises:
        ValueError: the config asks for a model beyond the caps above; the message names the setting.
    """
    caps = [(len(cfg.channels), MAX_LEVELS, "channels", "levels"),
            (max(cfg.channels), MAX_CHANNELS, "channels", "channels in a level"),
            (cfg.num_res_blocks, MAX_RES_BLOCKS, "num_res_blocks", "residual blocks per level"),
            (len(cfg.classes), MAX_CLASSES, "classes", "classes")]
    for value, cap, key, what in caps:
        if value > cap:
            raise ValueError(f"model.{key}: {value} {what}, more than the {cap} fedsynth builds")
    try:
        with torch.device("meta"):
            model = build_unet(cfg)
    except (ValueError, TypeError, RuntimeError, AssertionError) as err:
        raise ValueError(f"model: MONAI cannot build this UNet ({err})") from None
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    total = sum(int(np.prod(shape)) for shape in shapes.values())
    if total > MAX_PARAMETERS:
        raise ValueError(f"model.channels {list(cfg.channels)} (num_res_blocks {cfg.num_res_blocks}) describe a UNet of "
                         f"{total:,} parameters, more than the {MAX_PARAMETERS:,} fedsynth builds")
    return shapes


def _schedule_args(cfg: DiffusionConfig) -> dict[str, float]:
    if cfg.schedule in ("linear_beta", "scaled_linear_beta"):
        return {"beta_start": cfg.beta_start, "beta_end": cfg.beta_end}
    return {}


def build_train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule, **_schedule_args(cfg))


def build_ddpm_sampler(cfg: DiffusionConfig) -> DDPMScheduler:
    sched = build_train_scheduler(cfg)
    sched.set_timesteps(cfg.num_train_timesteps)
    return sched


def build_ddim_sampler(cfg: DiffusionConfig, steps: int) -> DDIMScheduler:
    """DDIM over the DDPM training schedule: ``steps`` model calls instead of all T."""
    if not 1 <= steps <= cfg.num_train_timesteps:
        raise ValueError(f"steps must be in [1, {cfg.num_train_timesteps}], got {steps}")
    sched = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule, **_schedule_args(cfg))
    sched.set_timesteps(steps)
    return sched


def _rng_device(generator: torch.Generator | None) -> torch.device:
    """Draw where the generator lives: a CPU generator gives the same numbers on every device,
    a GPU generator avoids a host-to-device copy per step."""
    return generator.device if generator is not None else torch.device("cpu")


def drop_labels(labels: torch.Tensor, null_class: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null class with probability ``p`` (CFG training)."""
    if p <= 0:
        return labels
    mask = torch.rand(labels.shape, generator=generator, device=_rng_device(generator)).to(labels.device) < p
    return torch.where(mask, torch.full_like(labels, null_class), labels)


def diffusion_loss(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    draws: int = 1,
) -> torch.Tensor:
    """Noise-prediction MSE, one value per image.

    Args:
        images: ``(N, 1, H, W)`` in [-1, 1].
        labels: ``(N,)`` class indices (the null class allowed).
        draws: noise multiplicity K: each image's loss is the mean over K independent
            (timestep, noise) draws, from one forward pass over ``N * K`` rows, image ``i``
            being rows ``i*K .. i*K+K-1`` (what :class:`client.grad_sample.GradSampler` folds).

    Returns:
        ``(N,)`` per-image losses; callers take the mean for the optimiser.
    """
    if draws > 1:
        images, labels = images.repeat_interleave(draws, dim=0), labels.repeat_interleave(draws, dim=0)
    n = images.shape[0]
    rng_device = _rng_device(generator)
    noise = torch.randn(images.shape, generator=generator, device=rng_device).to(images.device)
    t = torch.randint(0, scheduler.num_train_timesteps, (n,), generator=generator, device=rng_device).to(images.device)
    noisy = scheduler.add_noise(original_samples=images, noise=noise, timesteps=t)
    pred = model(x=noisy, timesteps=t, class_labels=labels)
    return ((pred - noise) ** 2).flatten(1).mean(dim=1).view(-1, draws).mean(dim=1)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_state(model: torch.nn.Module, include_frozen: bool = False) -> dict[str, np.ndarray]:
    """The weights that travel: float32 numpy arrays of trainable parameters only.

    Opacus wraps the model and prefixes its keys with ``_module.``; the wire format must
    not depend on whether a site trained with DP, so the prefix is stripped.

    Args:
        include_frozen: also the parameters a site froze for ``training.trainable``: the whole
            model, as the server and every other caller of :func:`load_trainable_state` expect it.
    """
    inner = getattr(model, "_module", model)
    out: dict[str, np.ndarray] = {}
    for name, param in inner.named_parameters():
        if param.requires_grad or include_frozen:
            out[name] = param.detach().to("cpu", torch.float32).numpy().copy()
    return out


def load_trainable_state(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Copy ``arrays`` into the model's trainable parameters; keys and shapes must match exactly."""
    inner = getattr(model, "_module", model)
    params = dict(inner.named_parameters())
    expected = {k for k, p in params.items() if p.requires_grad}
    missing, extra = expected - set(arrays), set(arrays) - expected
    if missing or extra:
        raise ValueError(
            f"weights do not match the model: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
            f"{len(extra)} unexpected (e.g. {sorted(extra)[:3]})"
        )
    with torch.no_grad():
        for name in expected:
            value = torch.as_tensor(np.asarray(arrays[name]))
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(f"weights do not match the model: {name} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))


def pick_device() -> torch.device:
    """GPU when present, CPU otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training on ``device`` (``training.mixed_precision``), or None for full precision.

    CPU training is left exactly as it was (full precision, whatever the mode): bf16 autocast
    speeds up a non-DP step only on CPUs with bf16 instructions and barely a DP step, whose
    per-sample gradients are float32 (bench/perf_gpu.py). float16 is not offered: it needs
    loss scaling, which DP clipping would see.
    """
    if mode == "off" or device.type != "cuda":
        return None
    if mode in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None
