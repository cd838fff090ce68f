"""Performance benchmarks of fedsynth: cost of DP, of federation, sampling, communication, GPU readiness, scale.

    python bench/run.py --quick --json runs/perf-quick.json     # small sizes, under 10 minutes on 2 cores
    python bench/run.py --json runs/perf-full.json              # larger sizes (about an hour here)
    python bench/run.py --quick --only dp,sampling              # some sections only

Writes one JSON file with the headline ratios at the top level (``dp_time_ratio``,
``dp_memory_ratio``, ``federation_overhead_ratio``, ``ddim_speedup``, ``bytes_ratio``) and
every measurement under its section, and prints a summary. Measurements only: nothing here
asserts a speed; docs/performance.md says what the numbers mean and what each target's status is.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a clone without `pip install -e .` too

from bench import perf_dp, perf_federation, perf_gpu, perf_sampling, perf_scale, perf_transfer  # noqa: E402
from bench.perf_common import machine_info  # noqa: E402

SECTIONS = ("dp", "federation", "sampling", "transfer", "gpu", "scale")
HEADLINES = {"dp_time_ratio": ("dp", "dp_time_ratio"), "dp_memory_ratio": ("dp", "dp_memory_ratio"),
             "dp_time_ratio_wall": ("dp", "dp_time_ratio_wall"), "dp_memory_increase_ratio": ("dp", "dp_memory_increase_ratio"),
             "opacus_time_ratio": ("dp", "opacus_time_ratio"), "opacus_memory_ratio": ("dp", "opacus_memory_ratio"),
             "federation_overhead_ratio_cpu": ("federation", "federation_overhead_ratio_cpu"),
             "federation_overhead_ratio": ("federation", "federation_overhead_ratio"),
             "ddim_speedup": ("sampling", "ddim_speedup"), "bytes_ratio": ("transfer", "bytes_ratio"),
             "bytes_ratio_float16": ("transfer", "bytes_ratio_float16"),
             "deployment_beyond_training_s": ("federation", "deployment_beyond_training_s"),
             "deployment_beyond_training_s_10m_tls_auth": ("federation", "deployment_beyond_training_s_10m_tls_auth"),
             "cfg_cost": ("sampling", "cfg_cost")}
TARGETS = {"dp_time_ratio": ("<=", 1.3), "dp_memory_ratio": ("<=", 1.3), "federation_overhead_ratio": ("<=", 1.10),
           "ddim_speedup": (">=", 19.0), "bytes_ratio": ("<=", 1.02), "deployment_beyond_training_s": ("<=", 5.0),
           "deployment_beyond_training_s_10m_tls_auth": ("<=", 5.0)}


def run_section(name: str, quick: bool, workdir: Path, results: dict) -> dict:
    if name == "dp":
        return perf_dp.run(quick)
    if name == "federation":
        return perf_federation.run(quick, workdir / "federation")
    if name == "sampling":
        return perf_sampling.run(quick)
    if name == "transfer":
        sim = results.get("federation", {}).get("simulation")
        audits = {"tiny 0.28M (simulation run)": ([Path(d) for d in sim["state_dirs"]], sim["params"])} if sim else None
        return perf_transfer.run(quick, workdir / "transfer", audits)
    if name == "gpu":
        return perf_gpu.run(quick)
    if name == "scale":
        return perf_scale.run(quick, workdir / "scale")
    raise ValueError(name)


def _clean(value: object) -> object:
    """JSON has no NaN or infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def summary_lines(out: dict) -> list[str]:
    lines = []
    for key in HEADLINES:
        value = out.get(key)
        target = TARGETS.get(key)
        status = ""
        if value is not None and target:
            op, limit = target
            status = f"  target {op} {limit}: " + ("met" if (value <= limit if op == "<=" else value >= limit) else "NOT met")
        lines.append(f"{key:42s} {'-' if value is None else f'{value:.3f}'}{status}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under 10 minutes on 2 cores)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedsynth-perf-"))
    out: dict = {"mode": "quick" if args.quick else "full", "machine": machine_info(), "section_seconds": {}}
    started = time.perf_counter()
    for name in SECTIONS:
        if name not in sections:
            continue
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        out[name] = run_section(name, args.quick, workdir, out)
        out["section_seconds"][name] = time.perf_counter() - t0
        print(f"[bench] {name} done in {out['section_seconds'][name]:.0f} s", flush=True)
        if args.json:  # partial results survive a later section's failure
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(_clean(out), indent=1))
    for key, (section, field) in HEADLINES.items():
        out[key] = out.get(section, {}).get(field)
    out["total_seconds"] = time.perf_counter() - started
    out["machine"]["loadavg_end"] = list(__import__("os").getloadavg())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_clean(out), indent=1))
    print("\n".join(summary_lines(out)))
    print(f"total {out['total_seconds']:.0f} s; sections: " + ", ".join(f"{k} {v:.0f} s" for k, v in out["section_seconds"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
