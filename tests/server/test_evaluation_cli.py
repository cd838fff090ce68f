"""``fedsynth evaluate`` on a real sampler output folder: report.json keys and a self-contained report.html."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import Checkpoint, save_checkpoint
from common.config import FedsynthConfig, config_from_dict
from common.model import build_unet, trainable_state
from server.cli import main as cli_main
from server.synthetic_set import SampleRequest, generate_synthetic_set
from tests.conftest import tiny_federation, write_shapes_dataset


@pytest.fixture()
def sampler_output(tmp_path: Path) -> Path:
    cfg = config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server"), "test")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    arrays = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in trainable_state(build_unet(cfg.model)).items()}
    ckpt = save_checkpoint(tmp_path / "model.pt", Checkpoint(cfg, arrays, 2))
    out = tmp_path / "samples"
    generate_synthetic_set(SampleRequest(checkpoint=ckpt, num=8, out=out, steps=3, seed=1), progress=False)
    return out


def test_evaluate_cli_writes_complete_reports(sampler_output: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    real_test = write_shapes_dataset(tmp_path / "test", per_class=6, seed=3)
    real_train = write_shapes_dataset(tmp_path / "train", per_class=8, seed=4)
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"round": 1, "phase": "train", "kind": "site", "site_id": "a", "train-loss": 1.1, "epsilon": 0.5},
            {"round": 1, "phase": "train", "kind": "aggregate", "train-loss": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    argv = ["evaluate", "--synthetic", str(sampler_output), "--real-test", str(real_test), "--real-train", str(real_train),
            "--run", str(run), "--out", str(out), "--classifier-steps", "30", "--cache-dir", str(tmp_path / "cache")]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and " ± " in printed and "SD over classifier seeds" in printed

    report = json.loads((out / "report.json").read_text())
    assert report["inputs"]["image_size"] == 16  # from the manifest
    assert report["inputs"]["synthetic_counts"] == {"disc": 4, "ring": 4}  # each image once, not NIfTI + PNG
    fid = report["fidelity"]
    assert fid["fid"] > 0 and set(fid["fid_per_class"]) == {"disc", "ring"} and fid["histogram_distance"] > 0
    assert 0 < report["diversity"]["ms_ssim_synthetic"] <= 1 and 0 < report["diversity"]["ms_ssim_real"] <= 1
    util = report["utility"]
    assert {"tstr_accuracy", "trtr_accuracy", "ratio"} <= set(util)
    assert util["classifier_repeats"] == 3 and [r["seed"] for r in util["tstr_runs"]] == [0, 1, 2]  # the CLI default
    assert util["tstr_balanced_accuracy"] == pytest.approx(np.mean([r["balanced_accuracy"] for r in util["tstr_runs"]]))
    assert util["tstr_balanced_accuracy_sd"] is not None and len(util["trtr_runs"]) == 3
    mem = report["memorisation"]
    assert 0 <= mem["fraction_below_p1"] <= 1 and mem["num_synthetic"] == 8 and mem["num_train"] == 16
    assert len(mem["closest_pairs"]) == 8
    assert report["training"]["train_loss"] == [[1, 1.0]]
    assert report["feature_network"]["trained_on"] == "real_train" and not report["feature_network"]["from_cache"]

    html = (out / "report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', html)) >= 4 + 8  # samples per class and set, closest pairs
    assert html.count("<svg") >= 4  # intensity, distances, loss, epsilon
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing to fetch: opens offline

    # Same inputs again: the feature network comes from the cache and the numbers repeat.
    assert cli_main(argv) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["feature_network"]["from_cache"] and again["fidelity"] == report["fidelity"]


def test_evaluate_cli_errors_name_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    real = write_shapes_dataset(tmp_path / "real", per_class=3)
    code = cli_main(["evaluate", "--synthetic", str(tmp_path / "missing"), "--real-test", str(real), "--out", str(tmp_path / "o")])
    assert code == 2 and "missing: image folder not found" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    code = cli_main(["evaluate", "--synthetic", str(tmp_path / "bad"), "--real-test", str(real), "--out", str(tmp_path / "o")])
    assert code == 2 and "manifest.json: not a readable sampler manifest" in capsys.readouterr().err


def test_evaluate_cli_refuses_no_classifier_and_writes_nothing(sampler_output: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    real = write_shapes_dataset(tmp_path / "real", per_class=3)
    out = tmp_path / "o"
    code = cli_main(["evaluate", "--synthetic", str(sampler_output), "--real-test", str(real), "--out", str(out),
                     "--classifier-repeats", "0"])
    assert code == 2 and "--classifier-repeats must be at least 1, got 0" in capsys.readouterr().err
    assert not out.exists()
