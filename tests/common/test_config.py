from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.config import (
    FedsynthConfig,
    config_from_dict,
    config_to_dict,
    load_federation_config,
    load_site_config,
)
from common.errors import ConfigError
from tests.conftest import tiny_federation


def _write(tmp_path: Path, data: object, name: str = "fed.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_valid_federation_config_loads_and_resolves_paths(tmp_path: Path) -> None:
    path = _write(tmp_path, tiny_federation(Path("out")))
    cfg = load_federation_config(path)
    assert cfg.model.channels == (8, 8)
    assert cfg.federation.output_dir == str((tmp_path / "out").resolve())
    assert cfg.federation.final_model_path == tmp_path.resolve() / "out" / "final_model.pt"
    assert cfg.model.null_class == 2


def test_round_trip_through_plain_data(tmp_path: Path) -> None:
    cfg = load_federation_config(_write(tmp_path, tiny_federation(tmp_path)))
    assert config_from_dict(FedsynthConfig, config_to_dict(cfg), "copy") == cfg


@pytest.mark.parametrize(
    ("section", "values", "key", "reason"),
    [
        ("model", {"chanels": [8, 8]}, "model.chanels", "unknown key"),
        ("model", {"channels": [8, 10]}, "model.channels", "divisible by norm_num_groups"),
        ("model", {"channels": "8,8"}, "model.channels", "must be a list"),
        ("model", {"attention_levels": [False]}, "model.attention_levels", "one entry per level"),
        ("model", {"classes": ["a", "a"]}, "model.classes", "unique"),
        ("training", {"local_steps": 0}, "training.local_steps", "must be >= 1"),
        ("training", {"batch_size": "16"}, "training.batch_size", "must be an integer"),
        ("training", {"label_dropout": 1.5}, "training.label_dropout", "[0, 1)"),
        ("privacy", {"noise_multiplier": -1.0}, "privacy.noise_multiplier", "must be > 0"),
        ("privacy", {"enabled": "yes"}, "privacy.enabled", "true or false"),
        ("privacy", {"accountant": "gdp"}, "privacy.accountant", "must be one of"),
        ("diffusion", {"schedule": "quadratic"}, "diffusion.schedule", "must be one of"),
        ("federation", {"min_available_nodes": 1, "min_train_nodes": 2}, "federation.min_available_nodes", ">= min_train_nodes"),
        ("data", {"image_size": 17}, "data.image_size", "divisible by"),
        ("federation", {"evaluate_every": -1}, "federation.evaluate_every", "must be >= 0"),
        ("federation", {"evaluate_every": 1.5}, "federation.evaluate_every", "must be an integer"),
        ("data", {"slice_axis": 3}, "data.slice_axis", "0, 1 or 2"),
    ],
)
def test_bad_values_name_file_key_and_reason(tmp_path: Path, section: str, values: dict, key: str, reason: str) -> None:
    path = _write(tmp_path, tiny_federation(tmp_path, **{section: values}))
    with pytest.raises(ConfigError) as err:
        load_federation_config(path)
    message = str(err.value)
    assert str(path) in message
    assert key in message
    assert reason in message


def test_missing_required_section_and_bad_yaml(tmp_path: Path) -> None:
    data = tiny_federation(tmp_path)
    del data["federation"]
    with pytest.raises(ConfigError, match="federation: is required"):
        load_federation_config(_write(tmp_path, data))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_federation_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_federation_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_federation_config(_write(tmp_path, [1, 2], "list.yaml"))


def test_site_config_budget_validation(tmp_path: Path) -> None:
    site = {"site_id": "hospital-a", "data_dir": "data", "state_dir": "state",
            "privacy_budget": {"epsilon": 8, "delta": "1e-5"}}
    cfg = load_site_config(_write(tmp_path, site, "site.yaml"))
    assert cfg.privacy_budget.delta == 1e-5
    assert cfg.data_dir == str((tmp_path / "data").resolve())
    site["privacy_budget"] = {"epsilon": 0, "delta": 1e-5}
    with pytest.raises(ConfigError, match=r"privacy_budget.epsilon: must be in \(0, 100\]"):
        load_site_config(_write(tmp_path, site, "site.yaml"))
    site["privacy_budget"] = {"epsilon": 8}
    with pytest.raises(ConfigError, match="privacy_budget.delta: is required"):
        load_site_config(_write(tmp_path, site, "site.yaml"))
    site["privacy_budget"] = {"epsilon": 8, "delta": 1e-5}
    site["site_id"] = "hospital a/b"
    with pytest.raises(ConfigError, match="site_id"):
        load_site_config(_write(tmp_path, site, "site.yaml"))


@pytest.mark.parametrize("name", ["federation.example.yaml", "site.example.yaml"])
def test_shipped_example_configs_are_valid(name: str) -> None:
    path = Path(__file__).resolve().parents[2] / "configs" / name
    (load_federation_config if name.startswith("federation") else load_site_config)(path)
