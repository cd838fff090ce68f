"""The real ClientApp, called in-process with real Flower messages: the site policy governs every task
type, and a refused task is answered with an error and recorded in the site's audit log."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client.audit_log import read_audit
from client.client_app import app
from client.ledger import INIT_MESSAGE_TYPE
from client.policy import running_app_hash
from common import audit_protocol as ap
from common import keys
from common.config import FedsynthConfig, config_from_dict, config_to_json
from tests.conftest import tiny_federation, write_shapes_dataset, write_site

UNAPPROVED = "0" * 64


def _fed_json(tmp_path: Path) -> str:
    return config_to_json(config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server"), "test"))


def _site(tmp_path: Path, data_dir: Path, **policy: object) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"max_epsilon": 8.0, "max_delta": 1e-5, "approved_apps": [running_app_hash()], **policy}))
    return write_site(tmp_path / "sites", "site-a", data_dir, policy_file=str(path))


def _message(message_type: str, fed_json: str, arrays: dict[str, np.ndarray], **config: object) -> Message:
    """A task as the SuperNode hands it to the ClientApp (metadata filled in by Flower there)."""
    metadata = Metadata(run_id=7, message_id=f"m-{message_type}", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=600.0, message_type=message_type)
    return Message(metadata=metadata, content=RecordDict({
        keys.ARRAYS: ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
        keys.CONFIG: ConfigRecord({keys.FEDERATION_CONFIG: fed_json, keys.SERVER_ROUND: 1, **config}),
    }))


def _context(site_yaml: Path) -> Context:
    return Context(run_id=7, node_id=1, node_config={keys.NODE_SITE_CONFIG: str(site_yaml)}, state=RecordDict(), run_config={})


def _query(fed_json: str, distinct: int, copies: int = 0, thresholds: tuple[float, ...] = (1e-6, 0.02)) -> Message:
    unique = np.random.default_rng(distinct).uniform(-1, 1, (distinct, 1, 16, 16)).astype(np.float32)
    images = np.concatenate([unique, np.repeat(unique[:1], copies, axis=0)])
    return _message(MessageType.QUERY, fed_json, {ap.SYNTHETIC_IMAGES: images},
                    **{ap.THRESHOLDS: list(thresholds), ap.QUANTILE_LEVELS: [0.25, 0.5]})


def _outcomes(site_yaml: Path) -> list[tuple[str, str]]:
    state = yaml.safe_load(site_yaml.read_text())["state_dir"]
    return [(row["message_type"], row["outcome"]) for row in read_audit(state) if row["message_type"] != INIT_MESSAGE_TYPE]


@pytest.mark.parametrize("message_type", [MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY])
def test_unapproved_app_is_refused_for_every_task_before_data_is_read(tmp_path: Path, message_type: str) -> None:
    # No data folder at all: had the site tried to read its data, the reply would be a site-data error.
    missing = tmp_path / "no-such-folder"
    site_yaml = _site(tmp_path, missing, approved_apps=[UNAPPROVED])
    fed_json = _fed_json(tmp_path)
    msg = _query(fed_json, 20) if message_type == MessageType.QUERY else _message(message_type, fed_json, {"w": np.zeros(3, np.float32)})

    reply = app(msg, _context(site_yaml))

    assert reply.has_error() and reply.error.code == keys.ERROR_POLICY
    reason = f"site policy refuses the task: app code {running_app_hash()[:12]}... is not among the 1 approved app(s)"
    assert reply.error.reason == reason and str(tmp_path) not in reply.error.reason
    assert _outcomes(site_yaml) == [(message_type, f"refused: {reason}")]


def test_approved_app_goes_on_to_read_the_data(tmp_path: Path) -> None:
    """The contrast to the test above: with the app approved, the same site fails on its missing data."""
    site_yaml = _site(tmp_path, tmp_path / "no-such-folder")
    reply = app(_message(MessageType.EVALUATE, _fed_json(tmp_path), {"w": np.zeros(3, np.float32)}), _context(site_yaml))
    assert reply.has_error() and reply.error.code == keys.ERROR_SITE_DATA


def test_audit_refusal_comes_before_the_data_is_read(tmp_path: Path) -> None:
    site_yaml = _site(tmp_path, tmp_path / "no-such-folder", allow_audit=False)
    reply = app(_query(_fed_json(tmp_path), 20), _context(site_yaml))
    assert reply.has_error() and reply.error.code == keys.ERROR_POLICY
    assert reply.error.reason == "site policy refuses the task: memorisation audits are not allowed by the policy"


def test_audit_queries_are_limited_by_the_policy_and_logged(tmp_path: Path) -> None:
    site_yaml = _site(tmp_path, write_shapes_dataset(tmp_path / "data", per_class=6), audit_max_per_day=1)
    fed_json, context = _fed_json(tmp_path), _context(site_yaml)

    # 4 decoys + 1 candidate padded to 25 images with copies: refused before any search runs.
    padded = app(_query(fed_json, 5, copies=20), context)
    assert padded.has_error() and padded.error.code == keys.ERROR_POLICY
    assert padded.error.reason == ("site policy refuses the task: 5 distinct synthetic images, fewer than the policy's "
                                   "minimum 20 (images closer than 0.05 to one another count once)")

    answered = app(_query(fed_json, 20), context)
    assert not answered.has_error()
    metrics = answered.content.metric_records[keys.METRICS]
    assert metrics[ap.NUM_SYNTHETIC] == 20 and metrics[ap.NUM_LOCAL] == 12 and len(metrics[ap.COUNTS_BELOW]) == 2
    assert metrics[ap.NUM_DISTINCT] == 20 and metrics[ap.COUNT_FLOOR] == 5

    # The day's one answered query is counted from the audit log the ClientApp itself wrote.
    again = app(_query(fed_json, 20), context)
    assert again.has_error()
    assert again.error.reason == "site policy refuses the task: 1 audit queries admitted in the last 24 h, the policy's maximum is 1"

    assert _outcomes(site_yaml) == [("query", f"refused: {padded.error.reason}"), ("query", "ok"),
                                    ("query", f"refused: {again.error.reason}")]


def test_without_a_policy_file_the_policy_defaults_apply(tmp_path: Path) -> None:
    site_yaml = write_site(tmp_path / "sites", "site-a", write_shapes_dataset(tmp_path / "data", per_class=6))
    context = _context(site_yaml)
    small = app(_query(_fed_json(tmp_path), ap.MIN_SYNTHETIC_IMAGES), context)
    assert small.has_error() and small.error.reason.startswith(
        "site policy refuses the task: 5 distinct synthetic images, fewer than the policy's minimum 20")
    probing = app(_query(_fed_json(tmp_path), 20, thresholds=tuple(0.01 * i for i in range(1, 13))), context)
    assert probing.error.reason == "site policy refuses the task: 12 thresholds, more than the policy's maximum 8"
    answered = app(_query(_fed_json(tmp_path), 20), context)
    assert not answered.has_error()
    assert answered.content.metric_records[keys.METRICS][ap.NUM_SYNTHETIC] == 20
