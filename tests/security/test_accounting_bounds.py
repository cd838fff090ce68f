"""A hostile server cannot exhaust a site's memory or hang it through the accountant or the model size."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

from client import privacy
from client.ledger import LEDGER_FILE, PrivacyLedger
from client.policy import load_site_policy
from client.site_data import SiteSlices
from client.training import train_round
from common.config import FedsynthConfig, config_from_dict, load_site_config
from common.errors import PolicyError, PrivacyBudgetError
from tests.conftest import tiny_federation, write_site

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, **overrides: dict) -> FedsynthConfig:
    return config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server", **overrides), "test")


def _slices(n: int = 20) -> SiteSlices:
    rng = np.random.default_rng(0)
    return SiteSlices(images=rng.uniform(-1, 1, (n, 1, 16, 16)).astype(np.float32),
                      labels=(np.arange(n) % 2).astype(np.int64), patients=[f"p{i:03d}" for i in range(n)],
                      classes=("disc", "ring"))


def _policy(tmp_path: Path, **values: object) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"max_epsilon": 50.0, "max_delta": 1e-5, "approved_apps": ["any"], **values}))
    return path


def test_100000_local_steps_are_refused_before_any_accountant_runs(tmp_path: Path) -> None:
    site = load_site_config(write_site(tmp_path / "sites", "a", tmp_path / "data"))  # no policy file: defaults apply
    ledger_before = Path(site.state_dir, LEDGER_FILE).read_text()
    accountings = privacy._composed_epsilon.cache_info()
    started = time.monotonic()
    with pytest.raises(PolicyError, match="100000 local steps in one round, more than the site's maximum 5000"):
        train_round(_cfg(tmp_path, training={"local_steps": 100_000}), site, _slices(), {}, server_round=1)
    assert time.monotonic() - started < 5
    assert privacy._composed_epsilon.cache_info() == accountings  # no epsilon computed, not even a cached one
    assert Path(site.state_dir, LEDGER_FILE).read_text() == ledger_before


def test_the_policy_caps_steps_and_epsilon_per_round(tmp_path: Path) -> None:
    site = load_site_config(write_site(tmp_path / "sites", "a", tmp_path / "data"))
    ledger_before = Path(site.state_dir, LEDGER_FILE).read_text()
    strict_steps = load_site_policy(_policy(tmp_path, max_steps_per_round=2))
    with pytest.raises(PolicyError, match="3 local steps in one round, more than the site's maximum 2"):
        train_round(_cfg(tmp_path), site, _slices(), {}, server_round=1, policy=strict_steps, app_hash="x")
    # The whole budget (50) would allow this round; the hospital's per-round cap does not.
    per_round = load_site_policy(_policy(tmp_path, max_epsilon_per_round=0.5))
    with pytest.raises(PrivacyBudgetError, match="in one round, over the site policy's cap of 0.5") as err:
        train_round(_cfg(tmp_path), site, _slices(), {}, server_round=1, policy=per_round, app_hash="x")
    assert str(tmp_path) not in err.value.public
    assert Path(site.state_dir, LEDGER_FILE).read_text() == ledger_before


_BOUNDED = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
from client.privacy import compute_epsilon
started = time.monotonic()
eps = [compute_epsilon(h, 1e-5) for h in ([(1.0, 0.25, 100000)], [(0.01, 0.5, 10)], [(0.05, 1.0, 5000)])]
print(json.dumps({"eps": eps, "seconds": time.monotonic() - started}))
"""


