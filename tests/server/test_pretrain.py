"""``fedsynth pretrain``: central training on a public set, its checkpoint, provenance and exclusion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from common.checkpoint import load_checkpoint
from common.errors import ConfigError, SiteDataError
from common.model import pick_device
from server.cli import main as cli_main
from common.config import load_federation_config
from server.pretrain import CentralSettings, PretrainRequest, WeightEMA, run_pretrain, train_central
from server.pretrain_data import data_digest, near_duplicates
from server.sampler import build_sampling_model, sample_images
from tests.conftest import tiny_federation, write_shapes_dataset


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(tiny_federation(tmp_path / "server")))
    return path


def test_pretrain_writes_a_sampleable_checkpoint_with_provenance_and_drops_excluded_copies(tmp_path: Path) -> None:
    data = write_shapes_dataset(tmp_path / "public", per_class=6, size=16)
    # A folder like common/demo_data: one public image re-encoded darker (Pearson r = 1), one unrelated image.
    planted = tmp_path / "private" / "disc"
    planted.mkdir(parents=True)
    copy = np.asarray(Image.open(data / "disc" / "disc-03.png"), dtype=np.float32) * 0.5 + 20
    Image.fromarray(copy.astype(np.uint8)).save(planted / "copy.png")
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (16, 16), dtype=np.uint8)).save(planted / "noise.png")
    out = tmp_path / "ckpt" / "pretrained.pt"

    rc = cli_main(["pretrain", "--data", str(data), "--config", str(_config(tmp_path)), "--out", str(out), "--steps", "4",
                   "--log-every", "2", "--exclude", str(tmp_path / "private"), "--description", "shapes v1", "--seed", "3"])
    assert rc == 0

    ckpt = load_checkpoint(out)
    assert ckpt.rounds_completed == 0 and ckpt.sites == {}
    p = ckpt.provenance
    assert p["kind"] == "pretrained" and p["description"] == "shapes v1"
    assert (p["num_images"], p["excluded"], p["per_class"]) == (11, 1, {"disc": 5, "ring": 6})
    files = sorted(data.rglob("*.png"))
    assert p["data_sha256"] == data_digest([(f.relative_to(data).as_posix(), f) for f in files])
    assert (p["steps"], p["batch_size"], p["learning_rate"], p["ema_decay"], p["seed"]) == (4, 4, 1e-3, 0.999, 3)
    assert p["data_dir"] == str(data.resolve()) and p["seconds"] > 0
    assert ckpt.config.model.init_checkpoint == ""

    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "pretrained.pt.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["ema"]) and r["seconds"] >= 0 for r in rows)

    model = build_sampling_model(ckpt.config, ckpt.arrays, pick_device())
    images = sample_images(ckpt.config, model, [0, 1], [0, 1], steps=2, progress=False)
    assert images.shape == (2, 16, 16) and np.isfinite(images).all()

    # Never over an existing checkpoint unless asked.
    before = out.read_bytes()
    args = ["pretrain", "--data", str(data), "--config", str(_config(tmp_path)), "--out", str(out), "--steps", "1"]
    assert cli_main(args) == 2
    assert out.read_bytes() == before
    assert cli_main([*args, "--force"]) == 0
    assert load_checkpoint(out).provenance["steps"] == 1 and load_checkpoint(out).provenance["excluded"] == 0


def test_class_folders_must_match_the_federation_classes(tmp_path: Path) -> None:
    config = _config(tmp_path)
    data = write_shapes_dataset(tmp_path / "public", per_class=3, size=16)

    def request(folder: Path) -> PretrainRequest:
        return PretrainRequest(data_dir=folder, config=config, out=tmp_path / "p.pt", steps=1)

    (data / "cube").mkdir()
    shutil.copy(data / "disc" / "disc-00.png", data / "cube" / "cube-00.png")
    with pytest.raises(ConfigError, match=r"public/cube: class folder 'cube' is not one of model.classes"):
        run_pretrain(request(data), progress=False)
    shutil.rmtree(data / "cube")
    shutil.rmtree(data / "ring")
    with pytest.raises(ConfigError, match=r"public/ring: missing; every class of model.classes"):
        run_pretrain(request(data), progress=False)
    with pytest.raises(SiteDataError, match=r"nowhere: public data folder not found"):
        run_pretrain(request(tmp_path / "nowhere"), progress=False)
    with pytest.raises(ConfigError, match="--ema-decay must be in"):
        run_pretrain(PretrainRequest(data_dir=data, config=config, out=tmp_path / "p.pt", ema_decay=1.0), progress=False)
    assert not (tmp_path / "p.pt").exists()


def test_near_duplicates_catch_rescaled_copies_only() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 1, 16, 16)).astype(np.float32)
    references = np.stack([images[1, 0] * 0.3 - 0.2, rng.normal(size=(16, 16))]).astype(np.float32)
    from server.pretrain_data import at_compare_size

    mask = near_duplicates(images, at_compare_size(references[:, None]))
    assert mask.tolist() == [False, True, False]


def test_weight_ema_is_bias_corrected() -> None:
    param = torch.nn.Parameter(torch.full((3,), 2.0))
    ema = WeightEMA([param], 0.999)
    ema.update()
    assert torch.allclose(ema.averaged()[0], param)  # uncorrected it would be 0.002
    with torch.no_grad():
        param.fill_(4.0)
    ema.update()
    assert torch.allclose(ema.averaged()[0], torch.full((3,), (0.999 * 2 + 4) / 1.999))
    assert torch.equal(WeightEMA([param], 0.0).averaged()[0], param.detach())


def test_central_training_starts_from_given_weights(tmp_path: Path) -> None:
    cfg = load_federation_config(_config(tmp_path))
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (8, 1, 16, 16)).astype(np.float32)
    labels = np.arange(8) % 2
    # lr 1e-12 and no EMA: one step leaves the start (nearly) where it was
    still = CentralSettings(steps=1, batch_size=4, learning_rate=1e-12, label_dropout=0.0, ema_decay=0.0, seed=0)
    fresh, _ = train_central(cfg, images, labels, still)
    start = {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in fresh.items()}
    arrays, _ = train_central(cfg, images, labels, still, initial=start)
    assert all(np.allclose(arrays[k], start[k], atol=1e-6) for k in start)
    assert not all(np.allclose(fresh[k], start[k], atol=1e-3) for k in start)
    with pytest.raises(ValueError, match="do not match the model"):
        train_central(cfg, images, labels, still, initial={k: v for k, v in list(start.items())[1:]})
