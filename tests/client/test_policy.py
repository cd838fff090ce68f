"""The site's policy: the coordinator can tighten it, never loosen it; refusals cost nothing."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from client.ledger import PrivacyLedger
from client.policy import app_code_hash, enforce_policy, load_site_policy, privacy_ceiling, running_app_hash
from client.site_data import SiteSlices
from client.training import train_round
from common.config import FedsynthConfig, config_from_dict, load_site_config
from common.errors import ConfigError, PolicyError
from common.model import build_unet, trainable_state
from tests.conftest import tiny_federation, write_site

REPO = Path(__file__).resolve().parents[2]


def _policy(tmp_path: Path, **values: object) -> Path:
    policy = {"max_epsilon": 20.0, "max_delta": 1e-5, "min_noise_multiplier": 0.8, "max_grad_norm": 1.0,
              "min_patients": 5, "approved_apps": [running_app_hash()], **values}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def _cfg(tmp_path: Path, **overrides: dict) -> FedsynthConfig:
    return config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server", **overrides), "test")


def _slices(n: int) -> SiteSlices:
    rng = np.random.default_rng(0)
    return SiteSlices(rng.uniform(-1, 1, (n, 1, 16, 16)).astype(np.float32), (np.arange(n) % 2).astype(np.int64),
                      [f"p{i}" for i in range(n)], ("disc", "ring"))


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"privacy": {"noise_multiplier": 0.5}}, "noise multiplier 0.5 is below the policy's minimum 0.8"),
        ({"privacy": {"max_grad_norm": 5.0}}, "clipping norm 5.0 is above the policy's maximum 1.0"),
        ({"privacy": {"enabled": False}}, "training without DP is not allowed"),
    ],
)
def test_loosening_train_configs_are_refused(tmp_path: Path, overrides: dict, reason: str) -> None:
    policy = load_site_policy(_policy(tmp_path))
    with pytest.raises(PolicyError, match=reason):
        enforce_policy(policy, _cfg(tmp_path, **overrides), running_app_hash(), 100)


def test_unapproved_app_and_too_few_patients_are_refused(tmp_path: Path) -> None:
    policy = load_site_policy(_policy(tmp_path, approved_apps=["0" * 64]))
    with pytest.raises(PolicyError, match="not among the 1 approved app"):
        enforce_policy(policy, _cfg(tmp_path), running_app_hash(), 100)
    policy = load_site_policy(_policy(tmp_path))
    with pytest.raises(PolicyError, match="3 training patients, fewer than the policy's minimum 5"):
        enforce_policy(policy, _cfg(tmp_path), running_app_hash(), 3)
    enforce_policy(policy, _cfg(tmp_path), running_app_hash(), 5)  # at the limit: allowed


def test_ceiling_is_the_tightest_of_site_policy_and_federation(tmp_path: Path) -> None:
    site = load_site_config(write_site(tmp_path / "sites", "a", tmp_path / "data", epsilon=10.0))
    policy = load_site_policy(_policy(tmp_path, max_epsilon=6.0, max_delta=1e-6))
    assert privacy_ceiling(site, policy, _cfg(tmp_path)).epsilon == 6.0
    assert privacy_ceiling(site, policy, _cfg(tmp_path)).delta == 1e-6
    # The federation may tighten...
    assert privacy_ceiling(site, policy, _cfg(tmp_path, privacy={"max_epsilon_per_site": 2.0})).epsilon == 2.0
    # ...but asking for more than the site allows changes nothing.
    assert privacy_ceiling(site, policy, _cfg(tmp_path, privacy={"max_epsilon_per_site": 50.0})).epsilon == 6.0
    assert privacy_ceiling(site, None, _cfg(tmp_path)).epsilon == 10.0


def test_refused_task_spends_no_budget(tmp_path: Path) -> None:
    site = load_site_config(write_site(tmp_path / "sites", "a", tmp_path / "data", policy_file=str(_policy(tmp_path))))
    policy = load_site_policy(site.policy_file)
    cfg = _cfg(tmp_path, privacy={"noise_multiplier": 0.3})
    torch.manual_seed(0)
    weights = trainable_state(build_unet(cfg.model))
    with pytest.raises(PolicyError):
        train_round(cfg, site, _slices(20), weights, policy=policy, app_hash=running_app_hash())
    assert PrivacyLedger.open(site.state_dir).total_steps == 0


def test_policy_file_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="approved_apps: entries must be 64"):
        load_site_policy(_policy(tmp_path, approved_apps=["abc"]))
    with pytest.raises(ConfigError, match="min_patient: unknown key"):
        load_site_policy(_policy(tmp_path, min_patient=3))


def test_app_hash_is_the_same_for_checkout_bundle_and_fab(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    for package in ("common", "client", "server"):
        shutil.copytree(REPO / package, bundle / package, ignore=shutil.ignore_patterns("__pycache__", "demo_data"))
    fab = tmp_path / "app.fab"
    with zipfile.ZipFile(fab, "w") as archive:
        for path in sorted(bundle.rglob("*.py")):
            archive.write(path, path.relative_to(bundle).as_posix())
    assert app_code_hash(REPO) == app_code_hash(bundle) == app_code_hash(fab) == running_app_hash()
    (bundle / "client" / "training.py").write_text((bundle / "client" / "training.py").read_text() + "\n# changed\n")
    assert app_code_hash(bundle) != app_code_hash(REPO)
