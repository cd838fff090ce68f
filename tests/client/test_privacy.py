"""Privacy accounting: epsilon covers every step across rounds and restarts; over-budget work is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from client.ledger import PrivacyLedger
from client.privacy import compute_epsilon, poisson_sample_rate
from client.site_data import SiteSlices
from client.training import PatientDataset, split_patients, train_round
from common.config import FedsynthConfig, config_from_dict, load_site_config
from common.errors import PrivacyBudgetError
from common.model import build_unet, trainable_state
from tests.conftest import tiny_federation, write_site


def _cfg(tmp_path: Path, **overrides: dict) -> FedsynthConfig:
    return config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server", **overrides), "test")


def _slices(num_patients: int, slices_per_patient: int = 1, size: int = 16) -> SiteSlices:
    rng = np.random.default_rng(0)
    n = num_patients * slices_per_patient
    return SiteSlices(
        images=rng.uniform(-1, 1, (n, 1, size, size)).astype(np.float32),
        labels=(np.arange(n) // slices_per_patient % 2).astype(np.int64),
        patients=[f"p{i // slices_per_patient:03d}" for i in range(n)],
        classes=("disc", "ring"),
    )


def _initial(cfg: FedsynthConfig) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return trainable_state(build_unet(cfg.model))


def test_epsilon_grows_over_rounds_and_survives_restart(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    site = load_site_config(write_site(tmp_path / "sites", "a", tmp_path / "data"))
    slices = _slices(30)
    weights = _initial(cfg)
    first = train_round(cfg, site, slices, weights, run_id="run-1", server_round=1)
    second = train_round(cfg, site, slices, first.arrays, run_id="run-1", server_round=2)
    assert 0 < first.epsilon < second.epsilon
    assert first.steps == second.steps == cfg.training.local_steps

    # A new process (or a new run) opens the same ledger and sees both rounds.
    reopened = PrivacyLedger.open(site.state_dir)
    assert reopened.total_steps == 2 * cfg.training.local_steps
    assert math.isclose(reopened.epsilon(site.privacy_budget.delta), second.epsilon, rel_tol=1e-9)
    third = train_round(cfg, site, slices, second.arrays, run_id="run-2", server_round=1)
    assert third.epsilon > second.epsilon
    # The ledger's epsilon is the one composed over all steps, not over the last round alone.
    train_patients = len(split_patients(slices, site.val_fraction)[0])
    q = poisson_sample_rate(train_patients, cfg.training.batch_size)
    expected = compute_epsilon([(1.0, q, 3 * cfg.training.local_steps)], 1e-5)
    assert math.isclose(third.epsilon, expected, rel_tol=1e-6)
    assert compute_epsilon([(1.0, q, cfg.training.local_steps)], 1e-5) < third.epsilon


def test_refuses_over_budget_and_spends_nothing(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, training={"local_steps": 5})
    slices = _slices(20)
    train_patients = len(split_patients(slices, 0.2)[0])  # write_site's default val_fraction
    q = poisson_sample_rate(train_patients, cfg.training.batch_size)
    one_round = compute_epsilon([(1.0, q, 5)], 1e-5)
    two_rounds = compute_epsilon([(1.0, q, 10)], 1e-5)
    budget = (one_round + two_rounds) / 2  # room for one round, not two
    site = load_site_config(write_site(tmp_path / "sites", "a", tmp_path / "data", epsilon=budget))
    weights = _initial(cfg)
    train_round(cfg, site, slices, weights, server_round=1)
    ledger_before = Path(site.state_dir, "privacy_ledger.json").read_text()
    with pytest.raises(PrivacyBudgetError) as err:
        train_round(cfg, site, slices, weights, server_round=2)
    assert "over the site's budget" in str(err.value)
    assert str(site.state_dir) not in err.value.public  # the server is told why, never where
    assert Path(site.state_dir, "privacy_ledger.json").read_text() == ledger_before


def test_server_cannot_switch_dp_off_unless_the_site_allows(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, privacy={"enabled": False})
    weights = _initial(cfg)
    strict = load_site_config(write_site(tmp_path / "sites", "a", tmp_path / "data"))
    with pytest.raises(PrivacyBudgetError, match="without DP"):
        train_round(cfg, strict, _slices(10), weights)
    lenient = load_site_config(write_site(tmp_path / "sites", "b", tmp_path / "data", allow_non_private=True))
    result = train_round(cfg, lenient, _slices(10), weights)
    assert math.isinf(result.epsilon)
    # Once data was used without DP, no later DP round can claim a finite epsilon for it.
    assert math.isinf(PrivacyLedger.open(lenient.state_dir).epsilon(1e-5))


def test_unit_of_privacy_is_the_patient(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    slices = _slices(num_patients=12, slices_per_patient=5)
    site = load_site_config(write_site(tmp_path / "sites", "a", tmp_path / "data"))
    train, val = split_patients(slices, site.val_fraction)
    assert sum(len(g) for g in train + val) == 60
    assert all(len(g) == 5 for g in train + val)
    dataset = PatientDataset(slices.images, slices.labels, train, seed=0)
    assert len(dataset) == len(train)  # one item per patient, not per slice
    train_round(cfg, site, slices, _initial(cfg))
    entry = json.loads(Path(site.state_dir, "privacy_ledger.json").read_text())["entries"][0]
    assert entry["sample_rate"] == poisson_sample_rate(len(train), cfg.training.batch_size)


def test_a_damaged_ledger_is_an_error_not_a_reset(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "privacy_ledger.json").write_text("{not json")
    with pytest.raises(Exception, match="privacy ledger is unreadable"):
        PrivacyLedger.open(state)


def test_update_changes_weights_and_stays_finite(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    site = load_site_config(write_site(tmp_path / "sites", "a", tmp_path / "data"))
    weights = _initial(cfg)
    result = train_round(cfg, site, _slices(20), weights)
    assert set(result.arrays) == set(weights)
    assert all(result.arrays[k].dtype == np.float32 and result.arrays[k].shape == weights[k].shape for k in weights)
    assert all(np.isfinite(v).all() for v in result.arrays.values())
    assert any(not np.array_equal(result.arrays[k], weights[k]) for k in weights)
    assert not any(k.startswith("_module.") for k in result.arrays)
