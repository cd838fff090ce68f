"""Local training and validation at one site: plain torch + MONAI, no Flower.

A round takes exactly ``training.local_steps`` optimiser steps. With DP each step is a
Poisson sample of *patients*; a sampled patient contributes one randomly chosen slice,
so one patient is one sample however many slices it has. A DP round's randomness comes
from OS entropy (:mod:`client.round_rng`), never from anything the server knows.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.utils.data import Dataset

from client.dp_sgd import LocalStep, PlainStep
from client.ledger import reserve_within_budget
from client.optimizer_state import load_run_state, restore_moments, save_run_state
from client.policy import SitePolicy, enforce_policy, privacy_ceiling
from client.privacy import make_private_step, poisson_sample_rate
from client.round_rng import RoundRandomness
from client.site_data import SiteSlices
from common.config import FedsynthConfig, SiteConfig
from common.errors import PrivacyBudgetError
from common.model import (
    autocast_dtype,
    build_train_scheduler,
    build_unet,
    diffusion_loss,
    drop_labels,
    load_trainable_state,
    pick_device,
    trainable_state,
)
from common.trainable import freeze_outside, is_partial, trainable_names

log = logging.getLogger("fedsynth.client")


@dataclass(frozen=True)
class TrainResult:
    arrays: dict[str, np.ndarray]
    num_examples: int
    loss: float
    steps: int
    epsilon: float
    delta: float
    epsilon_before: float = 0.0
    private: bool = True
    """DP-SGD: ``loss`` (of sampled patients, without noise) must not leave the site."""
    unsafe_reproducible_dp: bool = False
    """DP noise seeded from the config: the site's test-only switch was on."""
    trained: tuple[str, ...] = ()
    """The parameters trained (``training.trainable``), the only ones the reply carries; empty: all."""


class PatientDataset(Dataset):
    """One item per patient: a random one of that patient's slices, drawn afresh each time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, groups: list[np.ndarray], seed: int,
                 device: torch.device | None = None) -> None:
        # On a GPU the whole (small) site set lives there: batches are gathered without host copies.
        self.images = torch.from_numpy(images).to(device or "cpu")
        self.labels = torch.from_numpy(labels).to(device or "cpu")
        self.groups = groups
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.groups[index]
        i = int(group[self.rng.integers(len(group))])
        return self.images[i], self.labels[i]


def is_validation_patient(patient_id: str, val_fraction: float) -> bool:
    """A stable split: a patient stays on the same side in every round and run."""
    digest = hashlib.sha256(patient_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < val_fraction


def split_patients(slices: SiteSlices, val_fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Slice-index groups per patient, split into (train, validation)."""
    train, val = [], []
    ids = sorted(set(slices.patients))
    for pid, group in zip(ids, slices.patient_index()):
        (val if is_validation_patient(pid, val_fraction) else train).append(group)
    if not train:  # a tiny site trains on everything rather than on nothing
        return val, []
    return train, val


