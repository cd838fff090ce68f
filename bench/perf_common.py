"""Measuring on a shared 2-core machine: interleaved repeats, medians, peak RSS of fresh processes and trees.

Other people's jobs run on the same cores, so absolute times drift by 2x within minutes.
Every comparison here runs its variants interleaved in one process and reports the median
of each and the ratio of medians, in wall time and in CPU time of this process (the
latter is not inflated by time-slicing, only by shared caches).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.local_federation import processes_with_env  # noqa: E402


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Run each variant ``warmup + repeats`` times in turn (A B C A B C ...); medians of the timed repeats."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for i in range(warmup + repeats):
        for name, fn in variants.items():
            result = timed(fn)
            if i >= warmup:
                samples[name].append(result)
    return {name: {"wall_s": statistics.median(w for w, _ in s), "cpu_s": statistics.median(c for _, c in s),
                   "repeats": len(s)} for name, s in samples.items()}


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far.

    /proc's VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork + exec, so a
    child started by a large parent reports at least the parent's size.
    """
    peak = _status_mb("VmHWM")
    return peak if peak == peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


def run_child(module: str, args: dict, timeout_s: float = 600.0) -> dict:
    """``python -m bench.<module>`` in a fresh process, its JSON answer on the last stdout line.

    A fresh process per variant is how peak memory is compared: torch's allocator keeps
    freed memory, so a second variant in the same process would inherit the first's peak.
    """
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", f"bench.{module}", json.dumps(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.{module} {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB; PSS splits shared pages (torch's libraries) between the processes mapping them."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and of its children it has waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")


class TreeMemorySampler:
    """Samples the summed RSS, PSS and CPU time of this process's descendants every ``period_s``.

    The sum of RSS counts shared libraries once per process (an over-estimate); PSS is the
    fair share. Ray starts its workers from daemons that can leave the tree by re-parenting:
    ``flwr_home`` adds every process whose environment holds ``FLWR_HOME=<flwr_home>`` (all of a
    run's processes inherit it). ``cpu_at(t)`` is the CPU seconds at wall-clock time ``t``
    (``time.time()``), interpolated.
    """

    def __init__(self, period_s: float = 0.5, cpu_subtree: str = "flower-superlink", flwr_home: Path | None = None) -> None:
        self.period_s = period_s
        self.flwr_home = flwr_home
        # CPU is summed under the process whose command line holds ``cpu_subtree`` only: the short
        # ``flwr list`` calls that follow a run would come and go between samples.
        self.cpu_subtree = cpu_subtree
        self.peak_rss_mb = self.peak_pss_mb = 0.0
        self.peak_processes = 0
        self.cpu_timeline: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        root = os.getpid()
        while not self._stop.is_set():
            tree, pids, stack = _children(), [root], [root]
            while stack:
                for child in tree.get(stack.pop(), []):
                    pids.append(child)
                    stack.append(child)
            run = processes_with_env("FLWR_HOME", str(self.flwr_home)) if self.flwr_home else []
            # Not this process: it only drives the run, and holds whatever earlier benchmarks left.
            pids = sorted((set(pids) | set(run)) - {root})
            totals = [_memory_kb(pid) for pid in pids]
            cpu_pids = set(self._subtree(tree, pids)) | set(run)
            self.cpu_timeline.append((time.time(), sum(_cpu_s(pid) for pid in cpu_pids)))
            self.peak_rss_mb = max(self.peak_rss_mb, sum(r for r, _ in totals) / 1024)
            self.peak_pss_mb = max(self.peak_pss_mb, sum(p for _, p in totals) / 1024)
            self.peak_processes = max(self.peak_processes, len(pids))
            self._stop.wait(self.period_s)

    def _subtree(self, tree: dict[int, list[int]], pids: list[int]) -> list[int]:
        tops = [pid for pid in pids if self.cpu_subtree in _cmdline(pid)]
        found, stack = list(tops), list(tops)
        while stack:
            for child in tree.get(stack.pop(), []):
                found.append(child)
                stack.append(child)
        return found

    def cpu_at(self, t: float) -> float:
        points = self.cpu_timeline
        if not points:
            return float("nan")
        for (t0, c0), (t1, c1) in zip(points, points[1:]):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1
        return points[-1][1] if t > points[-1][0] else points[0][1]


def machine_info() -> dict:
    import torch

    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "nproc": sh("nproc"),
            "lscpu_head": sh("lscpu | head -n 8"), "loadavg": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}
