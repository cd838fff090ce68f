"""The accountant's epsilon per ledger history, kept in the site's state folder across processes.

A deployed site (Flower 1.42) runs every message in a fresh process, so the in-process cache of
:mod:`client.privacy` is empty at every budget check, and the epsilon already spent (the
previous round's "after") was composed again each round: a PRV composition, a fraction of a
CPU-second. Epsilon is a pure function of what the accountant composes (the merged
``(noise multiplier, sample rate, steps)`` mechanisms of the ledger, delta, the accountant) and
of the code that composes it, so a stored value changes no number.

What is trusted: an entry is found by the digest of its inputs and carries those inputs. It
is used only when its inputs are exactly the ones asked for, including the accounting code
version (the source of :mod:`client.privacy` and the versions of Opacus, SciPy and NumPy), and
its value is a finite number >= 0. Anything else (a damaged or foreign file, an entry of other
inputs or another code version, a value that is no epsilon) is ignored: epsilon is composed
again and the file rewritten atomically. What this cannot catch is a wrong value stored with
the right inputs: only someone who can write the site's state folder can do that, and they can
already edit, roll back or delete the ledger itself; the state folder is protected as a whole
(0750, files 0600, backed up).

Writes are read-merge-replace under a lock of their own (``epsilon_cache.lock``), always taken
after the ledger's lock when both are held, never before it; reads need no lock, since the file
is replaced atomically. Failing to write the cache never fails a task: the epsilon just computed
is used either way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from common.errors import SiteDataError
from common.fileio import write_json_atomic
from common.filelock import exclusive_lock

CACHE_FILE = "epsilon_cache.json"
CACHE_LOCK = "epsilon_cache.lock"
CACHE_FORMAT = 1
# A round needs two values (spent, after) and the next round's "spent" is this round's "after":
# a few entries suffice; the bound keeps the file small whatever happens.
MAX_ENTRIES = 64
# The lock is held for one small read-merge-replace; a task never waits long on a cache.
LOCK_TIMEOUT_S = 10.0
# The libraries whose numerics the accountants run on.
ACCOUNTING_LIBRARIES = ("opacus", "scipy", "numpy")

log = logging.getLogger("fedsynth.client")

Mechanisms = tuple[tuple[float, float, int], ...]


@functools.cache
def accounting_version() -> str:
    """Digest of the code that turns a history into epsilon: a change in any of it invalidates every entry."""
    digest = hashlib.sha256((Path(__file__).resolve().parent / "privacy.py").read_bytes())
    for name in ACCOUNTING_LIBRARIES:
        try:
            digest.update(f"\0{name}={version(name)}".encode())
        except PackageNotFoundError:
            digest.update(f"\0{name}=?".encode())
    return digest.hexdigest()


def cache_inputs(mechanisms: Mechanisms, delta: float, accountant: str) -> dict[str, Any]:
    """Everything the value depends on, in the form stored beside it (JSON floats round-trip exactly)."""
    return {"mechanisms": [[float(s), float(q), int(n)] for s, q, n in mechanisms], "delta": float(delta),
            "accountant": accountant, "code": accounting_version()}


def _canonical(inputs: Any) -> str:
    return json.dumps(inputs, sort_keys=True, separators=(",", ":"), allow_nan=False)


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(inputs).encode()).hexdigest()


def _valid_epsilon(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value >= 0


def _trusted(key: str, entry: Any) -> bool:
    """An entry whose stored inputs hash to its key, of this code version, holding a real epsilon."""
    if not isinstance(entry, dict) or not isinstance(entry.get("inputs"), dict):
        return False
    try:
        matches = cache_key(entry["inputs"]) == key
    except (TypeError, ValueError):  # NaN, or objects JSON cannot write
        return False
    return matches and entry["inputs"].get("code") == accounting_version() and _valid_epsilon(entry.get("epsilon"))


class EpsilonCache:
    """The epsilon cache of one site's state folder."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / CACHE_FILE
        self.lock = Path(state_dir) / CACHE_LOCK

    def _entries(self) -> dict[str, Any]:
        """The file's entries, or none when it is missing or not a cache of this format."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError) as err:
            log.warning("%s is unreadable (%s): epsilon is composed again and the file rewritten", self.path, err)
            return {}
        if not isinstance(raw, dict) or raw.get("format") != CACHE_FORMAT or not isinstance(raw.get("entries"), dict):
            log.warning("%s is not an epsilon cache of format %d: epsilon is composed again and the file rewritten",
                        self.path, CACHE_FORMAT)
            return {}
        return raw["entries"]

    def lookup(self, mechanisms: Mechanisms, delta: float, accountant: str) -> float | None:
        """The stored epsilon of exactly these inputs, or ``None`` (never stored, or not to be trusted)."""
        inputs = cache_inputs(mechanisms, delta, accountant)
        key = cache_key(inputs)
        entry = self._entries().get(key)
        if entry is None:
            return None
        if not _trusted(key, entry) or _canonical(entry["inputs"]) != _canonical(inputs):
            log.warning("%s: the entry for this ledger history is not to be trusted: epsilon is composed again",
                        self.path)
            return None
        return float(entry["epsilon"])

    def store(self, mechanisms: Mechanisms, delta: float, accountant: str, epsilon: float) -> None:
        """Add one value; keeps only trusted entries of this code version, the newest ``MAX_ENTRIES``."""
        if not _valid_epsilon(epsilon):
            return  # infinite (a non-private step) or zero history: nothing worth storing
        inputs = cache_inputs(mechanisms, delta, accountant)
        try:
            with exclusive_lock(self.lock, timeout_s=LOCK_TIMEOUT_S):
                entries = {k: e for k, e in self._entries().items() if _trusted(k, e)}
                entries[cache_key(inputs)] = {"inputs": inputs, "epsilon": float(epsilon), "time": time.time()}
                newest = sorted(entries.items(), key=lambda item: _stored_at(item[1]), reverse=True)[:MAX_ENTRIES]
                write_json_atomic(self.path, {"format": CACHE_FORMAT, "entries": dict(newest)})
        except (OSError, SiteDataError) as err:
            log.warning("could not update %s (%s); the epsilon just composed is used", self.path, err)

    def epsilon(self, mechanisms: Mechanisms, delta: float, accountant: str,
                compose: Callable[[Mechanisms, float, str], float]) -> float:
        """The stored value, or ``compose(mechanisms, delta, accountant)`` stored for the next process."""
        cached = self.lookup(mechanisms, delta, accountant)
        if cached is not None:
            return cached
        value = compose(mechanisms, delta, accountant)
        self.store(mechanisms, delta, accountant, value)
        return value


def _stored_at(entry: dict[str, Any]) -> float:
    stamp = entry.get("time")
    return float(stamp) if isinstance(stamp, (int, float)) and math.isfinite(stamp) else 0.0
