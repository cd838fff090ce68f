"""The site's persistent epsilon cache: the same numbers as a fresh composition, and nothing it stores is
trusted unless it is exactly the value of the inputs asked for (client/epsilon_cache.py)."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from client.epsilon_cache import CACHE_FILE, EpsilonCache, accounting_version, cache_inputs, cache_key
from client.ledger import init_ledger, reserve_within_budget
from client.privacy import _composed_epsilon, compute_epsilon
from common.config import PrivacyBudget

DELTA = 1e-5
HISTORY_A = [(1.0, 0.25, 4), (1.3, 0.125, 6)]
HISTORY_B = [(1.0, 0.25, 5), (1.3, 0.125, 6)]


def _mechanisms(history: list) -> tuple:
    return tuple((float(s), float(q), int(n)) for s, q, n in history)


def _key(history: list, accountant: str = "rdp") -> str:
    return cache_key(cache_inputs(_mechanisms(history), DELTA, accountant))


def _load(state: Path) -> dict:
    return json.loads((state / CACHE_FILE).read_text())


def _fresh_process() -> None:
    """What a new flwr-clientapp process starts with: no epsilon composed in memory."""
    _composed_epsilon.cache_clear()


def test_a_hit_returns_what_a_fresh_composition_returns_without_composing(tmp_path: Path) -> None:
    fresh = compute_epsilon(HISTORY_A, DELTA, "prv")
    _fresh_process()
    assert compute_epsilon(HISTORY_A, DELTA, "prv", cache=EpsilonCache(tmp_path)) == fresh
    assert _composed_epsilon.cache_info().misses == 1  # composed once, stored
    _fresh_process()
    assert compute_epsilon(HISTORY_A, DELTA, "prv", cache=EpsilonCache(tmp_path)) == fresh
    assert _composed_epsilon.cache_info().misses == 0  # read back from the site's file
    assert compute_epsilon(HISTORY_A, DELTA, "rdp", cache=EpsilonCache(tmp_path)) != fresh  # another accountant, another entry


def _move_a_under_b(entries: dict) -> None:
    entries[_key(HISTORY_B)] = entries[_key(HISTORY_A)]  # a real value, of another history


def _other_code_version(entries: dict) -> None:
    entry = entries[_key(HISTORY_B)]
    entry["inputs"]["code"] = "0" * 64
    entry["epsilon"] = 0.01


def _value(bad: object) -> Callable[[dict], None]:
    def tamper(entries: dict) -> None:
        entries[_key(HISTORY_B)]["epsilon"] = bad
    return tamper


@pytest.mark.parametrize("tamper", [_move_a_under_b, _other_code_version, _value(-1.0), _value("0.5"), _value(True),
                                    _value(None), _value(1)], ids=["other-history", "other-code", "negative", "string",
                                                                   "bool", "null", "int"])
def test_an_entry_not_of_exactly_these_inputs_is_not_trusted(tmp_path: Path, tamper: Callable[[dict], None]) -> None:
    # A wrong value stored with exactly the right inputs cannot be told from a right one: whoever can
    # write the state folder can already edit the ledger itself (see client/epsilon_cache.py).
    cache = EpsilonCache(tmp_path)
    fresh_b = compute_epsilon(HISTORY_B, DELTA, "rdp")
    compute_epsilon(HISTORY_A, DELTA, "rdp", cache=cache)
    compute_epsilon(HISTORY_B, DELTA, "rdp", cache=cache)
    raw = _load(tmp_path)
    tamper(raw["entries"])
    (tmp_path / CACHE_FILE).write_text(json.dumps(raw))
    assert cache.lookup(_mechanisms(HISTORY_B), DELTA, "rdp") is None
    assert compute_epsilon(HISTORY_B, DELTA, "rdp", cache=cache) == fresh_b
    rewritten = _load(tmp_path)["entries"][_key(HISTORY_B)]  # overwritten with the value composed again
    assert rewritten["epsilon"] == fresh_b and rewritten["inputs"]["code"] == accounting_version()
    assert cache.lookup(_mechanisms(HISTORY_B), DELTA, "rdp") == fresh_b


@pytest.mark.parametrize("content", [b"\x00\xff\xfe", b"{", b"[]", b"null", b'{"format": 2, "entries": {}}',
                                     b'{"format": 1, "entries": []}', b'{"format": 1, "entries": {"x": 5}}',
                                     b'{"format": 1, "entries": {"x": {"inputs": {"delta": NaN}, "epsilon": 0.1}}}'])
def test_a_damaged_or_foreign_file_is_ignored_and_replaced(tmp_path: Path, content: bytes) -> None:
    (tmp_path / CACHE_FILE).write_bytes(content)
    fresh = compute_epsilon(HISTORY_A, DELTA, "rdp")
    assert compute_epsilon(HISTORY_A, DELTA, "rdp", cache=EpsilonCache(tmp_path)) == fresh
    raw = _load(tmp_path)
    assert raw["format"] == 1 and list(raw["entries"]) == [_key(HISTORY_A)]  # the junk is gone
    assert EpsilonCache(tmp_path).lookup(_mechanisms(HISTORY_A), DELTA, "rdp") == fresh


def test_a_cache_that_cannot_be_written_never_fails_the_budget_check(tmp_path: Path) -> None:
    init_ledger(tmp_path, "site-a")
    (tmp_path / CACHE_FILE).mkdir()  # neither readable nor replaceable as a file
    budget = PrivacyBudget(epsilon=50.0, delta=DELTA)
    before, after = reserve_within_budget(tmp_path, "rdp", budget, (1.0, 0.25, 4), private=True)
    assert (before, after) == (0.0, compute_epsilon([(1.0, 0.25, 4)], DELTA, "rdp"))


def test_a_budget_check_in_a_fresh_process_composes_only_the_new_history(tmp_path: Path) -> None:
    init_ledger(tmp_path, "site-a")
    budget, planned = PrivacyBudget(epsilon=50.0, delta=DELTA), (1.0, 0.25, 3)
    _, first_after = reserve_within_budget(tmp_path, "prv", budget, planned, private=True, server_round=1)
    _fresh_process()
    before, after = reserve_within_budget(tmp_path, "prv", budget, planned, private=True, server_round=2)
    assert _composed_epsilon.cache_info().misses == 1  # "after" only: "spent" is round 1's "after"
    assert before == first_after
    _fresh_process()
    assert (before, after) == (compute_epsilon([planned], DELTA, "prv"), compute_epsilon([planned] * 2, DELTA, "prv"))


def _store_many(state: str, worker: int, start: multiprocessing.synchronize.Barrier) -> None:
    start.wait()
    for i in range(5):
        compute_epsilon([(1.0 + worker / 10, 0.25, i + 1)], DELTA, "rdp", cache=EpsilonCache(state))


def test_concurrent_writers_lose_no_entry_and_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    compute_epsilon(HISTORY_A, DELTA, "rdp")  # Opacus imported before the fork: the children compose at once
    ctx = multiprocessing.get_context("fork")  # the children only compose and write the cache: no torch threads
    start = ctx.Barrier(4)
    workers = [ctx.Process(target=_store_many, args=(str(tmp_path), w, start)) for w in range(4)]
    for worker in workers:
        worker.start()
    reads = 0
    while any(w.is_alive() for w in workers):
        if (tmp_path / CACHE_FILE).exists():
            assert _load(tmp_path)["format"] == 1  # replaced atomically: always whole
            reads += 1
        time.sleep(0.002)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert reads > 0
    assert len(_load(tmp_path)["entries"]) == 20
    _fresh_process()
    cache = EpsilonCache(tmp_path)
    for w in range(4):
        for i in range(5):
            mechanism = ((1.0 + w / 10, 0.25, i + 1),)
            assert cache.lookup(mechanism, DELTA, "rdp") == compute_epsilon(list(mechanism), DELTA, "rdp")
