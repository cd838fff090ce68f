"""The ledger's atomic replace is durable: the folder entry is synced after the rename."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from common import fileio


def test_write_atomic_syncs_the_folder_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[tuple[str, bool]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        synced.append(("replace", False))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fileio.write_json_atomic(tmp_path / "ledger.json", {"entries": []})
    # The file's data before the rename, the folder holding the new entry after it.
    assert synced == [("fsync", False), ("replace", False), ("fsync", True)]
    assert (tmp_path / "ledger.json").read_text().startswith("{")
