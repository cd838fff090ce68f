"""The site's audit log: one JSON line per task received, append-only, flushed per line.

Lives next to the privacy ledger in the site's state folder (``audit.jsonl``), so a
hospital can show what every task asked for, what it cost and what left the site.
Readable with ``fedsynth site audit`` or ``jq``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.fileio import append_jsonl

AUDIT_FILE = "audit.jsonl"


@dataclass
class TaskRecord:
    run_id: str
    message_type: str
    app_hash: str
    config: dict[str, Any]
    time: float = field(default_factory=time.time)
    server_round: int = 0
    steps: int = 0
    epsilon_before: float | None = None
    epsilon_after: float | None = None
    bytes_sent: int = 0
    outcome: str = "pending"
    """``ok``, ``refused: <reason sent to the server>`` or ``error: <category>``."""
    unsafe_reproducible_dp: bool = False
    """A DP round seeded from the config (the site's test-only switch): written only when true."""


def append_task_record(state_dir: str | Path, record: TaskRecord) -> None:
    row = asdict(record)
    for key in ("epsilon_before", "epsilon_after"):  # JSON has no infinity: non-private is null + flag
        value = row[key]
        if value is not None and value == float("inf"):
            row[key] = None
            row["non_private"] = True
    if not row["unsafe_reproducible_dp"]:
        del row["unsafe_reproducible_dp"]  # a line holds it only when it matters, as non_private
    append_jsonl(Path(state_dir) / AUDIT_FILE, row)


def read_audit(state_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(state_dir) / AUDIT_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            rows.append({"outcome": "unreadable line", "raw": line[:80]})  # shown, never dropped silently
    return rows
