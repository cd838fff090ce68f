"""The site's privacy ledger: every DP-SGD step the site ever takes, persisted in its state folder.

Steps are written to the ledger *before* training starts (a reservation), so a crash
mid-round can only over-count the privacy spent, never forget it. The ledger is one JSON
file replaced atomically; it survives rounds, runs and restarts.

The hospital's admin creates it once (``fedsynth site init``, :func:`init_ledger`). A site
never trains on a ledger that is missing, empty, damaged or holds fewer steps than its own
audit log records: any of those would silently restart epsilon from zero. Reading the ledger,
checking the budget and reserving happen under one inter-process lock, so two tasks running
at once cannot both spend the same remaining budget.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.audit_log import AUDIT_FILE, TaskRecord, append_task_record, read_audit
from client.epsilon_cache import EpsilonCache
from client.privacy import Mechanism, check_mechanism, compute_epsilon
from common.config import ACCOUNTANTS, PrivacyBudget
from common.errors import PrivacyBudgetError, SiteDataError
from common.filelock import exclusive_lock
from common.fileio import write_json_atomic

LEDGER_FILE = "privacy_ledger.json"
LOCK_FILE = "privacy_ledger.lock"
LEDGER_VERSION = 1
INIT_MESSAGE_TYPE = "ledger.init"
_NOT_INITIALISED = "the site's privacy ledger is missing or damaged; the site's admin must fix it"


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


def _ledger_error(path: Path, problem: str) -> SiteDataError:
    return SiteDataError(f"{path}: {problem}", public=_NOT_INITIALISED)


def _parse_entry(path: Path, index: int, raw: Any) -> LedgerEntry:
    if not isinstance(raw, dict):
        raise _ledger_error(path, f"entry {index} is not an object; restore the ledger from backup")
    try:
        entry = LedgerEntry(**raw)
    except TypeError as err:
        raise _ledger_error(path, f"entry {index} is malformed ({err}); restore the ledger from backup") from None
    problem = check_mechanism(entry.noise_multiplier, entry.sample_rate, entry.steps)
    if problem is None and entry.steps < 1:
        problem = f"steps must be >= 1 (every reservation is at least one step), got {entry.steps}"
    if problem is not None:
        # A zeroed or negative entry would lower epsilon: tampering, never a state the code writes.
        raise _ledger_error(path, f"entry {index}: {problem}; restore the ledger from backup")
    return entry


@dataclass
class PrivacyLedger:
    """All mechanisms applied to one site's data, and the accountant that composes them."""

    path: Path
    accountant: str = "prv"
    entries: list[LedgerEntry] = field(default_factory=list)
    site_id: str = ""

    @classmethod
    def open(cls, state_dir: str | Path, accountant: str = "prv") -> PrivacyLedger:
        """Load and validate the ledger in ``state_dir``.

        Raises:
            SiteDataError: the ledger is missing (never initialised, or deleted), empty,
                unreadable, or holds an entry no accountant may see.
        """
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            raise _ledger_error(path, "no privacy ledger: if this site has never trained, create it once with "
                                      "`fedsynth site init --config SITE.yaml`; otherwise restore it from backup")
        try:
            raw: Any = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict) or not isinstance(raw["entries"], list):
                raise ValueError("not a ledger object with an 'entries' list")
        except (OSError, UnicodeDecodeError, ValueError, KeyError) as err:
            # Never start from zero on a damaged ledger: that would silently reset epsilon.
            raise _ledger_error(path, f"privacy ledger is unreadable ({err}); restore it from backup") from None
        entries = [_parse_entry(path, i, e) for i, e in enumerate(raw["entries"])]
        stored = raw.get("accountant")
        if entries and stored not in ACCOUNTANTS:
            raise _ledger_error(path, f"accountant must be one of {list(ACCOUNTANTS)}, got {stored!r}; restore it from backup")
        # The first round's accountant is kept for good: epsilon must not jump between rounds.
        return cls(path=path, accountant=str(stored) if entries else accountant, entries=entries,
                   site_id=str(raw.get("site_id", "")))

    def history(self) -> list[Mechanism]:
        return [e.mechanism() for e in self.entries]

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self.entries)

    def epsilon(self, delta: float, extra: list[Mechanism] | None = None) -> float:
        """Epsilon of the whole ledger (plus ``extra``), through the site's epsilon cache.

        A fresh process (one per Flower message) then composes only histories never seen at
        this site: the "spent" of a budget check is the previous round's "after".
        """
        return compute_epsilon(self.history() + (extra or []), delta, self.accountant,
                               cache=EpsilonCache(self.path.parent))

    def check_audit(self) -> None:
        """Refuse a ledger holding fewer steps than the site's audit log says it took.

        Every step is reserved in the ledger before it is taken and reported in the audit log
        after, so the ledger can only ever be ahead; behind means rolled back or replaced.
        """
        audited = audited_steps(self.path.parent)
        if audited > self.total_steps:
            raise _ledger_error(self.path, f"holds {self.total_steps} DP steps but {self.path.parent / AUDIT_FILE} "
                                           f"records {audited} steps taken: the ledger was rolled back or replaced; "
                                           "restore the latest backup")

    def check_budget(self, budget: PrivacyBudget, planned: Mechanism,
                     max_epsilon_per_round: float = 0.0) -> tuple[float, float]:
        """Epsilon (spent so far, after ``planned`` steps); raises if the latter exceeds ``budget``.

        ``max_epsilon_per_round`` > 0 also caps what this one round may add.
        """
        spent = self.epsilon(budget.delta)
        after = self.epsilon(budget.delta, [planned])
        sigma, q, steps = planned
        if after > budget.epsilon:
            public = (
                f"site refuses to train: {steps} more steps (noise multiplier {sigma}, sample rate {q:.4f}) "
                f"would raise epsilon from {spent:.3f} to {after:.3f}, over the site's budget of "
                f"{budget.epsilon} at delta {budget.delta}"
            )
            raise PrivacyBudgetError(f"{public} (ledger: {self.path})", public=public)
        if max_epsilon_per_round > 0 and after - spent > max_epsilon_per_round:
            public = (
                f"site refuses to train: {steps} steps (noise multiplier {sigma}, sample rate {q:.4f}) would spend "
                f"epsilon {after - spent:.3f} in one round, over the site policy's cap of {max_epsilon_per_round}"
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
                "site_id": self.site_id,
                "accountant": self.accountant,
                "total_steps": self.total_steps,
                "entries": [vars(e) for e in self.entries],
            },
        )


