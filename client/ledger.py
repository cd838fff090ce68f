"""The site's privacy ledger: every DP-SGD step the site ever takes, persisted in its state folder.

Steps are written to the ledger *before* training starts (a reservation), so a crash
mid-round can only over-count the privacy spent, never forget it. The ledger is one JSON
file replaced atomically; it survives rounds, runs and restarts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.privacy import Mechanism, compute_epsilon
from common.config import PrivacyBudget
from common.errors import PrivacyBudgetError, SiteDataError
from common.fileio import write_json_atomic

LEDGER_FILE = "privacy_ledger.json"
LEDGER_VERSION = 1


@dataclass
class LedgerEntry:
    noise_multiplier: float
    sample_rate: float
    steps: int
    run_id: str = ""
    server_round: int = 0
    time: float = 0.0

    def mechanism(self) -> Mechanism:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass
class PrivacyLedger:
    """All mechanisms applied to one site's data, and the accountant that composes them."""

    path: Path
    accountant: str = "prv"
    entries: list[LedgerEntry] = field(default_factory=list)

    @classmethod
    def open(cls, state_dir: str | Path, accountant: str = "prv") -> PrivacyLedger:
        """Load the ledger from ``state_dir`` (a new, empty one if the site never trained)."""
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            return cls(path=path, accountant=accountant)
        try:
            raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            entries = [LedgerEntry(**e) for e in raw["entries"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            # Never start from zero on a damaged ledger: that would silently reset epsilon.
            raise SiteDataError(f"{path}: privacy ledger is unreadable ({err}); restore it from backup") from None
        return cls(path=path, accountant=raw.get("accountant", accountant), entries=entries)

    def history(self) -> list[Mechanism]:
        return [e.mechanism() for e in self.entries]

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self.entries)

    def epsilon(self, delta: float, extra: list[Mechanism] | None = None) -> float:
        return compute_epsilon(self.history() + (extra or []), delta, self.accountant)

    def check_budget(self, budget: PrivacyBudget, planned: Mechanism) -> tuple[float, float]:
        """Epsilon (spent so far, after ``planned`` steps); raises if the latter exceeds ``budget``."""
        spent = self.epsilon(budget.delta)
        after = self.epsilon(budget.delta, [planned])
        if after > budget.epsilon:
            sigma, q, steps = planned
            public = (
                f"site refuses to train: {steps} more steps (noise multiplier {sigma}, sample rate {q:.4f}) "
                f"would raise epsilon from {spent:.3f} to {after:.3f}, over the site's budget of "
                f"{budget.epsilon} at delta {budget.delta}"
            )
            raise PrivacyBudgetError(f"{public} (ledger: {self.path})", public=public)
        return spent, after

    def reserve(self, planned: Mechanism, run_id: str = "", server_round: int = 0) -> None:
        """Record ``planned`` steps durably before they are taken."""
        sigma, q, steps = planned
        self.entries.append(LedgerEntry(sigma, q, steps, run_id=run_id, server_round=server_round, time=time.time()))
        self.save()

    def save(self) -> None:
        write_json_atomic(
            self.path,
            {
                "version": LEDGER_VERSION,
                "accountant": self.accountant,
                "total_steps": self.total_steps,
                "entries": [vars(e) for e in self.entries],
            },
        )
