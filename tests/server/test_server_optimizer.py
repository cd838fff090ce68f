"""Server optimisers (Flower's FedAvgM/FedAdam/FedYogi/FedAdagrad) and the EMA of the global weights.

Rounds run through Flower's own strategy loop over an in-process Grid (sites are functions
here), so the checks, the optimiser and the checkpoints are the ServerApp's; the real
simulation with Ray and the resume across runs is in test_simulation.py.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from common import keys
from common.checkpoint import Checkpoint, check_output_dir, load_checkpoint, round_checkpoint_path, save_checkpoint
from common.config import FedsynthConfig, config_from_dict
from common.errors import CheckpointError, ConfigError
from common.model import build_unet, trainable_state
from common.server_state import ema_update
from server.in_process import InProcessGrid
from server.sampler import sampling_weights
from server.strategy import CheckpointingFedAvg, arrays_to_numpy, build_strategy
from tests.conftest import tiny_federation

REPO = Path(__file__).resolve().parents[2]
FIRST = "time_embed.0.weight"
OPTIONS = {"fedavgm": {"server_momentum": 0.9}, "fedadam": {"eta": 0.01}, "fedyogi": {}, "fedadagrad": {"eta": 0.05}}


def _cfg(out: Path, optimizer: str = "fedadam", ema: float = 0.9, **federation: object) -> FedsynthConfig:
    raw = tiny_federation(out, federation={"server_optimizer": optimizer, "ema_decay": ema,
                                           **OPTIONS.get(optimizer, {}), **federation})
    return config_from_dict(FedsynthConfig, raw, "test")


def _site(shift: float, num_examples: int) -> Callable[[Message], RecordDict]:
    """A deterministic 'site': shrinks the global weights a little and moves them by ``shift``."""
    def train(msg: Message) -> RecordDict:
        arrays = arrays_to_numpy(msg.content[keys.ARRAYS])
        return RecordDict({
            keys.ARRAYS: ArrayRecord({k: Array((0.9 * v + shift).astype(np.float32)) for k, v in arrays.items()}),
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: num_examples, keys.EPSILON: 1.0, keys.DELTA: 1e-5}),
            keys.SITE: ConfigRecord({keys.SITE_ID: f"site-{num_examples}"}),
        })
    return train


def _initial(cfg: FedsynthConfig) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return trainable_state(build_unet(cfg.model))


def _run(cfg: FedsynthConfig, arrays: dict[str, np.ndarray], rounds: int, **resume: object) -> CheckpointingFedAvg:
    strategy = build_strategy(cfg, **resume)
    strategy.start(grid=InProcessGrid([_site(0.01, 3), _site(-0.02, 1)]), num_rounds=rounds,
                   initial_arrays=ArrayRecord({k: Array(v) for k, v in arrays.items()}), train_config=ConfigRecord())
    return strategy


# ---------------------------------------------------------------------------------------- EMA math

def test_ema_is_bias_corrected_and_continues_exactly_from_its_saved_state(tmp_path: Path) -> None:
    w = [{"a": np.full(3, v, np.float32)} for v in (1.0, 2.0, 4.0)]
    one = ema_update(None, 0.9, w[0])
    assert np.array_equal(one.weights["a"], w[0]["a"])  # after round 1 the EMA is that round's weights
    assert np.allclose(one.accumulator["a"], 0.1)
    two = ema_update(one, 0.9, w[1])
    assert two.steps == 2 and np.allclose(two.weights["a"], (0.09 * 1 + 0.1 * 2) / 0.19)
    assert not np.allclose(two.accumulator["a"], two.weights["a"])  # without the correction: mostly zeros
    with pytest.raises(ValueError, match="differs"):
        ema_update(two, 0.5, w[2])

    # Through a checkpoint (float32 on disk) the next step is bit-identical to the uninterrupted one.
    cfg = _cfg(tmp_path / "s", "fedavg", 0.9)
    weights = _initial(cfg)
    state = None
    for scale in (1.0, 1.5):
        state = ema_update(state, 0.9, {k: v * scale for k, v in weights.items()})
    path = save_checkpoint(tmp_path / "ema.pt", Checkpoint(cfg, weights, 2, ema=state))
    resumed = load_checkpoint(path).ema
    third = {k: v * 3 for k, v in weights.items()}
    a, b = ema_update(state, 0.9, third), ema_update(resumed, 0.9, third)
    assert a.steps == b.steps == 3
    assert all(np.array_equal(a.weights[k], b.weights[k]) and np.array_equal(a.accumulator[k], b.accumulator[k]) for k in weights)


# ---------------------------------------------------------------------------------------- factory

@pytest.mark.parametrize(("name", "flower_class"), [("fedavg", FedAvg), ("fedavgm", FedAvgM), ("fedadam", FedAdam),
                                                   ("fedyogi", FedYogi), ("fedadagrad", FedAdagrad)])
def test_factory_builds_flowers_class_with_the_config_options(tmp_path: Path, name: str, flower_class: type) -> None:
    strategy = build_strategy(_cfg(tmp_path, name, 0.0))
    assert isinstance(strategy, flower_class) and isinstance(strategy, CheckpointingFedAvg)
    assert strategy.min_train_nodes == 2 and strategy.weighted_by_key == keys.NUM_EXAMPLES
    if name == "fedavgm":
        assert strategy.server_momentum == 0.9 and strategy.server_learning_rate == 1.0
    if name == "fedadam":
        assert (strategy.eta, strategy.beta_1, strategy.beta_2, strategy.tau) == (0.01, 0.9, 0.99, 1e-3)
    if name == "fedyogi":
        assert strategy.eta == 1e-2  # eta 0 in the config: Flower's own default for FedYogi
    if name == "fedadagrad":
        assert strategy.eta == 0.05 and strategy.beta_1 == 0.0


@pytest.mark.parametrize(("federation", "message"), [
    ({"server_optimizer": "sgd"}, "federation.server_optimizer: must be one of"),
    ({"eta": 0.1}, "federation.eta: is an option of server_optimizer fedadam or fedyogi or fedadagrad, not of 'fedavg'"),
    ({"server_optimizer": "fedadam", "server_momentum": 0.9}, "federation.server_momentum: is an option of server_optimizer fedavgm"),
    ({"server_optimizer": "fedadagrad", "beta_1": 0.5}, "federation.beta_1: is an option of server_optimizer fedadam or fedyogi"),
    ({"ema_decay": 1.0}, "federation.ema_decay: must be in [0, 1)"),
])
def test_bad_server_settings_are_named(tmp_path: Path, federation: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(FedsynthConfig, tiny_federation(tmp_path, federation=federation), "test")


def test_strategy_refuses_a_config_of_another_optimiser(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="build_strategy"):
        CheckpointingFedAvg(_cfg(tmp_path, "fedadam"))


# ---------------------------------------------------------------------------------------- rounds and resume

def test_fedadam_round_one_is_flowers_update_and_the_ema_is_kept(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "server", "fedadam", 0.9)
    w0 = _initial(cfg)
    _run(cfg, w0, rounds=1)
    ckpt = load_checkpoint(round_checkpoint_path(cfg.federation.checkpoint_dir, 1))
    delta = (3 * (0.9 * w0[FIRST] + 0.01) + (0.9 * w0[FIRST] - 0.02)) / 4 - w0[FIRST]
    m1, v1 = 0.1 * delta, 0.01 * delta ** 2
    eta_norm = 0.01 * np.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)  # Flower's bias correction at round 1
    slots = ckpt.optimizer.slots
    assert ckpt.optimizer.name == "fedadam" and set(slots) == {"current_arrays", "m_t", "v_t"}
    assert np.allclose(slots["m_t"][FIRST], m1, atol=1e-7) and np.allclose(slots["v_t"][FIRST], v1, atol=1e-9)
    assert np.allclose(ckpt.arrays[FIRST], w0[FIRST] + eta_norm * m1 / (np.sqrt(v1) + 1e-3), atol=1e-6)
    assert ckpt.ema.steps == 1 and np.array_equal(ckpt.ema.weights[FIRST], ckpt.arrays[FIRST])


@pytest.mark.parametrize("optimizer", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_resumed_run_continues_bit_for_bit(tmp_path: Path, optimizer: str) -> None:
    """2 rounds, a checkpoint, then 1 more round from it == 3 rounds in one go (weights, state, EMA)."""
    whole = _cfg(tmp_path / "whole", optimizer, 0.8, num_rounds=3)
    w0 = _initial(whole)
    _run(whole, w0, rounds=3)
    split = _cfg(tmp_path / "split", optimizer, 0.8, num_rounds=3)
    _run(split, w0, rounds=2)
    saved = load_checkpoint(round_checkpoint_path(split.federation.checkpoint_dir, 2))
    strategy = build_strategy(split, rounds_done=2, sites=saved.sites, optimizer=saved.optimizer, ema=saved.ema)
    after_load = strategy.optimizer_state()
    assert all(np.array_equal(after_load.slots[s][k], saved.optimizer.slots[s][k]) for s in saved.optimizer.slots for k in w0)
    _run(split, saved.arrays, rounds=1, rounds_done=2, sites=saved.sites, optimizer=saved.optimizer, ema=saved.ema)

    a = load_checkpoint(round_checkpoint_path(whole.federation.checkpoint_dir, 3))
    b = load_checkpoint(round_checkpoint_path(split.federation.checkpoint_dir, 3))
    assert b.rounds_completed == 3 and b.ema.steps == 3 and b.sites["site-3"]["rounds"] == 3
    assert set(a.optimizer.slots) == set(b.optimizer.slots) == set(saved.optimizer.slots)
    for k in w0:
        assert np.array_equal(a.arrays[k], b.arrays[k])
        assert np.array_equal(a.ema.accumulator[k], b.ema.accumulator[k]) and np.array_equal(a.ema.weights[k], b.ema.weights[k])
        assert all(np.array_equal(a.optimizer.slots[s][k], b.optimizer.slots[s][k]) for s in a.optimizer.slots)
    assert not np.array_equal(b.ema.weights[FIRST], b.arrays[FIRST])  # the sites train from the raw weights


def test_fedavg_through_the_strategy_is_the_weighted_mean(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "server", "fedavg", 0.0)
    w0 = _initial(cfg)
    strategy = _run(cfg, w0, rounds=1)
    ckpt = load_checkpoint(round_checkpoint_path(cfg.federation.checkpoint_dir, 1))
    assert strategy.optimizer_state() is None and ckpt.optimizer is None and ckpt.ema is None
    assert np.allclose(ckpt.arrays[FIRST], (3 * (0.9 * w0[FIRST] + 0.01) + 0.9 * w0[FIRST] - 0.02) / 4, atol=1e-7)


def test_resume_with_another_optimiser_or_decay_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "server", "fedadam", 0.9)
    _run(cfg, _initial(cfg), rounds=1)
    for federation, key in (({"server_optimizer": "fedyogi"}, "server_optimizer"), ({"ema_decay": 0.5}, "ema_decay")):
        other = _cfg(tmp_path / "server", "fedadam", 0.9, resume=True, **{"eta": 0.0, **federation})
        with pytest.raises(ConfigError, match=f"cannot resume with federation.{key} .* round-0001.pt was trained with"):
            check_output_dir(other)
    assert check_output_dir(_cfg(tmp_path / "server", "fedadam", 0.9, resume=True)).optimizer.name == "fedadam"


# ---------------------------------------------------------------------------------------- damaged checkpoints

def _set(*path: str, value: object) -> Callable[[dict], None]:
    def damage(p: dict) -> None:
        target = p
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value
    return damage


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _drop_first(arrays: dict) -> dict:
    return {k: v for k, v in arrays.items() if k != FIRST}


DAMAGE = {
    "NaN in m_t": (_set("server_optimizer", "slots", "m_t", FIRST, value=_nan), "server_optimizer.m_t array 'time_embed.0.weight' holds NaN"),
    "float64 v_t": (_set("server_optimizer", "slots", "v_t", FIRST, value=lambda t: t.double()), "server_optimizer.v_t array .* is torch.float64"),
    "unknown slot": (_set("server_optimizer", "slots", "momentum_vector", value={}), "slot 'momentum_vector', which fedadam does not keep"),
    "other optimiser": (_set("server_optimizer", "name", value="fedyogi"), "holds the state of 'fedyogi'"),
    "EMA array missing": (_set("ema", "weights", value=_drop_first), "'ema.weights' do not fit the model .* 1 missing"),
    "EMA wrong shape": (_set("ema", "accumulator", FIRST, value=torch.zeros(2, 2)), "ema.accumulator array .* has shape \\(2, 2\\)"),
    "EMA steps": (_set("ema", "steps", value=7), "'ema.steps' is 7"),
    "EMA decay": (_set("ema", "decay", value=0.5), "'ema.decay' is 0.5, but the embedded config's federation.ema_decay is 0.9"),
    "EMA inconsistent": (_set("ema", "weights", FIRST, value=lambda t: t + 1), "'ema' is inconsistent"),
}


@pytest.fixture(scope="module")
def adam_payload(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = _cfg(tmp_path_factory.mktemp("adam") / "server", "fedadam", 0.9)
    _run(cfg, _initial(cfg), rounds=1)
    return torch.load(round_checkpoint_path(cfg.federation.checkpoint_dir, 1), weights_only=True)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_server_state_is_named(tmp_path: Path, adam_payload: dict, damage: str) -> None:
    payload = {**adam_payload, "server_optimizer": {"name": "fedadam", "slots": {k: dict(v) for k, v in adam_payload["server_optimizer"]["slots"].items()}},
               "ema": {**adam_payload["ema"], "weights": dict(adam_payload["ema"]["weights"]),
                       "accumulator": dict(adam_payload["ema"]["accumulator"])}}
    apply, message = DAMAGE[damage]
    apply(payload)
    path = tmp_path / "damaged.pt"
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match=f"{path}: .*{message}"):
        load_checkpoint(path)


def test_checkpoint_without_server_state_still_loads(tmp_path: Path, adam_payload: dict) -> None:
    old = {k: v for k, v in adam_payload.items() if k not in ("server_optimizer", "ema")}
    buffer = io.BytesIO()
    torch.save(old, buffer)
    (tmp_path / "old.pt").write_bytes(buffer.getvalue())
    ckpt = load_checkpoint(tmp_path / "old.pt")
    assert ckpt.optimizer is None and ckpt.ema is None
    assert sampling_weights(ckpt) == (ckpt.arrays, "global")
    with pytest.raises(ConfigError, match="--weights ema: the checkpoint holds no EMA weights"):
        sampling_weights(ckpt, "ema")


# ---------------------------------------------------------------------------------------- benchmark

def test_benchmark_runs_the_servers_step_and_returns_the_ema(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import quality_train as qt
    finally:
        sys.path.remove(str(REPO / "bench"))
    from client.site_data import SiteSlices

    rng = np.random.default_rng(0)

    def slices(n: int) -> SiteSlices:
        return SiteSlices(images=rng.uniform(-1, 1, (n, 1, 16, 16)).astype(np.float32),
                          labels=np.arange(n) % 2, patients=[f"p{i}" for i in range(n)], classes=("disc", "ring"))

    sites = {"a": slices(6), "b": slices(4)}
    plain = qt.ModelPreset(image_size=16, channels=(8, 8), rounds=1, local_steps=2, batch_size=2, learning_rate=1e-3)
    old = qt.train_federated(plain, sites, tmp_path / "old", dp=False, target_epsilon=8.0, delta=1e-5)
    # The same fedavg run through the ServerApp's strategy gives the same model.
    cfg = qt.federation_config(plain, ("disc", "ring"), tmp_path / "via", plain.local_steps, dp=False)
    via = qt._train_with_server_strategy(cfg, plain, sites, tmp_path / "via", False, 8.0, 1e-5, "federated", None, None)
    assert all(np.allclose(old.arrays[k], via.arrays[k], rtol=1e-5, atol=1e-6) for k in old.arrays)

    adam = qt.ModelPreset(image_size=16, channels=(8, 8), rounds=2, local_steps=2, batch_size=2, learning_rate=1e-3,
                          server_optimizer="fedadam", ema_decay=0.5, server_options=(("eta", 0.01),))
    seen: list[int] = []
    out = qt.train_federated(adam, sites, tmp_path / "adam", dp=False, target_epsilon=8.0, delta=1e-5,
                             on_round=lambda rnd, _loss: seen.append(rnd))
    assert seen == [1, 2] and len(out.losses) == 2 and out.steps == 2 * 2 * 2 and out.weights == "ema"
    assert old.weights == via.weights == "global"
    assert not (tmp_path / "adam" / "checkpoints").exists()  # the benchmark keeps one model, not one per round
    assert all(np.isfinite(v).all() for v in out.arrays.values()) and set(out.arrays) == set(old.arrays)
