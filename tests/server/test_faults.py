"""Faults with real Flower processes on 127.0.0.1: a SuperNode killed mid-round, the server killed and
restarted, too few sites. Every process is stopped by PID, whatever happens."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from client.audit_log import read_audit
from client.ledger import PrivacyLedger
from common.checkpoint import list_round_checkpoints, load_checkpoint
from common.config import load_federation_config
from server.local_federation import (
    LocalSuperLink,
    flower_executable,
    free_port,
    local_superlink,
    local_supernode,
    run_status,
    stop_process_tree,
    submit_run,
)
from server.simulation import PROJECT_ROOT, run_simulation
from tests.conftest import tiny_federation, write_shapes_dataset, write_site

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="process control reads /proc (Linux)")


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def online_nodes(link: LocalSuperLink) -> int:
    proc = subprocess.run([flower_executable("flwr"), "supernode", "list", "fedsynth-local", "--format", "json"],
                          env=link.env(), capture_output=True, text=True, timeout=60)
    try:
        nodes = json.loads(proc.stdout[proc.stdout.index("{"):])["nodes"]
    except (ValueError, KeyError):
        return 0
    return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")


def finished(link: LocalSuperLink, run_id: int) -> bool:
    return str(run_status(link, run_id).get("status", "")).startswith("finished")


def _sites(tmp_path: Path, names: list[str]) -> list[Path]:
    return [write_site(tmp_path / "sites", name, write_shapes_dataset(tmp_path / "data" / name, per_class=8, seed=i))
            for i, name in enumerate(names)]


def _federation(tmp_path: Path, **federation: object) -> tuple[Path, object]:
    raw = tiny_federation(tmp_path / "server", federation=federation, training={"local_steps": 20})
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, load_federation_config(path)


def _rows(cfg) -> list[dict]:
    return [json.loads(line) for line in cfg.federation.metrics_file.read_text().splitlines()]


def test_supernode_killed_mid_round_round_completes_with_the_others(tmp_path: Path) -> None:
    sites = _sites(tmp_path, ["site-a", "site-b", "site-c"])
    fed_path, cfg = _federation(tmp_path, num_rounds=2, min_train_nodes=2, min_available_nodes=2, quorum=2,
                                round_timeout_s=180.0)
    with local_superlink(tmp_path / "flower", simulation=False) as link, ExitStack() as nodes:
        procs = {s.parent.name: nodes.enter_context(local_supernode(link.address, s, tmp_path / f"{s.parent.name}.log"))
                 for s in sites}
        wait_for(lambda: online_nodes(link) == 3, 90, "3 SuperNodes online")
        run_id = submit_run(link, PROJECT_ROOT, {"config": str(fed_path)}, num_supernodes=None)
        # The steps are reserved just before training starts: kill the node while it trains.
        wait_for(lambda: PrivacyLedger.open(tmp_path / "sites" / "site-c" / "state").total_steps > 0, 120, "site-c training")
        stop_process_tree(procs["site-c"], grace_s=0.0)
        wait_for(lambda: finished(link, run_id), 400, "the run to finish")
        assert run_status(link, run_id)["status"] == "finished:completed"

    assert load_checkpoint(cfg.federation.final_model_path).rounds_completed == 2
    assert [r for r, _ in list_round_checkpoints(cfg.federation.checkpoint_dir)] == [1, 2]
    rows = _rows(cfg)
    trained = sorted((r["round"], r["site_id"]) for r in rows if r["kind"] == "site" and r["phase"] == "train")
    assert trained == [(1, "site-a"), (1, "site-b"), (2, "site-a"), (2, "site-b")]
    failed = [r for r in rows if r["kind"] == "failure" and r["phase"] == "train" and r["round"] == 1]
    assert len(failed) == 1 and ("no reply" in failed[0]["reason"] or "unavailable" in failed[0]["reason"].lower())
    # The crashed site's steps were reserved before it trained: over-counted at worst, never forgotten.
    assert PrivacyLedger.open(tmp_path / "sites" / "site-c" / "state").total_steps == 20


def test_server_killed_then_resumed_without_lost_or_double_counted_steps(tmp_path: Path) -> None:
    sites = _sites(tmp_path, ["site-a", "site-b"])
    fed_path, cfg = _federation(tmp_path, num_rounds=3, min_train_nodes=2, min_available_nodes=2, quorum=2)
    port, database = free_port(), tmp_path / "superlink.db"
    with ExitStack() as nodes:
        with local_superlink(tmp_path / "flower-1", simulation=False, port=port, database=database) as link:
            for s in sites:
                nodes.enter_context(local_supernode(link.address, s, tmp_path / f"{s.parent.name}.log"))
            wait_for(lambda: online_nodes(link) == 2, 90, "2 SuperNodes online")
            submit_run(link, PROJECT_ROOT, {"config": str(fed_path)}, num_supernodes=None)
            wait_for(lambda: len(list_round_checkpoints(cfg.federation.checkpoint_dir)) >= 1, 180, "round 1's checkpoint")
        # The SuperLink, its SuperExec and the ServerApp are gone (stopped by PID); the hospitals stay up.
        done_before = max(r for r, _ in list_round_checkpoints(cfg.federation.checkpoint_dir))
        assert done_before < 3
        raw = yaml.safe_load(fed_path.read_text())
        raw["federation"]["resume"] = True
        fed_path.write_text(yaml.safe_dump(raw))
        with local_superlink(tmp_path / "flower-2", simulation=False, port=port, database=database) as link:
            wait_for(lambda: online_nodes(link) == 2, 120, "the SuperNodes to reconnect")
            run_id = submit_run(link, PROJECT_ROOT, {"config": str(fed_path)}, num_supernodes=None)
            wait_for(lambda: finished(link, run_id), 240, "the resumed run to finish")
            assert run_status(link, run_id)["status"] == "finished:completed"

    final = load_checkpoint(cfg.federation.final_model_path)
    assert final.rounds_completed == 3
    assert [r for r, _ in list_round_checkpoints(cfg.federation.checkpoint_dir)] == [1, 2, 3]
    resumed_rounds = sorted({r["round"] for r in _rows(cfg) if r["kind"] == "aggregate" and r["phase"] == "train"})
    assert resumed_rounds == [1, 2, 3]
    for site in ("site-a", "site-b"):
        state = tmp_path / "sites" / site / "state"
        ledger, audit = PrivacyLedger.open(state), read_audit(state)
        trained = [r for r in audit if r["message_type"] == "train" and r["outcome"] == "ok"]
        # One ledger entry per train task the site carried out, across both runs: none twice, none lost.
        assert len(ledger.entries) == len(trained) >= 3
        assert ledger.total_steps == sum(r["steps"] for r in trained)
        assert final.sites[site]["epsilon"] <= ledger.epsilon(1e-5) + 1e-9


def test_too_few_sites_stops_cleanly_after_the_wait(tmp_path: Path) -> None:
    sites = _sites(tmp_path, ["site-a"])
    fed_path, cfg = _federation(tmp_path, num_rounds=2, min_train_nodes=2, min_available_nodes=2, quorum=1,
                                node_wait_timeout_s=5.0)
    with pytest.raises(Exception, match="only 1 of the 2 required sites connected within 5 s"):
        run_simulation(cfg, fed_path, sites, tmp_path / "work", progress=False)
    assert list_round_checkpoints(cfg.federation.checkpoint_dir) == []
    assert not cfg.federation.final_model_path.exists()
