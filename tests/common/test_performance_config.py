"""The performance settings of a federation config: defaults, and one test per validation error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.config import FedsynthConfig, config_from_dict, load_federation_config
from common.errors import ConfigError
from tests.conftest import tiny_federation


def test_defaults_keep_float32_transfer_and_fedsynth_dp() -> None:
    cfg = config_from_dict(FedsynthConfig, tiny_federation(Path("out")), "test")
    assert cfg.federation.transfer_dtype == "float32"
    assert cfg.privacy.grad_sample_mode == "fedsynth"
    assert cfg.training.mixed_precision == "auto"


@pytest.mark.parametrize(
    ("section", "values"),
    [
        ("federation", {"transfer_dtype": "float16"}),
        ("privacy", {"grad_sample_mode": "hooks"}),
        ("privacy", {"grad_sample_mode": "functorch"}),
        ("training", {"mixed_precision": "off"}),
        ("training", {"mixed_precision": "bf16"}),
    ],
)
def test_allowed_values_load(section: str, values: dict) -> None:
    cfg = config_from_dict(FedsynthConfig, tiny_federation(Path("out"), **{section: values}), "test")
    key, value = next(iter(values.items()))
    assert getattr(getattr(cfg, section), key) == value


@pytest.mark.parametrize(
    ("section", "values", "key", "reason"),
    [
        ("federation", {"transfer_dtype": "bfloat16"}, "federation.transfer_dtype", "must be one of ['float32', 'float16']"),
        ("federation", {"transfer_dtype": 16}, "federation.transfer_dtype", "must be a string"),
        ("privacy", {"grad_sample_mode": "ghost"}, "privacy.grad_sample_mode", "must be one of"),
        ("training", {"mixed_precision": "fp16"}, "training.mixed_precision", "must be one of ['auto', 'off', 'bf16']"),
        ("training", {"mixed_precision": True}, "training.mixed_precision", "must be a string"),
    ],
)
def test_bad_values_name_file_key_and_reason(tmp_path: Path, section: str, values: dict, key: str, reason: str) -> None:
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(tiny_federation(tmp_path, **{section: values})))
    with pytest.raises(ConfigError) as err:
        load_federation_config(path)
    message = str(err.value)
    assert str(path) in message and key in message and reason in message
