"""An exclusive lock between processes on one file, for read-check-write sequences.

Flower can run two runs' tasks at one site at the same time (and a simulation runs sites
in separate processes), so a read-check-write on a state file (the privacy ledger, the
audit rate limit) must be atomic across processes, not just within one. ``fcntl.flock``
is released by the kernel when the holder dies, so a crashed task never leaves the site
locked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import SiteDataError
from common.fileio import make_dirs


@contextmanager
def exclusive_lock(path: str | Path, timeout_s: float = 120.0, poll_s: float = 0.05) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Raises:
        SiteDataError: the lock was not acquired within ``timeout_s`` (another task holds it).
    """
    path = Path(path)
    make_dirs(path.parent)  # often the site's state folder, made here first: never world-writable
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise SiteDataError(f"{path}: still locked by another task after {timeout_s:.0f} s",
                                        public="site is busy with another task") from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
