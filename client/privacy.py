"""DP-SGD with Opacus and the site's privacy accounting (the only module importing opacus).

The unit of privacy is the patient: the training dataset yields one item per patient,
Poisson sampling draws patients, and Opacus clips one gradient per patient. Epsilon is
computed over the site's whole ledger (every step of every round of every run), never
over one round alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from torch.utils.data import DataLoader, Dataset

# Opacus' hooks fire on the first layer, whose input needs no gradient; the warning is noise.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

# (noise_multiplier, sample_rate, steps), the composition unit Opacus' accountants take.
Mechanism = tuple[float, float, int]


def poisson_sample_rate(num_patients: int, batch_size: int) -> float:
    """The sampling rate Opacus derives from a loader of ``num_patients`` in batches of ``batch_size``."""
    if num_patients < 1:
        raise ValueError("no patients to sample")
    return 1.0 / math.ceil(num_patients / batch_size)


def _accountant(name: str) -> IAccountant:
    if name == "prv":
        return PRVAccountant()
    if name == "rdp":
        return RDPAccountant()
    raise ValueError(f"unknown accountant {name!r}")


def _merge(history: Iterable[Mechanism]) -> list[Mechanism]:
    """Combine entries with the same (sigma, q): same epsilon, far less work for PRV."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    return [(s, q, n) for (s, q), n in merged.items() if n > 0]


def compute_epsilon(history: Iterable[Mechanism], delta: float, accountant: str = "prv") -> float:
    """Epsilon at ``delta`` after composing every mechanism in ``history``.

    A zero noise multiplier stands for a non-private step: nothing bounds it.
    """
    merged = _merge(history)
    if not merged:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in merged):
        return math.inf
    acc = _accountant(accountant)
    acc.history = merged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    batch_size: int,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader, float]:
    """Wrap model, optimiser and a Poisson-sampled loader over ``dataset`` (one item per patient).

    Returns:
        The wrapped model, optimiser, loader and the sampling rate the accountant must use.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=generator)
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: its RNG is not cryptographically strong.
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="prv", secure_mode=False)
        model, optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode="hooks",
        )
    sample_rate = float(dp_loader.sample_rate)
    expected = poisson_sample_rate(len(dataset), batch_size)  # type: ignore[arg-type]
    if not math.isclose(sample_rate, expected):
        raise RuntimeError(f"Opacus sample rate {sample_rate} differs from the one accounted ({expected})")
    return model, optimizer, dp_loader, sample_rate