def _round_seed(cfg: FedsynthConfig, site_id: str, server_round: int) -> int:
    """Known to the server: only for non-private rounds and the site's ``unsafe_reproducible_dp``."""
    digest = hashlib.sha256(f"{cfg.training.seed}:{site_id}:{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def plan_steps(cfg: FedsynthConfig, num_train_patients: int) -> tuple[float, float, int]:
    """The mechanism a round applies: (noise multiplier, sample rate, steps)."""
    q = poisson_sample_rate(num_train_patients, cfg.training.batch_size)
    return (cfg.privacy.noise_multiplier, q, cfg.training.local_steps)


def train_round(
    cfg: FedsynthConfig,
    site: SiteConfig,
    slices: SiteSlices,
    global_arrays: dict[str, np.ndarray],
    run_id: str = "",
    server_round: int = 0,
    policy: SitePolicy | None = None,
    app_hash: str = "",
) -> TrainResult:
    """Train ``cfg.training.local_steps`` steps from the global weights; DP unless the site allows otherwise.

    Raises:
        ConfigError: ``training.trainable`` names a pattern that matches no parameter.
        PolicyError: the task would loosen the site's policy (see client/policy.py).
        PrivacyBudgetError: the planned steps would exceed the site's privacy ceiling, or the
            coordinator asked for non-private training the site does not allow.
        Nothing is spent when either is raised.

    The recipe around the DP mechanism changes nothing the accountant sees (same q, sigma and
    steps in the ledger): ``noise_multiplicity`` averages K draws inside each patient's loss
    before its one clipped gradient; AdamW's moments (``keep_optimizer_state``) and the warm-up
    are post-processing of the noisy gradients, kept in the site's state folder.
    """
    train_groups, _ = split_patients(slices, site.val_fraction)
    enforce_policy(policy, cfg, app_hash, len(train_groups))
    if is_partial(cfg.training.trainable):
        trainable_names(cfg)  # a pattern matching nothing is refused here, before any budget is reserved
    budget = privacy_ceiling(site, policy, cfg)
    if not cfg.privacy.enabled and not site.allow_non_private:
        reason = (
            "site refuses to train: the federation asks for training without DP, and this site's "
            "config does not set allow_non_private: true"
        )
        raise PrivacyBudgetError(reason, public=reason)
    planned = plan_steps(cfg, len(train_groups)) if cfg.privacy.enabled else (0.0, 1.0, cfg.training.local_steps)
    epsilon_before, epsilon_after = reserve_within_budget(
        site.state_dir, cfg.privacy.accountant, budget, planned, private=cfg.privacy.enabled, run_id=run_id,
        server_round=server_round, max_epsilon_per_round=policy.max_epsilon_per_round if policy else 0.0)

    rng = _round_randomness(cfg, site, server_round)
    rng.seed_global()
    device = pick_device()
    amp_dtype = autocast_dtype(cfg.training.mixed_precision, device)
    model = build_unet(cfg.model)
    load_trainable_state(model, global_arrays)
    # Frozen before the optimiser and the DP step see the model: both take only what requires a gradient,
    # so clipping and noise cover the trained subset and the frozen weights stay the global ones, bit for bit.
    trained = freeze_outside(model, cfg.training.trainable)
    model.to(device).train()
    if amp_dtype is not None:  # tensor-core convolutions want NHWC; weights still travel as float32 NCHW arrays
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.training.learning_rate)
    params = list(optimizer.param_groups[0]["params"])
    carried = load_run_state(site.state_dir, run_id, server_round, params)
    if cfg.training.keep_optimizer_state:
        restore_moments(optimizer, carried.moments)
    dataset = PatientDataset(slices.images, slices.labels, train_groups, rng.numpy_seed(), device=device)
    generator = rng.cpu_generator()  # patient sampling: always on the CPU
    # Noise and timesteps: the same CPU stream as ever on a CPU, drawn on the GPU on a GPU.
    noise_rng = generator if device.type == "cpu" else rng.device_generator(device)
    stepper: LocalStep
    if cfg.privacy.enabled:
        model, stepper, loader = make_private_step(
            model, optimizer, dataset, cfg.training.batch_size, cfg.privacy.noise_multiplier,
            cfg.privacy.max_grad_norm, generator=generator, grad_sample_mode=cfg.privacy.grad_sample_mode,
            noise_multiplicity=cfg.training.noise_multiplicity,
        )
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.training.batch_size, shuffle=True, generator=generator)
        stepper = PlainStep(optimizer)

    scheduler = build_train_scheduler(cfg.diffusion)
    losses: list[torch.Tensor] = []  # kept on the device: reading each one back would sync every step
    steps = 0
    while steps < cfg.training.local_steps:
        for images, labels in loader:
            if steps >= cfg.training.local_steps:
                break
            set_learning_rate(optimizer, warmup_learning_rate(cfg.training.learning_rate, cfg.training.warmup_steps,
                                                              carried.steps + steps + 1))
            if len(images) == 0:
                stepper.empty_step()
            else:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if amp_dtype is not None:
                    images = images.contiguous(memory_format=torch.channels_last)
                labels = drop_labels(labels, cfg.model.null_class, cfg.training.label_dropout, noise_rng)
                losses.append(stepper.step(partial(_batch_losses, model, scheduler, images, labels, noise_rng, amp_dtype,
                                                   cfg.training.noise_multiplicity)))
            steps += 1

    if cfg.training.keep_optimizer_state or cfg.training.warmup_steps:
        _save_optimizer_state(site.state_dir, run_id, server_round, params, carried.steps + steps,
                              optimizer if cfg.training.keep_optimizer_state else None)
    loss = float(torch.stack(losses).float().mean()) if losses else float("nan")
    log.info("round %d: %d steps, train loss %.4f (%s)", server_round, steps, loss,
             "kept at the site" if cfg.privacy.enabled else "sent: non-private training")
    return TrainResult(
        arrays=trainable_state(model, include_frozen=True),  # the whole model: validation_loss loads it
        num_examples=len(train_groups),
        loss=loss,
        steps=steps,
        epsilon=epsilon_after,  # the ledger holds exactly the planned steps, reserved above
        delta=budget.delta,
        epsilon_before=epsilon_before,
        private=cfg.privacy.enabled,
        unsafe_reproducible_dp=cfg.privacy.enabled and site.unsafe_reproducible_dp,
        trained=trained if is_partial(cfg.training.trainable) else (),
    )


