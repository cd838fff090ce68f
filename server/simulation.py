"""Run a federation config as a local simulation, follow it with a progress bar, report the result."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from common import keys
from common.audit_protocol import MODE_TRAIN, RUN_MODE
from common.checkpoint import check_output_dir
from common.config import FedsynthConfig
from common.errors import FederationError
from common.trainable import is_partial, trainable_names
from server.local_federation import local_superlink, run_status, save_run_log, submit_run

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_APP_PYPROJECT = """[project]
name = "fedsynth-app"
version = "0.1.0"
license = { file = "LICENSE" }
dependencies = ["flwr>=1.42.0,<1.43"]

[tool.flwr.app]
publisher = "fedsynth"
fab-format-version = 1
flwr-version-target = "1.42.0"

[tool.flwr.app.components]
serverapp = "server.server_app:app"
clientapp = "client.client_app:app"

[tool.flwr.app.config]
config = ""
sim-site-configs = ""
mode = "train"
audit-synthetic = ""
audit-thresholds = ""
audit-out = ""
"""


@dataclass(frozen=True)
class SimulationResult:
    run_id: int
    status: str
    seconds: float
    rounds_completed: int


def app_dir(workdir: Path) -> Path:
    """The Flower app to submit: this checkout, or (installed from a wheel) a bundle naming its modules."""
    pyproject = PROJECT_ROOT / "pyproject.toml"
    if pyproject.exists() and "[tool.flwr.app]" in pyproject.read_text():
        return PROJECT_ROOT
    bundle = workdir / "app"
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "pyproject.toml").write_text(_APP_PYPROJECT)
    (bundle / "LICENSE").write_text("Apache-2.0\n")
    return bundle


def last_error(log_file: Path) -> str:
    """The ServerApp's own exception line (``module.Error: message``) from a run log, if any."""
    if not log_file.exists():
        return ""
    lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines()]
    causes = [ln for ln in lines if ln.split(":", 1)[0].rsplit(".", 1)[-1].endswith(("Error", "Exception"))
              and " " not in ln.split(":", 1)[0]]
    return causes[-1] if causes else ""


def completed_rounds(metrics_file: Path) -> int:
    if not metrics_file.exists():
        return 0
    done = 0
    for line in metrics_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if row.get("phase") == "train" and row.get("kind") == "aggregate":
            done = max(done, int(row["round"]))
    return done


def run_simulation(cfg: FedsynthConfig, config_path: Path, site_configs: list[Path], workdir: Path,
                   timeout_s: float = 3600.0, progress: bool = True,
                   extra_run_config: dict[str, str] | None = None, app: Path | None = None) -> SimulationResult:
    """Run ``cfg`` with one simulated SuperNode per site config; raises if the run does not complete.

    ``extra_run_config`` adds run-config keys, e.g. ``{"mode": "audit", "audit-synthetic": DIR}``;
    ``app`` submits another app folder than this checkout (tests wrap the ServerApp with it).
    """
    extra = dict(extra_run_config or {})
    if extra.get(RUN_MODE, MODE_TRAIN) == MODE_TRAIN:
        check_output_dir(cfg)  # fail in a second, not after Flower has started
        if is_partial(cfg.training.trainable):
            trainable_names(cfg)  # likewise: a pattern that matches no parameter
    started = time.time()
    run_config = {keys.RUN_CONFIG_PATH: str(config_path.resolve()),
                  keys.RUN_SIM_SITES: ",".join(str(p.resolve()) for p in site_configs), **extra}
    with local_superlink(workdir / "flower") as link:
        run_id = submit_run(link, app or app_dir(workdir), run_config, num_supernodes=len(site_configs))
        status = _follow(link, run_id, cfg, timeout_s, progress)
        save_run_log(link, run_id, workdir / "run.log")
    rounds = completed_rounds(cfg.federation.metrics_file)
    if not status.endswith("completed"):
        cause = last_error(workdir / "run.log")
        raise FederationError(f"run {run_id} ended as '{status}' after {rounds} round(s)"
                              + (f": {cause}" if cause else "") + f"; full log: {workdir / 'run.log'}")
    return SimulationResult(run_id, status, time.time() - started, rounds)


def _follow(link, run_id: int, cfg: FedsynthConfig, timeout_s: float, progress: bool) -> str:
    def check_superlink() -> None:
        if link.process.poll() is not None:
            raise FederationError(f"the SuperLink exited (code {link.process.returncode}) during run {run_id}; see {link.log_file}")

    return follow_run(run_id, lambda: str(run_status(link, run_id).get("status", "")), cfg, timeout_s, progress,
                      check_superlink)


def follow_run(run_id: int, read_status: Callable[[], str], cfg: FedsynthConfig, timeout_s: float, progress: bool,
               check_alive: Callable[[], None] = lambda: None, poll_s: float = 2.0) -> str:
    """Show rounds done (from ``metrics.jsonl``) until Flower reports the run finished; returns its status.

    ``read_status`` asks the SuperLink (local or remote); ``check_alive`` raises if what
    runs the federation has died, so a dead SuperLink is reported rather than waited on.
    """
    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("[bold]federation[/]"), BarColumn(), TextColumn("round {task.completed}/{task.total}"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("rounds", total=cfg.federation.num_rounds, status="starting")
        while True:
            status = read_status()
            bar.update(task, completed=completed_rounds(cfg.federation.metrics_file), status=status)
            if status.startswith("finished"):
                return status
            if time.monotonic() > deadline:
                raise FederationError(f"run {run_id} did not finish within {timeout_s:.0f} s (last status '{status}')")
            check_alive()
            time.sleep(poll_s)
