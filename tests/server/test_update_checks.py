"""Server-side validation of site updates: bad replies are rejected and the site named."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from common import keys
from common.config import FedsynthConfig, config_from_dict
from common.errors import FederationError
from server.strategy import CheckpointingFedAvg
from server.update_checks import update_problem
from tests.conftest import tiny_federation

GLOBAL = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
GOOD = {"a": np.full((2, 3), 0.1, np.float32), "b": np.ones(4, np.float32)}


@pytest.mark.parametrize(
    ("update", "metrics", "bound", "reason"),
    [
        ({**GOOD, "a": np.array([[np.nan, 0, 0], [0, 0, 0]], np.float32)}, {}, 0, "a holds NaN or Inf"),
        ({**GOOD, "b": np.array([1, 1, np.inf, 1], np.float32)}, {}, 0, "b holds NaN or Inf"),
        ({"a": GOOD["a"]}, {}, 0, "1 array(s) missing, e.g. b"),
        ({**GOOD, "c": GOOD["b"]}, {}, 0, "1 unexpected array(s), e.g. c"),
        ({**GOOD, "a": np.zeros((3, 2), np.float32)}, {}, 0, "a has shape (3, 2), expected (2, 3)"),
        ({**GOOD, "a": np.zeros((2, 3), np.float64)}, {}, 0, "a has dtype float64, expected float32"),
        ({**GOOD, "a": np.full((2, 3), 10.0, np.float32)}, {}, 5.0, "update norm 24.5 exceeds the bound 5"),
        (GOOD, {"num-examples": 0}, 0, "metric 'num-examples' is 0"),
        (GOOD, {"num-examples": float("nan")}, 0, "metric 'num-examples' is nan"),
    ],
)
def test_bad_updates_are_named(update: dict, metrics: dict, bound: float, reason: str) -> None:
    assert update_problem(update, GLOBAL, {"num-examples": 10, **metrics}, bound).startswith(reason)


def test_good_update_passes() -> None:
    assert update_problem(GOOD, GLOBAL, {"num-examples": 10}, max_update_norm=1.0) is None


def _reply(node_id: int, site: str, arrays: dict, num_examples: float = 10) -> Message:
    """A reply as the SuperLink hands it to the ServerApp (metadata filled in by Flower there)."""
    metadata = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0, reply_to_message_id="r",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    return Message(metadata=metadata, content=RecordDict({
        keys.ARRAYS: ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()}),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: num_examples, keys.EPSILON: 1.0, keys.DELTA: 1e-5}),
        keys.SITE: ConfigRecord({keys.SITE_ID: site}),
    }))


def _strategy(tmp_path: Path, **federation: object) -> CheckpointingFedAvg:
    raw = tiny_federation(tmp_path / "server", federation=federation)
    strategy = CheckpointingFedAvg(config_from_dict(FedsynthConfig, raw, "test"))
    strategy._global = GLOBAL
    return strategy


def test_strategy_averages_good_sites_only_and_logs_the_bad_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    strategy = _strategy(tmp_path, quorum=2)
    nan = {**GOOD, "a": np.full((2, 3), np.nan, np.float32)}
    other = {"a": np.full((2, 3), 0.3, np.float32), "b": np.ones(4, np.float32)}
    with caplog.at_level(logging.WARNING, logger="fedsynth.server"):
        arrays, _ = strategy.aggregate_train(1, [_reply(1, "good-1", GOOD), _reply(2, "bad", nan), _reply(3, "good-2", other, 30)])
    assert np.allclose(arrays["a"].numpy(), 0.25)  # (0.1 * 10 + 0.3 * 30) / 40
    assert "rejected the update of site bad (node 2): a holds NaN or Inf" in caplog.text
    rows = [json.loads(line) for line in strategy.cfg.federation.metrics_file.read_text().splitlines()]
    assert [r["site_id"] for r in rows if r["kind"] == "rejected"] == ["bad"]
    assert set(strategy.sites) == {"good-1", "good-2"}
    assert (tmp_path / "server" / "checkpoints" / "round-0001.pt").exists()


def test_below_quorum_stops_without_a_checkpoint(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, quorum=2)
    wrong = {"a": GOOD["a"]}
    with pytest.raises(FederationError, match="1 site update\\(s\\) accepted of 2 replies, below the quorum of 2"):
        strategy.aggregate_train(1, [_reply(1, "good", GOOD), _reply(2, "bad", wrong)])
    assert not (tmp_path / "server" / "checkpoints").exists()


def test_a_round_mixing_sites_with_and_without_train_loss_is_aggregated(tmp_path: Path) -> None:
    """A DP site keeps its training loss; another (an older version) sends one: Flower's FedAvg would
    refuse the mismatched metric keys and lose the round."""
    strategy = _strategy(tmp_path)
    with_loss = _reply(1, "old", GOOD)
    with_loss.content[keys.METRICS][keys.TRAIN_LOSS] = 0.7
    arrays, metrics = strategy.aggregate_train(1, [with_loss, _reply(2, "new", GOOD, 30)])
    assert np.allclose(arrays["a"].numpy(), 0.1) and keys.TRAIN_LOSS not in metrics
    rows = [json.loads(line) for line in strategy.cfg.federation.metrics_file.read_text().splitlines()]
    assert [r.get(keys.TRAIN_LOSS) for r in rows if r["kind"] == "site"] == [0.7, None]  # each site's own, as sent
    assert keys.TRAIN_LOSS not in next(r for r in rows if r["kind"] == "aggregate")


def test_train_replies_average_the_validation_loss_over_held_out_slices(tmp_path: Path) -> None:
    """num-examples weighs the weights; the validation loss is weighed by each site's held-out slices."""
    strategy = _strategy(tmp_path)
    replies = [_reply(1, "a", GOOD, 10), _reply(2, "b", GOOD, 30), _reply(3, "c", GOOD, 50)]
    for reply, (loss, count) in zip(replies, [(0.2, 3), (0.8, 1), (0.0, 0)]):  # c has no held-out patient
        reply.content[keys.METRICS][keys.VAL_LOSS] = loss
        reply.content[keys.METRICS][keys.VAL_EXAMPLES] = count
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics[keys.VAL_LOSS] == pytest.approx((0.2 * 3 + 0.8 * 1) / 4)
    assert metrics[keys.VAL_EXAMPLES] == 4
    assert metrics[keys.EPSILON] == pytest.approx(1.0)
    rows = [json.loads(line) for line in strategy.cfg.federation.metrics_file.read_text().splitlines()]
    (aggregate,) = [r for r in rows if r["kind"] == "aggregate"]
    assert aggregate[keys.VAL_LOSS] == pytest.approx(0.35)
    assert sorted(r[keys.VAL_LOSS] for r in rows if r["kind"] == "site") == [0.0, 0.2, 0.8]


