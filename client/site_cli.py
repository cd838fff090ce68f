"""``fedsynth site ...``: the hospital admin's commands (create the ledger, check data, read the audit log, hash an app)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _check(args: argparse.Namespace) -> int:
    from client.site_check import check_site, literal, print_report, training_refusals

    slices = check_site(args.data, args.config, args.federation)
    print_report(slices)
    refusals = training_refusals(slices, args.data, args.config, args.federation)
    if not args.federation:
        print("(checked against the default federation settings; give --federation for the real ones)")
    for reason in refusals:
        print(f"fedsynth site check: the client would refuse to train: {literal(reason)}", file=sys.stderr)
    return 1 if refusals else 0


def _state_dir(args: argparse.Namespace) -> Path:
    from common.config import load_site_config

    if args.state:
        return Path(args.state)
    if args.config:
        return Path(load_site_config(args.config).state_dir)
    raise SystemExit("fedsynth site audit: give --state DIR or --config SITE.yaml")


def _fmt_eps(value: object) -> str:
    return "-" if value is None else f"{float(value):.3f}"  # type: ignore[arg-type]


def _outcome(row: dict) -> str:
    outcome = str(row.get("outcome", ""))
    # The server could reproduce that round's DP noise: the admin must not miss it.
    return f"UNSAFE reproducible DP; {outcome}" if row.get("unsafe_reproducible_dp") else outcome


def _audit(args: argparse.Namespace) -> int:
    from client.audit_log import read_audit
    from client.ledger import PrivacyLedger
    from common.errors import SiteDataError

    state = _state_dir(args)
    rows = read_audit(state)
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    table = Table(title=f"Tasks received ({state / 'audit.jsonl'})")
    for column in ("time (UTC)", "run", "type", "round", "app", "steps", "eps before", "eps after", "bytes sent", "outcome"):
        table.add_column(column, justify="right" if column in ("round", "steps", "bytes sent") else "left")
    for row in rows[-args.last:] if args.last else rows:
        when = datetime.fromtimestamp(float(row.get("time", 0)), timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(when, str(row.get("run_id", ""))[-8:], str(row.get("message_type", "")), str(row.get("server_round", "")),
                      str(row.get("app_hash", ""))[:10], str(row.get("steps", "")), _fmt_eps(row.get("epsilon_before")),
                      _fmt_eps(row.get("epsilon_after")), str(row.get("bytes_sent", "")), _outcome(row))
    console = Console()
    console.print(table)
    try:
        ledger = PrivacyLedger.open(state)
    except SiteDataError as err:  # the log is still worth reading when the ledger is the problem
        console.print(f"Privacy ledger: {err}")
        return 1
    console.print(f"Privacy ledger: {ledger.total_steps} DP steps in {len(ledger.entries)} entries ({ledger.path})")
    return 0


def _init(args: argparse.Namespace) -> int:
    from client.ledger import init_ledger
    from common.config import load_site_config

    site = load_site_config(args.config)
    path = init_ledger(site.state_dir, site.site_id)
    print(f"Privacy ledger of site '{site.site_id}' created: {path}\n"
          "Back up the state folder with it; never delete or replace the ledger (the site refuses to train then).")
    return 0


def _app_hash(args: argparse.Namespace) -> int:
    from client.policy import app_code_hash

    print(app_code_hash(args.path))
    return 0


def register_site_commands(sub: argparse._SubParsersAction) -> None:
    site = sub.add_parser("site", help="hospital-side tools")
    site_sub = site.add_subparsers(dest="site_command", required=True)

    init = site_sub.add_parser("init", help="create the site's empty privacy ledger, once, before its first training")
    init.add_argument("--config", required=True, help="site YAML (its site_id and state_dir)")
    init.set_defaults(func=_init)

    check = site_sub.add_parser("check", help="show what the client will see in a data folder")
    check.add_argument("--data", help="the hospital's data folder")
    check.add_argument("--config", help="site YAML (data_dir, labels_csv)")
    check.add_argument("--federation", help="federation YAML (classes, image size); defaults otherwise")
    check.set_defaults(func=_check)

    audit = site_sub.add_parser("audit", help="show the site's audit log: every task received, its cost and outcome")
    audit.add_argument("--state", help="the site's state folder")
    audit.add_argument("--config", help="site YAML (its state_dir)")
    audit.add_argument("--last", type=int, default=0, help="only the last N tasks")
    audit.add_argument("--json", action="store_true", help="print the raw JSON lines (for jq)")
    audit.set_defaults(func=_audit)

    app_hash = site_sub.add_parser("app-hash", help="hash of an app's code, for the policy's approved_apps")
    app_hash.add_argument("path", help="a fedsynth checkout, an unpacked app bundle or a .fab file")
    app_hash.set_defaults(func=_app_hash)
