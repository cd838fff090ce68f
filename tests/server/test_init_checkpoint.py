"""``model.init_checkpoint``: a fresh run starts from it, mismatches and changed files are refused,
and its record travels into checkpoints, synthetic sets, model cards and the demo."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from common.checkpoint import Checkpoint, file_sha256, load_checkpoint, round_checkpoint_path, save_checkpoint
from common.config import FedsynthConfig, config_from_dict, load_federation_config
from common.errors import CheckpointError, ConfigError
from common.model import build_unet, trainable_state
from server.demo import CLASSES, DemoSettings, write_demo_configs
from server.init_weights import init_record
from server.model_card import render_model_card
from server.server_app import _starting_point
from server.synthetic_set import SampleRequest, generate_synthetic_set
from tests.conftest import tiny_federation

PRETRAINING = {"kind": "pretrained", "description": "public shapes v2", "data_sha256": "ab" * 32, "num_images": 40,
               "per_class": {"disc": 20, "ring": 20}, "excluded": 3, "steps": 10}


def _save_init(path: Path, cfg: FedsynthConfig, seed: int = 7, provenance: dict | None = None) -> Checkpoint:
    torch.manual_seed(seed)
    ckpt = Checkpoint(cfg, trainable_state(build_unet(cfg.model)), 0, provenance=dict(provenance or PRETRAINING))
    save_checkpoint(path, ckpt)
    return ckpt


def _federation(tmp_path: Path, **model: object) -> tuple[Path, FedsynthConfig]:
    raw = tiny_federation(tmp_path / "server", model=model)
    path = tmp_path / "conf" / "federation.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path, load_federation_config(path)


def test_a_fresh_run_starts_from_the_init_checkpoint_and_records_it(tmp_path: Path) -> None:
    fed_path, plain = _federation(tmp_path)
    init = _save_init(tmp_path / "conf" / "init.pt", plain)
    _, cfg = _federation(tmp_path, init_checkpoint="init.pt")  # relative to the config file
    assert cfg.model.init_checkpoint == str((tmp_path / "conf" / "init.pt").resolve())

    start = _starting_point(cfg, str(fed_path))
    assert start.rounds_done == 0 and start.sites == {}
    assert all(np.array_equal(start.arrays[k], init.arrays[k]) for k in init.arrays)
    assert start.provenance["init"] == {"kind": "checkpoint", "path": cfg.model.init_checkpoint,
                                        "sha256": file_sha256(tmp_path / "conf" / "init.pt"),
                                        "description": "public shapes v2", "pretraining": PRETRAINING}
    random_start = _starting_point(plain)
    assert random_start.provenance == {"init": {"kind": "random", "seed": plain.training.seed}}
    assert not np.array_equal(random_start.arrays["conv_in.conv.weight"], init.arrays["conv_in.conv.weight"])


def test_an_init_checkpoint_that_does_not_fit_is_refused_naming_both_files_and_the_field(tmp_path: Path) -> None:
    fed_path, plain = _federation(tmp_path)
    wider = dataclasses.replace(plain, model=dataclasses.replace(plain.model, channels=(8, 16)))
    _save_init(tmp_path / "wide.pt", wider)
    _, cfg = _federation(tmp_path, init_checkpoint=str(tmp_path / "wide.pt"))
    with pytest.raises(ConfigError, match=r"wide.pt does not fit .*federation.yaml: its model.channels is \[8, 16\], "
                                          r"the config's is \[8, 8\]"):
        _starting_point(cfg, str(fed_path))

    larger = dataclasses.replace(plain, data=dataclasses.replace(plain.data, image_size=32))
    _save_init(tmp_path / "large.pt", larger)
    _, cfg = _federation(tmp_path, init_checkpoint=str(tmp_path / "large.pt"))
    with pytest.raises(ConfigError, match=r"large.pt does not fit .*federation.yaml: its data.image_size is 32, the config's is 16"):
        _starting_point(cfg, str(fed_path))

    _, cfg = _federation(tmp_path, init_checkpoint="missing.pt")
    with pytest.raises(CheckpointError, match=r"model.init_checkpoint in .*federation.yaml: .*conf/missing.pt: checkpoint not found"):
        _starting_point(cfg, str(fed_path))


def test_resume_requires_the_recorded_init_file(tmp_path: Path) -> None:
    fed_path, plain = _federation(tmp_path)
    init_path = tmp_path / "conf" / "init.pt"
    init = _save_init(init_path, plain)
    _, cfg = _federation(tmp_path, init_checkpoint="init.pt")
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, resume=True))
    record = init_record(cfg, init)
    save_checkpoint(round_checkpoint_path(cfg.federation.checkpoint_dir, 1),
                    Checkpoint(cfg, init.arrays, 1, {"site-a": {"epsilon": 1.0}}, provenance={"init": record}))

    start = _starting_point(cfg, str(fed_path))
    assert start.rounds_done == 1 and start.provenance["init"]["sha256"] == record["sha256"]

    _save_init(init_path, plain, seed=8)  # same name, other weights
    with pytest.raises(ConfigError, match=rf"init.pt: model.init_checkpoint in .*federation.yaml has SHA-256 "
                                          rf"{file_sha256(init_path)}, but the run in .* started from .* with SHA-256 {record['sha256']}"):
        _starting_point(cfg, str(fed_path))
    init_path.unlink()
    with pytest.raises(ConfigError, match="init.pt: model.init_checkpoint in .* not found"):
        _starting_point(cfg, str(fed_path))
    without = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_checkpoint=""))
    with pytest.raises(ConfigError, match="no longer sets"):
        _starting_point(without, str(fed_path))


def test_resume_of_a_random_start_refuses_a_newly_set_init(tmp_path: Path) -> None:
    fed_path, plain = _federation(tmp_path)
    plain = dataclasses.replace(plain, federation=dataclasses.replace(plain.federation, resume=True))
    _save_init(tmp_path / "init.pt", plain)
    arrays = trainable_state(build_unet(plain.model))
    # A checkpoint written before provenance existed resumes as the random start it was.
    save_checkpoint(round_checkpoint_path(plain.federation.checkpoint_dir, 1), Checkpoint(plain, arrays, 1))
    assert _starting_point(plain).provenance == {"init": {"kind": "random", "seed": 0}}
    with_init = dataclasses.replace(plain, model=dataclasses.replace(plain.model, init_checkpoint=str(tmp_path / "init.pt")))
    with pytest.raises(ConfigError, match="record no init checkpoint"):
        _starting_point(with_init, str(fed_path))
    save_checkpoint(round_checkpoint_path(plain.federation.checkpoint_dir, 2),
                    Checkpoint(plain, arrays, 2, provenance={"init": {"kind": "random", "seed": 0}}))
    with pytest.raises(ConfigError, match="started from random weights, but .* now sets model.init_checkpoint"):
        _starting_point(with_init, str(fed_path))


def test_synthetic_set_manifest_and_model_card_name_the_init(tmp_path: Path) -> None:
    _, plain = _federation(tmp_path)
    init = _save_init(tmp_path / "init.pt", plain)
    cfg = dataclasses.replace(plain, model=dataclasses.replace(plain.model, init_checkpoint=str(tmp_path / "init.pt")))
    record = init_record(cfg, init)
    sites = {"site-a": {"epsilon": 2.5, "delta": 1e-5, "num_examples": 30, "rounds": 2},
             "site-b": {"epsilon": float("inf"), "delta": 1e-5, "num_examples": 12, "rounds": 1}}
    save_checkpoint(tmp_path / "final.pt", Checkpoint(cfg, init.arrays, 2, sites, provenance={"init": record}))

    manifest = generate_synthetic_set(SampleRequest(checkpoint=tmp_path / "final.pt", num=2, out=tmp_path / "set", steps=2),
                                      progress=False)
    assert manifest["init"] == {"kind": "checkpoint", "sha256": record["sha256"], "description": "public shapes v2"}
    assert json.loads((tmp_path / "set" / "manifest.json").read_text())["init"] == manifest["init"]
    card = (tmp_path / "set" / "model_card.md").read_text()
    assert f"SHA-256 `{file_sha256(tmp_path / 'final.pt')}`" in card
    assert f"SHA-256 `{record['sha256']}`" in card and "public shapes v2" in card and "ab" * 32 in card
    assert "Not for diagnosis" in card
    assert "| site-a | 2.5 | 1e-05 | 30 | 2 |" in card and "| site-b | no DP (unbounded) |" in card

    pretrained_card = render_model_card(load_checkpoint(tmp_path / "init.pt"))
    assert "pretrained centrally" in pretrained_card and "without differential privacy" in pretrained_card


def test_demo_takes_model_settings_from_the_shipped_checkpoint(tmp_path: Path) -> None:
    raw = tiny_federation(tmp_path / "x", model={"classes": list(CLASSES)}, data={"image_size": 16})
    init_cfg = config_from_dict(FedsynthConfig, raw, "test")
    _save_init(tmp_path / "demo.pt", init_cfg)
    fed_path, _ = write_demo_configs(tmp_path / "demo", DemoSettings(), tmp_path / "demo.pt")
    cfg = load_federation_config(fed_path)
    assert cfg.model.architecture() == init_cfg.model and cfg.data.image_size == 16
    assert cfg.model.init_checkpoint == str((tmp_path / "demo.pt").resolve())
    assert _starting_point(cfg, str(fed_path)).provenance["init"]["description"] == "public shapes v2"

    other = config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "x"), "test")
    _save_init(tmp_path / "other.pt", other)
    with pytest.raises(ConfigError, match=r"other.pt: its classes \['disc', 'ring'\] are not the demo's"):
        write_demo_configs(tmp_path / "demo2", DemoSettings(), tmp_path / "other.pt")


def test_provenance_is_saved_loaded_and_checked(tmp_path: Path) -> None:
    _, cfg = _federation(tmp_path)
    ckpt = _save_init(tmp_path / "a.pt", cfg)
    assert load_checkpoint(tmp_path / "a.pt").provenance == PRETRAINING
    payload = torch.load(tmp_path / "a.pt", weights_only=True)
    del payload["metadata"]["provenance"]  # as written before the field existed
    torch.save(payload, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt")
    assert old.provenance == {} and all(np.array_equal(old.arrays[k], ckpt.arrays[k]) for k in ckpt.arrays)
    payload["metadata"]["provenance"] = ["not", "a", "mapping"]
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad.pt: checkpoint provenance is a list, not a mapping"):
        load_checkpoint(tmp_path / "bad.pt")
