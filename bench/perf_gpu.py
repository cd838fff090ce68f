"""GPU readiness: what ``training.mixed_precision`` resolves to here, and what channels_last and
bfloat16 autocast would do on this device.

On a CPU the training path must not change: ``auto`` resolves to full precision and the
NCHW layout (tests/client/test_dp_step.py checks the weights are identical). The CPU
timings below say whether either would help on a CPU; on a CUDA machine the same code
times the bf16 + channels_last step the training path then uses.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from bench.perf_common import interleaved, ratio
from client.dp_sgd import DPSGDStep, PlainStep
from common.config import DiffusionConfig, ModelConfig
from common.model import autocast_dtype, build_train_scheduler, build_unet, diffusion_loss, pick_device


def _step(device: torch.device, dp: bool, channels_last: bool, amp: torch.dtype | None, size: int, batch: int):
    torch.manual_seed(0)
    model = build_unet(ModelConfig(channels=(32, 64, 64))).to(device)
    images = (torch.rand((batch, 1, size, size)) * 2 - 1).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 5, (batch,)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = DPSGDStep(model, optimizer, 1.0, 1.0, batch) if dp else PlainStep(optimizer)
    scheduler = build_train_scheduler(DiffusionConfig())
    g = torch.Generator(device=device).manual_seed(0)

    def losses() -> torch.Tensor:
        ctx = torch.autocast(device_type=device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            return diffusion_loss(model, scheduler, images, labels, g).float()

    def run() -> None:
        step.step(losses)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def run(quick: bool) -> dict:
    torch.set_num_threads(1)
    device = pick_device()
    resolved = autocast_dtype("auto", device)
    size, batch = (32, 16) if quick else (64, 16)
    low = torch.bfloat16
    variants = {}
    for dp in (False, True):
        tag = "dp" if dp else "nondp"
        variants[f"{tag}_fp32"] = _step(device, dp, False, None, size, batch)
        variants[f"{tag}_channels_last"] = _step(device, dp, True, None, size, batch)
        variants[f"{tag}_bf16_channels_last"] = _step(device, dp, True, low, size, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = interleaved(variants, repeats=3 if quick else 5)
    return {
        "device": str(device), "mixed_precision_auto_resolves_to": str(resolved) if resolved else "full precision (off)",
        "channels_last_in_training_path": resolved is not None, "image_size": size, "batch": batch, "times": times,
        "channels_last_speedup": {tag: ratio(times[f"{tag}_fp32"]["wall_s"], times[f"{tag}_channels_last"]["wall_s"])
                                  for tag in ("nondp", "dp")},
        "bf16_channels_last_speedup": {tag: ratio(times[f"{tag}_fp32"]["wall_s"], times[f"{tag}_bf16_channels_last"]["wall_s"])
                                       for tag in ("nondp", "dp")},
    }
