"""The quality benchmark's tables: the numbers that matter from each report, printed and as Markdown."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

MAIN_COLUMNS = ("run", "FID", "FID per class (g/m/n/p)", "hist W1", "MS-SSIM syn", "MS-SSIM real", "TSTR", "TRTR",
                "mem <p1", "max eps", "train s", "sample s")
SWEEP_COLUMNS = ("guidance", "DDIM steps", "FID", "MS-SSIM syn", "TSTR", "TSTR bal.", "mem <p1", "sample s")


def summarise(report: dict) -> dict:
    fid, div, util, mem = report["fidelity"], report["diversity"], report["utility"], report["memorisation"] or {}
    return {"fid": fid["fid"], "fid_per_class": fid["fid_per_class"], "histogram_w1": fid["histogram_distance"],
            "ms_ssim_synthetic": div["ms_ssim_synthetic"], "ms_ssim_real": div["ms_ssim_real"],
            "tstr_accuracy": util["tstr_accuracy"], "tstr_balanced_accuracy": util["tstr_balanced_accuracy"],
            "trtr_accuracy": util.get("trtr_accuracy"), "ratio": util.get("ratio"),
            "fraction_below_p1": mem.get("fraction_below_p1"), "baseline_p1": mem.get("baseline_p1")}


def _f(value: object, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _main_rows(result: dict) -> list[list[str]]:
    rows = []
    for name, run in result["runs"].items():
        s = run["summary"]
        eps = [e for e in run["epsilon"].values() if e is not None]
        per_class = "/".join(_f(v, 2) for v in s["fid_per_class"].values())
        rows.append([name, _f(s["fid"]), per_class, _f(s["histogram_w1"]), _f(s["ms_ssim_synthetic"]), _f(s["ms_ssim_real"]),
                     _f(s["tstr_accuracy"]), _f(s["trtr_accuracy"]), _f(s["fraction_below_p1"]),
                     _f(max(eps), 2) if eps else "∞ (no DP)", _f(run["train_seconds"], 0), _f(run["sample_seconds"], 0)])
    return rows


def _sweep_rows(result: dict) -> list[list[str]]:
    return [[_f(r["guidance"], 1), str(r["steps"]), _f(r["summary"]["fid"]), _f(r["summary"]["ms_ssim_synthetic"]),
             _f(r["summary"]["tstr_accuracy"]), _f(r["summary"]["tstr_balanced_accuracy"]),
             _f(r["summary"]["fraction_below_p1"]), _f(r["sample_seconds"], 0)] for r in result.get("sweep", {}).get("rows", [])]


def print_table(result: dict) -> None:
    console = Console()
    table = Table(title=f"quality benchmark, preset {result['preset']}" + (" (REDUCED)" if result["reduced"] else ""))
    for column in MAIN_COLUMNS:
        table.add_column(column, justify="right")
    for row in _main_rows(result):
        table.add_row(*row)
    console.print(table)
    if result.get("sweep"):
        sweep = Table(title=f"sweep on the {result['sweep']['model']} model, {result['sweep']['samples']} images each")
        for column in SWEEP_COLUMNS:
            sweep.add_column(column, justify="right")
        for row in _sweep_rows(result):
            sweep.add_row(*row)
        console.print(sweep)


def _markdown(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def markdown_table(result: dict) -> str:
    m = result["machine"]
    head = (f"Preset `{result['preset']}`{' (reduced)' if result['reduced'] else ''}, {m['date']}, nproc {m['nproc']}, "
            f"{m['cpu']}{', ' + m['gpu'] if m['gpu'] else ''}, torch {m['torch']} ({m['torch_threads']} threads), "
            f"total {result.get('total_seconds', '?')} s.\n\n")
    text = head + _markdown(MAIN_COLUMNS, _main_rows(result))
    if result.get("sweep"):
        text += f"\nSweep on `{result['sweep']['model']}`:\n\n" + _markdown(SWEEP_COLUMNS, _sweep_rows(result))
    return text
