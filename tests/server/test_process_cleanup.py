"""Stopping a run's processes finds one that a dying daemon spawned, whose environment says nothing.

The race this pins down, seen with Ray: a raylet stopped while it starts its agents forks them
after the process-tree snapshot; they are orphaned (re-parented to PID 1) and rename themselves
with setproctitle, which overwrites the memory /proc/PID/environ shows, so the run's
``FLWR_HOME`` is gone from it. Here a real daemon in a session of its own does the same on
SIGTERM: it spawns a child with an environment that lacks the marker, then exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from server.local_federation import processes_with_env, stat_fields, stop_process_tree, stop_processes_with_env

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="process checks read /proc (Linux)")

# On SIGTERM: start an orphan-to-be without the marker in its environment, report its PID, exit.
_DAEMON = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    def spawn_and_exit(signum, frame):
        child = subprocess.Popen(["sleep", "120"], env={"PATH": os.environ["PATH"]})
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(child.pid))
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        os._exit(0)
    signal.signal(signal.SIGTERM, spawn_and_exit)
    open(sys.argv[2], "w").close()
    while True:
        time.sleep(0.1)
""")


def _alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _wait_for_file(path: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_child_spawned_while_its_daemon_stops_is_stopped_by_its_session(tmp_path: Path) -> None:
    marker = str(tmp_path / "flwr-home")
    child_pid_file, ready_file = tmp_path / "child.pid", tmp_path / "ready"
    daemon = subprocess.Popen([sys.executable, "-c", _DAEMON, str(child_pid_file), str(ready_file)],
                              env={**os.environ, "FLWR_HOME": marker}, start_new_session=True)
    child_pid = None
    try:
        _wait_for_file(ready_file)
        sessions = stop_process_tree(daemon, grace_s=5.0)
        assert sessions == {daemon.pid}, "the daemon leads the session it was started in"
        _wait_for_file(child_pid_file)
        child_pid = int(child_pid_file.read_text())
        assert _alive(child_pid), "the daemon's last child outlived the tree walk, as in the race"
        assert child_pid not in processes_with_env("FLWR_HOME", marker), "its environment lacks the marker"

        stop_processes_with_env("FLWR_HOME", marker, grace_s=2.0, sessions=sessions)

        assert not _alive(child_pid), "a process left in the run's session outlived the cleanup"
    finally:  # whatever the code under test did, leave nothing behind
        for pid in (daemon.pid, child_pid):
            if pid is not None and _alive(pid):
                os.kill(pid, 9)
        daemon.wait(timeout=5)


def test_processes_of_another_session_are_left_alone(tmp_path: Path) -> None:
    """The session sweep takes only sessions our processes lead: an unrelated process, in the
    test runner's own session and without the marker, keeps running."""
    bystander = subprocess.Popen(["sleep", "120"], env={"PATH": os.environ["PATH"]})
    try:
        # Marked but not a session leader: its session (the runner's) must not be swept with it.
        with_marker = subprocess.Popen(["sleep", "120"], env={"PATH": os.environ["PATH"],
                                                              "FLWR_HOME": str(tmp_path / "flwr-home")})
        stop_processes_with_env("FLWR_HOME", str(tmp_path / "flwr-home"), grace_s=1.0)
        with_marker.wait(timeout=10)  # the marked one is stopped: the sweep did run
        assert bystander.poll() is None, "an unrelated process was stopped"
    finally:
        bystander.kill()
        bystander.wait(timeout=5)
