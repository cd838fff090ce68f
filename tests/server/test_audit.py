"""The federated memorisation audit in a real Flower simulation: a site holding a copy is flagged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from common.checkpoint import Checkpoint, save_checkpoint
from common.config import FedsynthConfig, load_federation_config
from common.errors import ConfigError
from common.model import build_unet, trainable_state
from server.audit_app import parse_thresholds
from server.simulation import run_simulation
from server.synthetic_set import SampleRequest, generate_synthetic_set
from tests.conftest import tiny_federation, write_shapes_dataset, write_site


# A site's default policy answers 20 distinct images or more, and counts from 5 patients up.
NUM_SYNTHETIC = 24
NUM_COPIED = 5


def _synthetic_set(tmp_path: Path, cfg: FedsynthConfig) -> Path:
    rng = np.random.default_rng(0)
    arrays = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in trainable_state(build_unet(cfg.model)).items()}
    ckpt = save_checkpoint(tmp_path / "model.pt", Checkpoint(cfg, arrays, 1))
    out = tmp_path / "samples"
    generate_synthetic_set(SampleRequest(checkpoint=ckpt, num=NUM_SYNTHETIC, out=out, steps=3, seed=5), progress=False)
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the local simulation stops processes through /proc (Linux)")
def test_audit_flags_only_the_site_holding_a_copy(tmp_path: Path) -> None:
    fed_path = tmp_path / "federation.yaml"
    fed_path.write_text(yaml.safe_dump(tiny_federation(tmp_path / "server")))
    cfg = load_federation_config(fed_path)
    torch.manual_seed(0)
    samples = _synthetic_set(tmp_path, cfg)
    manifest = json.loads((samples / "manifest.json").read_text())
    data_a = write_shapes_dataset(tmp_path / "data-a", per_class=6, seed=1)
    for i, copied in enumerate(manifest["images"][3:3 + NUM_COPIED]):  # patients' scans, "memorised"
        shutil.copy(samples / copied["png"], data_a / copied["class"] / f"leaked-copy-{i}.png")
    data_b = write_shapes_dataset(tmp_path / "data-b", per_class=6, seed=2)
    sites = [write_site(tmp_path / "sites", "site-a", data_a), write_site(tmp_path / "sites", "site-b", data_b)]
    audit_out = tmp_path / "audit" / "audit.json"

    result = run_simulation(cfg, fed_path, sites, tmp_path / "work", progress=False, extra_run_config={
        "mode": "audit", "audit-synthetic": str(samples), "audit-thresholds": "1e-4,0.05", "audit-out": str(audit_out)})

    assert result.status == "finished:completed"
    audit = json.loads(audit_out.read_text())
    by_site = {s["site_id"]: s for s in audit["sites"]}
    assert set(by_site) == {"site-a", "site-b"} and audit["failures"] == []
    assert by_site["site-a"]["counts_below"][0] == NUM_COPIED and by_site["site-a"]["flagged"]
    assert by_site["site-b"]["counts_below"][0] == 0 and not by_site["site-b"]["flagged"]
    assert audit["flagged_sites"] == ["site-a"] and audit["num_synthetic"] == NUM_SYNTHETIC
    assert audit["quantile_levels"] == [0.25, 0.5]  # the levels a default policy answers for 24 images
    assert by_site["site-a"]["num_local"] == 12 + NUM_COPIED and by_site["site-b"]["num_local"] == 12
    assert by_site["site-a"]["count_floor"] == 5 and by_site["site-a"]["num_distinct"] == NUM_SYNTHETIC
    # Only aggregates came back: no per-image distance list, no image, no file name.
    assert set(by_site["site-a"]) == {"site_id", "num_local", "num_synthetic", "num_distinct", "count_floor",
                                      "counts_below", "distance_quantiles", "flagged"}
    assert len(by_site["site-a"]["distance_quantiles"]) == len(audit["quantile_levels"])
    assert not (tmp_path / "server" / "checkpoints").exists()  # the audit trained nothing


def test_thresholds_are_validated() -> None:
    assert parse_thresholds("") == pytest.approx([1e-6, 0.01, 0.02, 0.05])
    assert parse_thresholds("0.02, 0.1") == [0.02, 0.1]
    with pytest.raises(ConfigError, match="comma-separated numbers"):
        parse_thresholds("0.1;0.2")
    with pytest.raises(ConfigError, match=r"in \[0, 2\]"):
        parse_thresholds("3")

