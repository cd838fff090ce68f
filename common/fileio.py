"""Atomic file writes: a crash mid-write never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

# Folders this module creates: owner and group only, so a site's state folder (ledger, audit
# log) is never world-writable, even when the process runs under umask 000. A stricter umask
# still applies, so an administrator's tighter choice is kept.
DIR_MODE = 0o750
# New files: 0600 (a umask can only take bits away; ``mkstemp`` does the same for atomic writes).
FILE_MODE = 0o600


def make_dirs(path: str | Path, mode: int = DIR_MODE) -> list[Path]:
    """Create ``path`` and every missing parent with ``mode``; returns the folders created, outermost first.

    ``Path.mkdir(parents=True)`` gives the parents the default mode (0777 under umask 000),
    whatever ``mode`` says; each missing level is made here instead.
    """
    path = Path(path)
    missing: list[Path] = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    created = []
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode)
        except FileExistsError:  # made meanwhile by another process: keep its mode
            continue
        created.append(folder)
    return created


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(handle)`` into a temp file, then rename it into place.

    The rename is atomic on POSIX, so readers see either the old file or the new one; the
    folder is synced after it, so the new file is the one that survives a power cut.
    """
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory entry: without it a power cut after the rename can bring back the old file."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda handle: handle.write(data))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line and flush it, so a crash loses at most the line being written."""
    path = Path(path)
    make_dirs(path.parent)
    # open(path, "a") would create it 0666 under umask 000: anyone could rewrite the audit trail.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(obj, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
