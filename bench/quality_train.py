"""The quality benchmark's training: central and federated, in-process, through the sites' own code.

Federated training is exactly what the ServerApp does each round: every site runs
``client.training.train_round`` from the global weights (its AdamW state kept between rounds in
its state folder, warm-up, noise multiplicity under DP), and the ServerApp's own strategy
(server/strategy.py over the in-process Grid of server/in_process.py: reply checks, Flower's
aggregation and server optimiser, the EMA of the global weights) aggregates, minus Flower's
messaging and its ~25 s fixed start-up. Central training (no DP) and public pretraining are
``server.pretrain.train_central``: one AdamW never restarted, warm-up, a per-step EMA. Every row
of a preset takes the same number of optimiser steps.

DP rows take their expected batch and noise multiplier from the DP planner (client/dp_planner.py,
one setting every site can afford at epsilon <= the target after all its planned steps) or, for
the "minus planner" ablation, the preset's fixed batch with the smallest noise multiplier that
keeps the smallest site within budget.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.client_app import train_reply_content
from client.dp_planner import SiteBudget, plan_common, plan_site
from client.ledger import LEDGER_FILE, init_ledger
from client.privacy import compute_epsilon, poisson_sample_rate
from client.site_data import SiteSlices
from client.training import train_round
from common.config import FedsynthConfig, PrivacyBudget, SiteConfig, config_from_dict
from common import keys
from common.model import build_unet, trainable_state
from common.server_state import EmaState, ServerOptimizerState
from server.in_process import InProcessGrid
from server.pretrain import CentralSettings, train_central as train_central_steps
from server.strategy import arrays_to_numpy, build_strategy


# Called after each round (or central chunk) with its number and mean training loss.
RoundReporter = Callable[[int, float], None]


@dataclass(frozen=True)
class ModelPreset:
    """Model and schedule of one benchmark preset."""

    image_size: int
    channels: tuple[int, ...]
    rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    head_channels: int = 8
    # The DDPM noise schedule (diffusion.schedule): training and sampling of every row and of pretraining.
    schedule: str = "linear_beta"
    # Rows that start from the public checkpoint train at this rate (0: learning_rate, as from scratch).
    finetune_learning_rate: float = 0.0
    # The ServerApp's server step (federation.server_optimizer and its options, federation.ema_decay).
    server_optimizer: str = "fedavg"
    ema_decay: float = 0.0
    server_options: tuple[tuple[str, float], ...] = ()  # other federation keys, e.g. (("eta", 0.01),)
    # The site's recipe (training.*): warm-up steps, AdamW kept across rounds, K noise draws per DP patient.
    warmup_steps: int = 0
    keep_optimizer_state: bool = True
    noise_multiplicity: int = 1
    # Central rows (and pretraining): EMA of the weights per optimiser step (0 = the last iterate).
    central_ema_decay: float = 0.0
    # Public pretraining (server.pretrain.train_central on the public split).
    pretrain_steps: int = 0
    pretrain_batch_size: int = 64
    pretrain_ema_decay: float = 0.995
    # Batch sizes the DP planner may choose from (larger ones cost CPU time for little less noise).
    dp_batch_sizes: tuple[int, ...] = (16, 32, 64)

    def for_finetuning(self) -> ModelPreset:
        """The preset of a row that starts from the public checkpoint."""
        return dataclasses.replace(self, learning_rate=self.finetune_learning_rate or self.learning_rate)

    @property
    def server_step_is_plain_fedavg(self) -> bool:
        return self.server_optimizer == "fedavg" and self.ema_decay == 0 and not self.server_options


@dataclass(frozen=True)
class Recipe:
    """One federated row's site settings, where it differs from the preset."""

    batch_size: int
    noise_multiplier: float = 1.0
    noise_multiplicity: int = 1
    keep_optimizer_state: bool = True
    trainable: str = "all"


@dataclass
class TrainOutcome:
    arrays: dict[str, np.ndarray]
    seconds: float
    steps: int
    epsilon: dict[str, float | None]
    noise_multiplier: float | None
    losses: list[float]
    weights: str = "global"  # "ema": ``arrays`` is the EMA of the global weights over rounds
    global_arrays: dict[str, np.ndarray] | None = None  # the last round's global weights (when ``arrays`` is the EMA)
    ema: EmaState | None = None
    optimizer: ServerOptimizerState | None = None
    sites: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    batch_size: int | None = None


