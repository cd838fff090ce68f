"""The real ClientApp refuses task configs and models it did not agree to carry, before anything is spent or logged in full."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client.audit_log import AUDIT_FILE, read_audit
from client.client_app import app
from client.ledger import INIT_MESSAGE_TYPE, LEDGER_FILE
from common import keys
from common.config import FedsynthConfig, config_from_dict, config_to_json
from common.model import build_unet, trainable_state
from tests.conftest import tiny_federation, write_shapes_dataset, write_site


def _fed(tmp_path: Path, **overrides: dict) -> FedsynthConfig:
    return config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server", **overrides), "test")


def _message(config: dict, arrays: dict[str, np.ndarray]) -> Message:
    metadata = Metadata(run_id=7, message_id="m-train", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    return Message(metadata=metadata, content=RecordDict({
        keys.ARRAYS: ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
        keys.CONFIG: ConfigRecord(config),
    }))


def _site(tmp_path: Path, **policy: object) -> tuple[Path, Path]:
    extra = {}
    if policy:
        path = tmp_path / "policy.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"max_epsilon": 50.0, "max_delta": 1e-5, "approved_apps": ["any"], **policy}))
        extra["policy_file"] = str(path)
    site_yaml = write_site(tmp_path / "sites", "site-a", write_shapes_dataset(tmp_path / "data", per_class=6), **extra)
    return site_yaml, tmp_path / "sites" / "site-a" / "state"


def _run(site_yaml: Path, msg: Message) -> Message:
    context = Context(run_id=7, node_id=1, node_config={keys.NODE_SITE_CONFIG: str(site_yaml)}, state=RecordDict(),
                      run_config={})
    return app(msg, context)


def _weights(cfg: FedsynthConfig) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return trainable_state(build_unet(cfg.model))


def _task_rows(state: Path) -> list[dict]:
    return [r for r in read_audit(state) if r["message_type"] != INIT_MESSAGE_TYPE]


@pytest.mark.parametrize(("extra", "reason"), [
    ({"blob": b"\x00" * 1024}, "unknown key 'blob'"),
    ({keys.SERVER_ROUND: b"\x01"}, "'server-round' must be an integer"),
    ({"note": "x" * 20_000_000}, "unknown key 'note'"),
])
def test_bad_config_values_are_refused_unspent_and_logged_small(tmp_path: Path, extra: dict, reason: str) -> None:
    site_yaml, state = _site(tmp_path)
    cfg = _fed(tmp_path)
    ledger_before = (state / LEDGER_FILE).read_text()
    msg = _message({keys.FEDERATION_CONFIG: config_to_json(cfg), keys.SERVER_ROUND: 1, **extra}, _weights(cfg))
    reply = _run(site_yaml, msg)
    assert reply.has_error() and reason in reply.error.reason
    assert (state / LEDGER_FILE).read_text() == ledger_before
    [row] = _task_rows(state)
    assert row["outcome"].startswith("refused: task config refused") and row["steps"] == 0
    assert (state / AUDIT_FILE).stat().st_size < 4096  # a summary of what was sent, not the value


def test_an_oversized_federation_config_is_refused(tmp_path: Path) -> None:
    site_yaml, state = _site(tmp_path)
    cfg = _fed(tmp_path)
    padded = config_to_json(cfg)[:-1] + ', "padding": "' + "x" * 70_000 + '"}'
    reply = _run(site_yaml, _message({keys.FEDERATION_CONFIG: padded, keys.SERVER_ROUND: 1}, _weights(cfg)))
    assert reply.has_error() and "more than 65,536" in reply.error.reason
    assert (state / AUDIT_FILE).stat().st_size < 4096


def test_a_model_over_the_sites_limit_is_refused_before_it_is_built(tmp_path: Path) -> None:
    site_yaml, state = _site(tmp_path)  # no policy file: the default limit (100M parameters) applies
    huge = _fed(tmp_path, model={"channels": [1024, 2048], "norm_num_groups": 4})
    started = time.monotonic()
    reply = _run(site_yaml, _message({keys.FEDERATION_CONFIG: config_to_json(huge), keys.SERVER_ROUND: 1}, {}))
    assert reply.has_error() and "the federation's model has 712,188,929 parameters" in reply.error.reason
    assert time.monotonic() - started < 30
    # The arrays are counted too, from their shapes, against the policy's limit.
    site_yaml, state = _site(tmp_path / "strict", max_model_parameters=1000)
    cfg = _fed(tmp_path)
    reply = _run(site_yaml, _message({keys.FEDERATION_CONFIG: config_to_json(cfg), keys.SERVER_ROUND: 1}, _weights(cfg)))
    assert reply.has_error() and "weight values, more than the site's maximum 1,000" in reply.error.reason
    assert _task_rows(state)[0]["outcome"].startswith("refused: site policy refuses the task")


def test_a_valid_task_still_trains_and_is_logged_in_full(tmp_path: Path) -> None:
    site_yaml, state = _site(tmp_path)
    cfg = _fed(tmp_path)
    reply = _run(site_yaml, _message({keys.FEDERATION_CONFIG: config_to_json(cfg), keys.SERVER_ROUND: 2}, _weights(cfg)))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    [row] = _task_rows(state)
    assert row["outcome"] == "ok" and row["server_round"] == 2 and row["steps"] == cfg.training.local_steps
    assert row["config"][keys.FEDERATION_CONFIG]["training"]["local_steps"] == cfg.training.local_steps
