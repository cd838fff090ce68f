"""Run a federation as a local simulation on Flower's own SuperLink, and always clean up.

``flwr run`` would start a detached SuperLink that outlives it on a fixed port; instead we
start ``flower-superlink --simulation`` ourselves on free loopback ports, with a private
``FLWR_HOME``, submit the app with ``flwr run``, follow the run until it ends and stop the
SuperLink's whole process group by PID. ``flwr run --stream`` exits 0 even when a run
fails, so the run's status is read with ``flwr list`` instead.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.errors import FederationError
from server.termination import stop_signals_held, stop_signals_raise

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DISABLE_USAGE_STATS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
}
CONNECTION = "fedsynth-local"
# flower-superexec (which a SuperNode in subprocess isolation starts) looks for a new task once
# a second by default; each message waits half of that on average before its ClientApp process
# starts. Flower 1.42 reads this variable (0.01 to 60 s) in flower-superexec.
SUPEREXEC_POLL_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_executable(name: str) -> str:
    """Flower's executables from this interpreter's environment, not whatever is on PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass
class LocalSuperLink:
    process: subprocess.Popen
    address: str
    flwr_home: Path
    log_file: Path

    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The SuperLink finds ``flower-superexec`` on PATH: put this environment's bin first."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home), "PATH": path}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc.

    The SuperLink starts ``flower-superexec`` in a new session, which starts the
    simulation and Ray's workers: killing one process group misses them, so the tree is
    snapshotted before anything is stopped (orphans are re-parented and lost to the walk).
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := stat_fields(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def stop_process_tree(process: subprocess.Popen, grace_s: float = 10.0) -> set[int]:
    """SIGTERM the process and everything it started, wait, then SIGKILL whatever is left.

    Returns the sessions that the tree's processes led before they were stopped, for
    :func:`stop_processes_with_env` to sweep: what they started after the snapshot is in them.
    """
    tree = descendants(process.pid) if Path("/proc").is_dir() else []
    sessions = sessions_led_by([process.pid, *tree]) if Path("/proc").is_dir() else set()
    for pid in [process.pid, *tree]:
        _signal(pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
        time.sleep(0.2)
    for pid in [process.pid, *tree, *descendants(process.pid)]:
        _signal(pid, signal.SIGKILL)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    return sessions


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has ``name=value``.

    Ray starts its workers from daemons that outlive their parents, so a process-tree walk
    can miss them; every one of them inherits the private ``FLWR_HOME`` of its run, though.
    """
    marker = f"{name}={value}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes() + b"\0" and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (state, ppid, pgrp, session, ...); None once it is gone.

    The name is cut at the last ')': it may itself hold spaces and parentheses.
    """
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def session_of(pid: int) -> int | None:
    """The session ID of ``pid`` (None once it is gone)."""
    fields = stat_fields(pid)
    return int(fields[3]) if fields else None


def sessions_led_by(pids: Iterable[int]) -> set[int]:
    """The sessions whose leader is one of ``pids``: sessions our own processes created."""
    return {pid for pid in pids if session_of(pid) == pid}


def processes_in_sessions(sessions: set[int]) -> list[int]:
    """Live processes in any of ``sessions``, whatever their parent or environment now says."""
    if not sessions:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and session_of(int(entry.name)) in sessions:
            if _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def stop_processes_with_env(name: str, value: str, grace_s: float = 5.0, max_sweeps: int = 10,
                            sessions: Iterable[int] = ()) -> None:
    """SIGTERM, then SIGKILL, every process carrying ``name=value`` or living in one of
    ``sessions``, sweeping until none is left.

    One sweep is not enough: a Ray daemon stopped mid-start may still spawn its agents (dashboard,
    runtime-env) while the first sweep waits, and those would outlive the run. Nor is the
    environment alone: those agents rename themselves with setproctitle, which overwrites the
    memory /proc/PID/environ reads, so ``FLWR_HOME`` can vanish from it. Their session stays
    (the SuperExec's, which the SuperLink started), so a process in a session that one of ours
    leads is ours too.
    """
    known_sessions = set(sessions)

    def ours() -> list[int]:
        pids = set(processes_with_env(name, value))
        known_sessions.update(sessions_led_by(pids))
        return sorted(pids | set(processes_in_sessions(known_sessions)))

    for _ in range(max_sweeps):
        pids = ours()
        if not pids:
            time.sleep(0.5)  # a process forked just now shows up on the next look
            if not ours():
                return
            continue
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)
        for pid in ours():
            _signal(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"  # a zombie is dead for our purposes


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def local_superlink(workdir: Path, startup_timeout_s: float = 60.0, simulation: bool = True,
                    port: int | None = None, database: Path | None = None) -> Iterator[LocalSuperLink]:
    """A SuperLink on a loopback port (free unless given), stopped by PID when the block exits.

    ``simulation=False`` gives a plain insecure SuperLink that real SuperNodes on this machine
    join (tests of crashes and restarts); ``database`` keeps its state across restarts.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
    )
    log_file = workdir / "superlink.log"
    env = flower_env(flwr_home)
    process: subprocess.Popen | None = None
    # SIGTERM/SIGHUP would otherwise end us without the cleanup below: the SuperLink is in a
    # session of its own and would outlive us, with the SuperExec and Ray's workers.
    with stop_signals_raise():
        try:
            with stop_signals_held():  # a signal while it starts is raised once `process` is known
                with open(log_file, "ab") as log_handle:
                    process = subprocess.Popen(
                        [flower_executable("flower-superlink"), "--insecure", *(["--simulation"] if simulation else []),
                         "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
                         "--disable-runtime-dependency-installation", *(["--database", str(database)] if database else [])],
                        cwd=workdir, env=env, stdout=log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
            link = LocalSuperLink(process, address, flwr_home, log_file)
            _wait_ready(link, startup_timeout_s)
            yield link
        finally:
            if process is not None:
                with stop_signals_held():  # a second signal must not cut the cleanup short
                    sessions = stop_process_tree(process)
                    if Path("/proc").is_dir():
                        stop_processes_with_env("FLWR_HOME", str(flwr_home), sessions=sessions)


@contextmanager
def local_supernode(superlink: str, site_config: Path, log_file: Path,
                    auth: tuple[Path, Path] | None = None) -> Iterator[subprocess.Popen]:
    """A real SuperNode on this machine that joins ``superlink``, stopped by PID when the block exits.

    ``auth`` = (the CA certificate, the site's private key) for TLS and SuperNode authentication;
    without it the SuperNode connects insecurely (a SuperLink from ``local_superlink(simulation=False)``).
    Tests and benchmarks start hospitals this way; a hospital itself runs its kit's start-supernode.sh.
    """
    security = (["--insecure"] if auth is None
                else ["--root-certificates", str(auth[0]), "--auth-supernode-private-key", str(auth[1])])
    cmd = [flower_executable("flower-supernode"), *security, "--superlink", superlink, "--port", str(free_port()),
           "--node-config", f'site-config="{site_config}" num-threads=1']
    # One FLWR_HOME per SuperNode: each installs the app bundle under FLWR_HOME/apps, and nodes sharing
    # one home raced there (a node loaded the app while another was still unpacking it, and failed).
    # The poll interval is the one a kit's start-supernode.sh sets.
    env = {**flower_env(log_file.parent / f"flwr-home-{log_file.stem}"), **SUPEREXEC_POLL_ENV}
    with open(log_file, "ab") as handle:
        process = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    try:
        yield process
    finally:
        stop_process_tree(process)


def _wait_ready(link: LocalSuperLink, timeout_s: float) -> None:
    wait_for_port(link.process, link.address, timeout_s, link.log_file)


def wait_for_port(process: subprocess.Popen, address: str, timeout_s: float, log_file: Path) -> None:
    """Until ``process`` (a SuperLink) accepts connections at ``address``; a clear error if it dies or hangs."""
    host, port = address.split(":")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FederationError(f"flower-superlink exited with code {process.returncode}; see {log_file}")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return
        except OSError:
            time.sleep(0.3)
    raise FederationError(f"flower-superlink did not start within {timeout_s:.0f} s; see {log_file}")


def submit_run(link: LocalSuperLink, app_dir: Path, run_config: dict[str, str], num_supernodes: int | None,
               cpus_per_site: int = 1) -> int:
    """``flwr run`` the app on the local SuperLink; returns the run id.

    ``num_supernodes`` sizes a simulation; ``None`` runs on the SuperNodes that joined.
    """
    overrides = " ".join(f'{k}="{v}"' for k, v in run_config.items())
    cmd = [flower_executable("flwr"), "run", str(app_dir), CONNECTION, "--format", "json", "--run-config", overrides]
    if num_supernodes is not None:
        cmd += ["--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_site}"]
    proc = subprocess.run(cmd, env=link.env(), capture_output=True, text=True, timeout=300, cwd=app_dir)
    try:
        payload = json.loads(proc.stdout[proc.stdout.index("{"):])
        return int(payload["run-id"])
    except (ValueError, KeyError, TypeError):
        raise FederationError(f"flwr run failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}") from None


def run_status(link: LocalSuperLink, run_id: int) -> dict:
    """The run's row from ``flwr list`` (status, sub-status, details)."""
    proc = subprocess.run([flower_executable("flwr"), "list", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                          env=link.env(), capture_output=True, text=True, timeout=120)
    try:
        payload = json.loads(proc.stdout[proc.stdout.index("{"):])
        return dict(payload["runs"][0])
    except (ValueError, KeyError, IndexError, TypeError):
        raise FederationError(f"flwr list failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}") from None


def save_run_log(link: LocalSuperLink, run_id: int, path: Path) -> None:
    """Keep the run's ServerApp/ClientApp log next to the outputs, for the user to read."""
    try:
        proc = subprocess.run([flower_executable("flwr"), "log", str(run_id), CONNECTION, "--show"],
                              env=link.env(), capture_output=True, text=True, timeout=60)
        path.write_text(proc.stdout + proc.stderr)
    except (OSError, subprocess.SubprocessError):
        pass
