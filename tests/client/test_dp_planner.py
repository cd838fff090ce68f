"""The DP planner: its noise multipliers are within budget and (to its tolerance) the smallest that are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from client.dp_planner import SiteBudget, plan_common, plan_site, smallest_noise_multiplier
from client.privacy import compute_epsilon, expected_batch_size, poisson_sample_rate
from server.cli import main
from tests.conftest import tiny_federation, write_shapes_dataset, write_site


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_smallest_noise_multiplier_fits_and_is_minimal(accountant: str) -> None:
    q, steps, target = 1 / 10, 300, 4.0
    sigma = smallest_noise_multiplier((), q, steps, target, 1e-5, accountant, rel_tol=0.02)
    assert sigma is not None
    assert compute_epsilon([(sigma, q, steps)], 1e-5, accountant) <= target
    # 3% less noise must overspend: the answer is the smallest to within the 2% tolerance.
    assert compute_epsilon([(sigma * 0.97, q, steps)], 1e-5, accountant) > target


def test_history_is_spent_before_the_plan() -> None:
    fresh = SiteBudget("a", 200, 6.0, 1e-5)
    used = SiteBudget("a", 200, 6.0, 1e-5, history=((2.0, 0.1, 100),))
    plan_fresh, plan_used = plan_site(fresh, 200, "rdp"), plan_site(used, 200, "rdp")
    assert plan_fresh.feasible and plan_used.feasible
    assert plan_used.noise_per_coordinate > plan_fresh.noise_per_coordinate
    total = compute_epsilon([*used.history, (plan_used.noise_multiplier, plan_used.sample_rate, 200)], 1e-5, "rdp")
    assert total <= 6.0
    assert plan_used.epsilon == pytest.approx(total)


def test_plan_is_least_noisy_within_tolerance_and_consistent() -> None:
    site = SiteBudget("a", 300, 8.0, 1e-5)
    plan = plan_site(site, 400, "rdp", tolerance=0.05)
    least = min(r for _, _, r in plan.candidates)
    assert plan.noise_per_coordinate <= least * 1.05
    # Nothing smaller qualifies: the chosen batch is the cheapest within tolerance.
    assert all(r > least * 1.05 for b, _, r in plan.candidates if b < plan.batch_size)
    assert plan.sample_rate == poisson_sample_rate(300, plan.batch_size)
    assert plan.expected_batch == expected_batch_size(300, plan.batch_size)
    assert plan.noise_per_coordinate == pytest.approx(plan.noise_multiplier / plan.expected_batch)
    assert plan.epsilon <= 8.0


def test_policy_noise_floor_is_respected() -> None:
    plan = plan_site(SiteBudget("a", 2000, 50.0, 1e-5, min_noise_multiplier=1.5), 50, "rdp")
    assert plan.noise_multiplier >= 1.5


def test_spent_budget_is_infeasible() -> None:
    plan = plan_site(SiteBudget("a", 100, 1.0, 1e-5, history=((0.5, 0.5, 1000),)), 10, "rdp")
    assert not plan.feasible
    assert "already spent" in plan.reason


def test_common_setting_fits_every_site() -> None:
    sites = [SiteBudget("small", 60, 8.0, 1e-5), SiteBudget("large", 600, 4.0, 1e-5)]
    plans = [plan_site(s, 200, "rdp") for s in sites]
    batch, sigma = plan_common(plans, sites, 200, "rdp")
    for s in sites:
        q = poisson_sample_rate(s.num_patients, batch)
        assert compute_epsilon([(sigma, q, 200)], s.delta, "rdp") <= s.epsilon


def test_plan_command_on_real_site_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fed = tiny_federation(tmp_path / "out", privacy={"accountant": "rdp"}, training={"local_steps": 10})
    fed_path = tmp_path / "fed.yaml"
    fed_path.write_text(yaml.safe_dump(fed))
    sites = [write_site(tmp_path / "sites", name, write_shapes_dataset(tmp_path / name, per_class=n), epsilon=eps)
             for name, n, eps in (("a", 12, 8.0), ("b", 30, 3.0))]
    out = tmp_path / "plan.json"
    code = main(["plan", "--config", str(fed_path), "--site", str(sites[0]), "--site", str(sites[1]), "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "DP plan per site" in printed and "sigma" in printed and "privacy.noise_multiplier" in printed
    plan = json.loads(out.read_text())
    assert plan["steps"] == 10 * fed["federation"]["num_rounds"]
    assert [s["site_id"] for s in plan["sites"]] == ["a", "b"]
    for row, budget in zip(plan["sites"], (8.0, 3.0)):
        assert row["feasible"] and row["epsilon"] <= budget
        assert 0 < row["patients"] < 60
    assert plan["federation"]["batch_size"] >= 1


def test_plan_counts_only_the_trained_subset(tmp_path: Path) -> None:
    """training.trainable efficient: the noise per coordinate is the same, its norm covers fewer coordinates."""
    import math

    from common.config import FedsynthConfig, config_from_dict
    from common.trainable import trainable_count
    from server.plan_command import count_parameters, plan_row

    every = config_from_dict(FedsynthConfig, tiny_federation(tmp_path), "t")
    efficient = config_from_dict(FedsynthConfig, tiny_federation(tmp_path, training={"trainable": "efficient"}), "t")
    n_all, n_eff = count_parameters(every), count_parameters(efficient)
    assert n_eff == trainable_count(efficient) and 0 < n_eff < n_all
    plan = plan_site(SiteBudget("a", 200, 8.0, 1e-5), 100, "rdp")
    whole, subset = plan_row(plan, n_all), plan_row(plan, n_eff)
    assert subset["noise_per_coordinate"] == whole["noise_per_coordinate"]
    assert subset["noise_to_signal"] == pytest.approx(whole["noise_to_signal"] * math.sqrt(n_eff / n_all))
