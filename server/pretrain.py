"""``fedsynth pretrain``: central training, without DP, on a public data set.

A federation that starts from weights already trained on public brain MRI spends its privacy
budget on what the hospitals' data adds, not on learning what a brain looks like; that is the
largest lever on how far DP samples get out of the noise regime (issue 11). Only data the
coordinator may use openly belongs here: nothing about it is protected by DP.

The step is the sites' own (:mod:`client.training`): the noise-prediction loss, labels dropped to
the null class for classifier-free guidance, AdamW (never restarted), under the same mixed
precision. An exponential moving average of the weights (bias-corrected) is what the checkpoint
stores: it samples better than the last iterate and is what a federation then starts from.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from client.dp_sgd import PlainStep
from client.training import _batch_losses, set_learning_rate, warmup_learning_rate
from common.checkpoint import Checkpoint, save_checkpoint
from common.config import FedsynthConfig, load_federation_config
from common.errors import ConfigError, FedsynthError
from common.fileio import append_jsonl, make_dirs
from common.model import (
    autocast_dtype,
    build_train_scheduler,
    build_unet,
    drop_labels,
    load_trainable_state,
    pick_device,
)
from server.pretrain_data import NEAR_DUPLICATE_R, PublicData, load_public_data

log = logging.getLogger("fedsynth.pretrain")

# Images of the fixed batch the "ema" metric is measured on: enough for a steady number, one forward pass.
PROBE_IMAGES = 64


@dataclass(frozen=True)
class PretrainRequest:
    """What ``fedsynth pretrain`` was asked for; ``None`` takes the federation config's ``training`` value."""

    data_dir: Path
    config: Path
    out: Path
    steps: int = 2000
    batch_size: int | None = None
    learning_rate: float | None = None
    label_dropout: float | None = None
    ema_decay: float = 0.999
    exclude: tuple[Path, ...] = ()
    description: str = ""
    seed: int | None = None
    log_every: int = 50
    skip_bad_files: bool = False
    force: bool = False


@dataclass(frozen=True)
class PretrainResult:
    checkpoint: Path
    metrics: Path
    provenance: dict[str, Any]
    loss: float
    """Mean training loss of the last logged chunk of steps."""
    history: list[dict[str, Any]] = field(default_factory=list)


def metrics_path(out: Path) -> Path:
    """``<CKPT>.metrics.jsonl``: one line per chunk of steps, next to the checkpoint."""
    return out.with_name(out.name + ".metrics.jsonl")


