"""A train task's path up to training, phase by phase, in this (fresh) process: what Flower 1.42 pays per message.

``python -m bench.fresh_task FEDERATION_YAML SITE_YAML`` prints one JSON object: per phase the CPU
seconds of this process (steadier than wall time on a loaded machine) and the wall seconds. The
phases follow the train handler (client/client_app.py, client/training.py): Flower, the ClientApp
module, torch, MONAI (the model module), the rest of the task's modules, Opacus, the site's data,
then the budget check (epsilon spent and after the planned steps, through the site's epsilon
cache). It spends nothing: the check reserves no steps.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

IMPORT_PHASES = (
    ("flower", ("flwr.app", "flwr.clientapp")),
    ("clientapp_module", ("client.client_app",)),
    ("torch", ("torch",)),
    ("monai", ("common.model",)),
    ("task_modules", ("client.site_data", "client.training")),
    ("opacus", ("opacus",)),
)


def _timed(phases: dict[str, dict[str, float]], name: str, work: Callable[[], Any]) -> Any:
    cpu, wall = time.process_time(), time.perf_counter()
    out = work()
    phases[name] = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
    return out


def main(federation_yaml: str, site_yaml: str) -> dict[str, dict[str, float]]:
    phases: dict[str, dict[str, float]] = {}
    for name, modules in IMPORT_PHASES:
        _timed(phases, name, lambda modules=modules: [importlib.import_module(m) for m in modules])
    import torch

    torch.set_num_threads(1)
    from client.ledger import PrivacyLedger
    from client.policy import load_site_policy, privacy_ceiling
    from client.site_data import load_site_slices
    from client.training import plan_steps, split_patients
    from common.config import load_federation_config, load_site_config

    def site_data() -> tuple:
        cfg, site = load_federation_config(federation_yaml), load_site_config(site_yaml)
        slices = load_site_slices(site.data_dir, cfg.model.classes, cfg.data, site.labels_csv or None)
        return cfg, site, len(split_patients(slices, site.val_fraction)[0])

    cfg, site, train_patients = _timed(phases, "site_data", site_data)

    def budget_check() -> tuple[float, float]:
        policy = load_site_policy(site.policy_file) if site.policy_file else None
        ledger = PrivacyLedger.open(site.state_dir, cfg.privacy.accountant)
        return ledger.check_budget(privacy_ceiling(site, policy, cfg), plan_steps(cfg, train_patients))

    _timed(phases, "budget_check", budget_check)
    return phases


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
