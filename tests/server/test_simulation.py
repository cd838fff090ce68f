"""A real Flower simulation (SuperLink, SuperExec, Ray-backed SuperNodes) end to end, then a resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from client.audit_log import read_audit
from client.ledger import INIT_MESSAGE_TYPE, PrivacyLedger
from client.optimizer_state import OPTIMIZER_STATE_FILE
from client.policy import app_code_hash
from common.checkpoint import list_round_checkpoints, load_checkpoint
from common.config import load_federation_config
from common.errors import ConfigError
from server.simulation import run_simulation
from tests.conftest import tiny_federation, write_shapes_dataset, write_site


REPO = Path(__file__).resolve().parents[2]


def _flower_processes_under(flwr_home: Path) -> list[int]:
    """PIDs of live processes started with this FLWR_HOME (ours, never another session's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"FLWR_HOME={flwr_home}".encode() in env and state != "Z":
            found.append(int(entry.name))
    return found


def _metrics(cfg) -> list[dict]:
    return [json.loads(line) for line in cfg.federation.metrics_file.read_text().splitlines()]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process checks read /proc (Linux)")
def test_two_sites_two_rounds_then_resume(tmp_path: Path) -> None:
    data_a = write_shapes_dataset(tmp_path / "data-a", per_class=10, seed=1)
    data_b = write_shapes_dataset(tmp_path / "data-b", per_class=6, seed=2)
    # Site a has a policy approving exactly the code under test: the app check passes in a real run.
    policy_a = tmp_path / "policy-a.yaml"

    def approve_current_code() -> None:
        policy_a.write_text(yaml.safe_dump({"max_epsilon": 50.0, "max_delta": 1e-5, "min_noise_multiplier": 0.5,
                                            "max_grad_norm": 1.0, "min_patients": 5, "approved_apps": [app_code_hash(REPO)]}))

    approve_current_code()
    sites = [write_site(tmp_path / "sites", "site-a", data_a, policy_file=str(policy_a)),
             write_site(tmp_path / "sites", "site-b", data_b)]
    fed_path = tmp_path / "federation.yaml"
    fed_path.write_text(yaml.safe_dump(tiny_federation(tmp_path / "server", federation={"evaluate_every": 1})))
    cfg = load_federation_config(fed_path)

    result = run_simulation(cfg, fed_path, sites, tmp_path / "work", progress=False)
    assert result.status == "finished:completed"
    assert result.rounds_completed == 2
    assert not _flower_processes_under(tmp_path / "work" / "flower" / "flwr-home")

    final = load_checkpoint(cfg.federation.final_model_path)
    assert final.rounds_completed == 2
    assert [r for r, _ in list_round_checkpoints(cfg.federation.checkpoint_dir)] == [1, 2]
    assert set(final.sites) == {"site-a", "site-b"}
    for site_id in ("site-a", "site-b"):
        ledger = PrivacyLedger.open(tmp_path / "sites" / site_id / "state")
        assert ledger.total_steps == 2 * cfg.training.local_steps
        assert final.sites[site_id]["epsilon"] == pytest.approx(ledger.epsilon(1e-5))
        # Round 2 resumed round 1's optimiser state: the real ClientApp passes one run id to both rounds.
        kept = torch.load(tmp_path / "sites" / site_id / "state" / OPTIMIZER_STATE_FILE, weights_only=True)
        assert kept["server_round"] == 2 and kept["steps"] == 2 * cfg.training.local_steps
    assert final.sites["site-a"]["num_examples"] > final.sites["site-b"]["num_examples"]
    rows = _metrics(cfg)
    trained = {(r["round"], r["site_id"]) for r in rows if r["kind"] == "site" and r["phase"] == "train"}
    assert trained == {(1, "site-a"), (1, "site-b"), (2, "site-a"), (2, "site-b")}
    assert {r["round"] for r in rows if r["kind"] == "aggregate" and r["phase"] == "evaluate"} == {1, 2}
    for site_id in ("site-a", "site-b"):
        audit = [r for r in read_audit(tmp_path / "sites" / site_id / "state") if r["message_type"] != INIT_MESSAGE_TYPE]
        assert [(r["message_type"], r["server_round"], r["outcome"]) for r in audit] == [
            ("train", 1, "ok"), ("evaluate", 1, "ok"), ("train", 2, "ok"), ("evaluate", 2, "ok")]
        assert audit[2]["epsilon_before"] == pytest.approx(audit[0]["epsilon_after"])
        assert audit[2]["epsilon_after"] == pytest.approx(final.sites[site_id]["epsilon"])
        assert all(r["bytes_sent"] > 0 and len(r["app_hash"]) == 64 for r in audit)
        assert audit[0]["config"]["fedsynth-config"]["privacy"]["noise_multiplier"] == 1.0
        assert audit[0]["bytes_sent"] > 4 * sum(v.size for v in final.arrays.values())  # the weights went out

    # Starting over in the same folder would overwrite the checkpoints: refused.
    with pytest.raises(Exception, match="already holds 2 round checkpoint"):
        run_simulation(cfg, fed_path, sites, tmp_path / "work-again", progress=False)

    # Resume to round 3. Site b has since lowered its budget below what it spent: it refuses,
    # the round completes with site a, and the refusal reaches the server without local paths.
    raw = tiny_federation(tmp_path / "server", federation={"num_rounds": 3, "resume": True, "min_train_nodes": 1})
    fed_path.write_text(yaml.safe_dump(raw))
    spent_b = final.sites["site-b"]["epsilon"]
    site_b = yaml.safe_load(sites[1].read_text())
    site_b["privacy_budget"]["epsilon"] = spent_b + 0.01
    sites[1].write_text(yaml.safe_dump(site_b))
    # Site c joins with a policy that approves another app: it refuses, costing nothing.
    policy_c = tmp_path / "policy-c.yaml"
    policy_c.write_text(yaml.safe_dump({"max_epsilon": 50.0, "max_delta": 1e-5, "approved_apps": ["0" * 64]}))
    sites.append(write_site(tmp_path / "sites", "site-c", data_a, policy_file=str(policy_c)))
    cfg3 = load_federation_config(fed_path)
    approve_current_code()  # the hash of the code each run ships
    result = run_simulation(cfg3, fed_path, sites, tmp_path / "work-resume", progress=False)
    assert result.rounds_completed == 3
    final3 = load_checkpoint(cfg3.federation.final_model_path)
    assert final3.rounds_completed == 3
    assert PrivacyLedger.open(tmp_path / "sites" / "site-a" / "state").total_steps == 3 * cfg.training.local_steps
    assert PrivacyLedger.open(tmp_path / "sites" / "site-b" / "state").total_steps == 2 * cfg.training.local_steps
    failures = [r for r in _metrics(cfg3) if r["kind"] == "failure" and r["round"] == 3 and r["phase"] == "train"]
    reasons = sorted(r["reason"] for r in failures)
    assert len(reasons) == 2
    assert any("over the site's budget" in r for r in reasons)
    assert any("site policy refuses the task: app code" in r for r in reasons)
    assert all(str(tmp_path) not in r for r in reasons)
    assert PrivacyLedger.open(tmp_path / "sites" / "site-c" / "state").entries == []
    refused = [r for r in read_audit(tmp_path / "sites" / "site-c" / "state") if r["message_type"] == "train"]
    assert refused[0]["outcome"].startswith("refused: site policy refuses the task")
    # Ledgers agree with the audit logs: every step taken is counted once, none is forgotten.
    for site_id in ("site-a", "site-b", "site-c"):
        state = tmp_path / "sites" / site_id / "state"
        taken = sum(r["steps"] for r in read_audit(state) if r["message_type"] == "train" and r["outcome"] == "ok")
        assert PrivacyLedger.open(state).total_steps == taken


def test_one_message_per_round_carries_the_validation_loss(tmp_path: Path) -> None:
    """evaluate_every 0: no evaluate message at all, yet every round logs each site's validation loss."""
    sites = [write_site(tmp_path / "sites", "site-a", write_shapes_dataset(tmp_path / "data-a", per_class=8, seed=1)),
             write_site(tmp_path / "sites", "site-b", write_shapes_dataset(tmp_path / "data-b", per_class=6, seed=2))]
    fed_path = tmp_path / "federation.yaml"
    fed_path.write_text(yaml.safe_dump(tiny_federation(tmp_path / "server", federation={"evaluate_every": 0})))
    cfg = load_federation_config(fed_path)

    result = run_simulation(cfg, fed_path, sites, tmp_path / "work", progress=False)
    assert result.status == "finished:completed" and result.rounds_completed == 2

    for site_id in ("site-a", "site-b"):
        audit = [r for r in read_audit(tmp_path / "sites" / site_id / "state") if r["message_type"] != INIT_MESSAGE_TYPE]
        assert [(r["message_type"], r["server_round"], r["outcome"]) for r in audit] == [("train", 1, "ok"), ("train", 2, "ok")]
    rows = _metrics(cfg)
    assert not [r for r in rows if r["phase"] == "evaluate"]
    per_site = {(r["round"], r["site_id"]): r for r in rows if r["kind"] == "site" and r["phase"] == "train"}
    assert set(per_site) == {(1, "site-a"), (1, "site-b"), (2, "site-a"), (2, "site-b")}
    for row in per_site.values():
        assert row["val-num-examples"] > 0 and row["val-loss"] > 0
    for rnd in (1, 2):
        (agg,) = [r for r in rows if r["kind"] == "aggregate" and r["phase"] == "train" and r["round"] == rnd]
        sites_rnd = [per_site[(rnd, s)] for s in ("site-a", "site-b")]
        weighted = sum(r["val-loss"] * r["val-num-examples"] for r in sites_rnd) / sum(r["val-num-examples"] for r in sites_rnd)
        assert agg["val-loss"] == pytest.approx(weighted)


def test_efficient_fine_tuning_sends_only_the_subset_and_keeps_the_frozen_weights(tmp_path: Path) -> None:
    """training.trainable efficient, one round: each train reply carries only the trained arrays (its byte count
    says so) and the round checkpoint holds every frozen array exactly as the server started it."""
    from common.model import build_unet, trainable_state
    from common.trainable import trainable_names

    sites = [write_site(tmp_path / "sites", "site-a", write_shapes_dataset(tmp_path / "data-a", per_class=8, seed=1)),
             write_site(tmp_path / "sites", "site-b", write_shapes_dataset(tmp_path / "data-b", per_class=6, seed=2))]
    fed_path = tmp_path / "federation.yaml"
    fed_path.write_text(yaml.safe_dump(tiny_federation(tmp_path / "server", federation={"num_rounds": 1},
                                                       training={"trainable": "efficient"})))
    cfg = load_federation_config(fed_path)
    result = run_simulation(cfg, fed_path, sites, tmp_path / "work", progress=False)
    assert result.status == "finished:completed" and result.rounds_completed == 1

    torch.manual_seed(cfg.training.seed)  # the server's fresh start (server/server_app.py)
    initial = trainable_state(build_unet(cfg.model))
    trained = set(trainable_names(cfg))
    trained_values = sum(initial[k].size for k in trained)
    all_values = sum(v.size for v in initial.values())
    for site_id in ("site-a", "site-b"):
        (train,) = [r for r in read_audit(tmp_path / "sites" / site_id / "state") if r["message_type"] == "train"]
        assert train["outcome"] == "ok"
        # float32 trained arrays plus names, shapes and metrics; far from the whole model's 4 bytes a value.
        assert 4 * trained_values < train["bytes_sent"] < 4 * trained_values + 40_000 < 4 * all_values
    (_, path), = list_round_checkpoints(cfg.federation.checkpoint_dir)
    round_1 = load_checkpoint(path)
    assert set(round_1.arrays) == set(initial)
    assert all(np.array_equal(round_1.arrays[k], initial[k]) for k in initial if k not in trained)
    assert any(not np.array_equal(round_1.arrays[k], initial[k]) for k in trained)


def test_fedadam_and_ema_checkpointed_then_resumed(tmp_path: Path) -> None:
    """Flower's FedAdam and the EMA in a real run: both in every checkpoint, both continued by a resume,
    and the sampler takes the EMA weights unless told otherwise."""
    import numpy as np

    from server.synthetic_set import SampleRequest, generate_synthetic_set

    sites = [write_site(tmp_path / "sites", "site-a", write_shapes_dataset(tmp_path / "data-a", per_class=8, seed=1)),
             write_site(tmp_path / "sites", "site-b", write_shapes_dataset(tmp_path / "data-b", per_class=6, seed=2))]
    server = {"server_optimizer": "fedadam", "eta": 0.01, "ema_decay": 0.9}
    fed_path = tmp_path / "federation.yaml"
    fed_path.write_text(yaml.safe_dump(tiny_federation(tmp_path / "server", federation=server)))
    cfg = load_federation_config(fed_path)
    assert run_simulation(cfg, fed_path, sites, tmp_path / "work", progress=False).rounds_completed == 2

    fed_path.write_text(yaml.safe_dump(tiny_federation(tmp_path / "server", federation={**server, "num_rounds": 3, "resume": True})))
    cfg3 = load_federation_config(fed_path)
    assert run_simulation(cfg3, fed_path, sites, tmp_path / "work-resume", progress=False).rounds_completed == 3

    two, three = (load_checkpoint(p) for r, p in list_round_checkpoints(cfg.federation.checkpoint_dir) if r in (2, 3))
    assert set(two.optimizer.slots) == set(three.optimizer.slots) == {"current_arrays", "m_t", "v_t"}
    assert (two.ema.steps, three.ema.steps) == (2, 3)
    for k, w2 in two.arrays.items():
        # Round 3 started from round 2's weights and moments: FedOpt's arrays are what was sent...
        assert np.array_equal(three.optimizer.slots["current_arrays"][k], w2)
        # ...its moments continue round 2's (m_3 = b1 m_2 + (1 - b1) d_3, v_3 = b2 v_2 + (1 - b2) d_3^2)...
        m2, v2, m3, v3 = (s.optimizer.slots[n][k].astype(np.float64) for s in (two, three) for n in ("m_t", "v_t"))
        d3 = (m3 - 0.9 * m2) / 0.1
        assert np.allclose(v3, 0.99 * v2 + 0.01 * d3 ** 2, rtol=1e-3, atol=1e-12)
        # ...with Flower's bias correction at the federation's round 3, not the resumed run's round 1
        eta_norm = 0.01 * np.sqrt(1 - 0.99 ** 4) / (1 - 0.9 ** 4)
        assert np.allclose(three.arrays[k], w2 + eta_norm * m3 / (np.sqrt(v3) + 1e-3), rtol=1e-4, atol=1e-6)
        # and the EMA went on from its saved accumulator.
        acc3 = 0.9 * two.ema.accumulator[k].astype(np.float64) + (1 - 0.9) * three.arrays[k].astype(np.float64)
        assert np.array_equal(three.ema.accumulator[k], acc3.astype(np.float32))
    final = load_checkpoint(cfg3.federation.final_model_path)
    assert final.ema.steps == 3 and all(np.array_equal(final.ema.weights[k], three.ema.weights[k]) for k in final.arrays)
    assert all(np.array_equal(final.optimizer.slots["m_t"][k], three.optimizer.slots["m_t"][k]) for k in final.arrays)

    request = {"checkpoint": cfg3.federation.final_model_path, "num": 2, "steps": 2, "seed": 3}
    by_default = generate_synthetic_set(SampleRequest(out=tmp_path / "ema", **request), progress=False)
    from_global = generate_synthetic_set(SampleRequest(out=tmp_path / "global", weights="global", **request), progress=False)
    assert (by_default["weights"], by_default["ema_decay"], from_global["weights"]) == ("ema", 0.9, "global")
    first = by_default["images"][0]["file"]
    assert (tmp_path / "ema" / first).read_bytes() != (tmp_path / "global" / first).read_bytes()


def test_missing_run_config_is_a_clear_error(tmp_path: Path) -> None:
    from server.server_app import _load_config

    class _Ctx:
        run_config = {"config": ""}

    with pytest.raises(ConfigError, match="run config 'config' is empty"):
        _load_config(_Ctx())  # type: ignore[arg-type]


@pytest.mark.skipif(shutil.which("fedsynth") is None and not (Path(sys.executable).parent / "fedsynth").exists(),
                    reason="the fedsynth console command is not installed")
def test_demo_command_end_to_end(tmp_path: Path) -> None:
    """The README's main job, shortened: the real console command, 3 simulated hospitals."""
    exe = Path(sys.executable).parent / "fedsynth"
    out = tmp_path / "demo"
    proc = subprocess.run([str(exe if exe.exists() else "fedsynth"), "demo", "--out", str(out), "--rounds", "1", "--local-steps", "2"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TERM": "dumb"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    assert Path(summary["checkpoint"]).is_file()
    assert (Path(summary["samples_dir"]) / "contact_sheet.png").is_file()
    assert [s["site_id"] for s in summary["sites"]] == ["hospital-a", "hospital-b", "hospital-c"]
    assert all(0 < s["epsilon"] < 10 and s["delta"] == 1e-5 and s["num_examples"] > 0 for s in summary["sites"])
    again = subprocess.run([str(exe if exe.exists() else "fedsynth"), "demo", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "already holds a demo run" in again.stderr


def test_a_federation_starts_from_a_pretrained_checkpoint(tmp_path: Path) -> None:
    """One site, one round, from a `fedsynth pretrain` checkpoint: every checkpoint records which, and a card."""
    from common.checkpoint import file_sha256
    from server.pretrain import PretrainRequest, run_pretrain

    fed_path = tmp_path / "federation.yaml"
    raw = tiny_federation(tmp_path / "server", federation={"num_rounds": 1, "min_train_nodes": 1, "min_available_nodes": 1})
    fed_path.write_text(yaml.safe_dump(raw))
    init_path = tmp_path / "pretrained.pt"
    run_pretrain(PretrainRequest(data_dir=write_shapes_dataset(tmp_path / "public", per_class=4, size=16, seed=9),
                                 config=fed_path, out=init_path, steps=2, description="public shapes"), progress=False)
    raw["model"]["init_checkpoint"] = init_path.name  # relative to the federation file
    fed_path.write_text(yaml.safe_dump(raw))
    cfg = load_federation_config(fed_path)
    sites = [write_site(tmp_path / "sites", "site-a", write_shapes_dataset(tmp_path / "data-a", per_class=6, seed=1))]

    result = run_simulation(cfg, fed_path, sites, tmp_path / "work", progress=False)
    assert result.status == "finished:completed" and result.rounds_completed == 1

    sha = file_sha256(init_path)
    (_, round_path), = list_round_checkpoints(cfg.federation.checkpoint_dir)
    for ckpt in (load_checkpoint(round_path), load_checkpoint(cfg.federation.final_model_path)):
        init = ckpt.provenance["init"]
        assert (init["kind"], init["sha256"], init["description"]) == ("checkpoint", sha, "public shapes")
        assert init["pretraining"]["kind"] == "pretrained" and init["pretraining"]["num_images"] == 8
    card = (cfg.federation.final_model_path.parent / "model_card.md").read_text()
    assert sha in card and "public shapes" in card and "site-a" in card
