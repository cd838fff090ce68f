"""The DP planner: per site, the batch size and noise multiplier that make the averaged update least noisy
within the site's privacy budget.

DP-SGD at a site adds ``N(0, (sigma C)^2)`` per coordinate to the sum of clipped per-patient
gradients and divides by the expected batch ``B = int(patients * q)``. Relative to the clipping norm
``C`` the noise in the averaged update has standard deviation ``sigma / B`` per coordinate, and
``sigma * sqrt(d) / B`` in norm for ``d`` trainable parameters (the subset ``training.trainable``
selects: frozen parameters get no noise), against a clipped mean whose norm is at most 1. The
planner searches the sampling rates a site can use (``q = 1 / ceil(patients / b)``
for candidate batch sizes ``b``), finds for each the smallest ``sigma`` whose epsilon, composed over
the site's whole ledger plus the planned steps, stays within its budget, and keeps the one with the
smallest ``sigma / B``. Larger batches help only while subsampling still amplifies privacy; past
that the needed ``sigma`` grows as fast as ``B`` and every extra patient per step is compute for
nothing, so the smallest batch within a few percent of the least noisy is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from client.privacy import Mechanism, compute_epsilon, expected_batch_size, poisson_sample_rate

# Below this the accountants' cost and numerical trouble grow fast, and no useful plan needs it.
SIGMA_FLOOR = 0.3
SIGMA_CEILING = 512.0
DEFAULT_BATCH_SIZES = (4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class SiteBudget:
    """What the planner needs to know of one site (all of it the site's own)."""

    site_id: str
    num_patients: int
    epsilon: float
    delta: float
    history: tuple[Mechanism, ...] = ()
    """Mechanisms already in the site's ledger: the plan spends only what is left."""
    min_noise_multiplier: float = 0.0
    """The site policy's noise floor."""


@dataclass(frozen=True)
class SitePlan:
    site_id: str
    num_patients: int
    batch_size: int
    sample_rate: float
    expected_batch: int
    noise_multiplier: float
    steps: int
    epsilon: float
    delta: float
    noise_per_coordinate: float
    """``sigma / B``: noise std per coordinate of the averaged update, in units of the clipping norm."""
    feasible: bool = True
    reason: str = ""
    candidates: list[tuple[int, float, float]] = field(default_factory=list, compare=False)
    """Every (batch size, sigma, sigma / B) tried, for the table and the benchmark."""

    def noise_to_signal(self, num_parameters: int) -> float:
        """Norm of the noise over the largest norm of the clipped mean, for ``num_parameters`` coordinates."""
        return self.noise_per_coordinate * math.sqrt(num_parameters)


def smallest_noise_multiplier(history: Sequence[Mechanism], sample_rate: float, steps: int, epsilon: float,
                              delta: float, accountant: str = "prv", floor: float = 0.0,
                              rel_tol: float = 0.02) -> float | None:
    """The smallest ``sigma`` (to ``rel_tol``) with epsilon over ``history`` + ``steps`` steps at ``epsilon`` or below.

    Returns ``None`` when no ``sigma`` up to :data:`SIGMA_CEILING` fits (the history alone may
    already have spent the budget). Epsilon falls as ``sigma`` grows, so a bisection suffices.
    The search runs on RDP, which costs milliseconds where PRV at small ``sigma`` costs tens of
    seconds; with PRV the answer is then refined near RDP's, where PRV is cheap.
    """
    def fits(sigma: float, acc: str) -> bool:
        return compute_epsilon([*history, (sigma, sample_rate, steps)], delta, acc) <= epsilon

    low = max(floor, SIGMA_FLOOR)
    if fits(low, "rdp"):
        high = low
    else:
        high = _bisect(lambda s: fits(s, "rdp"), low, rel_tol)
        if high is None:
            return None
    if accountant == "rdp" or high == low:
        return high if fits(high, accountant) else None
    # PRV is tighter than RDP: its sigma lies at or below RDP's, usually within 20%.
    while not fits(high, accountant):  # rare, but never trust the order of two approximations
        high *= 1.1
        if high > SIGMA_CEILING:
            return None
    candidate = max(low, high * 0.8)
    if fits(candidate, accountant):
        return candidate
    return _refine(lambda s: fits(s, accountant), candidate, high, rel_tol)


def _bisect(fits, low: float, rel_tol: float) -> float | None:
    """Smallest fitting sigma above ``low`` (which does not fit), doubling to find a bracket first."""
    high = max(low * 2, 1.0)
    while not fits(high):
        low, high = high, high * 2
        if high > SIGMA_CEILING:
            return None
    return _refine(fits, low, high, rel_tol)


def _refine(fits, low: float, high: float, rel_tol: float) -> float:
    while high / low > 1 + rel_tol:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def plan_site(site: SiteBudget, steps: int, accountant: str = "prv",
              batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, tolerance: float = 0.05) -> SitePlan:
    """The batch size and noise multiplier with the least noise per coordinate for ``steps`` more steps.

    Past a point larger batches buy almost nothing (the needed ``sigma`` grows as fast as the
    batch) while every step costs more compute, so the smallest batch within ``tolerance`` of the
    least noisy one is chosen.
    """
    if site.num_patients < 1:
        return _infeasible(site, steps, "no training patients")
    sizes = sorted({min(b, site.num_patients) for b in batch_sizes if b >= 1})
    tried: list[tuple[int, float, float]] = []
    seen_rates: set[float] = set()
    for b in sizes:
        q = poisson_sample_rate(site.num_patients, b)
        if q in seen_rates:  # two batch sizes can round to the same sampling rate
            continue
        seen_rates.add(q)
        sigma = smallest_noise_multiplier(site.history, q, steps, site.epsilon, site.delta, accountant,
                                          floor=site.min_noise_multiplier)
        if sigma is not None:
            tried.append((b, sigma, sigma / expected_batch_size(site.num_patients, b)))
    if not tried:
        spent = compute_epsilon(site.history, site.delta, accountant)
        return _infeasible(site, steps, f"no noise multiplier up to {SIGMA_CEILING:g} fits: epsilon already spent "
                                        f"{spent:.3f} of {site.epsilon}")
    least = min(r for _, _, r in tried)
    b, sigma, per_coordinate = next(c for c in tried if c[2] <= least * (1 + tolerance))
    q = poisson_sample_rate(site.num_patients, b)
    eps = compute_epsilon([*site.history, (sigma, q, steps)], site.delta, accountant)
    return SitePlan(site.site_id, site.num_patients, b, q, expected_batch_size(site.num_patients, b), sigma, steps,
                    eps, site.delta, per_coordinate, candidates=tried)


def _infeasible(site: SiteBudget, steps: int, reason: str) -> SitePlan:
    return SitePlan(site.site_id, site.num_patients, 0, 0.0, 0, math.inf, steps, math.inf, site.delta, math.inf,
                    feasible=False, reason=reason)


def plan_common(plans: Sequence[SitePlan], sites: Sequence[SiteBudget], steps: int, accountant: str = "prv",
                tolerance: float = 0.05) -> tuple[int, float]:
    """One (batch size, noise multiplier) for a federation config that every site can afford.

    The federation config holds one setting for all sites, so each candidate batch size gets
    the largest sigma any site needs at it; the smallest batch size within ``tolerance`` of the least noisy worst site wins.
    """
    feasible = [(p, s) for p, s in zip(plans, sites) if p.feasible]
    if not feasible:
        raise ValueError("no site has a feasible plan")
    options: list[tuple[float, int, float]] = []
    sizes = sorted({b for p, _ in feasible for b, _, _ in p.candidates})
    # Each site's plan already solved for sigma at its own candidate rates: reuse them, as each
    # accountant search costs up to seconds.
    solved = [{poisson_sample_rate(site.num_patients, cb): cs for cb, cs, _ in plan.candidates} for plan, site in feasible]
    for b in sizes:
        needed = []
        for (_, site), known in zip(feasible, solved):
            q = poisson_sample_rate(site.num_patients, b)
            sigma = known[q] if q in known else smallest_noise_multiplier(
                site.history, q, steps, site.epsilon, site.delta, accountant, floor=site.min_noise_multiplier)
            if sigma is None:
                break
            needed.append((sigma, expected_batch_size(site.num_patients, b)))
        else:
            sigma = max(s for s, _ in needed)
            worst = max(sigma / e for _, e in needed)
            options.append((worst, b, sigma))
    if not options:
        raise ValueError("no batch size fits every site's budget")
    least = min(w for w, _, _ in options)
    _, b, sigma = next(o for o in options if o[0] <= least * (1 + tolerance))
    return b, sigma
