"""DP-SGD set-up and the site's privacy accounting (the only module importing opacus).

The unit of privacy is the patient: the training dataset yields one item per patient,
Poisson sampling (Opacus' ``DPDataLoader``) draws patients, and one gradient per patient is
clipped. Per-sample gradients come from :mod:`client.grad_sample` (``grad_sample_mode``
``fedsynth``, the default: same mechanism, cheaper) or from Opacus' own ``hooks`` /
``functorch`` modes. Epsilon is computed over the site's whole ledger (every step of every
round of every run), never over one round alone.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable
from functools import lru_cache, partial
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset

from client.dp_sgd import DPSGDStep, LocalStep, PlainStep

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant
    from opacus.data_loader import DPDataLoader

    from client.epsilon_cache import EpsilonCache

# Opacus is imported where it is used, not here: importing it costs about 2 CPU-seconds
# (torch.distributed, scipy.signal), and a deployed site pays that in a fresh process for
# every message, including evaluate and audit tasks that never touch it.

# Opacus' hooks fire on the first layer, whose input needs no gradient; the warning is noise.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

# (noise_multiplier, sample_rate, steps), the composition unit Opacus' accountants take.
Mechanism = tuple[float, float, int]

# Opacus' default epsilon error; the grid estimate below must use the same one.
PRV_EPS_ERROR = 0.01
# About 160 bytes of working memory per PRV grid point: 4M points peak near 700 MB and take
# seconds on one core; a realistic ledger (epsilon up to tens) needs far fewer.
PRV_MAX_POINTS = 4_000_000
# Distinct (sigma, q) pairs composed one by one; more are merged into one dominating pair.
MAX_MECHANISMS = 32


def poisson_sample_rate(num_patients: int, batch_size: int) -> float:
    """The sampling rate Opacus derives from a loader of ``num_patients`` in batches of ``batch_size``."""
    if num_patients < 1:
        raise ValueError("no patients to sample")
    return 1.0 / math.ceil(num_patients / batch_size)


def expected_batch_size(num_patients: int, batch_size: int) -> int:
    """What Opacus divides the noisy gradient sum by: ``int(patients * sample_rate)``, not ``batch_size``."""
    return int(num_patients * poisson_sample_rate(num_patients, batch_size))


def poisson_loader(dataset: Dataset, batch_size: int, generator: torch.Generator | None = None) -> DPDataLoader:
    """Opacus' Poisson-sampled loader, built exactly as ``PrivacyEngine.make_private`` builds it."""
    from opacus.data_loader import DPDataLoader

    loader = DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=generator))
    _check_sample_rate(float(loader.sample_rate), len(dataset), batch_size)  # type: ignore[arg-type]
    return loader


def _check_sample_rate(sample_rate: float, num_patients: int, batch_size: int) -> None:
    expected = poisson_sample_rate(num_patients, batch_size)
    if not math.isclose(sample_rate, expected):
        raise RuntimeError(f"Opacus sample rate {sample_rate} differs from the one accounted ({expected})")


def _accountant(name: str) -> IAccountant:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "prv":
        return PRVAccountant()
    if name == "rdp":
        return RDPAccountant()
    raise ValueError(f"unknown accountant {name!r}")


def check_mechanism(sigma: object, q: object, steps: object) -> str | None:
    """What is wrong with one ``(noise_multiplier, sample_rate, steps)``, or ``None`` if it can be accounted.

    Non-finite values sent Opacus' series expansions into endless loops; nothing reaches an
    accountant without passing this.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        return f"steps must be a non-negative integer, got {steps!r}"
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        return f"noise multiplier must be a finite number >= 0, got {sigma!r}"
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or not 0 < q <= 1:
        return f"sample rate must be in (0, 1], got {q!r}"
    return None


def _merge(history: Iterable[Mechanism]) -> list[Mechanism]:
    """Combine entries with the same (sigma, q): same epsilon, far less work for PRV."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        problem = check_mechanism(sigma, q, steps)
        if problem is not None:
            raise ValueError(f"cannot account ({sigma!r}, {q!r}, {steps!r}): {problem}")
        merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    return [(s, q, n) for (s, q), n in merged.items() if n > 0]


def _dominating(merged: list[Mechanism]) -> list[Mechanism]:
    """At most ``MAX_MECHANISMS`` distinct mechanisms; beyond that, one that dominates them all.

    The subsampled Gaussian leaks more with less noise and a higher sample rate, so all the
    steps taken at the smallest sigma and the largest q bound the true epsilon from above.
    A server that varies the batch size every round cannot make accounting cost grow with it.
    """
    if len(merged) <= MAX_MECHANISMS:
        return merged
    return [(min(s for s, _, _ in merged), max(q for _, q, _ in merged), sum(n for _, _, n in merged))]


