"""Under DP the training loss (a mean over the sampled patients, without noise) never leaves the site."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client.audit_log import read_audit
from client.client_app import app
from client.ledger import INIT_MESSAGE_TYPE
from client.site_cli import _audit
from common import keys
from common.config import FedsynthConfig, config_from_dict, config_to_json
from common.model import build_unet, trainable_state
from tests.conftest import tiny_federation, write_shapes_dataset, write_site


def _train_task(tmp_path: Path, **privacy: object) -> Message:
    cfg = config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server", privacy=privacy), "test")
    arrays = trainable_state(build_unet(cfg.model))
    metadata = Metadata(run_id=7, message_id="m-train", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    return Message(metadata=metadata, content=RecordDict({
        keys.ARRAYS: ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
        keys.CONFIG: ConfigRecord({keys.FEDERATION_CONFIG: config_to_json(cfg), keys.SERVER_ROUND: 1}),
    }))


def _run(tmp_path: Path, task: Message, **site: object) -> tuple[Message, list[dict]]:
    site_yaml = write_site(tmp_path / "sites", "site-a", write_shapes_dataset(tmp_path / "data", per_class=6), **site)
    context = Context(run_id=7, node_id=1, node_config={keys.NODE_SITE_CONFIG: str(site_yaml)}, state=RecordDict(),
                      run_config={})
    reply = app(task, context)
    rows = read_audit(yaml.safe_load(site_yaml.read_text())["state_dir"])
    return reply, [row for row in rows if row["message_type"] != INIT_MESSAGE_TYPE]  # the task's, not the admin's init


def test_a_dp_train_reply_carries_no_training_loss(tmp_path: Path) -> None:
    reply, audit = _run(tmp_path, _train_task(tmp_path))
    assert not reply.has_error()
    metrics = reply.content.metric_records[keys.METRICS]
    assert set(metrics) == {keys.NUM_EXAMPLES, keys.EPSILON, keys.DELTA, keys.STEPS, keys.VAL_LOSS, keys.VAL_EXAMPLES}
    assert audit[0]["outcome"] == "ok" and "unsafe_reproducible_dp" not in audit[0]


def test_non_private_training_may_still_send_its_loss(tmp_path: Path) -> None:
    reply, _ = _run(tmp_path, _train_task(tmp_path, enabled=False), allow_non_private=True)
    assert not reply.has_error()
    assert np.isfinite(reply.content.metric_records[keys.METRICS][keys.TRAIN_LOSS])


def test_the_unsafe_switch_is_written_to_the_audit_line_of_the_task(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    reply, audit = _run(tmp_path, _train_task(tmp_path), unsafe_reproducible_dp=True)
    assert not reply.has_error() and keys.TRAIN_LOSS not in reply.content.metric_records[keys.METRICS]
    assert audit[0]["unsafe_reproducible_dp"] is True
    _audit(argparse.Namespace(state=str(tmp_path / "sites" / "site-a" / "state"), config=None, last=0, json=False))
    assert "UNSAFE" in capsys.readouterr().out  # and in the admin's table