def federation_config(p: ModelPreset, classes: tuple[str, ...], out: Path, local_steps: int, dp: bool,
                      noise_multiplier: float = 1.0, seed: int = 0, recipe: Recipe | None = None,
                      init_checkpoint: str = "") -> FedsynthConfig:
    r = recipe or Recipe(p.batch_size, noise_multiplier, p.noise_multiplicity if dp else 1, p.keep_optimizer_state)
    return config_from_dict(FedsynthConfig, {
        "federation": {"output_dir": str(out), "num_rounds": p.rounds, "server_optimizer": p.server_optimizer,
                       "ema_decay": p.ema_decay, **dict(p.server_options)},
        "model": {"classes": list(classes), "channels": list(p.channels),
                  "attention_levels": [False] * (len(p.channels) - 1) + [True], "num_res_blocks": 1,
                  "norm_num_groups": 8, "num_head_channels": p.head_channels, "init_checkpoint": init_checkpoint},
        "training": {"local_steps": local_steps, "batch_size": r.batch_size, "learning_rate": p.learning_rate,
                     "label_dropout": 0.1, "seed": seed, "warmup_steps": p.warmup_steps,
                     "keep_optimizer_state": r.keep_optimizer_state, "noise_multiplicity": r.noise_multiplicity,
                     "trainable": r.trainable},
        "privacy": {"enabled": dp, "noise_multiplier": r.noise_multiplier, "max_grad_norm": 1.0, "accountant": "prv"},
        "data": {"image_size": p.image_size},
        "diffusion": {"schedule": p.schedule},
    }, "benchmark preset")


def site_config(state_root: Path, name: str, epsilon: float, delta: float, dp: bool) -> SiteConfig:
    """The site's config; its ledger is created on first use, as its admin would (``fedsynth site init``)."""
    if not (state_root / name / LEDGER_FILE).exists():
        init_ledger(state_root / name, name)
    # val_fraction 0: the benchmark holds out its own, near-duplicate-grouped validation set.
    # unsafe_reproducible_dp: a benchmark on public data is seeded end to end, DP noise included, so
    # its numbers do not depend on the number of workers; never a hospital's setting.
    return SiteConfig(site_id=name, data_dir=str(state_root), state_dir=str(state_root / name),
                      privacy_budget=PrivacyBudget(epsilon, delta), allow_non_private=not dp, val_fraction=0.0,
                      unsafe_reproducible_dp=dp)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv") -> float:
    """The smallest noise multiplier (to 0.5%) whose epsilon after ``steps`` steps is at most the target."""
    low, high = 0.3, 30.0
    if compute_epsilon([(high, sample_rate, steps)], delta, accountant) > target_epsilon:
        raise ValueError(f"epsilon {target_epsilon} is out of reach even at noise multiplier {high}")
    while high / low > 1.005:
        mid = (low * high) ** 0.5
        if compute_epsilon([(mid, sample_rate, steps)], delta, accountant) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


def noise_for_sites(sites: dict[str, SiteSlices], p: ModelPreset, target_epsilon: float, delta: float) -> float:
    """One noise multiplier for all sites such that the smallest site (largest sample rate) stays within budget."""
    fewest = min(len(set(s.patients)) for s in sites.values())
    q = poisson_sample_rate(fewest, p.batch_size)
    # a hair under the target: the site's own ledger check must not round the other way
    return calibrate_noise(target_epsilon * 0.999, delta, q, p.rounds * p.local_steps)


@dataclass(frozen=True)
class DpPlan:
    """One (expected batch, noise multiplier) for every site of a DP row, and how it was chosen."""

    batch_size: int
    noise_multiplier: float
    method: str  # "planner" or "fixed batch"
    per_site: dict[str, dict[str, float]]


