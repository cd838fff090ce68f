"""The quality benchmark's tables: the numbers that matter from each report, printed and as Markdown."""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

MAIN_COLUMNS = ("run", "FID", "FID per class (g/m/n/p)", "hist W1", "MS-SSIM syn", "TSTR", "TSTR bal. (± SD over classifiers)",
                "mem <p1", "nearest-train median", "max eps", "batch / sigma / K", "train s", "sample s")
ABLATION_COLUMNS = ("federated + DP from pretraining", "FID", "Δ FID", "TSTR bal.", "Δ TSTR bal.", "mem <p1",
                    "nearest-train median", "max eps", "batch / sigma / K")
SETS_TITLE = "every model on several sets of sampled images (disjoint seeds; the first set is the table above's)"
SETS_COLUMNS = ("run", "sets x images", "FID (mean ± SD)", "TSTR bal. (mean ± SD over sets)", "TSTR bal. min / max",
                "mem <p1 (max)", "all images pooled: FID", "pooled: TSTR bal.")
SWEEP_COLUMNS = ("guidance", "DDIM steps", "FID", "MS-SSIM syn", "TSTR", "TSTR bal.", "mem <p1", "sample s")


def summarise(report: dict) -> dict:
    fid, div, util, mem = report["fidelity"], report["diversity"], report["utility"], report["memorisation"] or {}
    return {"fid": fid["fid"], "fid_per_class": fid["fid_per_class"], "histogram_w1": fid["histogram_distance"],
            "ms_ssim_synthetic": div["ms_ssim_synthetic"], "ms_ssim_real": div["ms_ssim_real"],
            "tstr_accuracy": util["tstr_accuracy"], "tstr_balanced_accuracy": util["tstr_balanced_accuracy"],
            "tstr_balanced_sd": util.get("tstr_balanced_accuracy_sd"), "classifier_repeats": util.get("classifier_repeats", 1),
            "trtr_accuracy": util.get("trtr_accuracy"), "ratio": util.get("ratio"),
            "fraction_below_p1": mem.get("fraction_below_p1"), "baseline_p1": mem.get("baseline_p1"),
            "nearest_train_median": _median(mem)}


def _median(mem: dict) -> float | None:
    levels, values = mem.get("quantile_levels") or [], mem.get("synthetic_quantiles") or []
    if isinstance(values, dict):
        values = list(values.values())
    return next((float(v) for level, v in zip(levels, values) if abs(float(level) - 0.5) < 1e-9), None)


