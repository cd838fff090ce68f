"""Scale: Flower simulations of 1 to 50 sites of the tiny model on this machine.

Per site count: wall time per round (``round_seconds`` of rounds after the first, and the
whole run) and the peak memory of the process tree (this process, the SuperLink, SuperExec,
ServerApp, Ray and its workers), sampled every 0.5 s as summed RSS and summed PSS.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.perf_common import TreeMemorySampler
from bench.perf_federation import round_times
from bench.perf_sites import make_federation
from server.simulation import run_simulation


def measure(root: Path, sites: int, rounds: int) -> dict:
    fed = make_federation(root, sites, training={"local_steps": 3, "batch_size": 4},
                          federation={"num_rounds": rounds}, patients_per_class=6)
    start = time.perf_counter()
    with TreeMemorySampler(flwr_home=root / "work" / "flower" / "flwr-home") as memory:
        result = run_simulation(fed.cfg, fed.config_path, fed.site_paths, root / "work", timeout_s=1800, progress=False)
    wall = time.perf_counter() - start
    times = round_times(fed)
    return {"sites": sites, "rounds": result.rounds_completed, "total_s": wall,
            "first_round_s": times["first_round_seconds"],
            "round_s_median": statistics.median(times["round_seconds"]) if times["round_seconds"] else float("nan"),
            "round_wall_s_median": statistics.median(times["round_wall_s"]) if times["round_wall_s"] else float("nan"),
            "peak_tree_rss_mb": memory.peak_rss_mb, "peak_tree_pss_mb": memory.peak_pss_mb,
            "peak_processes": memory.peak_processes}


def run(quick: bool, workdir: Path) -> dict:
    counts = (1, 5) if quick else (1, 5, 10, 20, 50)
    rows = [measure(workdir / f"sites-{n}", n, rounds=2 if quick else 3) for n in counts]
    return {"rows": rows}
