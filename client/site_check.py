"""``fedsynth site check``: what the client will see in a hospital folder, before joining."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from client.site_data import SiteSlices, load_site_slices
from common.config import DataConfig, ModelConfig, load_federation_config, load_site_config


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


def print_report(slices: SiteSlices, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="What this site will train on")
    table.add_column("class")
    table.add_column("slices", justify="right")
    table.add_column("patients", justify="right")
    patients = slices.patients_per_class()
    for name, count in slices.counts_per_class().items():
        table.add_row(name, str(count), str(patients[name]))
    table.add_row("[bold]total[/]", f"[bold]{len(slices)}[/]", f"[bold]{slices.num_patients}[/]")
    console.print(table)
    shapes = Counter(slices.shapes)
    console.print("Slice shapes before resizing (H x W: count): " +
                  ", ".join(f"{h}x{w}: {n}" for (h, w), n in shapes.most_common(8)) +
                  (" ..." if len(shapes) > 8 else ""))
    console.print(f"Resized to {slices.images.shape[-1]}x{slices.images.shape[-1]} for the model.")
    if slices.skipped:
        skipped = Table(title=f"Skipped files ({len(slices.skipped)})")
        skipped.add_column("file")
        skipped.add_column("reason")
        for item in slices.skipped:
            skipped.add_row(item.path, item.reason)
        console.print(skipped)
    else:
        console.print("No file was skipped.")
