"""Training curves from a federation's ``metrics.jsonl`` (written by ``server/strategy.py``).

Rows are ``{"round", "phase": "train"|"evaluate", "kind": "site"|"aggregate"|"failure", ...}``
with ``val-loss`` and ``epsilon`` among the numbers, and ``train-loss`` only from non-private
training (a DP site keeps its training loss: epsilon does not cover it), so the train curves of
a DP run are empty. ``val-loss`` comes with every train reply (the site's model after its local
training) and, in rounds with an evaluate phase, from that phase (the aggregated model), which is
preferred. A line that does not parse (one being written when the file was read) is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import keys
from common.errors import ConfigError

METRICS_FILE = "metrics.jsonl"

Series = list[tuple[float, float]]


def find_metrics_file(run_dir: str | Path) -> Path:
    """``DIR/metrics.jsonl`` (a federation's output_dir) or ``DIR/server/metrics.jsonl`` (a demo folder)."""
    run_dir = Path(run_dir)
    for candidate in (run_dir, run_dir / METRICS_FILE, run_dir / "server" / METRICS_FILE):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{run_dir}: no {METRICS_FILE} here or in {run_dir / 'server'}; "
                      "--run takes a federation's output_dir (or a demo --out folder)")


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_training_curves(run_dir: str | Path) -> dict:
    """Per-round series, JSON-ready.

    Returns:
        ``{"metrics_file", "rounds", "train_loss": [[round, loss], ...], "val_loss": [...],
        "site_train_loss": {site: [...]}, "epsilon": {site: [[round, eps], ...]},
        "failures": n}``.
    """
    path = find_metrics_file(run_dir)
    train: Series = []
    val: Series = []
    val_trained: Series = []
    site_loss: dict[str, Series] = {}
    epsilon: dict[str, Series] = {}
    failures = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            rnd = float(row["round"])
        except (ValueError, KeyError, TypeError):
            continue
        phase, kind = row.get("phase"), row.get("kind")
        if kind == "failure":
            failures += 1
        elif kind == "aggregate" and phase == "train":
            if _number(row.get(keys.TRAIN_LOSS)) is not None:
                train.append((rnd, float(row[keys.TRAIN_LOSS])))
            if _number(row.get(keys.VAL_LOSS)) is not None:  # the sites' trained models, sent with their updates
                val_trained.append((rnd, float(row[keys.VAL_LOSS])))
        elif kind == "aggregate" and phase == "evaluate" and _number(row.get(keys.VAL_LOSS)) is not None:
            val.append((rnd, float(row[keys.VAL_LOSS])))
        elif kind == "site" and phase == "train":
            site = str(row.get("site_id", row.get("node_id", "?")))
            if _number(row.get(keys.TRAIN_LOSS)) is not None:
                site_loss.setdefault(site, []).append((rnd, float(row[keys.TRAIN_LOSS])))
            if _number(row.get(keys.EPSILON)) is not None:
                epsilon.setdefault(site, []).append((rnd, float(row[keys.EPSILON])))
    val = val_trained + val  # where a round had an evaluate phase, the global model's loss wins
    rounds = sorted({r for r, _ in train} | {r for r, _ in val})
    return {"metrics_file": str(path), "rounds": [int(r) for r in rounds],
            "train_loss": _rows(train), "val_loss": _rows(val),
            "site_train_loss": {k: _rows(v) for k, v in sorted(site_loss.items())},
            "epsilon": {k: _rows(v) for k, v in sorted(epsilon.items())}, "failures": failures}


def _rows(series: Series) -> list[list[float]]:
    # a resumed run can log a round twice; the later line wins
    return [[r, v] for r, v in sorted(dict(series).items())]
