"""A hostile server must not be able to reproduce a site's DP round from what it sent.

The old round seed was sha256(training.seed:site_id:round): a server replaying a round on a
candidate dataset matched the site's weights exactly, which is certain membership inference.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from client.round_rng import RoundRandomness, fill_from_entropy, is_seeded_state
from client.site_data import SiteSlices
from client.training import _round_seed, train_round
from common.config import FedsynthConfig, SiteConfig, config_from_dict, load_site_config
from common.model import build_unet, trainable_state
from tests.conftest import tiny_federation, write_site


def _cfg(tmp_path: Path, mode: str) -> FedsynthConfig:
    return config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server", privacy={"grad_sample_mode": mode}), "t")


def _slices(n: int = 24) -> SiteSlices:
    rng = np.random.default_rng(0)
    return SiteSlices(images=rng.uniform(-1, 1, (n, 1, 16, 16)).astype(np.float32),
                      labels=(np.arange(n) % 2).astype(np.int64), patients=[f"p{i:03d}" for i in range(n)],
                      classes=("disc", "ring"))


def _weights(cfg: FedsynthConfig) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return trainable_state(build_unet(cfg.model))


def _site(tmp_path: Path, name: str, **extra: object) -> SiteConfig:
    return load_site_config(write_site(tmp_path / name, "a", tmp_path / "data", **extra))


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


def _server_replay(cfg: FedsynthConfig, slices: SiteSlices, weights: dict, tmp_path: Path) -> dict[str, np.ndarray]:
    """What the server could compute before the fix: the round seeded from the config it sent."""
    old_seed = int.from_bytes(hashlib.sha256(f"{cfg.training.seed}:a:1".encode()).digest()[:4], "big")
    # The site's unsafe switch seeds exactly as the old code did: this run is the old replay.
    assert _round_seed(cfg, "a", 1) == old_seed
    return train_round(cfg, _site(tmp_path, "replay", unsafe_reproducible_dp=True), slices, weights, server_round=1).arrays


@pytest.mark.parametrize("mode", ["fedsynth", "hooks"])
def test_a_dp_round_is_neither_repeatable_nor_replayable_from_the_config(tmp_path: Path, mode: str) -> None:
    cfg, slices = _cfg(tmp_path, mode), _slices()
    weights = _weights(cfg)
    site = _site(tmp_path, "site")
    first = train_round(cfg, site, slices, weights, run_id="r", server_round=1).arrays
    torch.manual_seed(0)  # whatever the process's global RNG was, the round must not depend on it
    second = train_round(cfg, site, slices, weights, run_id="r", server_round=1).arrays
    assert not _same(first, second)
    replay = _server_replay(cfg, slices, weights, tmp_path)
    assert not _same(first, replay) and not _same(second, replay)


def test_the_sites_unsafe_switch_is_what_makes_dp_repeatable_and_it_is_loud(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    cfg, slices = _cfg(tmp_path, "fedsynth"), _slices()
    weights = _weights(cfg)
    site = _site(tmp_path, "unsafe", unsafe_reproducible_dp=True)
    with caplog.at_level(logging.WARNING, logger="fedsynth.client"):
        first = train_round(cfg, site, slices, weights, server_round=1)
        second = train_round(cfg, site, slices, weights, server_round=1)
    assert _same(first.arrays, second.arrays)
    assert _same(first.arrays, _server_replay(cfg, slices, weights, tmp_path))
    assert first.unsafe_reproducible_dp and second.unsafe_reproducible_dp
    assert sum("UNSAFE" in r.getMessage() for r in caplog.records) == 3  # every round, the replay's included


def test_non_private_rounds_keep_the_config_seed(tmp_path: Path) -> None:
    raw = tiny_federation(tmp_path / "server", privacy={"enabled": False})
    cfg, slices = config_from_dict(FedsynthConfig, raw, "t"), _slices()
    site = _site(tmp_path, "plain", allow_non_private=True)
    first = train_round(cfg, site, slices, _weights(cfg), server_round=1)
    second = train_round(cfg, site, slices, _weights(cfg), server_round=1)
    assert _same(first.arrays, second.arrays) and not first.unsafe_reproducible_dp


def test_entropy_fills_the_whole_cpu_generator_state() -> None:
    # Why a seed is not enough: torch's CPU generator keeps only the low 32 bits of it.
    assert torch.equal(torch.rand(4, generator=torch.Generator().manual_seed(1)),
                       torch.rand(4, generator=torch.Generator().manual_seed(1 + 2**32)))
    a, b = fill_from_entropy(torch.Generator()), fill_from_entropy(torch.Generator())
    assert not is_seeded_state(a) and not is_seeded_state(b)  # a state no manual_seed reaches
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))
    assert is_seeded_state(torch.Generator().manual_seed(12345))
    RoundRandomness().seed_global()
    assert not is_seeded_state(torch.default_generator)
    assert not is_seeded_state(RoundRandomness().cpu_generator())
    assert RoundRandomness().numpy_seed() != RoundRandomness().numpy_seed()
    RoundRandomness(7).seed_global()
    assert is_seeded_state(torch.default_generator)