@pytest.mark.parametrize(("every", "rounds_done", "evaluated"), [(0, 0, []), (1, 0, [1, 2, 3, 4]), (2, 0, [2, 4]), (2, 1, [1, 3])])
def test_evaluate_phase_runs_every_n_federation_rounds(tmp_path: Path, every: int, rounds_done: int, evaluated: list[int]) -> None:
    """Counted in the federation's rounds, so a resumed run keeps the schedule."""
    strategy = _strategy(tmp_path, evaluate_every=every, num_rounds=6)
    strategy.rounds_done = rounds_done
    assert [r for r in range(1, 5) if strategy.evaluates_in(rounds_done + r)] == evaluated
    if not evaluated:
        assert list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid=None)) == []  # type: ignore[arg-type]


def test_efficient_replies_carry_the_subset_and_frozen_arrays_stay_the_global_ones(tmp_path: Path) -> None:
    """training.trainable efficient: a reply with exactly the trained arrays is valid, one more or one fewer is
    rejected naming the setting; the aggregate and its checkpoint hold the frozen arrays exactly as they were."""
    from common.checkpoint import load_checkpoint
    from common.model import build_unet, trainable_state
    from common.trainable import trainable_names

    raw = tiny_federation(tmp_path / "server", training={"trainable": "efficient"}, federation={"quorum": 2})
    cfg = config_from_dict(FedsynthConfig, raw, "test")
    strategy = CheckpointingFedAvg(cfg)
    rng = np.random.default_rng(0)
    strategy._global = {k: v + rng.normal(0, 0.1, v.shape).astype(np.float32)
                        for k, v in trainable_state(build_unet(cfg.model)).items()}
    trained = trainable_names(cfg)
    frozen = sorted(set(strategy._global) - set(trained))

    def update(shift: float) -> dict:
        return {k: strategy._global[k] + np.float32(shift) for k in trained}

    extra = {**update(0.2), frozen[0]: strategy._global[frozen[0]]}
    missing = {k: v for k, v in update(0.2).items() if k != trained[0]}
    # Weights 10 and 21: a float32 mean of equal values then differs from them in about 10% of coordinates.
    replies = [_reply(1, "a", update(0.1), 10), _reply(2, "b", update(0.3), 21), _reply(3, "extra", extra),
               _reply(4, "missing", missing)]
    arrays, _ = strategy.aggregate_train(1, replies)
    rows = [json.loads(line) for line in cfg.federation.metrics_file.read_text().splitlines()]
    reasons = {r["site_id"]: r["reason"] for r in rows if r["kind"] == "rejected"}
    assert reasons == {
        "extra": f"1 unexpected array(s), e.g. {frozen[0]} (training.trainable 'efficient': a reply carries exactly {len(trained)} arrays)",
        "missing": f"1 array(s) missing, e.g. {trained[0]} (training.trainable 'efficient': a reply carries exactly {len(trained)} arrays)",
    }
    assert set(arrays.keys()) == set(strategy._global)
    for name in frozen:
        assert np.array_equal(arrays[name].numpy(), strategy._global[name]), name
    for name in trained:
        assert np.allclose(arrays[name].numpy(), strategy._global[name] + (0.1 * 10 + 0.3 * 21) / 31, atol=1e-6), name
    saved = load_checkpoint(tmp_path / "server" / "checkpoints" / "round-0001.pt")
    assert all(np.array_equal(saved.arrays[n], strategy._global[n]) for n in frozen)


def test_a_pattern_matching_no_parameter_stops_the_server_before_any_round(tmp_path: Path) -> None:
    from common.errors import ConfigError

    raw = tiny_federation(tmp_path / "server", training={"trainable": ["out.*", "decoder.*"]})
    with pytest.raises(ConfigError, match="training.trainable: pattern 'decoder.\\*' matches no parameter"):
        CheckpointingFedAvg(config_from_dict(FedsynthConfig, raw, "test"))
