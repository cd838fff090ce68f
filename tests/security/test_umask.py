"""Files and folders fedsynth creates keep explicit modes even under ``umask 000``.

A hospital's service account may run with a permissive umask; the provisioned keys and a
site's privacy ledger and audit log must still not be writable (or keys readable) by others.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.audit_log import TaskRecord, append_task_record
from client.ledger import PrivacyLedger, init_ledger
from common.filelock import exclusive_lock
from server import kits
from server.cli import main

SITES = ("hospital-a", "hospital-b")


@pytest.fixture()
def umask_000() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _tree(root: Path) -> list[Path]:
    return [root, *sorted(root.rglob("*"))]


def test_provision_under_umask_000_sets_every_mode(tmp_path: Path, umask_000: None, capsys) -> None:
    out = tmp_path / "new-parent" / "fed"  # --out and its parent do not exist yet
    args = ["provision", "--sites", ",".join(SITES), "--server-host", "fl.example.org", "--out", str(out)]
    assert main(args) == 0
    assert main([*args[:2], "hospital-c", *args[3:], "--force-new-sites"]) == 0
    layout = kits.Layout(out)
    private = {layout.ca_key, layout.server_dir / kits.SERVER_KEY, *(layout.site_key(s) for s in (*SITES, "hospital-c"))}
    scripts = {p for p in out.rglob("*.sh")}
    for path in _tree(tmp_path / "new-parent"):
        mode = _mode(path)
        if path.is_dir():
            assert mode == kits.FOLDER, f"{path} is {oct(mode)}"
        elif path in private:
            assert mode == kits.PRIVATE, f"{path} is {oct(mode)}"
        elif path in scripts:
            assert mode == kits.SCRIPT, f"{path} is {oct(mode)}"
        else:
            assert mode == kits.PUBLIC, f"{path} is {oct(mode)}"
    assert layout.sites_dir.is_dir() and _mode(layout.sites_dir) == 0o700


def test_site_state_under_umask_000_is_not_open_to_others(tmp_path: Path, umask_000: None) -> None:
    # The state folder does not exist yet: the lock, the ledger or the audit log creates it.
    state = tmp_path / "site" / "state"
    with exclusive_lock(state / "ledger.lock"):
        init_ledger(state, "site-a")
        ledger = PrivacyLedger.open(state)
        ledger.reserve((1.0, 0.1, 5), run_id="1", server_round=1)
    append_task_record(state, TaskRecord(run_id="1", message_type="train", app_hash="", config={}))
    for folder in (tmp_path / "site", state):
        assert _mode(folder) & 0o027 == 0, f"{folder} is {oct(_mode(folder))}: group-writable or open to others"
    files = sorted(p for p in state.iterdir())
    assert {p.name for p in files} == {"ledger.lock", "privacy_ledger.lock", "privacy_ledger.json", "audit.jsonl"}
    for path in files:
        assert _mode(path) == 0o600, f"{path} is {oct(_mode(path))}"
