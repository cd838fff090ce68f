"""A missing, emptied, rolled-back or tampered ledger is refused, never a silent reset of epsilon."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.audit_log import TaskRecord, append_task_record, read_audit
from client.ledger import INIT_MESSAGE_TYPE, LEDGER_FILE, PrivacyLedger, init_ledger
from client.site_data import SiteSlices
from client.training import train_round
from common.config import FedsynthConfig, config_from_dict, load_site_config
from common.errors import SiteDataError
from server.cli import main
from tests.conftest import tiny_federation, write_site


def _cfg(tmp_path: Path) -> FedsynthConfig:
    return config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server"), "test")


def _slices(n: int = 20) -> SiteSlices:
    rng = np.random.default_rng(0)
    return SiteSlices(images=rng.uniform(-1, 1, (n, 1, 16, 16)).astype(np.float32),
                      labels=(np.arange(n) % 2).astype(np.int64), patients=[f"p{i:03d}" for i in range(n)],
                      classes=("disc", "ring"))


def _train(tmp_path: Path, site_yaml: Path):
    # Refusals come before the model is built, so no weights are needed to reach them.
    return train_round(_cfg(tmp_path), load_site_config(site_yaml), _slices(), {}, server_round=1)


def _entry(**values: object) -> dict:
    return {"noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 3, "run_id": "r", "server_round": 1, "time": 0.0,
            **values}


def test_train_without_an_initialised_ledger_is_refused_and_creates_none(tmp_path: Path) -> None:
    site_yaml = write_site(tmp_path / "sites", "a", tmp_path / "data", init=False)
    state = tmp_path / "sites" / "a" / "state"
    with pytest.raises(SiteDataError) as err:
        _train(tmp_path, site_yaml)
    assert str(state / LEDGER_FILE) in str(err.value) and "fedsynth site init" in str(err.value)
    assert str(tmp_path) not in err.value.public
    assert not (state / LEDGER_FILE).exists()


@pytest.mark.parametrize(("content", "problem"), [
    ("", "unreadable"),
    ("{not json", "unreadable"),
    ("[]", "unreadable"),
    (json.dumps({"entries": [_entry(steps=-30)]}), "steps must be a non-negative integer"),
    (json.dumps({"entries": [_entry(steps=0)]}), "steps must be >= 1"),
    (json.dumps({"entries": [_entry(steps=2.5)]}), "steps must be a non-negative integer"),
    (json.dumps({"entries": [_entry(noise_multiplier=float("nan"))]}), "noise multiplier must be a finite number"),
    (json.dumps({"entries": [_entry(noise_multiplier=float("inf"))]}), "noise multiplier must be a finite number"),
    (json.dumps({"entries": [_entry(noise_multiplier=-1.0)]}), "noise multiplier must be a finite number"),
    (json.dumps({"entries": [_entry(sample_rate=0.0)]}), "sample rate must be in (0, 1]"),
    (json.dumps({"entries": [_entry(sample_rate=1.5)]}), "sample rate must be in (0, 1]"),
    (json.dumps({"entries": [_entry(surprise=1)]}), "malformed"),
])
def test_a_tampered_ledger_is_refused_and_left_as_it_is(tmp_path: Path, content: str, problem: str) -> None:
    site_yaml = write_site(tmp_path / "sites", "a", tmp_path / "data")
    ledger = tmp_path / "sites" / "a" / "state" / LEDGER_FILE
    ledger.write_text(content)
    with pytest.raises(SiteDataError, match="restore") as err:
        _train(tmp_path, site_yaml)
    assert problem in str(err.value) and str(ledger) in str(err.value)
    assert ledger.read_text() == content


def test_a_ledger_behind_the_audit_log_is_refused(tmp_path: Path) -> None:
    site_yaml = write_site(tmp_path / "sites", "a", tmp_path / "data")
    state = tmp_path / "sites" / "a" / "state"
    # The site trained 40 steps (its audit log says so), then the ledger was swapped for a fresh one.
    append_task_record(state, TaskRecord(run_id="1", message_type="train", app_hash="x", config={}, steps=40, outcome="ok"))
    with pytest.raises(SiteDataError, match="records 40 steps taken: the ledger was rolled back or replaced"):
        _train(tmp_path, site_yaml)
    assert PrivacyLedger.open(state).entries == []
    # Refused or failed tasks spent nothing the audit log could claim back.
    (state / LEDGER_FILE).write_text(json.dumps({"accountant": "prv", "entries": [_entry(steps=40)]}))
    append_task_record(state, TaskRecord(run_id="2", message_type="train", app_hash="x", config={}, steps=0,
                                         outcome="refused: budget"))
    PrivacyLedger.open(state).check_audit()


def test_init_is_explicit_once_and_never_over_a_history(tmp_path: Path) -> None:
    site_yaml = write_site(tmp_path / "sites", "a", tmp_path / "data", init=False)
    state = tmp_path / "sites" / "a" / "state"
    assert main(["site", "init", "--config", str(site_yaml)]) == 0
    assert PrivacyLedger.open(state).entries == [] and PrivacyLedger.open(state).site_id == "a"
    assert [r["message_type"] for r in read_audit(state)] == [INIT_MESSAGE_TYPE]
    before = (state / LEDGER_FILE).read_text()
    assert main(["site", "init", "--config", str(site_yaml)]) == 2  # never over an existing ledger
    assert (state / LEDGER_FILE).read_text() == before
    # A deleted ledger cannot be recreated while the audit log shows steps were taken.
    append_task_record(state, TaskRecord(run_id="1", message_type="train", app_hash="x", config={}, steps=3, outcome="ok"))
    (state / LEDGER_FILE).unlink()
    with pytest.raises(SiteDataError, match="records 3 DP steps this site took: restore the ledger from backup"):
        init_ledger(state, "a")
    assert not (state / LEDGER_FILE).exists()


def test_simulate_stops_at_once_on_a_site_without_a_ledger(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    site_yaml = write_site(tmp_path / "sites", "a", tmp_path / "data", init=False)
    fed_yaml = tmp_path / "federation.yaml"
    fed_yaml.write_text(json.dumps(tiny_federation(tmp_path / "server")))  # JSON is YAML
    assert main(["simulate", "--config", str(fed_yaml), "--site", str(site_yaml)]) == 2
    assert "fedsynth site init" in capsys.readouterr().err
    assert not (tmp_path / "server").exists()  # Flower never started
    assert main(["site", "audit", "--config", str(site_yaml)]) == 1  # the log is shown, the ledger's problem named