class WeightEMA:
    """Bias-corrected exponential moving average of the weights (Adam's correction, applied to weights).

    The average starts at zero and is divided by ``1 - decay**t`` when read, so after ``t`` steps it
    is a proper weighted mean of the ``t`` iterates, not one pulled towards the zero it started at.
    ``decay = 0`` keeps nothing: the weights read are the current ones.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.params = params
        self.decay = decay
        self.updates = 0
        self.shadow = [torch.zeros_like(p, dtype=torch.float32) for p in params] if decay > 0 else []

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        if self.decay > 0:
            torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def averaged(self) -> list[torch.Tensor]:
        if self.decay == 0 or self.updates == 0:
            return [p.detach().float() for p in self.params]
        correction = 1.0 - self.decay ** self.updates
        return [s / correction for s in self.shadow]


def _batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Indices of each batch: epochs of fresh permutations, batches running on across epoch ends."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(count, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


@dataclass(frozen=True)
class CentralSettings:
    steps: int
    batch_size: int
    learning_rate: float
    label_dropout: float
    ema_decay: float
    seed: int
    log_every: int = 50


def train_central(cfg: FedsynthConfig, images: np.ndarray, labels: np.ndarray, s: CentralSettings,
                  metrics_file: Path | None = None, progress: bool = False,
                  initial: dict[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Train a UNet without DP on ``images`` (``(N, 1, S, S)`` in [-1, 1]) and ``labels``: a fresh one,
    or one starting from ``initial`` (a checkpoint's trainable weights by name, e.g. pretrained ones).

    Every ``s.log_every`` steps (and after the last) one row is logged (and appended to
    ``metrics_file``): ``step``, ``loss`` (mean training loss of the chunk), ``ema`` (the loss, with
    fixed noise and timesteps on a fixed batch, of the weights the checkpoint would store now; rows
    compare), ``lr`` and ``seconds`` since training began.

    Returns:
        The EMA weights by parameter name (float32 numpy) and the logged rows.

    Raises:
        FedsynthError: the loss became NaN or infinite (the message names the step).
    """
    device = pick_device()
    torch.manual_seed(s.seed)  # the initial weights, as the ServerApp seeds its random start
    model = build_unet(cfg.model)
    if initial is not None:
        load_trainable_state(model, initial)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    model.to(device).train()
    amp_dtype = autocast_dtype(cfg.training.mixed_precision, device)
    if amp_dtype is not None:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate)
    stepper = PlainStep(optimizer)
    ema = WeightEMA(params, s.ema_decay)
    probe_model = copy.deepcopy(model).eval()
    probe_params = [p for p in probe_model.parameters() if p.requires_grad]
    scheduler = build_train_scheduler(cfg.diffusion)

    data = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    order_rng = torch.Generator().manual_seed(s.seed)
    noise_rng = (torch.Generator(device=device) if device.type == "cuda" else torch.Generator()).manual_seed(s.seed + 1)
    probe = torch.randperm(len(data), generator=torch.Generator().manual_seed(s.seed + 2))[:PROBE_IMAGES].to(device)
    batches = _batches(len(data), s.batch_size, order_rng)

    @torch.no_grad()
    def probe_loss() -> float:
        for target, value in zip(probe_params, ema.averaged()):
            target.copy_(value)
        fixed = torch.Generator().manual_seed(s.seed + 3)  # the same noise and timesteps every time
        losses = _batch_losses(probe_model, scheduler, data[probe], targets[probe], fixed, amp_dtype)
        return float(losses.float().mean())

    rows: list[dict] = []
    chunk: list[torch.Tensor] = []
    started = time.monotonic()
    columns = (TextColumn("pretraining"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("steps", total=s.steps, status="")
        for step in range(1, s.steps + 1):
            lr = warmup_learning_rate(s.learning_rate, cfg.training.warmup_steps, step)
            set_learning_rate(optimizer, lr)
            index = next(batches).to(device)
            x, y = data[index], targets[index]
            if amp_dtype is not None:
                x = x.contiguous(memory_format=torch.channels_last)
            y = drop_labels(y, cfg.model.null_class, s.label_dropout, noise_rng)
            chunk.append(stepper.step(partial(_batch_losses, model, scheduler, x, y, noise_rng, amp_dtype)))
            ema.update()
            bar.advance(task)
            if step % s.log_every and step != s.steps:
                continue
            loss = float(torch.stack(chunk).float().mean())  # one device sync per chunk, not per step
            chunk = []
            if not math.isfinite(loss):
                raise FedsynthError(f"pretraining diverged by step {step} (training loss {loss}); "
                                    f"lower --learning-rate (was {s.learning_rate:g})")
            row = {"step": step, "loss": loss, "ema": probe_loss(), "lr": lr,
                   "seconds": round(time.monotonic() - started, 3)}
            rows.append(row)
            if metrics_file is not None:
                append_jsonl(metrics_file, row)
            bar.update(task, status=f"loss {loss:.4f}  ema {row['ema']:.4f}")
            log.info("step %d: loss %.4f, ema %.4f", step, loss, row["ema"])
    arrays = {name: value.detach().to("cpu", torch.float32).numpy().copy() for name, value in zip(names, ema.averaged())}
    return arrays, rows


def _checked(req: PretrainRequest, cfg: FedsynthConfig) -> CentralSettings:
    t = cfg.training
    s = CentralSettings(steps=req.steps, batch_size=t.batch_size if req.batch_size is None else req.batch_size,
                        learning_rate=t.learning_rate if req.learning_rate is None else req.learning_rate,
                        label_dropout=t.label_dropout if req.label_dropout is None else req.label_dropout,
                        ema_decay=req.ema_decay, seed=t.seed if req.seed is None else req.seed, log_every=req.log_every)
    checks = [(s.steps >= 1, f"--steps must be >= 1, got {s.steps}"),
              (s.batch_size >= 1, f"--batch-size must be >= 1, got {s.batch_size}"),
              (0 < s.learning_rate < 1, f"--learning-rate must be in (0, 1), got {s.learning_rate}"),
              (0 <= s.label_dropout < 1, f"--label-dropout must be in [0, 1), got {s.label_dropout}"),
              (0 <= s.ema_decay < 1, f"--ema-decay must be in [0, 1) (0 = off), got {s.ema_decay}"),
              (s.log_every >= 1, f"--log-every must be >= 1, got {s.log_every}"),
              (0 <= s.seed < 2**63, f"--seed must be in [0, 2**63), got {s.seed}")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return s


def run_pretrain(req: PretrainRequest, progress: bool = True) -> PretrainResult:
    """Load the public set, train, and write the checkpoint (atomically) with its provenance.

    Raises:
        ConfigError: a bad flag, a class folder not in ``model.classes``, or ``--out`` exists without ``force``.
        SiteDataError: the data or an ``--exclude`` folder is missing or unusable.
    """
    out = Path(req.out).expanduser().resolve()
    if out.exists() and not req.force:
        raise ConfigError(f"{out} already exists; choose another --out or pass --force to replace it")
    cfg = load_federation_config(req.config)
    settings = _checked(req, cfg)
    public: PublicData = load_public_data(Path(req.data_dir), cfg.model.classes, cfg.data, Path(req.config),
                                          req.exclude, req.skip_bad_files, progress)
    if public.excluded:
        log.warning("dropped %d public slice(s) that nearly duplicate an image under --exclude", public.excluded)
    make_dirs(out.parent)
    metrics = metrics_path(out)
    metrics.unlink(missing_ok=True)  # a previous or crashed run's rows would mix with this one's
    started = time.monotonic()
    arrays, rows = train_central(cfg, public.slices.images, public.slices.labels, settings, metrics, progress)
    provenance = {
        "kind": "pretrained",
        "description": req.description,
        "data_dir": str(Path(req.data_dir).expanduser().resolve()),
        "num_images": len(public.slices),
        "num_files": public.num_files,
        "per_class": public.per_class(),
        "excluded": public.excluded,
        "exclude_dirs": [str(Path(p).expanduser().resolve()) for p in req.exclude],
        "exclude_threshold_r": NEAR_DUPLICATE_R,
        "data_sha256": public.data_sha256,
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "label_dropout": settings.label_dropout,
        "ema_decay": settings.ema_decay,
        "seed": settings.seed,
        "seconds": round(time.monotonic() - started, 3),
        "device": pick_device().type,
    }
    # The embedded config records the recipe actually used; a pretrained model starts from random weights.
    embedded = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, init_checkpoint=""),
        training=dataclasses.replace(cfg.training, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                                     label_dropout=settings.label_dropout, seed=settings.seed))
    if out.exists() and not req.force:  # appeared while training: still never overwritten
        raise ConfigError(f"{out} appeared while pretraining; pass --force to replace it")
    save_checkpoint(out, Checkpoint(config=embedded, arrays=arrays, rounds_completed=0, provenance=provenance))
    return PretrainResult(checkpoint=out, metrics=metrics, provenance=provenance, loss=rows[-1]["loss"], history=rows)

