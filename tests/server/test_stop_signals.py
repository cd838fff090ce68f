"""A stop signal to ``fedsynth simulate`` stops everything it started, then exits non-zero with one line.

Real processes throughout: the CLI in a subprocess, Flower's SuperLink, SuperExec and
simulation, read back from /proc. Only processes carrying this test's own FLWR_HOME or
SuperLink port are looked at (and, should the code under test fail, killed by PID).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from server.termination import STOP_SIGNALS
from tests.conftest import tiny_federation, write_shapes_dataset, write_site

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="process checks read /proc (Linux)")


def _processes_of_run(flwr_home: Path, port: str | None) -> dict[int, str]:
    """Live processes whose environment or command line carries this run's FLWR_HOME or port."""
    marks = [f"FLWR_HOME={flwr_home}".encode(), str(flwr_home).encode()]
    if port:
        marks += [f"127.0.0.1:{port}".encode(), f"--port\0{port}\0".encode()]
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env, cmdline = (entry / "environ").read_bytes(), (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(m in env or m in cmdline for m in marks):
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
    return found


def _superlink_port(flwr_home: Path) -> str | None:
    try:
        match = re.search(r'address = "127\.0\.0\.1:(\d+)"', (flwr_home / "config.toml").read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def _default_stop_signals() -> None:
    """In the child before exec: the dispositions of a command typed in a terminal. Ignored
    signals are inherited, so under ``nohup`` (SIGHUP) or in a shell's background job (SIGINT)
    the CLI would rightly keep ignoring the very signal a test sends."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    data = write_shapes_dataset(tmp_path / "data", per_class=6)
    sites = [write_site(tmp_path / "sites", s, data) for s in ("site-a", "site-b")]
    fed_path = tmp_path / "federation.yaml"
    fed_path.write_text(yaml.safe_dump(tiny_federation(tmp_path / "server", federation={"num_rounds": 20})))
    argv = [sys.executable, "-m", "server.cli", "simulate", "--config", str(fed_path),
            *(a for s in sites for a in ("--site", str(s))), "--workdir", str(tmp_path / "work")]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=_default_stop_signals)
    return proc, tmp_path / "work" / "flower" / "flwr-home"


def _wait_for(proc: subprocess.Popen, flwr_home: Path, needle: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"fedsynth exited early ({proc.returncode}): {proc.communicate()[1][-2000:]}"
        if any(needle in cmd for cmd in _processes_of_run(flwr_home, None).values()):
            return
        time.sleep(0.5)
    pytest.fail(f"no {needle} process with FLWR_HOME={flwr_home} within {timeout_s:.0f} s")


def _stop_and_check(proc: subprocess.Popen, flwr_home: Path, signals: list[int]) -> None:
    port = _superlink_port(flwr_home)
    assert port, f"no SuperLink address in {flwr_home / 'config.toml'}"
    try:
        for i, sig in enumerate(signals):
            if i:
                time.sleep(0.3)  # a repeat, as from an impatient user, while the cleanup runs
            proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("fedsynth simulate did not exit within 60 s of the signal")
        name = signal.Signals(signals[0]).name
        deadline = time.monotonic() + 10  # the kernel may take a moment to reap what was killed
        while (left := _processes_of_run(flwr_home, port)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"left running after {name}: {left}"
        assert proc.returncode == 128 + signals[0], err
        assert f"fedsynth simulate: stopped by {name}; every process it started has been stopped" in err, err
        assert "Traceback" not in err, err
    finally:  # never leave this test's own processes behind, whatever the code under test did
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in _processes_of_run(flwr_home, port):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_sigterm_during_a_run_stops_superlink_superexec_and_simulation(tmp_path: Path) -> None:
    proc, flwr_home = _start(tmp_path)
    # Once Ray's raylet runs, so do the SuperLink, the SuperExec, the simulation and Ray's
    # daemons, which start in sessions of their own: the processes most easily orphaned.
    _wait_for(proc, flwr_home, "raylet", timeout_s=240)
    _stop_and_check(proc, flwr_home, [signal.SIGTERM, signal.SIGTERM])


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_sighup_and_sigint_once_the_superlink_is_up(sig: int, tmp_path: Path) -> None:
    proc, flwr_home = _start(tmp_path)
    _wait_for(proc, flwr_home, "flower-superlink", timeout_s=120)
    _stop_and_check(proc, flwr_home, [sig])