UNSAFE_REPRODUCIBLE_WARNING = (
    "UNSAFE: site config sets unsafe_reproducible_dp: true, so this DP round is seeded from the federation "
    "config. The server can reproduce its noise and sampling; the reported epsilon protects nothing. "
    "For tests only: remove it from the site config."
)


def _round_randomness(cfg: FedsynthConfig, site: SiteConfig, server_round: int) -> RoundRandomness:
    """Fresh OS entropy under DP; the config-derived seed only without DP or with the site's unsafe switch."""
    if not cfg.privacy.enabled:
        return RoundRandomness(_round_seed(cfg, site.site_id, server_round))
    if site.unsafe_reproducible_dp:
        log.warning("round %d: %s", server_round, UNSAFE_REPRODUCIBLE_WARNING)
        return RoundRandomness(_round_seed(cfg, site.site_id, server_round))
    return RoundRandomness()


def warmup_learning_rate(base: float, warmup_steps: int, step: int) -> float:
    """The rate of the run's ``step``-th optimiser step (from 1): linear up to ``base`` at ``warmup_steps``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return base
    return base * step / warmup_steps


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:  # shared with Opacus' DPOptimizer when it wraps this optimiser
        group["lr"] = lr


def _save_optimizer_state(state_dir: str, run_id: str, server_round: int, params: list[torch.nn.Parameter],
                          steps: int, optimizer: torch.optim.Optimizer | None) -> None:
    # The round's weights are already trained and its privacy cost recorded: losing the moments only
    # means a fresh AdamW next round, not a reason to discard the round.
    try:
        save_run_state(state_dir, run_id, server_round, params, steps, optimizer)
    except OSError as err:
        log.warning("could not save the optimiser state in %s (%s); the next round starts it fresh", state_dir, err)


def _batch_losses(model: torch.nn.Module, scheduler, images: torch.Tensor, labels: torch.Tensor,
                  rng: torch.Generator, amp_dtype: torch.dtype | None, draws: int = 1) -> torch.Tensor:
    """Per-image losses ``(N,)`` (each the mean of ``draws`` noise draws), under autocast when mixed
    precision is on; the loss itself stays float32."""
    if amp_dtype is None:
        return diffusion_loss(model, scheduler, images, labels, rng, draws)
    with torch.autocast(device_type=images.device.type, dtype=amp_dtype):
        return diffusion_loss(model, scheduler, images, labels, rng, draws).float()


@torch.no_grad()
def validation_loss(cfg: FedsynthConfig, slices: SiteSlices, arrays: dict[str, np.ndarray], val_fraction: float,
                    max_images: int = 256) -> tuple[float, int]:
    """Mean diffusion loss on the site's held-out patients, with fixed noise so rounds compare.

    Args:
        val_fraction: the site's own ``SiteConfig.val_fraction``, the share ``train_round`` held out.

    Returns:
        (loss, number of validation slices); ``(nan, 0)`` when the site has no held-out patient.
    """
    _, val_groups = split_patients(slices, val_fraction)
    if not val_groups:
        return float("nan"), 0
    index = np.concatenate(val_groups)[:max_images]
    device = pick_device()
    model = build_unet(cfg.model)
    load_trainable_state(model, arrays)
    model.to(device).eval()
    scheduler = build_train_scheduler(cfg.diffusion)
    generator = torch.Generator().manual_seed(cfg.training.seed)
    total = 0.0
    for start in range(0, len(index), 32):
        batch = index[start:start + 32]
        images = torch.from_numpy(slices.images[batch]).to(device)
        labels = torch.from_numpy(slices.labels[batch]).to(device)
        total += float(diffusion_loss(model, scheduler, images, labels, generator).sum())
    return total / len(index), len(index)
