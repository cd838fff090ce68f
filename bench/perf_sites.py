"""Generated federations for the performance benchmarks: N sites of shapes data and one federation YAML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from client.ledger import init_ledger
from common.config import FedsynthConfig, SiteConfig, load_federation_config, load_site_config
from tests.conftest import tiny_federation, write_shapes_dataset, write_site

# REFERENCE.md's "tiny" UNet (0.28M parameters at 32 px) and a 10M-parameter one for transfer costs.
TINY_32 = {"channels": [16, 32, 32], "attention_levels": [False, False, True], "norm_num_groups": 8, "num_head_channels": 8}
SMALL = {"channels": [32, 64, 64], "attention_levels": [False, False, True], "norm_num_groups": 8, "num_head_channels": 8}
PARAMS_10M = {"channels": [96, 192, 192], "attention_levels": [False, False, True], "norm_num_groups": 8, "num_head_channels": 8}


@dataclass(frozen=True)
class Federation:
    config_path: Path
    cfg: FedsynthConfig
    site_paths: list[Path]

    def sites(self) -> list[SiteConfig]:
        return [load_site_config(p) for p in self.site_paths]


def make_federation(root: Path, num_sites: int, *, model: dict | None = None, image_size: int = 16,
                    training: dict | None = None, federation: dict | None = None, privacy: dict | None = None,
                    patients_per_class: int = 12, site_prefix: str = "site") -> Federation:
    """``root/data/<site>``, ``root/sites/<site>/site.yaml`` and ``root/federation.yaml`` (outputs in ``root/server``)."""
    root.mkdir(parents=True, exist_ok=True)
    site_paths = []
    for i in range(num_sites):
        name = f"{site_prefix}-{i:02d}"
        data = write_shapes_dataset(root / "data" / name, per_class=patients_per_class, size=max(image_size, 24), seed=i)
        site_paths.append(write_site(root / "sites", name, data, epsilon=100.0))
    fed = {"min_train_nodes": num_sites, "min_available_nodes": num_sites, "quorum": 1, "num_rounds": 3,
           **(federation or {})}
    raw = tiny_federation(root / "server", federation=fed, training=training or {}, privacy=privacy or {},
                          data={"image_size": image_size})
    if model:
        raw["model"].update(model)
    path = root / "federation.yaml"
    path.write_text(yaml.safe_dump(raw))
    return Federation(path, load_federation_config(path), site_paths)


def fresh_site_copy(site_path: Path, root: Path) -> SiteConfig:
    """The same site's data with its own state folder (ledger, audit): in-process baselines must not
    spend the privacy budget of the sites the federation uses."""
    site = load_site_config(site_path)
    data = yaml.safe_load(site_path.read_text())
    copy = root / site.site_id / "site.yaml"
    copy.parent.mkdir(parents=True, exist_ok=True)
    data["state_dir"] = str(root / site.site_id / "state")
    copy.write_text(yaml.safe_dump(data))
    init_ledger(data["state_dir"], site.site_id)
    return load_site_config(copy)
