"""Local training and validation at one site: plain torch + MONAI, no Flower.

A round takes exactly ``training.local_steps`` optimiser steps. With DP each step is a
Poisson sample of *patients*; a sampled patient contributes one randomly chosen slice,
so one patient is one sample however many slices it has.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from client.ledger import PrivacyLedger
from client.policy import SitePolicy, enforce_policy, privacy_ceiling
from client.privacy import make_private, poisson_sample_rate
from client.site_data import SiteSlices
from common.config import FedsynthConfig, SiteConfig
from common.errors import PrivacyBudgetError
from common.model import (
    build_train_scheduler,
    build_unet,
    diffusion_loss,
    drop_labels,
    load_trainable_state,
    pick_device,
    trainable_state,
)


@dataclass(frozen=True)
class TrainResult:
    arrays: dict[str, np.ndarray]
    num_examples: int
    loss: float
    steps: int
    epsilon: float
    delta: float
    epsilon_before: float = 0.0


class PatientDataset(Dataset):
    """One item per patient: a random one of that patient's slices, drawn afresh each time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, groups: list[np.ndarray], seed: int) -> None:
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)
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
        PolicyError: the task would loosen the site's policy (see client/policy.py).
        PrivacyBudgetError: the planned steps would exceed the site's privacy ceiling, or the
            coordinator asked for non-private training the site does not allow.
        Nothing is spent when either is raised.
    """
    train_groups, _ = split_patients(slices, cfg.training.val_fraction)
    enforce_policy(policy, cfg, app_hash, len(train_groups))
    ledger = PrivacyLedger.open(site.state_dir, cfg.privacy.accountant)
    budget = privacy_ceiling(site, policy, cfg)
    if not cfg.privacy.enabled and not site.allow_non_private:
        reason = (
            "site refuses to train: the federation asks for training without DP, and this site's "
            "config does not set allow_non_private: true"
        )
        raise PrivacyBudgetError(reason, public=reason)
    planned = plan_steps(cfg, len(train_groups)) if cfg.privacy.enabled else (0.0, 1.0, cfg.training.local_steps)
    if cfg.privacy.enabled:
        epsilon_before, epsilon_after = ledger.check_budget(budget, planned)
    else:
        epsilon_before, epsilon_after = ledger.epsilon(budget.delta), math.inf
    ledger.reserve(planned, run_id=run_id, server_round=server_round)

    seed = _round_seed(cfg, site.site_id, server_round)
    torch.manual_seed(seed)
    device = pick_device()
    model = build_unet(cfg.model)
    load_trainable_state(model, global_arrays)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.training.learning_rate)
    dataset = PatientDataset(slices.images, slices.labels, train_groups, seed)
    generator = torch.Generator().manual_seed(seed)
    if cfg.privacy.enabled:
        model, optimizer, loader, _ = make_private(
            model, optimizer, dataset, cfg.training.batch_size,
            cfg.privacy.noise_multiplier, cfg.privacy.max_grad_norm, generator=generator,
        )
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.training.batch_size, shuffle=True, generator=generator)

    scheduler = build_train_scheduler(cfg.diffusion)
    losses: list[float] = []
    steps = 0
    while steps < cfg.training.local_steps:
        for images, labels in loader:
            if steps >= cfg.training.local_steps:
                break
            optimizer.zero_grad(set_to_none=True)
            if len(images) == 0:
                _noise_only_step(optimizer)
            else:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                labels = drop_labels(labels, cfg.model.null_class, cfg.training.label_dropout, generator)
                loss = diffusion_loss(model, scheduler, images, labels, generator).mean()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            steps += 1

    return TrainResult(
        arrays=trainable_state(model),
        num_examples=len(train_groups),
        loss=float(np.mean(losses)) if losses else float("nan"),
        steps=steps,
        epsilon=epsilon_after,  # the ledger holds exactly the planned steps, reserved above
        delta=budget.delta,
        epsilon_before=epsilon_before,
    )


def _noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """An empty Poisson batch is still a DP step: the update is noise alone.

    Skipping it would change the sampling distribution the accountant assumes.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()


@torch.no_grad()
def validation_loss(cfg: FedsynthConfig, slices: SiteSlices, arrays: dict[str, np.ndarray], max_images: int = 256) -> tuple[float, int]:
    """Mean diffusion loss on the site's held-out patients, with fixed noise so rounds compare.

    Returns:
        (loss, number of validation slices); ``(nan, 0)`` when the site has no held-out patient.
    """
    _, val_groups = split_patients(slices, cfg.training.val_fraction)
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