def prv_domain_points(merged: Iterable[Mechanism], delta: float) -> int:
    """An upper bound on the grid points Opacus' PRV accountant allocates (over all distinct mechanisms) for ``merged``.

    Opacus sizes its discretisation grid as ``2 L / mesh``, where the mesh shrinks with the square
    root of the total steps and ``L`` is an RDP bound on the privacy loss
    (``PRVAccountant._get_domain`` and ``compute_safe_domain_size``, eps_error 0.01 and
    delta_error delta/1000 as in ``get_epsilon``); a large epsilon or a small sigma made it
    allocate gigabytes. ``L`` is computed here by the same formula, over the integer RDP orders
    only (:func:`_rdp_epsilon_upper`): never below Opacus' ``L``, so never fewer points, at a
    twentieth of the cost of Opacus' own (which the composition then computes again).
    """
    merged = list(merged)
    eps_error, delta_error = PRV_EPS_ERROR, delta / 1000
    total_steps = sum(n for _, _, n in merged)
    half_width = max(_rdp_epsilon_upper(merged, delta_error / 4),
                     *(_rdp_epsilon_upper([(sigma, q, 1)], delta_error / (8 * total_steps)) for sigma, q, _ in merged))
    if not math.isfinite(half_width):  # no finite bound at any order: no grid would do
        return sys.maxsize
    half_width = max(half_width, eps_error) + 3
    mesh = eps_error / math.sqrt(total_steps * math.log(12 / delta_error) / 2)
    return math.ceil(2 * half_width / mesh) * len(merged)


def _rdp_epsilon_upper(history: list[Mechanism], delta: float) -> float:
    """Opacus' RDP epsilon over the integer orders among its default ones.

    RDP's epsilon is a minimum over orders, so over a subset of Opacus' orders it is never below
    Opacus' own; the fractional orders, which need a slow series, cost 20 times as much.
    """
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": this is a bound, loose is fine
        return float(acc.get_epsilon(delta, alphas=[a for a in acc.DEFAULT_ALPHAS if float(a).is_integer()]))


def compute_epsilon(history: Iterable[Mechanism], delta: float, accountant: str = "prv",
                    cache: EpsilonCache | None = None) -> float:
    """Epsilon at ``delta`` after composing every mechanism in ``history``.

    A zero noise multiplier stands for a non-private step: nothing bounds it. Time and memory
    are bounded whatever the history: PRV runs only on a grid of at most ``PRV_MAX_POINTS``;
    beyond it the RDP bound (also a valid upper bound on epsilon, looser) is reported instead.
    ``cache`` (the site's, :mod:`client.epsilon_cache`) keeps the value for later processes; it
    is keyed by exactly what the accountant composes below, so it returns the same number.

    Raises:
        ValueError: an entry is negative, non-finite or its sample rate is outside (0, 1].
    """
    merged = _merge(history)
    if not merged:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in merged):
        return math.inf
    mechanisms = tuple(_dominating(merged))
    if cache is not None:
        return cache.epsilon(mechanisms, float(delta), accountant, _composed_epsilon)
    return _composed_epsilon(mechanisms, float(delta), accountant)


@lru_cache(maxsize=256)
def _composed_epsilon(merged: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    # A site checks its budget before every round: "spent" then equals the previous round's
    # "after", and each PRV composition costs about a second on a CPU. The result is a pure
    # function of (history, delta, accountant), so caching it changes no number.
    if accountant == "prv" and prv_domain_points(merged, delta) > PRV_MAX_POINTS:
        accountant = "rdp"
    acc = _accountant(accountant)
    acc.history = list(merged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if accountant == "prv":
            return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
        return float(acc.get_epsilon(delta=delta))


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    batch_size: int,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator | None = None,
    grad_sample_mode: str = "hooks",
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader, float]:
    """Opacus' way: wrap model, optimiser and a Poisson-sampled loader over ``dataset`` (one item per patient).

    Returns:
        The wrapped model, optimiser, loader and the sampling rate the accountant must use.
    """
    from opacus import PrivacyEngine

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
            grad_sample_mode=grad_sample_mode,
        )
    sample_rate = float(dp_loader.sample_rate)
    _check_sample_rate(sample_rate, len(dataset), batch_size)  # type: ignore[arg-type]
    return model, optimizer, dp_loader, sample_rate


def make_private_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    batch_size: int,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator | None = None,
    grad_sample_mode: str = "fedsynth",
    noise_multiplicity: int = 1,
) -> tuple[torch.nn.Module, LocalStep, DataLoader]:
    """The model to train, its DP-SGD step and the Poisson-sampled loader over ``dataset``.

    Whatever the mode, the loader, the clipping, the noise and the accounting are the same;
    ``fedsynth`` leaves the model unwrapped and skips Opacus' hooks.

    Args:
        noise_multiplicity: forward rows per sampled patient (see ``DPSGDStep``); ``fedsynth``
            mode only. Opacus' modes would clip each row as a sample of its own: a patient would
            weigh K clipped gradients while the accountant counts one, so they refuse it.
    """
    if grad_sample_mode == "fedsynth":
        loader = poisson_loader(dataset, batch_size, generator)
        expected = expected_batch_size(len(dataset), batch_size)  # type: ignore[arg-type]
        step = DPSGDStep(model, optimizer, noise_multiplier, max_grad_norm, expected, repeats=noise_multiplicity)
        return model, step, loader
    if noise_multiplicity != 1:
        raise ValueError(f"noise multiplicity {noise_multiplicity} needs grad_sample_mode 'fedsynth', "
                         f"not {grad_sample_mode!r}")
    model, optimizer, loader, _ = make_private(model, optimizer, dataset, batch_size, noise_multiplier, max_grad_norm,
                                               generator=generator, grad_sample_mode=grad_sample_mode)
    return model, PlainStep(optimizer, empty=partial(_noise_only_step, optimizer)), loader


def _noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """An empty Poisson batch is still a DP step: the update is noise alone.

    Skipping it would change the sampling distribution the accountant assumes.
    """
    optimizer.zero_grad(set_to_none=True)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()