def test_prv_accounting_is_bounded_in_memory_and_time() -> None:
    # What blew PRV up to 6.7 GB: its grid grows with sqrt(steps) times the privacy loss bound,
    # which grows with the steps and as sigma shrinks. Under a 3 GB address-space limit it must still answer.
    done = subprocess.run([sys.executable, "-c", _BOUNDED], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["seconds"] < 60
    for eps, history in zip(result["eps"], ([(1.0, 0.25, 100000)], [(0.01, 0.5, 10)], [(0.05, 1.0, 5000)])):
        assert privacy.prv_domain_points(history, 1e-5) > privacy.PRV_MAX_POINTS
        rdp = RDPAccountant()
        rdp.history = history
        assert eps == pytest.approx(rdp.get_epsilon(1e-5))  # the RDP bound: valid, if looser


def test_a_realistic_ledger_still_uses_prv() -> None:
    history = [(1.0, 0.032, 1563)]  # REFERENCE.md's example: epsilon ~8.4 with PRV
    assert privacy.prv_domain_points(history, 1e-5) < privacy.PRV_MAX_POINTS
    assert privacy.compute_epsilon(history, 1e-5) == pytest.approx(8.42, abs=0.05)


def _opacus_grid_points(merged: list, delta: float) -> int:
    """What PRVAccountant._get_domain allocates: 2 L / mesh per mechanism, L from Opacus' own safe domain size."""
    steps = [n for _, _, n in merged]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half_width = compute_safe_domain_size(prvs=[PoissonSubsampledGaussianPRV(q, s) for s, q, _ in merged],
                                              max_self_compositions=steps, eps_error=0.01, delta_error=delta / 1000)
    mesh = 0.01 / math.sqrt(sum(steps) * math.log(12 / (delta / 1000)) / 2)
    return math.ceil(2 * half_width / mesh) * len(merged)


@pytest.mark.parametrize("history", [[(1.0, 0.25, 2)], [(1.0, 0.032, 1563)], [(1.1, 0.0625, 200), (0.9, 0.125, 50)],
                                     [(0.6, 0.5, 3)], [(5.0, 0.001, 10)], [(1.0, 0.25, 100000)], [(0.01, 0.5, 10)]])
def test_the_grid_estimate_never_undercounts_opacus_grid(history: list) -> None:
    # Integer RDP orders only: an upper bound on Opacus' L, a twentieth of its cost, and close on real ledgers.
    estimate, opacus_points = privacy.prv_domain_points(history, 1e-5), _opacus_grid_points(history, 1e-5)
    assert estimate >= opacus_points
    if opacus_points < privacy.PRV_MAX_POINTS:
        assert estimate <= 1.01 * opacus_points


def test_many_distinct_mechanisms_are_bounded_by_a_dominating_one() -> None:
    # A server changing the batch size every round would otherwise add one PRV grid per round.
    history = [(1.0 + i / 100, 0.01 + i / 1000, 20) for i in range(privacy.MAX_MECHANISMS + 8)]
    exact = RDPAccountant()
    exact.history = list(history)
    bounded = privacy.compute_epsilon(history, 1e-5, "rdp")
    assert bounded >= exact.get_epsilon(1e-5)
    worst = (1.0, 0.01 + (len(history) - 1) / 1000, 20 * len(history))
    assert bounded == pytest.approx(privacy.compute_epsilon([worst], 1e-5, "rdp"))


@pytest.mark.parametrize("bad", [(float("nan"), 0.1, 10), (1.0, float("inf"), 10), (1.0, 0.1, -5), (1.0, 0.0, 5)])
def test_non_finite_or_out_of_range_mechanisms_never_reach_an_accountant(bad: tuple) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="cannot account"):
        privacy.compute_epsilon([(1.0, 0.1, 10), bad], 1e-5)
    assert time.monotonic() - started < 1


def test_ledger_with_a_nan_entry_is_refused_on_open(tmp_path: Path) -> None:
    (tmp_path / LEDGER_FILE).write_text(json.dumps({"accountant": "prv", "entries": [
        {"noise_multiplier": float("nan"), "sample_rate": 0.1, "steps": 10}]}))
    with pytest.raises(Exception, match="noise multiplier must be a finite number"):
        PrivacyLedger.open(tmp_path)
