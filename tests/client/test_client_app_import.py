"""A deployed SuperNode starts a fresh process for every message: the ClientApp module must load light."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _modules_after(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_importing_the_client_app_loads_no_torch_monai_or_opacus() -> None:
    loaded = _modules_after("import client.client_app")
    assert "client.client_app" in loaded
    assert not {"opacus", "torch", "monai"} & loaded


def test_the_evaluation_path_needs_no_opacus() -> None:
    """validation_loss lives next to train_round; only train_round's accounting may pull in Opacus."""
    loaded = _modules_after("from client.training import validation_loss")
    assert "torch" in loaded and "opacus" not in loaded


def test_a_fresh_process_reads_a_known_history_s_epsilon_without_any_accountant(tmp_path: Path) -> None:
    """The site's epsilon cache: the epsilon spent, composed by the previous round's process, costs no Opacus."""
    from client.ledger import PrivacyLedger, init_ledger

    init_ledger(tmp_path, "site-a")
    ledger = PrivacyLedger.open(tmp_path, "prv")
    ledger.reserve((1.0, 0.25, 3))
    spent = ledger.epsilon(1e-5)  # composed here, stored in the state folder
    ledger_there = f"from client.ledger import PrivacyLedger; ledger = PrivacyLedger.open({str(tmp_path)!r})"
    assert "opacus" not in _modules_after(f"{ledger_there}; assert ledger.epsilon(1e-5) == {spent!r}")
    assert "opacus" in _modules_after(f"{ledger_there}; ledger.epsilon(2e-5)")  # never seen: composed