def plan_dp(sites: dict[str, SiteSlices], p: ModelPreset, target_epsilon: float, delta: float, planner: bool) -> DpPlan:
    """The DP planner's common setting for all sites, or the old fixed batch with a calibrated noise multiplier."""
    steps = p.rounds * p.local_steps
    if not planner:
        sigma = noise_for_sites(sites, p, target_epsilon, delta)
        return DpPlan(p.batch_size, sigma, "fixed batch", {
            name: {"patients": len(set(s.patients)), "sample_rate": poisson_sample_rate(len(set(s.patients)), p.batch_size),
                   "epsilon": compute_epsilon([(sigma, poisson_sample_rate(len(set(s.patients)), p.batch_size), steps)],
                                              delta, "prv")} for name, s in sites.items()})
    # a hair under the target: the site's own ledger check must not round the other way
    budgets = [SiteBudget(name, len(set(s.patients)), target_epsilon * 0.999, delta) for name, s in sites.items()]
    plans = [plan_site(b, steps, batch_sizes=p.dp_batch_sizes) for b in budgets]
    batch, sigma = plan_common(plans, budgets, steps)
    per_site = {}
    for b in budgets:
        q = poisson_sample_rate(b.num_patients, batch)
        per_site[b.site_id] = {"patients": b.num_patients, "sample_rate": q,
                               "own_best_batch": next(pl.batch_size for pl in plans if pl.site_id == b.site_id),
                               "epsilon": compute_epsilon([(sigma, q, steps)], delta, "prv")}
    return DpPlan(batch, sigma, "planner", per_site)


def _initial(cfg: FedsynthConfig) -> dict[str, np.ndarray]:
    torch.manual_seed(cfg.training.seed)  # what the ServerApp does
    return trainable_state(build_unet(cfg.model))