def _f(value: object, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _balanced(s: dict) -> str:
    """Balanced TSTR, with its SD over the classifier seeds when there were several."""
    sd = s.get("tstr_balanced_sd")
    return _f(s["tstr_balanced_accuracy"]) + ("" if sd is None else f" ± {sd:.3f}")


MAIN = ("public_only", "central", "federated", "central_pretrained", "federated_pretrained", "federated_dp",
        "federated_dp_pretrained", "federated_dp_pretrained_efficient")
ABLATIONS = ("ablation_no_ema", "ablation_restart", "ablation_k1", "ablation_no_planner")


def _eps(run: dict) -> str:
    eps = [e for e in (run.get("epsilon") or {}).values() if e is not None]
    return _f(max(eps), 2) if eps else "∞ (no DP)"


def _setting(run: dict) -> str:
    sigma = run.get("noise_multiplier")
    return f"{run.get('batch_size')} / {'–' if sigma is None else f'{sigma:.2f}'} / {run.get('noise_multiplicity', 1)}"


def _main_rows(result: dict) -> list[list[str]]:
    rows = []
    for name in [n for n in MAIN if n in result["runs"]] + [n for n in result["runs"] if n not in MAIN + ABLATIONS]:
        run = result["runs"][name]
        s = run["summary"]
        per_class = "/".join(_f(v, 1) for v in s["fid_per_class"].values())
        rows.append([run.get("title", name), _f(s["fid"], 2), per_class, _f(s["histogram_w1"]), _f(s["ms_ssim_synthetic"]),
                     _f(s["tstr_accuracy"]), _balanced(s), _f(s["fraction_below_p1"]),
                     _f(s.get("nearest_train_median")), _eps(run), _setting(run), _f(run["train_seconds"], 0),
                     _f(run["sample_seconds"], 0)])
    return rows


def _ablation_rows(result: dict) -> list[list[str]]:
    runs = result["runs"]
    full = runs.get("federated_dp_pretrained")
    if full is None:
        return []
    base = full["summary"]

    def row(label: str, run: dict) -> list[str]:
        s = run["summary"]
        d_fid = s["fid"] - base["fid"]
        d_tstr = s["tstr_balanced_accuracy"] - base["tstr_balanced_accuracy"]
        return [label, _f(s["fid"], 2), f"{d_fid:+.2f}", _balanced(s), f"{d_tstr:+.3f}",
                _f(s["fraction_below_p1"]), _f(s.get("nearest_train_median")), _eps(run), _setting(run)]

    rows = [row("full recipe", full)]
    rows += [row(runs[n]["title"], runs[n]) for n in ABLATIONS if n in runs]
    if "federated_dp" in runs:
        rows.append(row("minus pretraining (= from scratch)", runs["federated_dp"]))
    return rows


def _mean_sd(values: list[float], digits: int) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _sets_rows(result: dict) -> list[list[str]]:
    """Per run scored on several sampling sets: the spread between draws of the same model, and the pooled set."""
    rows = []
    for name, run in result["runs"].items():
        sets = run.get("sets")
        if not sets:
            continue
        each, pooled = sets["summaries"], sets["pooled"]
        tstr = [s["tstr_balanced_accuracy"] for s in each]
        memorised = [s["fraction_below_p1"] for s in each + [pooled] if s["fraction_below_p1"] is not None]
        rows.append([run.get("title", name), f"{sets['count']} x {sets['samples']}",
                     _mean_sd([s["fid"] for s in each], 2), _mean_sd(tstr, 3), f"{min(tstr):.3f} / {max(tstr):.3f}",
                     _f(max(memorised) if memorised else None),
                     _f(pooled["fid"], 2), _balanced(pooled)])
    return rows


def _sweep_rows(result: dict) -> list[list[str]]:
    return [[_f(r["guidance"], 1), str(r["steps"]), _f(r["summary"]["fid"]), _f(r["summary"]["ms_ssim_synthetic"]),
             _f(r["summary"]["tstr_accuracy"]), _balanced(r["summary"]),
             _f(r["summary"]["fraction_below_p1"]), _f(r["sample_seconds"], 0)] for r in result.get("sweep", {}).get("rows", [])]


def print_table(result: dict) -> None:
    console = Console()
    table = Table(title=f"quality benchmark, preset {result['preset']}" + (" (REDUCED)" if result["reduced"] else ""))
    for column in MAIN_COLUMNS:
        table.add_column(column, justify="right")
    for row in _main_rows(result):
        table.add_row(*row)
    console.print(table)
    sets = _sets_rows(result)
    if sets:
        t = Table(title=SETS_TITLE)
        for column in SETS_COLUMNS:
            t.add_column(column, justify="right")
        for row in sets:
            t.add_row(*row)
        console.print(t)
    ablation = _ablation_rows(result)
    if len(ablation) > 1:
        t = Table(title="ablation: each row takes one ingredient away (Δ: minus the full recipe)")
        for column in ABLATION_COLUMNS:
            t.add_column(column, justify="right")
        for row in ablation:
            t.add_row(*row)
        console.print(t)
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


def _recipe_line(model: dict) -> str:
    """The recipe choices that do not make a run "reduced", so that a table read alone says which recipe it is."""
    finetune = model.get("finetune_learning_rate")
    return (f"Recipe: noise schedule `{model.get('schedule', 'linear_beta')}`, server step "
            f"`{model.get('server_optimizer', 'fedavg')}`, learning rate {model.get('learning_rate', '?')}"
            f"{f', {finetune} from the public checkpoint' if finetune else ''}.\n\n")


def markdown_table(result: dict) -> str:
    m = result["machine"]
    head = (f"Preset `{result['preset']}`{' (reduced)' if result['reduced'] else ''}, {m['date']}, nproc {m['nproc']}, "
            f"{m['cpu']}{', ' + m['gpu'] if m['gpu'] else ''}, torch {m['torch']} ({m['torch_threads']} threads), "
            f"total {result.get('total_seconds', '?')} s.\n\n")
    text = head + _recipe_line(result.get("model", {})) + _markdown(MAIN_COLUMNS, _main_rows(result))
    sets = _sets_rows(result)
    if sets:
        text += f"\n{SETS_TITLE[0].upper()}{SETS_TITLE[1:]}:\n\n" + _markdown(SETS_COLUMNS, sets)
    ablation = _ablation_rows(result)
    if len(ablation) > 1:
        text += "\nAblation (Δ: minus the full recipe):\n\n" + _markdown(ABLATION_COLUMNS, ablation)
    if result.get("sweep"):
        text += f"\nSweep on `{result['sweep']['model']}`:\n\n" + _markdown(SWEEP_COLUMNS, _sweep_rows(result))
    return text
