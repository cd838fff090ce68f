"""A deployed federation on loopback: real SuperLink (TLS, SuperNode auth), real SuperNodes, ``fedsynth run``.

Everything is started from kits made by ``fedsynth provision`` with the kits' own scripts,
the way a coordinator and the hospitals would, and every process is stopped by PID when
the module ends, whatever happened.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from client.ledger import PrivacyLedger
from common.checkpoint import load_checkpoint
from server.local_federation import flower_env, free_port, stop_process_tree
from server.remote_run import RemoteSuperLink
from tests.conftest import tiny_federation, write_shapes_dataset

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="process checks read /proc (Linux)")

REPO = Path(__file__).resolve().parents[2]
HEALTHCHECK = REPO / "deploy" / "healthcheck.py"
# flwr's ExitCode.SUPERNODE_CONNECTION_ERROR: logged as such, though the process itself exits 1
# (the SuperNode runs inside uvicorn, which turns the SystemExit into a plain failure).
CONNECTION_REFUSED_LOG = "Exit Code: 305"


@dataclass
class Federation:
    root: Path
    kits: Path
    address: str
    ca: Path
    health: str
    node_health: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    registered_ids: set[str] = field(default_factory=set)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def start(self, name: str, cmd: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        env = {**flower_env(self.root / f"flwr-home-{name}"), **(extra_env or {})}
        with open(self.root / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.root, start_new_session=True)
        self.processes[name] = proc
        return proc

    def nodes(self) -> list[dict]:
        link = RemoteSuperLink(self.address, self.ca, self.root / "flwr-home-cli")
        proc = link.flwr("supernode", "list", "fedsynth", "--format", "json")
        return list(json.loads(proc.stdout[proc.stdout.index("{"):])["nodes"])


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def healthy(address: str) -> bool:
    """The containers' own health check script, run the way their HEALTHCHECK runs it."""
    return subprocess.run([sys.executable, str(HEALTHCHECK), address], capture_output=True, timeout=30).returncode == 0


def _load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedsynth_healthcheck", HEALTHCHECK)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the same check in process, for waiting: a Python start per poll would cost the CPU we wait for
serving = _load_healthcheck().check


def cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "TERM": "dumb"})


def configure_site(kit: Path, data: Path, state: Path) -> None:
    """What a hospital admin does with the kit: point site.yaml at the scans and the state folder, set the budget."""
    site = yaml.safe_load((kit / "site.yaml").read_text())
    site.update(data_dir=str(data), state_dir=str(state), privacy_budget={"epsilon": 50.0, "delta": 1e-5})
    (kit / "site.yaml").write_text(yaml.safe_dump(site))
    policy = yaml.safe_load((kit / "site-policy.yaml").read_text())  # the kit's policy caps epsilon too
    policy.update(max_epsilon=50.0)
    (kit / "site-policy.yaml").write_text(yaml.safe_dump(policy))
    made = cli("site", "init", "--config", str(kit / "site.yaml"))
    assert made.returncode == 0, made.stderr


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("deployed")
    made = cli("provision", "--sites", "site-a,site-b,site-c", "--server-host", "localhost", "--out", str(root / "kits"))
    assert made.returncode == 0, made.stderr
    other = cli("provision", "--sites", "site-a", "--server-host", "localhost", "--out", str(root / "other-kits"))
    assert other.returncode == 0, other.stderr
    port, health = free_port(), f"127.0.0.1:{free_port()}"
    fed = Federation(root, root / "kits", f"127.0.0.1:{port}", root / "kits" / "server" / "ca.pem", health,
                     f"127.0.0.1:{free_port()}")
    try:
        fed.start("superlink", [str(fed.kits / "server" / "start-superlink.sh"), "--health-server-address", health],
                  {"FEDSYNTH_BIND": "127.0.0.1", "FEDSYNTH_PORT": str(port), "FEDSYNTH_SERVER_STATE": str(root / "server-state")})
        wait_for(lambda: fed.processes["superlink"].poll() is not None or serving(health, 1.0), 60,
                 "the SuperLink's health server")
        assert fed.processes["superlink"].poll() is None, fed.log("superlink")
        # site-c is provisioned but never registered: the coordinator did not admit it
        registered = subprocess.run([str(fed.kits / "server" / "register-sites.sh"), fed.address, "site-a", "site-b"],
                                    env=flower_env(root / "flwr-home-register"), capture_output=True, text=True, timeout=120)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        fed.registered_ids = set(re.findall(r"SuperNode (\d+) registered successfully", registered.stdout))
        assert len(fed.registered_ids) == 2, registered.stdout

        node_env = {"FEDSYNTH_SUPERLINK": fed.address, "FEDSYNTH_NUM_THREADS": "1"}
        for i, site in enumerate(("site-a", "site-b")):
            kit = fed.kits / "sites" / site
            configure_site(kit, write_shapes_dataset(root / "data" / site, per_class=6, seed=i), root / "state" / site)
            extra = ["--health-server-address", fed.node_health] if site == "site-a" else []
            fed.start(site, [str(kit / "start-supernode.sh"), "--port", str(free_port()), *extra], node_env)
        fed.start("unregistered", [str(fed.kits / "sites" / "site-c" / "start-supernode.sh"), "--port", str(free_port())],
                  node_env)
        fed.start("other-ca", [str(root / "other-kits" / "sites" / "site-a" / "start-supernode.sh"),
                               "--port", str(free_port())], node_env)
        yield fed
    finally:
        for proc in reversed(list(fed.processes.values())):
            stop_process_tree(proc)