def audited_steps(state_dir: str | Path) -> int:
    """DP steps the site's audit log records as taken (train tasks that succeeded)."""
    total = 0
    for row in read_audit(state_dir):
        if row.get("message_type") == "train" and row.get("outcome") == "ok":
            steps = row.get("steps", 0)
            total += steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else 0
    return total


def init_ledger(state_dir: str | Path, site_id: str) -> Path:
    """Create the site's empty privacy ledger, once, and record that in the audit log.

    Raises:
        SiteDataError: a ledger already exists (it is never reset), or the audit log shows the
            site has trained before (its ledger must be restored, not recreated).
    """
    state = Path(state_dir)
    path = state / LEDGER_FILE
    with exclusive_lock(state / LOCK_FILE):
        if path.exists():
            raise SiteDataError(f"{path}: a privacy ledger already exists; it holds the privacy this site has spent "
                                "and is never re-initialised")
        audited = audited_steps(state)
        if audited:
            raise SiteDataError(f"{path}: missing, but {state / AUDIT_FILE} records {audited} DP steps this site took: "
                                "restore the ledger from backup; a new one would restart epsilon from zero")
        PrivacyLedger(path=path, site_id=site_id).save()
        append_task_record(state, TaskRecord(run_id="", message_type=INIT_MESSAGE_TYPE, app_hash="",
                                             config={"site_id": site_id, "ledger": str(path)}, outcome="ok"))
    return path


def reserve_within_budget(state_dir: str | Path, accountant: str, budget: PrivacyBudget, planned: Mechanism,
                          private: bool, run_id: str = "", server_round: int = 0,
                          max_epsilon_per_round: float = 0.0) -> tuple[float, float]:
    """Read, check and reserve under the ledger's lock: (epsilon before, epsilon after ``planned``).

    ``private=False`` reserves a non-private round (epsilon after is infinite) without a
    budget check; the caller has checked the site allows it.

    Raises:
        SiteDataError: the ledger is missing, damaged or behind the audit log.
        PrivacyBudgetError: the planned steps exceed the budget or the per-round cap.
        Nothing is reserved when either is raised.
    """
    with exclusive_lock(Path(state_dir) / LOCK_FILE):
        ledger = PrivacyLedger.open(state_dir, accountant)
        ledger.check_audit()
        if private:
            before, after = ledger.check_budget(budget, planned, max_epsilon_per_round)
        else:
            before, after = ledger.epsilon(budget.delta), math.inf
        ledger.reserve(planned, run_id=run_id, server_round=server_round)
    return before, after
