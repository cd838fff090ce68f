"""The quality benchmark's training: central and federated, in-process, through ``client.training.train_round``.

Federated training here is exactly what the ServerApp does each round (every site runs
``train_round`` from the global weights, the server takes the example-weighted FedAvg),
minus Flower's messaging and its ~25 s fixed start-up cost. Central training is one
"site" holding every hospital's data, trained without DP in chunks of the same size as a
federated round summed over sites, so both see the same number of optimiser steps of
the same batch size. AdamW's moments restart at every ``train_round`` call in both
settings (a chunk centrally, a round federated).

With a server optimiser or an EMA on the preset (``server_optimizer``, ``ema_decay``), the
federated rounds run through the ServerApp's own strategy (server/strategy.py: reply checks,
Flower's aggregation and server optimiser, the EMA) over an in-process Grid, and the model
sampled is the EMA when it is on. At the defaults the loop below with its own FedAvg runs, as before.
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
from client.ledger import LEDGER_FILE, init_ledger
from client.privacy import compute_epsilon, poisson_sample_rate
from client.site_data import SiteSlices
from client.training import train_round
from common.config import FedsynthConfig, PrivacyBudget, SiteConfig, config_from_dict
from common import keys
from common.model import build_unet, trainable_state
from server.in_process import InProcessGrid
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
    # The ServerApp's server step (federation.server_optimizer and its options, federation.ema_decay).
    server_optimizer: str = "fedavg"
    ema_decay: float = 0.0
    server_options: tuple[tuple[str, float], ...] = ()  # other federation keys, e.g. (("eta", 0.01),)

    @property
    def server_step_is_plain_fedavg(self) -> bool:
        return self.server_optimizer == "fedavg" and self.ema_decay == 0 and not self.server_options


@dataclass
class TrainOutcome:
    arrays: dict[str, np.ndarray]
    seconds: float
    steps: int
    epsilon: dict[str, float | None]
    noise_multiplier: float | None
    losses: list[float]
    weights: str = "global"  # "ema": ``arrays`` is the EMA of the global weights over rounds


def federation_config(p: ModelPreset, classes: tuple[str, ...], out: Path, local_steps: int, dp: bool,
                      noise_multiplier: float = 1.0, seed: int = 0) -> FedsynthConfig:
    return config_from_dict(FedsynthConfig, {
        "federation": {"output_dir": str(out), "num_rounds": p.rounds, "server_optimizer": p.server_optimizer,
                       "ema_decay": p.ema_decay, **dict(p.server_options)},
        "model": {"classes": list(classes), "channels": list(p.channels),
                  "attention_levels": [False] * (len(p.channels) - 1) + [True], "num_res_blocks": 1,
                  "norm_num_groups": 8, "num_head_channels": p.head_channels},
        "training": {"local_steps": local_steps, "batch_size": p.batch_size, "learning_rate": p.learning_rate,
                     "label_dropout": 0.1, "seed": seed},
        "privacy": {"enabled": dp, "noise_multiplier": noise_multiplier, "max_grad_norm": 1.0, "accountant": "prv"},
        "data": {"image_size": p.image_size},
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


def _initial(cfg: FedsynthConfig) -> dict[str, np.ndarray]:
    torch.manual_seed(cfg.training.seed)  # what the ServerApp does
    return trainable_state(build_unet(cfg.model))


def fedavg(results: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """Example-weighted mean of the sites' weights."""
    total = sum(n for _, n in results)
    return {k: sum(a[k].astype(np.float64) * (n / total) for a, n in results).astype(np.float32) for k in results[0][0]}


def train_federated(p: ModelPreset, sites: dict[str, SiteSlices], state_root: Path, dp: bool, target_epsilon: float,
                    delta: float, label: str = "federated", on_round: RoundReporter | None = None) -> TrainOutcome:
    sigma = noise_for_sites(sites, p, target_epsilon, delta) if dp else None
    cfg = federation_config(p, next(iter(sites.values())).classes, state_root, p.local_steps, dp, sigma or 1.0)
    if not p.server_step_is_plain_fedavg:
        return _train_with_server_strategy(cfg, p, sites, state_root, dp, target_epsilon, delta, label, on_round, sigma)
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
    return TrainOutcome(arrays, time.time() - started, p.rounds * p.local_steps * len(sites), epsilon, sigma, losses)


def _train_with_server_strategy(cfg: FedsynthConfig, p: ModelPreset, sites: dict[str, SiteSlices], state_root: Path,
                                dp: bool, target_epsilon: float, delta: float, label: str,
                                on_round: RoundReporter | None, sigma: float | None) -> TrainOutcome:
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
                            initial_arrays=ArrayRecord({k: Array(v) for k, v in _initial(cfg).items()}),
                            num_rounds=p.rounds, timeout=cfg.federation.round_timeout_s, train_config=ConfigRecord(),
                            evaluate_fn=round_done)
    if strategy.ema is not None:
        arrays, weights = strategy.ema.weights, "ema"
    else:
        arrays, weights = arrays_to_numpy(result.arrays), "global"
    return TrainOutcome(arrays, time.time() - started, p.rounds * p.local_steps * len(sites), epsilon, sigma, losses, weights)


def train_central(p: ModelPreset, slices: SiteSlices, num_sites: int, state_root: Path,
                  on_round: RoundReporter | None = None) -> TrainOutcome:
    """No DP, all data in one place; ``rounds`` chunks of ``local_steps * num_sites`` steps."""
    cfg = federation_config(p, slices.classes, state_root, p.local_steps * num_sites, dp=False)
    site = site_config(state_root, "central", 8.0, 1e-5, dp=False)
    arrays, started, losses = _initial(cfg), time.time(), []
    for chunk in range(1, p.rounds + 1):
        res = train_round(cfg, site, slices, arrays, run_id="central", server_round=chunk)
        arrays = res.arrays
        losses.append(res.loss)
        if on_round is not None:
            on_round(chunk, res.loss)
    return TrainOutcome(arrays, time.time() - started, p.rounds * p.local_steps * num_sites, {"central": None}, None, losses)
