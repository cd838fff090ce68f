"""``fedsynth demo``: three simulated hospitals, DP training on the shipped demo set, then samples.

The 240 demo slices are split non-IID (each hospital sees mostly one or two tumour
classes). Hospitals read them in place through a labels CSV of their own, so nothing is
copied. Everything lands in ``--out``: configs, site ledgers, checkpoints, metrics,
samples and ``summary.json``.

When the project ships a pretrained starting point (``common/pretrained/demo.pt``, made by
``fedsynth pretrain`` on public data disjoint from the demo set), the federation starts from it:
its model, diffusion settings and image size are taken from that checkpoint, so they fit.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path

from client.ledger import init_ledger
from common.config import config_to_dict, load_federation_config, write_yaml
from common.errors import ConfigError
from common.fileio import write_bytes_atomic, write_json_atomic
from common.checkpoint import load_checkpoint
from server.simulation import run_simulation
from server.synthetic_set import SampleRequest, generate_synthetic_set, init_summary

DEMO_DATA = Path(__file__).resolve().parents[1] / "common" / "demo_data"
DEMO_PRETRAINED = Path(__file__).resolve().parents[1] / "common" / "pretrained" / "demo.pt"
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
# Share of each class held by each hospital (columns sum to 1): hospitals differ in case mix.
CLASS_SHARES = {
    "hospital-a": (0.6, 0.2, 0.2, 0.1),
    "hospital-b": (0.2, 0.6, 0.2, 0.2),
    "hospital-c": (0.2, 0.2, 0.6, 0.7),
}


@dataclass(frozen=True)
class DemoSettings:
    rounds: int = 4
    local_steps: int = 30
    batch_size: int = 8
    image_size: int = 32
    noise_multiplier: float = 1.5
    max_grad_norm: float = 1.0
    site_epsilon: float = 10.0
    site_delta: float = 1e-5
    channels: tuple[int, ...] = (16, 32, 32)
    num_samples: int = 32
    sample_steps: int = 50
    guidance: float = 1.0
    seed: int = 0
    # Start from DEMO_PRETRAINED when the project ships it; False: the seeded random init.
    use_pretrained: bool = True


def demo_init_checkpoint(settings: DemoSettings) -> Path | None:
    """The shipped pretrained starting point, if there is one and the demo may use it."""
    return DEMO_PRETRAINED if settings.use_pretrained and DEMO_PRETRAINED.is_file() else None


def split_demo_data(data_dir: Path, sites: dict[str, tuple[float, ...]], seed: int) -> dict[str, list[tuple[str, str]]]:
    """(relative file, class) per site; every image goes to exactly one hospital."""
    rng = random.Random(seed)
    split: dict[str, list[tuple[str, str]]] = {site: [] for site in sites}
    for c, name in enumerate(CLASSES):
        files = sorted(p.relative_to(data_dir).as_posix() for p in (data_dir / name).glob("*.png"))
        if not files:
            raise ConfigError(f"{data_dir / name}: the demo data is missing (re-install fedsynth or run bench/make_demo_data.py)")
        rng.shuffle(files)
        start = 0
        for i, (site, shares) in enumerate(sites.items()):
            stop = len(files) if i == len(sites) - 1 else start + round(shares[c] * len(files))
            split[site] += [(f, name) for f in files[start:stop]]
            start = stop
    return split


def _write_labels_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "label"])
    writer.writerows(rows)
    write_bytes_atomic(path, buffer.getvalue().encode("utf-8"))


def write_demo_configs(out: Path, s: DemoSettings, init_checkpoint: Path | None = None) -> tuple[Path, list[Path]]:
    """The federation config and one site config per hospital, inside ``out``.

    With ``init_checkpoint`` the federation starts from it, with the model, diffusion settings and
    image size embedded in it (``DemoSettings.channels`` and ``image_size`` then do not apply).
    """
    federation = {
        "federation": {"output_dir": str(out / "server"), "num_rounds": s.rounds, "min_train_nodes": len(CLASS_SHARES),
                       "min_available_nodes": len(CLASS_SHARES), "round_timeout_s": 1800.0},
        "model": {"classes": list(CLASSES), "channels": list(s.channels),
                  "attention_levels": [False] * (len(s.channels) - 1) + [True],
                  "num_res_blocks": 1, "norm_num_groups": 8, "num_head_channels": 8},
        # the shipped checkpoint's schedule, so that --random-init differs from it only in the start; at 32 px
        # cosine keeps more of the class in the images than linear_beta (docs/benchmarks.md)
        "diffusion": {"num_train_timesteps": 1000, "schedule": "cosine"},
        "training": {"local_steps": s.local_steps, "batch_size": s.batch_size, "learning_rate": 1e-3,
                     "label_dropout": 0.1, "seed": s.seed},
        "privacy": {"enabled": True, "noise_multiplier": s.noise_multiplier, "max_grad_norm": s.max_grad_norm,
                    "accountant": "prv"},
        "data": {"image_size": s.image_size, "pixel_spacing_mm": 1.0},
    }
    if init_checkpoint is not None:
        init = load_checkpoint(init_checkpoint)
        if tuple(init.config.model.classes) != CLASSES:
            raise ConfigError(f"{init_checkpoint}: its classes {list(init.config.model.classes)} are not the demo's "
                              f"{list(CLASSES)}; retrain it with `fedsynth pretrain` on these classes or remove it")
        federation["model"] = {**config_to_dict(init.config.model), "init_checkpoint": str(Path(init_checkpoint).resolve())}
        federation["diffusion"] = config_to_dict(init.config.diffusion)
        federation["data"]["image_size"] = init.config.data.image_size
    fed_path = write_yaml(out / "federation.yaml", federation)
    site_paths = []
    for site, rows in split_demo_data(DEMO_DATA, CLASS_SHARES, s.seed).items():
        site_dir = out / "sites" / site
        _write_labels_csv(site_dir / "labels.csv", rows)
        site_paths.append(write_yaml(site_dir / "site.yaml", {
            "site_id": site, "data_dir": str(DEMO_DATA), "labels_csv": str(site_dir / "labels.csv"),
            "state_dir": str(site_dir / "state"),
            "privacy_budget": {"epsilon": s.site_epsilon, "delta": s.site_delta},
        }))
        init_ledger(site_dir / "state", site)  # what each hospital's admin does once (`fedsynth site init`)
    return fed_path, site_paths


def run_demo(out: Path, settings: DemoSettings = DemoSettings(), progress: bool = True) -> dict:
    out = out.resolve()
    if (out / "summary.json").exists() or (out / "server" / "checkpoints").exists():
        raise ConfigError(f"{out} already holds a demo run; choose a new --out (site ledgers and checkpoints are never overwritten)")
    fed_path, site_paths = write_demo_configs(out, settings, demo_init_checkpoint(settings))
    cfg = load_federation_config(fed_path)
    result = run_simulation(cfg, fed_path, site_paths, out, progress=progress)
    samples = out / "samples"
    generate_synthetic_set(SampleRequest(checkpoint=cfg.federation.final_model_path, num=settings.num_samples, out=samples,
                                         steps=settings.sample_steps, guidance=settings.guidance, seed=settings.seed),
                           progress=progress)
    final = load_checkpoint(cfg.federation.final_model_path)
    summary = {
        "rounds_completed": final.rounds_completed,
        "checkpoint": str(cfg.federation.final_model_path),
        "samples_dir": str(samples),
        "contact_sheet": str(samples / "contact_sheet.png"),
        "metrics_file": str(cfg.federation.metrics_file),
        "run_id": result.run_id,
        "init": init_summary(final.provenance),
        "federation_seconds": round(result.seconds, 1),
        "sites": [{"site_id": site, "num_examples": int(info.get("num_examples", 0)),
                   "epsilon": info.get("epsilon"), "delta": info.get("delta")}
                  for site, info in sorted(final.sites.items())],
    }
    write_json_atomic(out / "summary.json", summary)
    return summary
