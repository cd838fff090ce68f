"""Two processes reserving against one budget at once: exactly the affordable reservations succeed, none is lost."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from client.ledger import PrivacyLedger, init_ledger, reserve_within_budget
from client.privacy import compute_epsilon
from common.config import PrivacyBudget
from common.errors import PrivacyBudgetError

PLANNED = (1.0, 0.1, 10)  # RDP: milliseconds per check, so the processes really interleave
AFFORDABLE = 6
ATTEMPTS_PER_PROCESS = 5


def _reserve_until_refused(state: str, budget: PrivacyBudget, start: multiprocessing.synchronize.Barrier,
                           results: multiprocessing.Queue) -> None:
    start.wait()
    granted = 0
    for attempt in range(ATTEMPTS_PER_PROCESS):
        try:
            reserve_within_budget(state, "rdp", budget, PLANNED, private=True, run_id=f"pid-{attempt}")
            granted += 1
        except PrivacyBudgetError:
            pass
    results.put(granted)


def test_concurrent_reservations_never_overspend_nor_lose_an_entry(tmp_path: Path) -> None:
    init_ledger(tmp_path, "site-a")
    sigma, q, steps = PLANNED
    fits = compute_epsilon([(sigma, q, steps * AFFORDABLE)], 1e-5, "rdp")
    too_many = compute_epsilon([(sigma, q, steps * (AFFORDABLE + 1))], 1e-5, "rdp")
    budget = PrivacyBudget(epsilon=(fits + too_many) / 2, delta=1e-5)
    ctx = multiprocessing.get_context("fork")  # the children only touch the ledger: no torch threads involved
    start, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_reserve_until_refused, args=(str(tmp_path), budget, start, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    granted = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert sum(granted) == AFFORDABLE  # 10 attempts for 6 affordable reservations
    ledger = PrivacyLedger.open(tmp_path)
    assert len(ledger.entries) == AFFORDABLE  # every granted reservation is on disk
    assert ledger.epsilon(1e-5) <= budget.epsilon