def fedavg(results: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """Example-weighted mean of the sites' weights."""
    total = sum(n for _, n in results)
    return {k: sum(a[k].astype(np.float64) * (n / total) for a, n in results).astype(np.float32) for k in results[0][0]}


def train_federated(p: ModelPreset, sites: dict[str, SiteSlices], state_root: Path, dp: bool, target_epsilon: float,
                    delta: float, label: str = "federated", on_round: RoundReporter | None = None,
                    recipe: Recipe | None = None, initial: dict[str, np.ndarray] | None = None,
                    init_checkpoint: str = "") -> TrainOutcome:
    """``recipe`` overrides the preset's site settings (a planned DP batch and sigma, an ablation);
    ``initial`` (weights of ``init_checkpoint``) replaces the seeded random start."""
    if recipe is None:
        sigma = noise_for_sites(sites, p, target_epsilon, delta) if dp else None
        recipe = Recipe(p.batch_size, sigma or 1.0, p.noise_multiplicity if dp else 1, p.keep_optimizer_state)
    sigma = recipe.noise_multiplier if dp else None
    cfg = federation_config(p, next(iter(sites.values())).classes, state_root, p.local_steps, dp, recipe=recipe,
                            init_checkpoint=init_checkpoint)
    if not p.server_step_is_plain_fedavg or initial is not None or recipe.trainable != "all":
        return _train_with_server_strategy(cfg, p, sites, state_root, dp, target_epsilon, delta, label, on_round, sigma,
                                           initial)
    arrays, started, losses = _initial(cfg), time.time(), []
    epsilon: dict[str, float | None] = {}
    for rnd in range(1, p.rounds + 1):
        results, round_loss = [], []
        for name, slices in sites.items():
            res = train_round(cfg, site_config(state_root, name, target_epsilon, delta, dp), slices, arrays, run_id=label,
                              server_round=rnd)
            results.append((res.arrays, res.num_examples))
            round_loss.append((res.loss, res.num_examples))
            epsilon[name] = res.epsilon if np.isfinite(res.epsilon) else None
        arrays = fedavg(results)
        losses.append(sum(l * n for l, n in round_loss) / sum(n for _, n in round_loss))
        if on_round is not None:
            on_round(rnd, losses[-1])
    return TrainOutcome(arrays, time.time() - started, p.rounds * p.local_steps * len(sites), epsilon, sigma, losses,
                        batch_size=cfg.training.batch_size)


def _train_with_server_strategy(cfg: FedsynthConfig, p: ModelPreset, sites: dict[str, SiteSlices], state_root: Path,
                                dp: bool, target_epsilon: float, delta: float, label: str,
                                on_round: RoundReporter | None, sigma: float | None,
                                initial: dict[str, np.ndarray] | None = None) -> TrainOutcome:
    """Flower's strategy loop with the ServerApp's strategy, the sites trained in this process.

    Returns the EMA weights when the preset has an EMA (what the ServerApp's checkpoints give
    ``fedsynth sample`` by default), else the last round's global weights.
    """
    every_site = dataclasses.replace(cfg.federation, min_train_nodes=len(sites), min_available_nodes=len(sites))
    cfg = dataclasses.replace(cfg, federation=every_site)
    epsilon: dict[str, float | None] = {}
    round_loss: list[tuple[float, int]] = []
    losses: list[float] = []

    def site(name: str) -> Callable[[Message], RecordDict]:
        def train(msg: Message) -> RecordDict:
            res = train_round(cfg, site_config(state_root, name, target_epsilon, delta, dp), sites[name],
                              arrays_to_numpy(msg.content[keys.ARRAYS]), run_id=label,
                              server_round=int(msg.content[keys.CONFIG][keys.SERVER_ROUND]))
            round_loss.append((res.loss, res.num_examples))
            epsilon[name] = res.epsilon if np.isfinite(res.epsilon) else None
            return train_reply_content(res, name, cfg.federation.transfer_dtype)
        return train

    def round_done(rnd: int, _arrays: ArrayRecord) -> MetricRecord | None:
        if rnd > 0:  # Flower also calls this before round 1
            losses.append(sum(l * n for l, n in round_loss) / sum(n for _, n in round_loss))
            round_loss.clear()
            if on_round is not None:
                on_round(rnd, losses[-1])
        return None

    strategy = build_strategy(cfg, checkpoints=False)  # the benchmark keeps its model, not one file per round
    started = time.time()
    result = strategy.start(grid=InProcessGrid([site(name) for name in sites]),
                            initial_arrays=ArrayRecord({k: Array(v) for k, v in
                                                        (_initial(cfg) if initial is None else initial).items()}),
                            num_rounds=p.rounds, timeout=cfg.federation.round_timeout_s, train_config=ConfigRecord(),
                            evaluate_fn=round_done)
    global_arrays = arrays_to_numpy(result.arrays)
    if strategy.ema is not None:
        arrays, weights = strategy.ema.weights, "ema"
    else:
        arrays, weights = global_arrays, "global"
    return TrainOutcome(arrays, time.time() - started, p.rounds * p.local_steps * len(sites), epsilon, sigma, losses, weights,
                        global_arrays=global_arrays, ema=strategy.ema, optimizer=strategy.optimizer_state(),
                        sites=dict(strategy.sites), batch_size=cfg.training.batch_size)


def train_central(p: ModelPreset, slices: SiteSlices, num_sites: int, state_root: Path,
                  on_round: RoundReporter | None = None, steps: int | None = None, batch_size: int | None = None,
                  ema_decay: float | None = None, label: str = "central",
                  initial: dict[str, np.ndarray] | None = None) -> TrainOutcome:
    """No DP, all data in one place: ``server.pretrain.train_central`` (the recipe of ``fedsynth pretrain``).

    By default ``rounds * local_steps * num_sites`` steps, the federated rows' total, reported
    every ``local_steps * num_sites`` steps as a "round"; public pretraining passes its own steps.
    """
    cfg = federation_config(p, slices.classes, state_root, p.local_steps * num_sites, dp=False)
    total = p.rounds * p.local_steps * num_sites if steps is None else steps
    chunk = max(1, total // p.rounds) if steps is None else max(1, total // 20)
    settings = CentralSettings(steps=total, batch_size=batch_size or p.batch_size, learning_rate=p.learning_rate,
                               label_dropout=cfg.training.label_dropout,
                               ema_decay=p.central_ema_decay if ema_decay is None else ema_decay,
                               seed=cfg.training.seed, log_every=chunk)
    started = time.time()
    reported: list[float] = []

    metrics = state_root / f"{label}.metrics.jsonl"
    arrays, rows = train_central_steps(cfg, slices.images, slices.labels, settings, metrics_file=metrics, initial=initial)
    for n, row in enumerate(rows, 1):
        reported.append(row["loss"])
        if on_round is not None:
            on_round(n, row["loss"])
    return TrainOutcome(arrays, time.time() - started, total, {label: None}, None, reported,
                        weights="ema" if settings.ema_decay > 0 else "global", batch_size=settings.batch_size)
