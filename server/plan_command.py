"""``fedsynth plan``: the DP planner over a federation config and the sites' own files.

Each site's training patients are counted with the client's own loader and split, its budget
is the tightest of its site config, policy and the federation's cap, and what its ledger
already holds is spent before the plan starts. Where the site files are not at hand (a real
deployment), each hospital runs the same command with its own site config.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from typing import TYPE_CHECKING

from common.config import FedsynthConfig, SiteConfig, load_federation_config, load_site_config
from common.fileio import write_json_atomic

if TYPE_CHECKING:  # the planner pulls in Opacus: only when `fedsynth plan` runs
    from client.dp_planner import SiteBudget, SitePlan


def site_budget(cfg: FedsynthConfig, site: SiteConfig) -> SiteBudget:
    """What the planner needs of one site, read the way its ClientApp reads it."""
    from client.dp_planner import SiteBudget
    from client.ledger import LEDGER_FILE, PrivacyLedger
    from client.policy import load_site_policy, privacy_ceiling
    from client.site_data import load_site_slices
    from client.training import split_patients

    slices = load_site_slices(site.data_dir, cfg.model.classes, cfg.data, site.labels_csv or None)
    train_groups, _ = split_patients(slices, site.val_fraction)
    policy = load_site_policy(site.policy_file) if site.policy_file else None
    budget = privacy_ceiling(site, policy, cfg)
    ledger_path = Path(site.state_dir) / LEDGER_FILE
    history = tuple(PrivacyLedger.open(site.state_dir, cfg.privacy.accountant).history()) if ledger_path.exists() else ()
    return SiteBudget(site.site_id, len(train_groups), budget.epsilon, budget.delta, history,
                      min_noise_multiplier=policy.min_noise_multiplier if policy else 0.0)


def planned_steps(cfg: FedsynthConfig) -> int:
    """Every step a site takes in this federation, if it is picked every round."""
    return cfg.training.local_steps * cfg.federation.num_rounds


def count_parameters(cfg: FedsynthConfig) -> int:
    """The coordinates DP noise is added in: the trained subset under ``training.trainable``."""
    from client.policy import model_parameters
    from common.trainable import is_partial, trainable_count

    return trainable_count(cfg) if is_partial(cfg.training.trainable) else model_parameters(cfg)


def _plan(args: argparse.Namespace) -> int:
    from client.dp_planner import plan_common, plan_site

    cfg = load_federation_config(args.config)
    steps = args.steps or planned_steps(cfg)
    console = Console(highlight=False)
    sites = [site_budget(cfg, load_site_config(path)) for path in args.site]
    plans = []
    with console.status("planning (an accountant run per candidate batch size)..."):
        for site in sites:
            plans.append(plan_site(site, steps, cfg.privacy.accountant))
    num_parameters = count_parameters(cfg)
    console.print(render_table(plans, num_parameters, cfg.privacy.accountant, cfg.training.trainable))
    result: dict = {"steps": steps, "accountant": cfg.privacy.accountant, "num_parameters": num_parameters,
                    "trainable": cfg.training.trainable,
                    "sites": [plan_row(p, num_parameters) for p in plans]}
    if any(p.feasible for p in plans):
        batch, sigma = plan_common(plans, sites, steps, cfg.privacy.accountant)
        result["federation"] = {"batch_size": batch, "noise_multiplier": sigma}
        console.print(f"One setting every site can afford for {steps} steps: training.batch_size: {batch}, "
                      f"privacy.noise_multiplier: {sigma:.3f}")
    if args.json:
        write_json_atomic(args.json, result)
    return 0 if all(p.feasible for p in plans) else 1


def plan_row(plan: SitePlan, num_parameters: int) -> dict:
    """One site's plan as JSON-ready numbers (infinities as null)."""
    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    return {"site_id": plan.site_id, "patients": plan.num_patients, "batch_size": plan.batch_size,
            "sample_rate": plan.sample_rate, "expected_batch": plan.expected_batch,
            "noise_multiplier": finite(plan.noise_multiplier), "steps": plan.steps, "epsilon": finite(plan.epsilon),
            "delta": plan.delta, "noise_per_coordinate": finite(plan.noise_per_coordinate),
            "noise_to_signal": finite(plan.noise_to_signal(num_parameters)), "feasible": plan.feasible,
            "reason": plan.reason, "candidates": [list(c) for c in plan.candidates]}


def render_table(plans: list[SitePlan], num_parameters: int, accountant: str, trainable: str | tuple[str, ...] = "all") -> Table:
    subset = "" if trainable == "all" else f", training.trainable {trainable if isinstance(trainable, str) else list(trainable)}"
    table = Table(title=f"DP plan per site ({accountant} accountant, {num_parameters:,} trainable parameters{subset})")
    for column in ("site", "patients", "batch", "q", "sigma", "steps", "epsilon", "delta",
                   "noise std / coord (x C)", "noise / signal norm"):
        table.add_column(column, justify="left" if column == "site" else "right")
    for p in plans:
        if not p.feasible:
            table.add_row(p.site_id, str(p.num_patients), "-", "-", "-", str(p.steps), "-", f"{p.delta:g}",
                          f"infeasible: {p.reason}", "")
            continue
        table.add_row(p.site_id, str(p.num_patients), str(p.batch_size), f"{p.sample_rate:.4f}",
                      f"{p.noise_multiplier:.3f}", str(p.steps), f"{p.epsilon:.3f}", f"{p.delta:g}",
                      f"{p.noise_per_coordinate:.4f}", f"{p.noise_to_signal(num_parameters):.1f}")
    return table


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="per site: batch size and noise multiplier with the least noise within budget")
    plan.add_argument("--config", required=True, help="federation YAML (steps = local_steps x num_rounds)")
    plan.add_argument("--site", action="append", required=True, help="site YAML, once per hospital")
    plan.add_argument("--steps", type=int, default=0, help="plan this many steps per site instead")
    plan.add_argument("--json", type=Path, help="also write the plan as JSON here")
    plan.set_defaults(func=_plan)
