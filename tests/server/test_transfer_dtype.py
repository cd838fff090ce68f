"""float16 transfer: half the bytes on the wire, exactly the configured dtype accepted, float32 averaging."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.transfer import decode_update, encode_update
from server.update_checks import update_problem
from tests.server.test_update_checks import GLOBAL, GOOD, _reply, _strategy


def test_float16_halves_the_bytes_and_round_trips_closely() -> None:
    rng = np.random.default_rng(0)
    weights = {"w": rng.normal(0, 0.05, (256, 256)).astype(np.float32), "b": rng.normal(0, 0.05, 256).astype(np.float32)}
    wire32 = ArrayRecord({k: Array(v) for k, v in encode_update(weights, "float32").items()})
    wire16 = ArrayRecord({k: Array(v) for k, v in encode_update(weights, "float16").items()})
    assert wire16.count_bytes() / wire32.count_bytes() == pytest.approx(0.5, abs=0.01)
    back = decode_update({k: a.numpy() for k, a in wire16.items()})
    assert all(back[k].dtype == np.float32 for k in back)
    assert max(float(np.abs(back[k] - weights[k]).max() / np.abs(weights[k]).max()) for k in weights) < 1e-3
    assert all(np.array_equal(encode_update(weights, "float32")[k], weights[k]) for k in weights)


def test_exactly_the_configured_dtype_is_accepted() -> None:
    half = encode_update(GOOD, "float16")
    assert update_problem(half, GLOBAL, {"num-examples": 10}, transfer_dtype="float16") is None
    assert update_problem(half, GLOBAL, {"num-examples": 10}).startswith("a has dtype float16, expected float32")
    assert update_problem(GOOD, GLOBAL, {"num-examples": 10}, transfer_dtype="float16").startswith(
        "a has dtype float32, expected float16")
    overflow = {**half, "a": np.full((2, 3), np.inf, np.float16)}  # what float16 makes of a weight above 65504
    assert update_problem(overflow, GLOBAL, {"num-examples": 10}, transfer_dtype="float16") == "a holds NaN or Inf"


def test_strategy_averages_float16_updates_in_float32(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, transfer_dtype="float16")
    other = {"a": np.full((2, 3), 0.3, np.float32), "b": np.ones(4, np.float32)}
    replies = [_reply(1, "s1", encode_update(GOOD, "float16")), _reply(2, "s2", encode_update(other, "float16"), 30)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert all(arrays[k].numpy().dtype == np.float32 for k in GLOBAL)
    assert np.allclose(arrays["a"].numpy(), 0.25, atol=1e-3)  # (0.1 * 10 + 0.3 * 30) / 40, float16-rounded inputs
