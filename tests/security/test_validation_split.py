"""The site fixes its own held-out split: a coordinator cannot have trained patients reported as held out
(the probe trained with val_fraction 0.0 and evaluated with 0.89)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client.client_app import app
from client.ledger import PrivacyLedger
from client.site_data import SiteSlices
from client.training import split_patients, train_round, validation_loss
from common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from common import keys
from common.config import FedsynthConfig, config_from_dict, load_federation_config, load_site_config
from common.errors import ConfigError
from common.model import build_unet, trainable_state
from tests.conftest import tiny_federation, write_site


def test_a_federation_config_naming_val_fraction_is_refused_on_load(tmp_path: Path) -> None:
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(tiny_federation(tmp_path, training={"val_fraction": 0.0})))
    with pytest.raises(ConfigError) as err:
        load_federation_config(path)
    assert str(path) in str(err.value) and "training.val_fraction" in str(err.value)
    assert "val_fraction in the site config" in str(err.value)


def test_a_checkpoint_written_before_the_move_still_loads(tmp_path: Path) -> None:
    cfg = config_from_dict(FedsynthConfig, tiny_federation(tmp_path), "t")
    path = save_checkpoint(tmp_path / "old.pt", Checkpoint(cfg, trainable_state(build_unet(cfg.model)), 1, {}))
    payload = torch.load(path, weights_only=True)
    payload["config"]["training"]["val_fraction"] = 0.1  # as every checkpoint before the move held it
    torch.save(payload, path)
    assert load_checkpoint(path).config == cfg


@pytest.mark.parametrize(("message_type", "val_fraction"), [(MessageType.TRAIN, 0.0), (MessageType.EVALUATE, 0.89)])
def test_a_task_choosing_the_split_is_refused_and_costs_nothing(tmp_path: Path, message_type: str,
                                                                 val_fraction: float) -> None:
    raw = tiny_federation(tmp_path / "server")
    raw["training"]["val_fraction"] = val_fraction
    metadata = Metadata(run_id=7, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=600.0, message_type=message_type)
    task = Message(metadata=metadata, content=RecordDict({
        keys.ARRAYS: ArrayRecord(array_dict={"w": Array(np.zeros(3, np.float32))}),
        keys.CONFIG: ConfigRecord({keys.FEDERATION_CONFIG: json.dumps(raw), keys.SERVER_ROUND: 1}),
    }))
    site_yaml = write_site(tmp_path / "sites", "site-a", tmp_path / "no-data-needed")
    reply = app(task, Context(run_id=7, node_id=1, node_config={keys.NODE_SITE_CONFIG: str(site_yaml)},
                              state=RecordDict(), run_config={}))
    assert reply.has_error() and reply.error.code == keys.ERROR_CONFIG
    assert reply.error.reason.startswith("training.val_fraction: no longer a federation setting")
    assert str(tmp_path) not in reply.error.reason
    assert PrivacyLedger.open(tmp_path / "sites" / "site-a" / "state").total_steps == 0  # nothing reserved


def test_site_val_fraction_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="val_fraction: must be in \\[0, 0.9\\), got 0.95"):
        load_site_config(write_site(tmp_path, "a", tmp_path / "data", val_fraction=0.95))


def test_no_patient_reported_as_held_out_was_trained_on(tmp_path: Path) -> None:
    """Held-out slices are NaN: had training touched one, the weights would be NaN. Non-private training
    with a batch larger than the site uses every training patient in its one step, so the check is total."""
    n = 40
    patients = [f"p{i // 2:03d}" for i in range(n)]  # 20 patients of 2 slices
    site = load_site_config(write_site(tmp_path, "a", tmp_path / "data", val_fraction=0.3, allow_non_private=True))
    images = np.random.default_rng(0).uniform(-1, 1, (n, 1, 16, 16)).astype(np.float32)
    probe = SiteSlices(images=images, labels=(np.arange(n) % 2).astype(np.int64), patients=patients, classes=("disc", "ring"))
    train_groups, val_groups = split_patients(probe, site.val_fraction)
    assert train_groups and val_groups
    images[np.concatenate(val_groups)] = np.nan
    raw = tiny_federation(tmp_path / "server", privacy={"enabled": False},
                          training={"local_steps": 1, "batch_size": 64})
    cfg = config_from_dict(FedsynthConfig, raw, "t")
    start = trainable_state(build_unet(cfg.model))
    result = train_round(cfg, site, probe, start)
    assert result.num_examples == len(train_groups)
    assert all(np.isfinite(v).all() for v in result.arrays.values())
    assert any(not np.array_equal(result.arrays[k], start[k]) for k in start)
    loss, count = validation_loss(cfg, probe, result.arrays, site.val_fraction)
    assert count == sum(len(g) for g in val_groups) and np.isnan(loss)  # exactly the held-out (NaN) slices
