"""Shared fixtures: tiny models and generated site data, small enough for a 2-core CI machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_CLASSES = ["disc", "ring"]


def tiny_federation(output_dir: Path, **overrides: dict) -> dict:
    """A federation config as plain data: 16 px images, a 2-level UNet of ~30k parameters."""
    cfg = {
        "federation": {"output_dir": str(output_dir), "num_rounds": 2, "min_train_nodes": 2, "min_available_nodes": 2,
                       "round_timeout_s": 600.0},
        "model": {"classes": TINY_CLASSES, "channels": [8, 8], "attention_levels": [False, True],
                  "num_res_blocks": 1, "norm_num_groups": 4, "num_head_channels": 8},
        "diffusion": {"num_train_timesteps": 100},
        "training": {"local_steps": 3, "batch_size": 4, "learning_rate": 1e-3},
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0},
        "data": {"image_size": 16},
    }
    for section, values in overrides.items():
        cfg[section].update(values)
    return cfg


def write_shapes_dataset(root: Path, per_class: int = 12, size: int = 24, seed: int = 0) -> Path:
    """``<root>/disc/*.png`` and ``<root>/ring/*.png``: simple, learnable, generated on the fly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for label in TINY_CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
            r = np.hypot(yy - cy, xx - cx)
            radius = rng.uniform(size * 0.2, size * 0.35)
            mask = r < radius if label == "disc" else (r < radius) & (r > radius * 0.6)
            image = (mask * rng.uniform(150, 250) + rng.normal(0, 5, mask.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / label / f"{label}-{i:02d}.png")
    return root


def write_site(root: Path, site_id: str, data_dir: Path, epsilon: float = 50.0, val_fraction: float = 0.2,
               init: bool = True, **extra: object) -> Path:
    """A site config; ``init`` also creates its empty privacy ledger, as the admin does once."""
    from client.ledger import init_ledger

    path = root / site_id / "site.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = {"site_id": site_id, "data_dir": str(data_dir), "state_dir": str(root / site_id / "state"),
           "privacy_budget": {"epsilon": epsilon, "delta": 1e-5}, "val_fraction": val_fraction, **extra}
    path.write_text(yaml.safe_dump(cfg))
    if init:
        init_ledger(root / site_id / "state", site_id)
    return path


@pytest.fixture()
def shapes_data(tmp_path: Path) -> Path:
    return write_shapes_dataset(tmp_path / "data")
