"""The quality benchmark's rows (bench/quality_runs.py) run end to end at toy size: public pretraining,
a DP row from it through the ServerApp's strategy, parameter-efficient fine-tuning, "minus EMA" scoring."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from client.site_data import SiteSlices
from common.checkpoint import load_checkpoint
from common.model import build_unet
from server.evaluation.classifier import ClassifierSettings
from server.evaluation.evaluate import EvaluationSettings
from server.evaluation.image_sets import ImageSet
from server.sampler import sampling_weights

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
try:
    import quality
    import quality_jobs as qj
    import quality_runs as qr
    import quality_train as qt
finally:
    sys.path.remove(str(REPO / "bench"))

CLASSES = ("disc", "ring")
TOY_MACHINE = {"date": "today", "nproc": 2, "cpu": "cpu", "gpu": None, "torch": "x", "torch_threads": 1}


def _slices(rng: np.random.Generator, n: int, prefix: str) -> SiteSlices:
    return SiteSlices(images=rng.uniform(-1, 1, (n, 1, 16, 16)).astype(np.float32), labels=np.arange(n) % 2,
                      patients=[f"{prefix}{i}" for i in range(n)], classes=CLASSES)


def _toy_hospitals(rng: np.random.Generator) -> tuple[dict[str, SiteSlices], SiteSlices, ImageSet]:
    """Two toy hospitals, their union (the central rows' data), and hospital a as the real set."""
    sites = {"a": _slices(rng, 12, "a"), "b": _slices(rng, 10, "b")}
    central = SiteSlices(np.concatenate([s.images for s in sites.values()]),
                         np.concatenate([s.labels for s in sites.values()]),
                         [q for s in sites.values() for q in s.patients], CLASSES)
    real = ImageSet(sites["a"].images, sites["a"].labels, CLASSES, sites["a"].patients, "toy")
    return sites, central, real


def _pretrain_then_finetune(p: qt.ModelPreset, run_dir: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Public pretraining and a federated row from its checkpoint, at toy size, in ``run_dir``: the row's weights."""
    sites, central, real = _toy_hospitals(rng)
    evaluation = EvaluationSettings(classifier=ClassifierSettings(steps=2, batch_size=8, width=4))
    qj.init_worker(qj.BenchmarkInputs(model=p, sites=sites, central=central, public=central, plans={},
                                      real_test=real, real_train=real, evaluation=evaluation, run_dir=run_dir,
                                      epsilon=8.0, delta=1e-5, seed=0, threads=1), None)
    qj.train_and_score("public_only", 4, 2, 1.0)
    _, arrays, _ = qj.train_and_score("federated_pretrained", 4, 2, 1.0)
    return arrays


def test_dependencies_pull_in_pretraining_and_the_source_run() -> None:
    assert qr.with_dependencies(["ablation_no_ema"]) == ["public_only", "federated_dp_pretrained", "ablation_no_ema"]
    assert qr.with_dependencies(["central"]) == ["central"]
    assert qr.with_dependencies(["federated_pretrained"]) == ["public_only", "federated_pretrained"]


def test_recipe_rows_at_toy_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sites, central, real = _toy_hospitals(rng)
    p = qt.ModelPreset(image_size=16, channels=(8, 8), rounds=2, local_steps=2, batch_size=4, learning_rate=1e-3,
                       ema_decay=0.5, warmup_steps=2, noise_multiplicity=2, central_ema_decay=0.9, pretrain_steps=3,
                       pretrain_batch_size=4, dp_batch_sizes=(2, 4))
    plans = {"planner": qt.plan_dp(sites, p, 8.0, 1e-5, planner=True),
             "fixed batch": qt.plan_dp(sites, p, 8.0, 1e-5, planner=False)}
    assert plans["fixed batch"].batch_size == 4 and plans["planner"].batch_size in (2, 4)
    assert all(s["epsilon"] <= 8.0 for plan in plans.values() for s in plan.per_site.values())
    inputs = qj.BenchmarkInputs(model=p, sites=sites, central=central, public=_slices(rng, 8, "pub"), plans=plans,
                                real_test=real, real_train=real,
                                evaluation=EvaluationSettings(classifier=ClassifierSettings(steps=2, batch_size=8, width=4)),
                                run_dir=tmp_path, epsilon=8.0, delta=1e-5, seed=0, threads=1)
    qj.init_worker(inputs, None)

    public, _, _ = qj.train_and_score("public_only", 4, 2, 1.0)
    assert public["optimiser_steps"] == 3 and load_checkpoint(tmp_path / "public_only" / "model.pt").provenance["kind"] == "pretrained"

    full, ema, raw = qj.train_and_score("federated_dp_pretrained", 4, 2, 1.0)
    assert full["weights"] == "ema" and full["noise_multiplicity"] == 2 and full["batch_size"] == plans["planner"].batch_size
    assert full["optimiser_steps"] == 2 * 2 * 2 and all(e is not None and e <= 8.0 for e in full["epsilon"].values())
    assert any(not np.array_equal(ema[k], raw[k]) for k in ema)  # "minus EMA" scores different weights
    ckpt = load_checkpoint(tmp_path / "federated_dp_pretrained" / "model.pt")
    assert ckpt.provenance["init"]["kind"] == "checkpoint" and ckpt.ema is not None
    full_init_sha = ckpt.provenance["init"]["sha256"]
    sampled, which = sampling_weights(ckpt)  # what `fedsynth sample` takes by default: the EMA
    assert which == "ema" and all(np.array_equal(sampled[k], ema[k]) for k in ema)

    central, _, _ = qj.train_and_score("central_pretrained", 4, 2, 1.0)
    ckpt = load_checkpoint(tmp_path / "central_pretrained" / "model.pt")
    assert central["optimiser_steps"] == 2 * 2 * 2 and ckpt.provenance["init"]["kind"] == "checkpoint"
    assert ckpt.provenance["init"]["sha256"] == full_init_sha  # the same public start as the DP rows

    no_ema = qj.score_weights("ablation_no_ema", raw, full, 4, 2, 1.0)
    assert no_ema["weights"] == "global" and no_ema["train_seconds"] == 0.0

    efficient, arrays, _ = qj.train_and_score("federated_dp_pretrained_efficient", 4, 2, 1.0)
    init = load_checkpoint(tmp_path / "public_only" / "model.pt").arrays
    frozen = [k for k in init if np.array_equal(init[k], arrays[k])]
    assert frozen and len(frozen) < len(init)  # only the efficient subset moved


def test_every_preset_is_a_valid_federation_whose_unet_builds(tmp_path: Path) -> None:
    """A preset that only fails after an hour of loading and pretraining is a benchmark nobody can run."""
    for name, preset in quality.PRESETS.items():
        model = preset["model"]
        for dp in (False, True):
            cfg = qt.federation_config(model, CLASSES, tmp_path / name, model.local_steps, dp=dp)
            assert list(cfg.model.channels) == list(model.channels), name
        unet = build_unet(cfg.model)
        assert sum(p.numel() for p in unet.parameters()) > 0, name
        assert preset["samples"] >= len(CLASSES) and preset["classifier_steps"] > 0, name
        assert preset["classifier_repeats"] >= 1, name


def test_several_sampling_sets_score_disjoint_draws_and_their_pool(tmp_path: Path) -> None:
    """The first set is the one-set run's images; the others are new draws; the pool is all of them."""
    rng = np.random.default_rng(1)
    sites, central, real = _toy_hospitals(rng)
    p = qt.ModelPreset(image_size=16, channels=(8, 8), rounds=1, local_steps=2, batch_size=4, learning_rate=1e-3,
                       warmup_steps=1, central_ema_decay=0.5)
    evaluation = EvaluationSettings(classifier=ClassifierSettings(steps=2, batch_size=8, width=4))
    inputs = qj.BenchmarkInputs(model=p, sites=sites, central=central, public=central, plans={}, real_test=real,
                                real_train=real, evaluation=evaluation, run_dir=tmp_path, epsilon=8.0, delta=1e-5,
                                seed=0, threads=1)
    qj.init_worker(inputs, None)
    one, arrays, _ = qj.train_and_score("central", 4, 2, 1.0)
    assert "sets" not in one

    qj.init_worker(dataclasses.replace(inputs, sampling_sets=3), None)
    three = qj.score_weights("ablation_no_ema", arrays, one, 4, 2, 1.0)
    sets = three["sets"]
    assert (sets["count"], sets["samples"], len(sets["summaries"])) == (3, 4, 3)
    assert three["summary"] == sets["summaries"][0]
    assert sets["summaries"][0]["fid"] == pytest.approx(one["summary"]["fid"], rel=1e-4)
    assert len({s["fid"] for s in sets["summaries"]}) == 3  # three different draws
    assert sets["pooled"]["fid"] not in {s["fid"] for s in sets["summaries"]}

    text = quality.markdown_table({"preset": "toy", "reduced": True, "machine": TOY_MACHINE,
                                   "runs": {"central": one, "ablation_no_ema": three}})
    sets_table = text.split("several sets of sampled images")[1]
    assert "| 3 x 4 |" in sets_table and "central" not in sets_table.split("\n", 3)[3]


def test_fewer_than_one_sampling_set_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    assert quality.main(["--sampling-sets", "0", "--data", str(tmp_path), "--out", str(out)]) == 2
    assert "--sampling-sets must be at least 1, got 0" in capsys.readouterr().err
    assert not out.exists()


def test_rows_from_pretraining_train_at_the_finetuning_rate(tmp_path: Path) -> None:
    """Pretraining keeps the preset's rate; every row that starts from its checkpoint takes the fine-tuning rate."""
    moved = {}
    for rate in (1e-3, 1e-7):
        p = qt.ModelPreset(image_size=16, channels=(8, 8), rounds=1, local_steps=2, batch_size=4, learning_rate=1e-3,
                           finetune_learning_rate=rate, pretrain_steps=2, pretrain_batch_size=4)
        run_dir = tmp_path / f"rate-{rate}"
        arrays = _pretrain_then_finetune(p, run_dir, np.random.default_rng(2))
        public = load_checkpoint(run_dir / "public_only" / "model.pt")
        row = load_checkpoint(run_dir / "federated_pretrained" / "model.pt")
        assert public.config.training.learning_rate == 1e-3
        assert row.config.training.learning_rate == rate
        moved[rate] = sum(float(np.abs(arrays[k] - public.arrays[k]).sum()) for k in public.arrays)
    assert moved[1e-7] < moved[1e-3] / 100  # the rate reached the sites' optimiser, not just the config


def test_a_finetuning_rate_that_is_not_positive_is_refused_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    assert quality.main(["--finetune-learning-rate", "0", "--data", str(tmp_path), "--out", str(out)]) == 2
    assert "--finetune-learning-rate must be positive, got 0.0" in capsys.readouterr().err
    assert not out.exists()


def test_the_noise_schedule_reaches_pretraining_the_rows_and_their_checkpoints(tmp_path: Path) -> None:
    """``--schedule`` is the diffusion schedule both of training and of what ``fedsynth sample`` reads back."""
    trained = {}
    for schedule in ("linear_beta", "cosine"):
        p = qt.ModelPreset(image_size=16, channels=(8, 8), rounds=1, local_steps=2, batch_size=4, learning_rate=1e-3,
                           schedule=schedule, pretrain_steps=2, pretrain_batch_size=4)
        run_dir = tmp_path / schedule
        trained[schedule] = _pretrain_then_finetune(p, run_dir, np.random.default_rng(3))
        for row in ("public_only", "federated_pretrained"):
            assert load_checkpoint(run_dir / row / "model.pt").config.diffusion.schedule == schedule
        text = quality.markdown_table({"preset": "toy", "reduced": False, "machine": TOY_MACHINE, "runs": {},
                                       "model": dataclasses.asdict(p)})
        assert f"noise schedule `{schedule}`" in text.split("|")[0]  # the table says which recipe it is
    # same seeds, same data: only the noise levels of the training steps differ
    assert any(not np.array_equal(trained["linear_beta"][k], trained["cosine"][k]) for k in trained["cosine"])


def test_an_unknown_noise_schedule_is_refused_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "q"
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--schedule", "sigmoid", "--data", str(tmp_path), "--out", str(out)])
    assert exit_info.value.code == 2
    assert not out.exists()