def test_health_check_script_tells_up_from_down(federation: Federation) -> None:
    # deploy/healthcheck.py is what the Docker HEALTHCHECK runs: it must pass here and fail where nothing listens
    wait_for(lambda: serving(federation.node_health, 1.0), 60, "site-a's SuperNode health server")
    assert healthy(federation.health)  # the SuperLink's (server image)
    assert healthy(federation.node_health)  # a SuperNode's (hospital image)
    assert not healthy(f"127.0.0.1:{free_port()}")


def test_unregistered_key_is_refused(federation: Federation) -> None:
    proc = federation.processes["unregistered"]
    proc.wait(timeout=90)
    log = federation.log("unregistered")
    assert proc.returncode != 0, log
    assert CONNECTION_REFUSED_LOG in log
    assert "Failed to activate SuperNode" in log


def test_node_trusting_another_ca_is_refused(federation: Federation) -> None:
    proc = federation.processes["other-ca"]
    proc.wait(timeout=90)
    log = federation.log("other-ca")
    assert proc.returncode != 0, log
    assert CONNECTION_REFUSED_LOG in log
    assert "CERTIFICATE_VERIFY_FAILED" in log
    assert "Failed to activate SuperNode" not in log  # refused at the TLS handshake, before any request


def test_only_the_registered_sites_come_online(federation: Federation) -> None:
    wait_for(lambda: sorted(n["status"] for n in federation.nodes()) == ["online", "online"], 90,
             "both registered SuperNodes online")
    # exactly the two registered keys are known, and the refused SuperNodes never show up
    assert {n["node-id"] for n in federation.nodes()} == federation.registered_ids
    for site in ("site-a", "site-b"):
        assert federation.processes[site].poll() is None, federation.log(site)


def test_one_round_with_fedsynth_run(federation: Federation) -> None:
    out = federation.root / "server-out"
    fed_yaml = federation.root / "federation.yaml"
    fed_yaml.write_text(yaml.safe_dump(tiny_federation(out, federation={"num_rounds": 1})))
    run = subprocess.Popen([sys.executable, "-m", "server.cli", "run", "--superlink", federation.address,
                            "--ca", str(federation.ca), "--config", str(fed_yaml), "--no-progress",
                            "--log", str(federation.root / "run.log")],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "TERM": "dumb"}, start_new_session=True)
    try:
        stdout, stderr = run.communicate(timeout=300)
    finally:
        stop_process_tree(run)
    assert run.returncode == 0, stdout + stderr
    assert "finished:completed" in stdout
    final = load_checkpoint(out / "final_model.pt")
    assert final.rounds_completed == 1
    assert set(final.sites) == {"site-a", "site-b"}
    local_steps = tiny_federation(out)["training"]["local_steps"]
    for site in ("site-a", "site-b"):
        assert PrivacyLedger.open(federation.root / "state" / site).total_steps == local_steps
    streamed = (federation.root / "run.log").read_text()
    assert "[ROUND 1/1]" in streamed


def test_failed_run_exits_non_zero(federation: Federation) -> None:
    fed_yaml = federation.root / "federation-missing-on-server.yaml"
    fed_yaml.write_text(yaml.safe_dump(tiny_federation(federation.root / "never-written", federation={"num_rounds": 1})))
    result = cli("run", "--superlink", federation.address, "--ca", str(federation.ca), "--config", str(fed_yaml),
                 "--server-config", str(federation.root / "not-on-the-server.yaml"), "--no-progress",
                 "--log", str(federation.root / "failed-run.log"), timeout_s=300)
    assert result.returncode != 0
    assert "ended as 'finished:failed'" in result.stderr
    assert "config file not found" in result.stderr
