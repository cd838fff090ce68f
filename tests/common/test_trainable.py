"""training.trainable: which UNet parameters train under DP and travel (common/trainable.py)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from common.config import FedsynthConfig, config_from_dict, config_to_dict, load_federation_config
from common.errors import ConfigError
from common.model import build_unet, trainable_shapes
from common.trainable import EFFICIENT_PATTERNS, freeze_outside, select, trainable_count, trainable_names
from tests.conftest import tiny_federation

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "federation.example.yaml"


def _cfg(tmp_path: Path, trainable: object) -> FedsynthConfig:
    return config_from_dict(FedsynthConfig, tiny_federation(tmp_path, training={"trainable": trainable}), "fed.yaml")


def test_efficient_subset_of_the_example_model() -> None:
    cfg = load_federation_config(EXAMPLE)
    assert cfg.training.trainable == "all"
    efficient = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, trainable="efficient"))
    names = set(trainable_names(efficient))
    for kept in ("time_embed.0.weight", "time_embed.2.bias", "class_embedding.weight",
                 "down_blocks.0.resnets.0.norm1.weight", "middle_block.resnet_2.norm2.bias",
                 "down_blocks.1.resnets.0.time_emb_proj.weight", "down_blocks.2.attentions.0.attn.to_q.weight",
                 "up_blocks.0.attentions.1.norm.bias", "middle_block.attention.attn.out_proj.weight",
                 "out.0.weight", "out.2.conv.bias"):
        assert kept in names, kept
    for frozen in ("conv_in.conv.weight", "down_blocks.0.resnets.0.conv1.conv.weight",
                   "down_blocks.1.resnets.0.skip_connection.conv.weight", "down_blocks.0.downsampler.op.conv.weight",
                   "up_blocks.0.upsampler.postconv.conv.weight", "middle_block.resnet_1.conv2.conv.bias"):
        assert frozen not in names, frozen
    total = sum(math.prod(s) for s in trainable_shapes(cfg.model).values())
    share = trainable_count(efficient) / total
    assert total == 1_113_441 and trainable_count(efficient) == 170_241  # 15.3% (docs/performance.md)
    assert 0.1 < share < 0.2
    # Every built-in pattern selects something in the example model: none is dead weight in the list.
    all_names = list(trainable_shapes(cfg.model))
    assert all(select(all_names, (p,)) for p in EFFICIENT_PATTERNS)


def test_patterns_select_in_model_order_and_all_is_everything(tmp_path: Path) -> None:
    names = list(trainable_shapes(_cfg(tmp_path, "all").model))
    assert trainable_names(_cfg(tmp_path, "all")) == tuple(names)
    chosen = trainable_names(_cfg(tmp_path, ["out.*", "time_embed.*"]))
    assert chosen == tuple(n for n in names if n.startswith(("time_embed.", "out.")))
    assert list(chosen) == [n for n in names if n in chosen]


@pytest.mark.parametrize("patterns", [["out.*", "Time_embed.*"], ["no.such.layer"]])
def test_a_pattern_matching_nothing_is_named_with_the_field(tmp_path: Path, patterns: list[str]) -> None:
    cfg = _cfg(tmp_path, patterns)  # the config alone cannot know the model's names
    bad = patterns[-1]
    with pytest.raises(ConfigError, match=f"training.trainable: pattern '{bad}' matches no parameter") as err:
        trainable_names(cfg)
    assert err.value.public == str(err.value)  # config values only: a site may tell the server


@pytest.mark.parametrize(("value", "reason"), [
    ("some", "must be 'all', 'efficient' or a list of glob patterns"),
    ([], "non-empty list"),
    (["out.*", ""], "non-empty string"),
    (["out.*", "out.*"], "unique"),
    (["x"] * 65, "at most 64 patterns"),
    (["a" * 201], "at most 200 characters"),
    (3, "must be a str or a list, got int"),
    ([1], r"\[0\]: must be a string"),
])
def test_bad_values_are_refused_on_load(tmp_path: Path, value: object, reason: str) -> None:
    with pytest.raises(ConfigError, match=f"fed.yaml: training.trainable.*{reason}"):
        _cfg(tmp_path, value)


def test_a_pattern_list_survives_yaml_and_the_json_sent_to_sites(tmp_path: Path) -> None:
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(tiny_federation(tmp_path / "out", training={"trainable": ["out.*", "*.norm1.*"]})))
    cfg = load_federation_config(path)
    assert cfg.training.trainable == ("out.*", "*.norm1.*")
    again = config_from_dict(FedsynthConfig, config_to_dict(cfg), "sent")
    assert again.training.trainable == cfg.training.trainable


def test_freeze_outside_switches_gradients_off(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "efficient")
    model = build_unet(cfg.model)
    chosen = freeze_outside(model, cfg.training.trainable)
    assert chosen == trainable_names(cfg)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(chosen)
    assert 0 < len(chosen) < len(list(model.parameters()))
