"""AdamW's state stays at the site between rounds of a run; the learning rate warms up over the run's first steps."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from client.client_app import train_reply_content
from client.optimizer_state import OPTIMIZER_STATE_FILE
from client.site_data import SiteSlices
from client.training import TrainResult, train_round, warmup_learning_rate
from common import keys
from common.config import FedsynthConfig, SiteConfig, config_from_dict, load_site_config
from common.model import build_unet, trainable_state
from tests.conftest import tiny_federation, write_site

STEPS = 3


def _slices(n: int = 20) -> SiteSlices:
    rng = np.random.default_rng(0)
    return SiteSlices(images=rng.uniform(-1, 1, (n, 1, 16, 16)).astype(np.float32),
                      labels=(np.arange(n) % 2).astype(np.int64), patients=[f"p{i:03d}" for i in range(n)],
                      classes=("disc", "ring"))


def _setup(tmp_path: Path, **training: object) -> tuple[FedsynthConfig, SiteConfig]:
    cfg = config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server", training={"local_steps": STEPS, **training}),
                           "t")
    site = load_site_config(write_site(tmp_path / "sites", "a", tmp_path / "data"))
    return cfg, site


def _round(cfg: FedsynthConfig, site: SiteConfig, run_id: str, server_round: int,
           model_cfg: FedsynthConfig | None = None) -> TrainResult:
    weights = trainable_state(build_unet((model_cfg or cfg).model))
    return train_round(model_cfg or cfg, site, _slices(), weights, run_id=run_id, server_round=server_round)


def _saved(site: SiteConfig) -> dict:
    return torch.load(Path(site.state_dir) / OPTIMIZER_STATE_FILE, weights_only=True)


def _adam_steps(site: SiteConfig) -> set[float]:
    return {float(entry["step"]) for entry in _saved(site)["moments"].values()}


def test_the_next_round_of_the_run_resumes_the_moments(tmp_path: Path) -> None:
    cfg, site = _setup(tmp_path)
    _round(cfg, site, "run-1", 1)
    assert _adam_steps(site) == {STEPS} and _saved(site)["steps"] == STEPS
    first = {i: e["exp_avg_sq"].clone() for i, e in _saved(site)["moments"].items()}
    _round(cfg, site, "run-1", 2)
    assert _adam_steps(site) == {2 * STEPS} and _saved(site)["steps"] == 2 * STEPS  # AdamW's count continues
    assert any(not torch.equal(first[i], e["exp_avg_sq"]) for i, e in _saved(site)["moments"].items())
    mode = stat.S_IMODE((Path(site.state_dir) / OPTIMIZER_STATE_FILE).stat().st_mode)
    assert mode == 0o600


def test_a_round_sent_again_does_not_resume_its_own_state(tmp_path: Path) -> None:
    """A retried round cannot start from the moments it produced itself: fresh, as in a new run."""
    cfg, site = _setup(tmp_path)
    _round(cfg, site, "run-1", 1)
    _round(cfg, site, "run-1", 1)
    assert _adam_steps(site) == {STEPS}
    _round(cfg, site, "run-1", 3)  # a site left out of round 2 still resumes its latest state
    assert _adam_steps(site) == {2 * STEPS}


def test_a_new_run_or_another_model_starts_fresh(tmp_path: Path) -> None:
    cfg, site = _setup(tmp_path)
    _round(cfg, site, "run-1", 1)
    _round(cfg, site, "run-2", 1)
    assert _adam_steps(site) == {STEPS} and _saved(site)["run_id"] == "run-2"
    wider = config_from_dict(FedsynthConfig, tiny_federation(
        tmp_path / "server", model={"channels": [8, 16]}, training={"local_steps": STEPS}), "t")
    _round(cfg, site, "run-2", 2, model_cfg=wider)
    assert _adam_steps(site) == {STEPS}


@pytest.mark.parametrize("content", [b"not a torch file", None], ids=["garbage", "wrong-shapes"])
def test_a_corrupt_state_file_is_ignored_with_a_warning(tmp_path: Path, content: bytes | None,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    cfg, site = _setup(tmp_path)
    _round(cfg, site, "run-1", 1)
    path = Path(site.state_dir) / OPTIMIZER_STATE_FILE
    if content is None:  # a readable file whose moments do not fit the parameters they claim to
        saved = _saved(site)
        saved["moments"][0]["exp_avg"] = torch.zeros(3)
        torch.save(saved, path)
    else:
        path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="fedsynth.client"):
        _round(cfg, site, "run-1", 2)
    assert any(OPTIMIZER_STATE_FILE in r.getMessage() and "starts fresh" in r.getMessage() for r in caplog.records)
    assert _adam_steps(site) == {STEPS}


def test_keep_optimizer_state_false_keeps_no_moments(tmp_path: Path) -> None:
    cfg, site = _setup(tmp_path, keep_optimizer_state=False)
    _round(cfg, site, "run-1", 1)
    assert not (Path(site.state_dir) / OPTIMIZER_STATE_FILE).exists()
    cfg = config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server", training={
        "local_steps": STEPS, "keep_optimizer_state": False, "warmup_steps": 10}), "t")
    _round(cfg, site, "run-1", 2)
    assert _saved(site)["moments"] == {} and _saved(site)["steps"] == STEPS  # only the warm-up's step count


def test_the_moments_never_leave_the_site(tmp_path: Path) -> None:
    cfg, site = _setup(tmp_path)
    result = _round(cfg, site, "run-1", 1)
    content = train_reply_content(result, site.site_id, cfg.federation.transfer_dtype)
    assert set(content[keys.ARRAYS].keys()) == set(trainable_state(build_unet(cfg.model)))
    moments = [t.numpy() for e in _saved(site)["moments"].values() for k, t in e.items() if k != "step"]
    sent = [np.asarray(a.numpy()) for a in content[keys.ARRAYS].values()]
    assert not any(a.shape == m.shape and np.array_equal(a, m) for a in sent for m in moments)
    assert set(content) == {keys.ARRAYS, keys.METRICS, keys.SITE}


def test_warmup_rises_linearly_over_the_runs_first_steps(tmp_path: Path) -> None:
    assert [warmup_learning_rate(1.0, 4, s) for s in (1, 2, 3, 4, 5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_learning_rate(0.3, 0, 1) == 0.3
    cfg, site = _setup(tmp_path, warmup_steps=5)
    applied: list[float] = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: applied.append(opt.param_groups[0]["lr"]))
    try:
        _round(cfg, site, "run-1", 1)
        _round(cfg, site, "run-1", 2)  # the warm-up goes on where round 1 stopped
    finally:
        hook.remove()
    lr = cfg.training.learning_rate
    assert applied == pytest.approx([lr * s / 5 for s in (1, 2, 3, 4)] + [lr, lr])
