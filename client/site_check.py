"""``fedsynth site check``: what the client will see in a hospital folder, before joining."""

from __future__ import annotations

import dataclasses
import unicodedata
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from client.site_data import SiteSlices, load_site_slices, require_readable
from common.config import (
    DataConfig,
    FederationConfig,
    FedsynthConfig,
    ModelConfig,
    SiteConfig,
    load_federation_config,
    load_site_config,
)
from common.errors import FedsynthError

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# How many multi-file patients the report names before summarising the rest.
_NAMED_PATIENTS = 5


def literal(text: str) -> str:
    """``text`` with control, format and undecodable characters escaped as in Python source.

    A file name can hold a newline (forging a report line), a right-to-left override (showing
    another name) or bytes that are not UTF-8 (which the terminal cannot print): the admin
    must see the name the file really has.
    """
    return "".join(
        _ESCAPES.get(c) or (c.encode("unicode_escape").decode("ascii") if unicodedata.category(c)[0] == "C" else c)
        for c in text
    )


def _plain(text: str) -> Text:
    """A table cell shown exactly as written: no Rich markup, no :emoji: codes, escaped controls."""
    return Text(literal(text))


def check_site(data_dir: str | None, site_config: str | None, federation_config: str | None) -> SiteSlices:
    """Load the folder exactly as training would; raises SiteDataError when nothing is usable."""
    classes, data_cfg, labels_csv = ModelConfig().classes, DataConfig(), None
    if federation_config:
        fed = load_federation_config(federation_config)
        classes, data_cfg = fed.model.classes, fed.data
    if site_config:
        site = load_site_config(site_config)
        data_dir = data_dir or site.data_dir
        labels_csv = site.labels_csv or None
    if not data_dir:
        raise SystemExit("fedsynth site check: give --data DIR or --config SITE.yaml with data_dir")
    return load_site_slices(Path(data_dir), classes, data_cfg, labels_csv, progress=True)


def training_refusals(
    slices: SiteSlices, data_dir: str | None, site_config: str | None, federation_config: str | None
) -> list[str]:
    """Why the client, run with these settings on this folder, would refuse its first train task.

    Without a federation config the defaults stand in for the coordinator's settings; the
    policy, ledger and budget checks need the site config. Empty when it would train.
    """
    site = load_site_config(site_config) if site_config else None
    fed = (load_federation_config(federation_config) if federation_config
           else FedsynthConfig(federation=FederationConfig(output_dir="unused")))
    reasons: list[str] = []
    try:
        require_readable(slices, data_dir or (site.data_dir if site else ""), site.skip_bad_files if site else False)
    except FedsynthError as err:
        reasons.append(str(err))
    if site is not None:
        reasons.extend(_site_refusals(slices, site, fed))
    return reasons


def _site_refusals(slices: SiteSlices, site: SiteConfig, fed: FedsynthConfig) -> list[str]:
    """The policy and privacy-budget checks ``train_round`` makes before it spends anything."""
    from client.ledger import PrivacyLedger
    from client.policy import ANY_APP, enforce_policy, load_site_policy, privacy_ceiling
    from client.training import plan_steps, split_patients

    train_groups, _ = split_patients(slices, site.val_fraction)
    try:
        policy = load_site_policy(site.policy_file) if site.policy_file else None
        if policy is not None:
            # Which app the coordinator will send is not known here: every other rule applies.
            enforce_policy(dataclasses.replace(policy, approved_apps=(ANY_APP,)), fed, "", len(train_groups))
        if not fed.privacy.enabled:
            if not site.allow_non_private:
                return ["the federation trains without DP and the site config does not set allow_non_private: true"]
            return []
        ledger = PrivacyLedger.open(site.state_dir, fed.privacy.accountant)
        ledger.check_budget(privacy_ceiling(site, policy, fed), plan_steps(fed, len(train_groups)))
    except FedsynthError as err:
        return [str(err)]
    return []


def print_report(slices: SiteSlices, console: Console | None = None) -> None:
    console = console or Console(emoji=False, highlight=False)
    table = Table(title="What this site will train on")
    table.add_column("class")
    table.add_column("slices", justify="right")
    table.add_column("patients", justify="right")
    patients = slices.patients_per_class()
    for name, count in slices.counts_per_class().items():
        table.add_row(_plain(name), str(count), str(patients[name]))
    table.add_row("[bold]total[/]", f"[bold]{len(slices)}[/]", f"[bold]{slices.num_patients}[/]")
    console.print(table)
    shapes = Counter(slices.shapes)
    console.print("Slice shapes before resizing (H x W: count): " +
                  ", ".join(f"{h}x{w}: {n}" for (h, w), n in shapes.most_common(8)) +
                  (" ..." if len(shapes) > 8 else ""))
    console.print(f"Resized to {slices.images.shape[-1]}x{slices.images.shape[-1]} for the model.")
    empty = [name for name, count in slices.counts_per_class().items() if count == 0]
    if empty:
        console.print(Text(f"Note: no slices of class {', '.join(literal(n) for n in empty)} at this site."))
    multi = [(p, n) for p, n in slices.files_per_patient.most_common() if n > 1]
    if multi:
        named = ", ".join(f"{literal(p)} ({n} files)" for p, n in multi[:_NAMED_PATIENTS])
        more = f" and {len(multi) - _NAMED_PATIENTS} more" if len(multi) > _NAMED_PATIENTS else ""
        console.print(Text(f"Warning: {len(multi)} patient(s) have several files, each counted as ONE patient "
                           f"(the unit of privacy): {named}{more}."))
    if slices.skipped:
        skipped = Table(title=f"Skipped files ({len(slices.skipped)})")
        skipped.add_column("file")
        skipped.add_column("reason")
        for item in slices.skipped:
            skipped.add_row(_plain(item.path), _plain(item.reason))
        console.print(skipped)
    else:
        console.print("No file was skipped.")
