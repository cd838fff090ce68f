"""The pretrained starting point shipped with the project (common/pretrained/demo.pt)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from common.checkpoint import file_sha256, load_checkpoint
from common.config import load_federation_config
from server.demo import CLASSES, DEMO_PRETRAINED, DemoSettings, demo_init_checkpoint, write_demo_configs

README = DEMO_PRETRAINED.parent / "README.md"


def test_shipped_checkpoint_loads_fits_the_demo_and_says_where_it_comes_from() -> None:
    assert DEMO_PRETRAINED.is_file(), "common/pretrained/demo.pt is part of the project"
    ckpt = load_checkpoint(DEMO_PRETRAINED)  # names, shapes, dtype and finiteness checked on load
    assert ckpt.config.model.classes == CLASSES
    assert ckpt.rounds_completed == 0
    prov = ckpt.provenance
    assert prov["kind"] == "pretrained"
    assert sum(prov["per_class"].values()) == prov["num_images"] > 1000
    # made disjoint from the demo's hospitals: their folder was excluded, and something was dropped
    assert [Path(d).parts[-2:] for d in prov["exclude_dirs"]] == [("common", "demo_data")]
    assert prov["excluded"] > 0
    assert demo_init_checkpoint(DemoSettings()) == DEMO_PRETRAINED
    assert demo_init_checkpoint(DemoSettings(use_pretrained=False)) is None


def test_its_readme_names_the_file_it_describes() -> None:
    """The documented SHA-256 and data counts are those of the shipped file, not of an older one."""
    text = README.read_text()
    assert file_sha256(DEMO_PRETRAINED) in text
    prov = load_checkpoint(DEMO_PRETRAINED).provenance
    assert f"{prov['num_images']:,}" in text and f"{prov['steps']:,}" in text
    assert "Cheng" in text  # the attribution the data's licence asks for
    schedule = load_checkpoint(DEMO_PRETRAINED).config.diffusion.schedule
    assert f"MONAI's `{schedule}` noise schedule" in " ".join(text.split())


def test_random_init_demo_differs_from_the_shipped_start_only_in_the_weights(tmp_path: Path) -> None:
    """`fedsynth demo --random-init` trains the shipped checkpoint's model with its noise schedule."""
    shipped = load_checkpoint(DEMO_PRETRAINED).config
    fed_path, _ = write_demo_configs(tmp_path / "demo", DemoSettings(use_pretrained=False))
    cfg = load_federation_config(fed_path)
    assert cfg.diffusion == shipped.diffusion
    assert dataclasses.replace(cfg.model, init_checkpoint=shipped.model.init_checkpoint) == shipped.model
    assert cfg.data.image_size == shipped.data.image_size
